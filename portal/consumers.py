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
