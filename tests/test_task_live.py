"""/ws/tasks/{id}/: a subscriber gets every kept event of the task once and in order: the replay after
`?after=`, live events, gaps refilled from what is kept, and a dropped last event fetched while the
socket is quiet. Outsiders get nothing; staff viewing as the customer watch its tasks while the view-as
session runs."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from django.utils import timezone

from crm import services as crm_services
from crm.middleware import VIEW_AS_SESSION_KEY
from crm.models import StaffRole, ViewAsSession
from hosting import services
from hosting.models import Task, TaskState
from portal.routing import websocket_urlpatterns
from tests.factories import UserFactory, make_tenant, staff_with_role
from tests.test_live import redis_layer

pytestmark = pytest.mark.django_db(transaction=True, serialized_rollback=True)


@pytest.fixture
def fast_resync(settings):
    settings.PORTAL_TASK_SOCKET_RESYNC_SECONDS = 0.2


def _task(owner, state=TaskState.RUNNING) -> Task:
    tenant = make_tenant(owner=owner)
    return Task.objects.create(
        tenant=tenant, created_by=owner, name="train", framework="custom", image="", command="true", state=state
    )


async def _keep(task, count, *, push=True):
    """Keep `count` log events of the task; with push=False the channel layer never sees them."""

    def keep():
        lines = [("log", {"text": f"line {task.last_seq + i + 1}"}) for i in range(count)]
        if push:
            services._events(task, lines)
        else:
            original = services._push
            services._push = lambda *args: None
            try:
                services._events(task, lines)
            finally:
                services._push = original

    await sync_to_async(keep)()


async def _subscribe(user, task, after=None, session=None):
    path = f"/ws/tasks/{task.pk}/" + (f"?after={after}" if after is not None else "")
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = user
    if session is not None:
        communicator.scope["session"] = session
    connected, code = await communicator.connect()
    return communicator, connected, code


async def _receive(communicator, count, timeout=3):
    return [await communicator.receive_json_from(timeout=timeout) for _ in range(count)]


@pytest.mark.redis
async def test_replay_after_a_sequence_then_live_events_once_each_on_the_redis_layer(settings):
    with override_settings(CHANNEL_LAYERS=redis_layer(settings)):
        channel_layers.backends.clear()
        owner = await sync_to_async(UserFactory)()
        task = await sync_to_async(_task)(owner)
        await _keep(task, 5)

        socket, connected, _ = await _subscribe(owner, task, after=2)
        assert connected
        replayed = await _receive(socket, 3)
        assert [e["seq"] for e in replayed] == [3, 4, 5]
        assert replayed[0]["data"] == {"text": "line 3"} and replayed[0]["kind"] == "log"

        await _keep(task, 2)
        live = await _receive(socket, 2)
        assert [e["seq"] for e in live] == [6, 7]
        assert await socket.receive_nothing(timeout=0.3), "nothing is sent twice"
        await socket.disconnect()
        channel_layers.backends.clear()


async def test_a_bad_after_replays_everything():
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    await _keep(task, 2)
    socket, connected, _ = await _subscribe(owner, task, after="x")
    assert connected
    assert [e["seq"] for e in await _receive(socket, 2)] == [1, 2]
    await socket.disconnect()


async def test_an_event_dropped_in_the_middle_is_refilled_when_the_next_arrives(settings):
    settings.PORTAL_TASK_SOCKET_RESYNC_SECONDS = 60  # only the gap path may deliver it here
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    socket, connected, _ = await _subscribe(owner, task)
    assert connected
    await _keep(task, 1)
    await _keep(task, 1, push=False)
    assert [e["seq"] for e in await _receive(socket, 1)] == [1]
    assert await socket.receive_nothing(timeout=0.3)
    await _keep(task, 1)
    assert [e["seq"] for e in await _receive(socket, 2)] == [2, 3]
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_a_dropped_last_event_arrives_while_the_socket_is_quiet(fast_resync):
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    socket, connected, _ = await _subscribe(owner, task)
    assert connected
    await _keep(task, 2)
    assert [e["seq"] for e in await _receive(socket, 2)] == [1, 2]
    await _keep(task, 2, push=False)  # the layer lost the tail: nothing will follow it
    tail = await _receive(socket, 2, timeout=3)
    assert [e["seq"] for e in tail] == [3, 4]
    assert await socket.receive_nothing(timeout=1), "the resync sends nothing twice"
    await socket.disconnect()


async def test_the_final_state_event_is_delivered_even_if_the_layer_drops_it(fast_resync):
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    socket, connected, _ = await _subscribe(owner, task)
    assert connected

    def finish_unheard():
        original = services._push
        services._push = lambda *args: None
        try:
            services._events(task, [("state", {"state": TaskState.SUCCEEDED})])
            Task.objects.filter(pk=task.pk).update(state=TaskState.SUCCEEDED)
        finally:
            services._push = original

    await sync_to_async(finish_unheard)()
    event = await socket.receive_json_from(timeout=3)
    assert event["kind"] == "state" and event["data"]["state"] == TaskState.SUCCEEDED
    assert await socket.receive_nothing(timeout=1)
    await socket.disconnect()


async def test_outsiders_and_anonymous_users_get_not_found_and_members_may_watch():
    from django.contrib.auth.models import AnonymousUser

    owner, outsider, viewer = [await sync_to_async(UserFactory)() for _ in range(3)]
    task = await sync_to_async(_task)(owner)
    await sync_to_async(lambda: task.tenant.memberships.create(user=viewer, role="viewer"))()
    await sync_to_async(make_tenant)(owner=outsider, name="Other")
    await _keep(task, 1)

    for user in (outsider, AnonymousUser()):
        socket, connected, code = await _subscribe(user, task)
        assert not connected and code == 4404
    missing = Task(pk=uuid.uuid4())
    socket, connected, code = await _subscribe(owner, missing)
    assert not connected and code == 4404

    socket, connected, _ = await _subscribe(viewer, task)
    assert connected
    assert [e["seq"] for e in await _receive(socket, 1)] == [1]
    await socket.disconnect()
    await asyncio.sleep(0)


# --- Staff viewing as the customer -----------------------------------------------------------------


def _viewing(task):
    """An admin member of staff with a tenant of their own (and a task there), viewing as `task`'s tenant."""
    staff = staff_with_role(StaffRole.ADMIN)
    own_task = _task(staff)
    session = crm_services.view_as_start(tenant=task.tenant, actor=staff, reason="Ticket #9: the log stops")
    return staff, own_task, session


async def test_staff_viewing_as_the_customer_watch_its_tasks_live_log_and_only_its():
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    await _keep(task, 2)
    staff, own_task, view = await sync_to_async(_viewing)(task)
    viewing = {VIEW_AS_SESSION_KEY: str(view.pk)}

    _socket, connected, code = await _subscribe(staff, task)  # not a member, not viewing: nothing
    assert not connected and code == 4404

    socket, connected, _ = await _subscribe(staff, task, session=viewing)
    assert connected
    assert [e["seq"] for e in await _receive(socket, 2)] == [1, 2]
    await _keep(task, 1)
    assert [e["seq"] for e in await _receive(socket, 1)] == [3]
    await socket.disconnect()

    _socket, connected, code = await _subscribe(staff, own_task, session=viewing)  # the page is the customer's
    assert not connected and code == 4404

    await sync_to_async(crm_services.view_as_stop)(session=view, actor=staff)
    _socket, connected, code = await _subscribe(staff, task, session=viewing)
    assert not connected and code == 4404
    own, connected, _ = await _subscribe(staff, own_task)  # a member watching their own task, as before
    assert connected
    await own.disconnect()


async def test_a_task_socket_of_a_view_as_session_closes_when_it_expires():
    owner = await sync_to_async(UserFactory)()
    task = await sync_to_async(_task)(owner)
    staff, _own_task, view = await sync_to_async(_viewing)(task)
    soon = timezone.now() + timedelta(seconds=1)
    await sync_to_async(lambda: ViewAsSession.objects.filter(pk=view.pk).update(expires_at=soon))()
    socket, connected, _ = await _subscribe(staff, task, session={VIEW_AS_SESSION_KEY: str(view.pk)})
    assert connected
    assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}
