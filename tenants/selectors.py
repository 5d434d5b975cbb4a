"""Reads for tenants. Every function takes the tenant it reads from."""

from dataclasses import dataclass

from django.db.models import QuerySet, Sum
from django.utils.translation import gettext as _

from tenants.models import (
    ApiToken,
    AuditEvent,
    GpuQuota,
    Invitation,
    InvitationStatus,
    Membership,
    QuotaReservation,
    SshKey,
    Tenant,
    TenantQuota,
)
from tenants.services import _RESERVABLE


def members_of(tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by("created_at", "id")


def pending_invitations_of(tenant: Tenant) -> QuerySet[Invitation]:
    return Invitation.objects.filter(tenant=tenant, status=InvitationStatus.PENDING).select_related("invited_by")


def ssh_keys_of(tenant: Tenant) -> QuerySet[SshKey]:
    return SshKey.objects.filter(tenant=tenant).select_related("owner")


def api_tokens_of(tenant: Tenant, *, user=None) -> QuerySet[ApiToken]:
    tokens = ApiToken.objects.filter(tenant=tenant).select_related("user")
    return tokens.filter(user=user) if user is not None else tokens


def audit_events_of(tenant: Tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant).select_related("actor")


@dataclass(frozen=True)
class QuotaLine:
    key: str
    label: str
    used: int
    limit: int

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return 100 if self.used else 0
        return min(100, round(100 * self.used / self.limit))

    @property
    def free(self) -> int:
        return max(self.limit - self.used, 0)


def quota_usage(tenant: Tenant) -> list[QuotaLine]:
    """Each limit of the tenant with what its active reservations use (four queries whatever the size)."""
    quota = TenantQuota.objects.get(tenant=tenant)
    active = QuotaReservation.objects.filter(tenant=tenant, released_at__isnull=True)
    used = active.aggregate(**{name: Sum(name) for name, _field, _label in _RESERVABLE})
    gpu_used = dict(
        active.filter(gpus__gt=0).values("gpu_model__code").annotate(n=Sum("gpus")).values_list("gpu_model__code", "n")
    )
    lines = [
        QuotaLine(
            key=f"gpu:{g.gpu_model.code}",
            label=_("%(model)s GPUs") % {"model": g.gpu_model.code},
            used=gpu_used.get(g.gpu_model.code, 0),
            limit=g.limit,
        )
        for g in GpuQuota.objects.filter(tenant=tenant)
        .select_related("gpu_model")
        .order_by("gpu_model__display_order", "gpu_model__code")
    ]
    lines += [
        QuotaLine(key=field, label=str(label), used=used[name] or 0, limit=getattr(quota, field))
        for name, field, label in _RESERVABLE
    ]
    return lines
