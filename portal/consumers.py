from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from portal.events import dashboard_group
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY


@database_sync_to_async
def _active_tenant_id(user, session) -> int | None:
    from tenants.models import Membership

    if not user.is_authenticated:
        return None
    wanted = session.get(ACTIVE_TENANT_SESSION_KEY) if session is not None else None
    memberships = Membership.objects.filter(user=user)
    membership = memberships.filter(tenant_id=wanted).first() if wanted else None
    membership = membership or memberships.order_by("tenant__kind", "created_at").first()
    return membership.tenant_id if membership else None


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    """/ws/dashboard/: live status of the active tenant's resources. Members only."""

    async def connect(self):
        self.tenant_id = await _active_tenant_id(self.scope["user"], self.scope.get("session"))
        if self.tenant_id is None:
            await self.close(code=4403)
            return
        self.group = dashboard_group(self.tenant_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def dashboard_event(self, event):
        await self.send_json({"kind": event["kind"], "payload": event["payload"]})


@database_sync_to_async
def _task_for(user, task_id):
    """The task when the user may watch it (a member of its tenant who sees compute), else None."""
    from hosting.models import Task
    from tenants.models import Membership
    from tenants.roles import Capability, role_can

    if not user.is_authenticated:
        return None
    task = Task.objects.filter(pk=task_id).only("pk", "tenant_id").first()
    if task is None:
        return None
    role = Membership.objects.filter(user=user, tenant_id=task.tenant_id).values_list("role", flat=True).first()
    return task if role and role_can(role, Capability.VIEW_COMPUTE) else None


@database_sync_to_async
def _events_after(task_id, after: int) -> list[dict]:
    from hosting.models import TaskEvent

    return [
        {"seq": e.seq, "at": e.at.isoformat(), "kind": e.kind, "data": e.data}
        for e in TaskEvent.objects.filter(task_id=task_id, seq__gt=after).order_by("seq")[:5000]
    ]


class TaskConsumer(AsyncJsonWebsocketConsumer):
    """/ws/tasks/{id}/?after=SEQ: the task's events, every one once, in order.

    Joins the live group first, then replays what is kept after `after`, then forwards live events,
    dropping any it already sent: a reconnecting browser misses nothing and sees nothing twice.
    """

    async def connect(self):
        from urllib.parse import parse_qs

        task_id = self.scope["url_route"]["kwargs"]["task_id"]
        task = await _task_for(self.scope["user"], task_id)
        if task is None:
            await self.close(code=4404)  # not found, whether it exists elsewhere or not
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        try:
            self.last_sent = max(int(query.get("after", ["0"])[0]), 0)
        except ValueError:
            self.last_sent = 0
        self.group = f"task.{task.pk}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        while True:  # replay in pages until caught up with what is kept
            backlog = await _events_after(task.pk, self.last_sent)
            if not backlog:
                break
            await self._send_events(backlog)

    async def disconnect(self, code):
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def task_events(self, message):
        await self._send_events(message["events"])

    async def _send_events(self, events):
        fresh = [e for e in events if e["seq"] > self.last_sent]
        if not fresh:
            return
        if fresh[0]["seq"] != self.last_sent + 1:  # a gap: fetch the missing ones from what is kept
            fresh = await _events_after(self.group.split(".", 1)[1], self.last_sent)
        for event in fresh:
            await self.send_json(event)
        self.last_sent = fresh[-1]["seq"]
