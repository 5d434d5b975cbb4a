"""/ws/dashboard/: members of a tenant get its live events through the channel layer, and so does staff
viewing as the customer while the view-as session runs; nobody else does."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from django.utils import timezone

from crm.middleware import VIEW_AS_SESSION_KEY
from crm.models import StaffProfile, StaffRole, ViewAsSession
from portal.routing import websocket_urlpatterns
from tenants import services
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY
from tenants.services import ResourceDemand
from tests.factories import UserFactory, make_tenant, staff_with_role

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


async def connect(user, tenant=None, view_as=None):
    scope_session = {ACTIVE_TENANT_SESSION_KEY: tenant.pk} if tenant else {}
    if view_as is not None:
        scope_session[VIEW_AS_SESSION_KEY] = str(view_as.pk)
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


# --- Staff viewing as a customer ---------------------------------------------------------------------


def view_as(staff, tenant, **changes) -> ViewAsSession:
    from crm import services as crm_services

    session = crm_services.view_as_start(tenant=tenant, actor=staff, reason="Ticket #7: dashboard looks stale")
    if changes:
        ViewAsSession.objects.filter(pk=session.pk).update(**changes)
        session.refresh_from_db()
    return session


def staff_and_customer():
    staff = staff_with_role(StaffRole.ADMIN)
    own = make_tenant(owner=staff, name="Staff's own")
    customer = make_tenant(name="Acme AI")
    return staff, own, customer


async def test_viewing_as_a_customer_the_dashboard_gets_its_events_not_the_staff_members_own():
    staff, own, customer = await sync_to_async(staff_and_customer)()
    session = await sync_to_async(view_as)(staff, customer)
    communicator, connected, _ = await connect(staff, own, view_as=session)
    assert connected
    await sync_to_async(_reserve)(own)
    assert await communicator.receive_nothing(timeout=0.3)  # the page shows the customer, not the staff's tenant
    await sync_to_async(_reserve)(customer)
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "quota.changed"
    await communicator.disconnect()

    plain, connected, _ = await connect(staff, own)  # no view-as in the session: the staff's own, as before
    assert connected
    await sync_to_async(services.quota_release)(holder_type="vm", holder_id=f"t{own.pk}")
    assert (await plain.receive_json_from(timeout=5))["kind"] == "quota.changed"
    await plain.disconnect()


async def test_an_ended_expired_or_foreign_view_as_session_is_refused_not_swapped_for_the_own_tenant():
    from crm import services as crm_services

    staff, own, customer = await sync_to_async(staff_and_customer)()
    stopped = await sync_to_async(view_as)(staff, customer)
    await sync_to_async(crm_services.view_as_stop)(session=stopped, actor=staff)
    _communicator, connected, code = await connect(staff, own, view_as=stopped)
    assert not connected and code == 4403

    expired = await sync_to_async(view_as)(staff, customer, expires_at=timezone.now() - timedelta(seconds=1))
    _communicator, connected, code = await connect(staff, own, view_as=expired)
    assert not connected and code == 4403

    colleague = await sync_to_async(staff_with_role)(StaffRole.ADMIN)
    await sync_to_async(make_tenant)(owner=colleague, name="Colleague's")
    theirs = await sync_to_async(view_as)(staff, customer)
    _communicator, connected, code = await connect(colleague, None, view_as=theirs)  # another's session id
    assert not connected and code == 4403

    await database_sync_to_async(lambda: StaffProfile.objects.filter(user=staff).update(role=StaffRole.SUPPORT))()
    demoted = await database_sync_to_async(type(staff).objects.get)(pk=staff.pk)  # as the next socket loads them
    _communicator, connected, code = await connect(demoted, own, view_as=theirs)  # no longer allowed to view as
    assert not connected and code == 4403


async def test_the_socket_closes_when_the_view_as_session_expires():
    staff, own, customer = await sync_to_async(staff_and_customer)()
    session = await sync_to_async(view_as)(staff, customer, expires_at=timezone.now() + timedelta(seconds=1))
    communicator, connected, _ = await connect(staff, own, view_as=session)
    assert connected
    closed = await communicator.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4403}  # live.js does not reconnect on 4403
