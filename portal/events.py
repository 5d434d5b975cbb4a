"""Live events to browsers. Services call emit_* after their transaction commits;
consumers only authorise, subscribe and forward."""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction


def dashboard_group(tenant_id: int) -> str:
    return f"dashboard.tenant.{tenant_id}"


def emit_dashboard_event(tenant_id: int, kind: str, payload: dict) -> None:
    """Push one event to every dashboard open on the tenant, once the current transaction commits."""

    def send():
        async_to_sync(get_channel_layer().group_send)(
            dashboard_group(tenant_id), {"type": "dashboard.event", "kind": kind, "payload": payload}
        )

    transaction.on_commit(send)
