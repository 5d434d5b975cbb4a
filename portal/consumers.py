import asyncio
from datetime import datetime

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from crm.middleware import VIEW_AS_SESSION_KEY
from portal.events import dashboard_group
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY

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
def _task_progress(task_id) -> tuple[int, bool]:
    """(last kept sequence number, whether the task has ended)."""
    from hosting.models import FINISHED_TASK_STATES, Task

    last_seq, state = Task.objects.filter(pk=task_id).values_list("last_seq", "state").get()
    return last_seq, state in FINISHED_TASK_STATES


class TaskConsumer(LiveConsumer):
    """/ws/tasks/{id}/?after=SEQ: the task's events, every one once, in order.

    Joins the live group first, then replays what is kept after `after`, then forwards live events,
    dropping any it already sent: a reconnecting browser misses nothing and sees nothing twice.

    The channel layer may drop a message (channels_redis does when a server's inbox is full). A
    dropped event in the middle shows as a gap when the next one arrives and is refilled from what is
    kept. A dropped *last* event has no successor, so while the socket is quiet the consumer asks the
    database, with backoff, whether the task kept more than it sent; it stops asking once the task has
    ended and everything was sent.
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
        self.resync = asyncio.create_task(self._resync_while_quiet())
        self.close_at(ends_at)

    async def disconnect(self, code):
        self.cancel_close()
        resync = getattr(self, "resync", None)
        if resync is not None:
            resync.cancel()
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

    async def _resync_while_quiet(self) -> None:
        first = settings.PORTAL_TASK_SOCKET_RESYNC_SECONDS
        delay = first
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(delay)
            quiet = loop.time() - self.last_activity
            if quiet < delay:  # events are flowing: any gap is refilled by the next one
                continue
            last_seq, ended = await _task_progress(self.task_id)
            if last_seq > self.last_sent:
                await self._catch_up()
                delay = first
            elif ended:
                return
            else:
                delay = min(delay * 2, settings.PORTAL_TASK_SOCKET_RESYNC_MAX_SECONDS)
