"""The append-only audit log: every state change goes through audit_record()."""

from typing import Any

from django.db import models

from portal.context import current
from tenants.models import AuditEvent, Tenant


def snapshot(obj: models.Model, fields: list[str]) -> dict[str, Any]:
    """A JSON-safe picture of some fields of an object, for before/after."""
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, models.Model):
            value = value.pk
        elif value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            value = str(value)
        out[name] = value
    return out


def audit_record(
    *,
    actor,
    tenant: Tenant | None,
    action: str,
    target: models.Model | None = None,
    before: dict | None = None,
    after: dict | None = None,
    via: str | None = None,
) -> AuditEvent:
    context = current()
    is_person = actor is not None and getattr(actor, "is_authenticated", False)
    return AuditEvent.objects.create(
        actor=actor if is_person else None,
        actor_label=actor.email if is_person else "system",
        tenant=tenant,
        action=action,
        target_type=target._meta.model_name if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_repr=str(target)[:200] if target is not None else "",
        before=before,
        after=after,
        source_ip=context.source_ip,
        request_id=context.request_id,
        via=via or context.via,
    )
