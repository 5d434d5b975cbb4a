"""/ws/dashboard/: members of a tenant get its live events through the channel layer, nobody else does."""

import asyncio
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from portal.routing import websocket_urlpatterns
from tenants import services
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY
from tenants.services import ResourceDemand
from tests.factories import UserFactory, make_tenant

pytestmark = pytest.mark.django_db(transaction=True, serialized_rollback=True)


def redis_layer(settings):
    """The real Redis layer, with a prefix of its own so parallel runs never cross."""
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": settings.REDIS_URL, "socket_timeout": 30}],
                "prefix": f"test-{uuid.uuid4().hex[:8]}",
            },
        }
    }


async def connect(user, tenant=None):
    scope_session = {ACTIVE_TENANT_SESSION_KEY: tenant.pk} if tenant else {}
    app = URLRouter(websocket_urlpatterns)
    communicator = WebsocketCommunicator(app, "/ws/dashboard/")
    communicator.scope["user"] = user
    communicator.scope["session"] = scope_session
    connected, code = await communicator.connect()
    return communicator, connected, code


@pytest.mark.redis
async def test_quota_change_reaches_every_dashboard_of_the_tenant_and_no_other(settings):
    from channels.layers import channel_layers

    with override_settings(CHANNEL_LAYERS=redis_layer(settings)):
        channel_layers.backends.clear()
        alice, bob, eve = await database_sync_to_async(lambda: (UserFactory(), UserFactory(), UserFactory()))()
        tenant = await sync_to_async(make_tenant)(owner=alice)
        await database_sync_to_async(lambda: tenant.memberships.create(user=bob, role="viewer"))()
        await sync_to_async(make_tenant)(owner=eve, name="Eve's")

        sockets = []
        for user, own in ((alice, tenant), (bob, tenant), (eve, None)):
            communicator, connected, _ = await connect(user, own)
            assert connected
            sockets.append(communicator)

        await sync_to_async(services.quota_reserve)(
            tenant=tenant, holder_type="vm", holder_id="42", demand=ResourceDemand(vcpus=4, vms=1)
        )
        for communicator in sockets[:2]:
            assert await communicator.receive_json_from(timeout=5) == {"kind": "quota.changed", "payload": {}}
        assert await sockets[2].receive_nothing(timeout=0.5)
        for communicator in sockets:
            await communicator.disconnect()
        channel_layers.backends.clear()


async def test_anonymous_and_tenantless_users_are_refused():
    from django.contrib.auth.models import AnonymousUser

    _communicator, connected, code = await connect(AnonymousUser())
    assert not connected and code == 4403
    lonely = await database_sync_to_async(UserFactory)()
    _communicator, connected, code = await connect(lonely)
    assert not connected and code == 4403


async def test_session_cannot_pick_a_tenant_the_user_is_not_in():
    alice, mallory = await database_sync_to_async(lambda: (UserFactory(), UserFactory()))()
    victim = await sync_to_async(make_tenant)(owner=alice)
    own = await sync_to_async(make_tenant)(owner=mallory, name="Mallory's")
    communicator, connected, _ = await connect(mallory, victim)  # a forged session value
    assert connected
    await sync_to_async(services.quota_release)(holder_type="vm", holder_id="none")  # nothing to release: no event
    await sync_to_async(_reserve)(victim)
    assert await communicator.receive_nothing(timeout=0.3)
    await sync_to_async(_reserve)(own)
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "quota.changed"
    await communicator.disconnect()


def _reserve(tenant):
    services.quota_reserve(tenant=tenant, holder_type="vm", holder_id=f"t{tenant.pk}", demand=ResourceDemand(vms=1))


@pytest.mark.redis
async def test_an_idle_subscriber_stays_connected_on_the_redis_layer():
    """A dashboard open with nothing happening must not die when the layer's blocking read idles."""
    owner = await database_sync_to_async(UserFactory)()
    tenant = await sync_to_async(make_tenant)(owner=owner)
    communicator, connected, _ = await connect(owner, tenant)
    assert connected
    await asyncio.sleep(7)  # past redis-py's default 5 s socket timeout
    assert await communicator.receive_nothing(timeout=0.5)
    await sync_to_async(_reserve)(tenant)
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "quota.changed"
    await communicator.disconnect()
