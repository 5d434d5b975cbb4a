import asyncio
import logging
import weakref
from datetime import datetime

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from crm.middleware import VIEW_AS_SESSION_KEY
from portal.events import dashboard_group
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY

logger = logging.getLogger(__name__)

# The close code a page's script takes as "not allowed, do not retry" (static/js/live.js, the task page).
REFUSED = 4403


class ViewAsEnded(Exception):
    """The session holds a view-as session that is no longer running (expired, stopped, or the staff
    member lost the right): the socket belongs to a customer's page, so it is refused rather than
    quietly given the staff member's own tenant. The next page load ends it (crm.middleware)."""


def _view_as(user, session):
    """The running ViewAsSession this socket's session holds (crm.middleware.ViewAsMiddleware's
    rules: the staff member's own, not ended, not expired, still allowed), None when it holds none;
    raises ViewAsEnded when it holds one that is no longer running."""
    from crm.models import ViewAsSession
    from crm.permissions import StaffCapability, staff_can

    session_id = session.get(VIEW_AS_SESSION_KEY) if session is not None else None
    if not session_id:
        return None
    view = (
        ViewAsSession.objects.filter(pk=session_id, staff=user, ended_at__isnull=True).select_related("tenant").first()
    )
    if view is None or not view.is_active() or not staff_can(user, StaffCapability.VIEW_AS, view.tenant):
        raise ViewAsEnded
    return view


@database_sync_to_async
def _active_tenant_id(user, session) -> tuple[int | None, datetime | None]:
    """(the tenant whose dashboard events the socket gets, when that ends): during a view-as session
    the viewed customer's until the session expires, otherwise the active tenant's, for good."""
    from tenants.models import Membership

    if not user.is_authenticated:
        return None, None
    try:
        view = _view_as(user, session)
    except ViewAsEnded:
        return None, None
    if view is not None:
        return view.tenant_id, view.expires_at
    wanted = session.get(ACTIVE_TENANT_SESSION_KEY) if session is not None else None
    memberships = Membership.objects.filter(user=user)
    membership = memberships.filter(tenant_id=wanted).first() if wanted else None
    membership = membership or memberships.order_by("tenant__kind", "created_at").first()
    return (membership.tenant_id, None) if membership else (None, None)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Forwards channel-layer messages without channels' per-message hop to a sync thread.

    AsyncConsumer.dispatch runs close_old_connections in the sync thread pool before every handler,
    so that handlers touching the ORM don't use stale connections. Our forwarding handlers reach the
    database only through database_sync_to_async, which does that itself; the hop per message would
    otherwise cost a thread switch for every event of every subscriber (thousands a second).
    """

    forwarded_types = frozenset()

    async def dispatch(self, message):
        if message.get("type") in self.forwarded_types:
            await getattr(self, message["type"].replace(".", "_"))(message)
            return
        await super().dispatch(message)

    def close_at(self, ends_at: datetime | None) -> None:
        """Close the socket (refused: no retry) when the view-as session it serves expires. Stopping
        one early navigates the page away, which closes the socket anyway."""
        if ends_at is not None:
            self.expiry = asyncio.create_task(self._close_after(max((ends_at - timezone.now()).total_seconds(), 0)))

    async def _close_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.close(code=REFUSED)

    def cancel_close(self) -> None:
        expiry = getattr(self, "expiry", None)
        if expiry is not None and expiry is not asyncio.current_task():
            expiry.cancel()


class DashboardConsumer(LiveConsumer):
    """/ws/dashboard/: live status of the active tenant's resources. Members only, and staff viewing
    as the customer (read-only, like the pages) while their view-as session runs."""

    forwarded_types = frozenset({"dashboard.event"})

    async def connect(self):
        self.tenant_id, ends_at = await _active_tenant_id(self.scope["user"], self.scope.get("session"))
        if self.tenant_id is None:
            await self.close(code=REFUSED)
            return
        self.group = dashboard_group(self.tenant_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.close_at(ends_at)

    async def disconnect(self, code):
        self.cancel_close()
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def dashboard_event(self, event):
        await self.send_json({"kind": event["kind"], "payload": event["payload"]})


@database_sync_to_async
def _task_for(user, task_id, session=None) -> tuple[object | None, datetime | None]:
    """(the task when the user may watch it, else None; when that right ends). A member of its
    tenant who sees compute may, for good; so may staff viewing as that tenant, as a viewer (the
    page's rights), until their view-as session expires. Read-only viewing includes a task's live log:
    the task page shows it to viewers."""
    from hosting.models import Task
    from tenants.models import Membership, Role
    from tenants.roles import Capability, role_can

    if not user.is_authenticated:
        return None, None
    task = Task.objects.filter(pk=task_id).only("pk", "tenant_id").first()
    if task is None:
        return None, None
    try:
        view = _view_as(user, session)
    except ViewAsEnded:
        return None, None
    if view is not None:
        allowed = view.tenant_id == task.tenant_id and role_can(Role.VIEWER, Capability.VIEW_COMPUTE)
        return (task, view.expires_at) if allowed else (None, None)
    role = Membership.objects.filter(user=user, tenant_id=task.tenant_id).values_list("role", flat=True).first()
    return (task, None) if role and role_can(role, Capability.VIEW_COMPUTE) else (None, None)


@database_sync_to_async
def _events_after(task_id, after: int) -> list[dict]:
    from hosting.models import TaskEvent

    return [
        {"seq": e.seq, "at": e.at.isoformat(), "kind": e.kind, "data": e.data}
        for e in TaskEvent.objects.filter(task_id=task_id, seq__gt=after).order_by("seq")[:5000]
    ]


@database_sync_to_async
def _tasks_progress(task_ids) -> dict:
    """{task id: (last kept sequence number, whether the task has ended)} in one query."""
    from hosting.models import FINISHED_TASK_STATES, Task

    rows = Task.objects.filter(pk__in=list(task_ids)).values_list("pk", "last_seq", "state")
    return {pk: (last_seq, state in FINISHED_TASK_STATES) for pk, last_seq, state in rows}


class _QuietSocketWatch:
    """Finds task sockets that missed their task's last events, for one server process (event loop).

    channels_redis drops a group_send silently when a server's inbox is full. A gap in the middle is
    refilled by the socket itself when the next event arrives; a dropped *last* event has no successor.
    So every PORTAL_TASK_SOCKET_RESYNC_SECONDS one query reads the kept sequence numbers of every task
    watched here, and each socket that has been quiet that long and is behind catches up from what is
    kept. One query per interval per process, however many sockets: polling per socket would put
    thousands of queries a second on the one thread Channels runs database work on. A socket leaves
    the watch when it closes, or once its task has ended and it has sent everything.
    """

    def __init__(self):
        self.sockets: dict = {}  # task id -> set of TaskConsumer
        self.runner: asyncio.Task | None = None
        self.catching_up: set[asyncio.Task] = set()

    def add(self, consumer) -> None:
        self.sockets.setdefault(consumer.task_id, set()).add(consumer)
        if self.runner is None or self.runner.done():
            self.runner = asyncio.get_running_loop().create_task(self._run())

    def discard(self, consumer) -> None:
        watchers = self.sockets.get(consumer.task_id)
        if watchers is not None:
            watchers.discard(consumer)
            if not watchers:
                del self.sockets[consumer.task_id]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.sockets:
            interval = settings.PORTAL_TASK_SOCKET_RESYNC_SECONDS
            await asyncio.sleep(interval)
            if not self.sockets:
                return
            try:
                progress = await _tasks_progress(self.sockets.keys())
            except Exception:  # the database is away for a moment: try again next interval
                logger.exception("Reading task progress for quiet sockets failed")
                continue
            now = loop.time()
            for task_id, consumers in list(self.sockets.items()):
                last_seq, ended = progress.get(task_id, (0, True))
                for consumer in list(consumers):
                    if last_seq > consumer.last_sent and now - consumer.last_activity >= interval:
                        consumer.last_activity = now  # one catch-up at a time per socket
                        catch_up = loop.create_task(consumer.catch_up_quietly())
                        self.catching_up.add(catch_up)  # the loop keeps only weak references to tasks
                        catch_up.add_done_callback(self.catching_up.discard)
                    elif ended and last_seq <= consumer.last_sent:
                        self.discard(consumer)


_watches: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _QuietSocketWatch]" = weakref.WeakKeyDictionary()


def _quiet_socket_watch() -> _QuietSocketWatch:
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _QuietSocketWatch()
    return watch


class TaskConsumer(LiveConsumer):
    """/ws/tasks/{id}/?after=SEQ: the task's events, every one once, in order.

    Joins the live group first, then replays what is kept after `after`, then forwards live events,
    dropping any it already sent: a reconnecting browser misses nothing and sees nothing twice.

    The channel layer may drop a message (channels_redis does when a server's inbox is full). A
    dropped event in the middle shows as a gap when the next one arrives and is refilled from what is
    kept. A dropped *last* event has no successor: _QuietSocketWatch notices that a quiet socket is
    behind what its task kept, and the socket catches up.
    """

    forwarded_types = frozenset({"task.events"})

    async def connect(self):
        from urllib.parse import parse_qs

        task_id = self.scope["url_route"]["kwargs"]["task_id"]
        task, ends_at = await _task_for(self.scope["user"], task_id, self.scope.get("session"))
        if task is None:
            await self.close(code=4404)  # not found, whether it exists elsewhere or not
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        try:
            self.last_sent = max(int(query.get("after", ["0"])[0]), 0)
        except ValueError:
            self.last_sent = 0
        self.task_id = task.pk
        self.sending = asyncio.Lock()
        self.last_activity = asyncio.get_running_loop().time()
        self.group = f"task.{task.pk}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._catch_up()
        _quiet_socket_watch().add(self)
        self.close_at(ends_at)

    async def disconnect(self, code):
        self.cancel_close()
        if getattr(self, "task_id", None) is not None:
            _quiet_socket_watch().discard(self)
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def task_events(self, message):
        async with self.sending:
            self.last_activity = asyncio.get_running_loop().time()
            fresh = [e for e in message["events"] if e["seq"] > self.last_sent]
            if not fresh:
                return
            if fresh[0]["seq"] != self.last_sent + 1:  # a gap: fetch the missing ones from what is kept
                fresh = await _events_after(self.task_id, self.last_sent)
            await self._send(fresh)

    async def _catch_up(self) -> None:
        async with self.sending:
            while True:  # in pages until caught up with what is kept
                backlog = await _events_after(self.task_id, self.last_sent)
                if not backlog:
                    return
                await self._send(backlog)

    async def _send(self, events) -> None:
        for event in events:
            await self.send_json(event)
        if events:
            self.last_sent = events[-1]["seq"]

    async def catch_up_quietly(self) -> None:
        try:
            await self._catch_up()
        except Exception:  # the socket closed meanwhile, or the database is away: the watch tries again
            logger.debug("Catching up task socket %s failed", self.channel_name, exc_info=True)
