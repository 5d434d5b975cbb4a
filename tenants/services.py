"""Writes for tenants, memberships, invitations, keys, tokens and quotas.

Every function here is the one place its state change happens: it checks the
actor's role, keeps the invariants (the last owner stays, quotas are never
exceeded), writes an audit event in the same transaction, and raises
ValidationError (field → message) or PermissionDenied on refusal, leaving
nothing half-done.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from portal.events import emit_dashboard_event
from provisioning.models import GpuModel
from tenants.audit import audit_record, snapshot
from tenants.models import (
    ApiToken,
    GpuQuota,
    Invitation,
    InvitationStatus,
    Membership,
    QuotaReservation,
    Role,
    SshKey,
    Tenant,
    TenantKind,
    TenantQuota,
    Tier,
    TierCode,
    User,
)
from tenants.roles import Capability, assignable_roles, role_can
from tenants.ssh import parse_public_key


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def require(membership: Membership, capability: Capability) -> None:
    if membership is None or not role_can(membership.role, capability):
        raise PermissionDenied(_("Your role in this tenant does not allow this."))


# --- Tenants -----------------------------------------------------------------


def _unique_slug(name: str) -> str:
    base = slugify(name)[:40] or "tenant"
    slug = base
    while Tenant.objects.filter(slug=slug).exists():
        slug = f"{base}-{secrets.token_hex(3)}"
    return slug


def _quota_from_tier(tenant: Tenant, tier: Tier) -> None:
    TenantQuota.objects.create(
        tenant=tenant,
        vcpus=tier.default_vcpus,
        memory_gib=tier.default_memory_gib,
        hugepages_gib=tier.default_hugepages_gib,
        vms=tier.default_vms,
        concurrent_tasks=tier.default_concurrent_tasks,
        storage_gib=tier.default_storage_gib,
    )
    models_by_code = {m.code: m for m in GpuModel.objects.all()}
    GpuQuota.objects.bulk_create(
        GpuQuota(tenant=tenant, gpu_model=model, limit=int(tier.default_gpus.get(code, 0)))
        for code, model in models_by_code.items()
    )


@transaction.atomic
def tenant_create(*, name: str, owner: User, kind: str = TenantKind.ORGANISATION) -> Tenant:
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": _("Give the organisation a name.")})
    if len(name) > 100:
        raise ValidationError({"name": _("Keep the name under 100 characters.")})
    tier = Tier.objects.get(code=TierCode.STANDARD)
    tenant = Tenant.objects.create(name=name, slug=_unique_slug(name), kind=kind, tier=tier)
    _quota_from_tier(tenant, tier)
    membership = Membership.objects.create(tenant=tenant, user=owner, role=Role.OWNER)
    audit_record(
        actor=owner,
        tenant=tenant,
        action="tenant.created",
        target=tenant,
        after=snapshot(tenant, ["name", "slug", "kind", "tier"]),
    )
    audit_record(
        actor=owner,
        tenant=tenant,
        action="member.added",
        target=membership,
        after={"user": owner.email, "role": Role.OWNER},
    )
    return tenant


def tenant_create_personal(*, user: User) -> Tenant:
    label = user.display_name or user.email.split("@")[0]
    return tenant_create(name=_("%(name)s's workspace") % {"name": label}, owner=user, kind=TenantKind.PERSONAL)


@transaction.atomic
def tenant_rename(*, membership: Membership, actor: User, name: str) -> Tenant:
    require(membership, Capability.MANAGE_MEMBERS)
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError({"name": _("The name must be 1 to 100 characters.")})
    tenant = Tenant.objects.select_for_update().get(pk=membership.tenant_id)
    before = snapshot(tenant, ["name"])
    tenant.name = name
    tenant.save(update_fields=["name"])
    audit_record(
        actor=actor,
        tenant=tenant,
        action="tenant.renamed",
        target=tenant,
        before=before,
        after=snapshot(tenant, ["name"]),
    )
    return tenant


# --- Invitations -------------------------------------------------------------


def _check_role_assignable(actor_membership: Membership, role: str, field: str = "role") -> None:
    if role not in Role.values:
        raise ValidationError({field: _("Choose one of: %(roles)s.") % {"roles": ", ".join(Role.values)}})
    if role not in assignable_roles(actor_membership.role):
        raise ValidationError({field: _("Only an owner can grant or change the owner role.")})


@transaction.atomic
def invitation_create(*, membership: Membership, actor: User, email: str, role: str) -> tuple[Invitation, str]:
    """Invite someone by email. Returns the invitation and the one-time link key (also emailed)."""
    require(membership, Capability.MANAGE_MEMBERS)
    email = (email or "").strip().lower()
    from django.core.validators import validate_email

    try:
        validate_email(email)
    except ValidationError as exc:
        raise ValidationError({"email": _("Enter a valid email address.")}) from exc
    _check_role_assignable(membership, role)
    tenant = membership.tenant
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise ValidationError({"email": _("%(email)s is already a member.") % {"email": email}})
    if Invitation.objects.filter(tenant=tenant, email=email, status=InvitationStatus.PENDING).exists():
        raise ValidationError({"email": _("%(email)s already has a pending invitation.") % {"email": email}})
    key = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        key_hash=_hash(key),
        invited_by=actor,
        expires_at=timezone.now() + timedelta(days=settings.PORTAL_INVITATION_DAYS),
    )
    audit_record(
        actor=actor, tenant=tenant, action="invitation.created", target=invitation, after={"email": email, "role": role}
    )
    link = reverse("invitation_accept", kwargs={"key": key})
    transaction.on_commit(lambda: _send_invitation_email(invitation.pk, link))
    _notify_invitee(invitation)
    return invitation, key


def _notify_invitee(invitation: Invitation) -> None:
    """Someone who already has an account also sees the invitation in the portal. The email above
    carries the secret link, so this one is never emailed (and never holds the link)."""
    from notifications.messages import bilingual
    from notifications.models import NotificationKind
    from notifications.services import notify

    invitee = User.objects.filter(email__iexact=invitation.email, is_active=True).first()
    if invitee is None:
        return
    notify(
        kind=NotificationKind.INVITATION_RECEIVED,
        users=[invitee],
        params={
            "tenant": invitation.tenant.name,
            "inviter": str(invitation.invited_by),
            "role": bilingual(Role(invitation.role).label),
        },
        dedupe_key=f"invitation:{invitation.pk}",
        email=False,
    )


def _send_invitation_email(invitation_id: int, link: str) -> None:
    invitation = Invitation.objects.select_related("tenant", "invited_by").get(pk=invitation_id)
    base = settings.PORTAL_BASE_URL.rstrip("/")
    context = {"invitation": invitation, "url": f"{base}{link}"}
    send_mail(
        subject=render_to_string("tenants/email/invitation_subject.txt", context).strip(),
        message=render_to_string("tenants/email/invitation_message.txt", context),
        from_email=None,
        recipient_list=[invitation.email],
    )


def invitation_for_key(key: str) -> Invitation | None:
    return Invitation.objects.select_related("tenant", "invited_by").filter(key_hash=_hash(key or "")).first()


@transaction.atomic
def invitation_accept(*, key: str, user: User) -> Membership:
    invitation = Invitation.objects.select_for_update().filter(key_hash=_hash(key or "")).first()
    if invitation is None or invitation.status == InvitationStatus.REVOKED:
        raise ValidationError(_("This invitation does not exist or was withdrawn."))
    if invitation.status == InvitationStatus.ACCEPTED:
        raise ValidationError(_("This invitation has already been accepted."))
    if invitation.is_expired:
        raise ValidationError(_("This invitation has expired. Ask for a new one."))
    from allauth.account.models import EmailAddress

    verified = EmailAddress.objects.filter(user=user, email__iexact=invitation.email, verified=True).exists()
    if not verified:
        raise ValidationError(
            _("This invitation was sent to %(email)s. Log in with that verified address to accept it.")
            % {"email": invitation.email}
        )
    if Membership.objects.filter(tenant=invitation.tenant, user=user).exists():
        raise ValidationError(_("You are already a member of %(tenant)s.") % {"tenant": invitation.tenant.name})
    membership = Membership.objects.create(tenant=invitation.tenant, user=user, role=invitation.role)
    invitation.status = InvitationStatus.ACCEPTED
    invitation.accepted_by = user
    invitation.accepted_at = timezone.now()
    invitation.save(update_fields=["status", "accepted_by", "accepted_at"])
    audit_record(
        actor=user,
        tenant=invitation.tenant,
        action="invitation.accepted",
        target=invitation,
        before={"status": InvitationStatus.PENDING},
        after={"status": InvitationStatus.ACCEPTED},
    )
    audit_record(
        actor=user,
        tenant=invitation.tenant,
        action="member.added",
        target=membership,
        after={"user": user.email, "role": invitation.role},
    )
    return membership


@transaction.atomic
def invitation_revoke(*, membership: Membership, actor: User, invitation: Invitation) -> None:
    require(membership, Capability.MANAGE_MEMBERS)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk, tenant=membership.tenant_id)
    if invitation.status != InvitationStatus.PENDING:
        raise ValidationError(_("Only a pending invitation can be withdrawn."))
    invitation.status = InvitationStatus.REVOKED
    invitation.save(update_fields=["status"])
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="invitation.revoked",
        target=invitation,
        before={"status": InvitationStatus.PENDING},
        after={"status": InvitationStatus.REVOKED},
    )


# --- Memberships -------------------------------------------------------------


def _lock_tenant_memberships(tenant_id: int) -> None:
    """Serialise changes to a tenant's owners: lock the tenant row first."""
    Tenant.objects.select_for_update().filter(pk=tenant_id).first()


def _other_owner_exists(target: Membership) -> bool:
    return Membership.objects.filter(tenant_id=target.tenant_id, role=Role.OWNER).exclude(pk=target.pk).exists()


@transaction.atomic
def membership_change_role(*, membership: Membership, actor: User, target: Membership, role: str) -> Membership:
    require(membership, Capability.MANAGE_MEMBERS)
    _lock_tenant_memberships(membership.tenant_id)
    target = Membership.objects.select_related("user").get(pk=target.pk, tenant_id=membership.tenant_id)
    actor_role = Membership.objects.get(pk=membership.pk).role  # re-read under the lock
    _check_role_assignable(Membership(role=actor_role), role)
    if target.role == Role.OWNER and actor_role != Role.OWNER:
        raise PermissionDenied(_("Only an owner can change another owner's role."))
    if target.role == role:
        return target
    if target.role == Role.OWNER and not _other_owner_exists(target):
        raise ValidationError({"role": _("The last owner cannot be demoted. Make someone else an owner first.")})
    before = {"role": target.role}
    target.role = role
    target.save(update_fields=["role"])
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="member.role_changed",
        target=target,
        before=before,
        after={"role": role, "user": target.user.email},
    )
    return target


@transaction.atomic
def membership_remove(*, membership: Membership, actor: User, target: Membership) -> None:
    """Remove a member (or, when target is the actor's own membership, leave)."""
    leaving = target.pk == membership.pk
    if not leaving:
        require(membership, Capability.MANAGE_MEMBERS)
    _lock_tenant_memberships(membership.tenant_id)
    target = Membership.objects.select_related("user").get(pk=target.pk, tenant_id=membership.tenant_id)
    actor_role = Membership.objects.get(pk=membership.pk).role
    if not leaving and target.role == Role.OWNER and actor_role != Role.OWNER:
        raise PermissionDenied(_("Only an owner can remove another owner."))
    if target.role == Role.OWNER and not _other_owner_exists(target):
        message = (
            _("You are the last owner: make someone else an owner before leaving.")
            if leaving
            else _("The last owner cannot be removed.")
        )
        raise ValidationError(message)
    ApiToken.objects.filter(tenant_id=target.tenant_id, user_id=target.user_id, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="member.left" if leaving else "member.removed",
        target=target,
        before={"user": target.user.email, "role": target.role},
    )
    target.delete()


# --- SSH keys ----------------------------------------------------------------


@transaction.atomic
def ssh_key_add(*, membership: Membership, actor: User, name: str, public_key: str) -> SshKey:
    require(membership, Capability.USE_COMPUTE)
    errors = {}
    name = (name or "").strip()
    if not name or len(name) > 100:
        errors["name"] = _("Name the key (1 to 100 characters), e.g. 'laptop'.")
    try:
        parsed = parse_public_key(public_key)
    except ValidationError as exc:
        errors["public_key"] = exc.messages[0]
        parsed = None
    if parsed and SshKey.objects.filter(tenant_id=membership.tenant_id, fingerprint=parsed.fingerprint).exists():
        errors["public_key"] = _("This key is already registered in this tenant.")
    if name and SshKey.objects.filter(tenant_id=membership.tenant_id, name=name).exists():
        errors["name"] = _("A key with this name already exists.")
    if errors:
        raise ValidationError(errors)
    key = SshKey.objects.create(
        tenant_id=membership.tenant_id,
        owner=actor,
        name=name,
        public_key=parsed.normalised,
        key_type=parsed.key_type,
        bits=parsed.bits,
        fingerprint=parsed.fingerprint,
    )
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="ssh_key.added",
        target=key,
        after=snapshot(key, ["name", "key_type", "bits", "fingerprint"]),
    )
    return key


@transaction.atomic
def ssh_key_delete(*, membership: Membership, actor: User, key: SshKey) -> None:
    if key.owner_id != actor.pk:
        require(membership, Capability.MANAGE_KEYS)
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="ssh_key.deleted",
        target=key,
        before=snapshot(key, ["name", "key_type", "fingerprint", "owner"]),
    )
    key.delete()


# --- API tokens --------------------------------------------------------------

TOKEN_PREFIX = "gpk"


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str  # shown once, never stored


@transaction.atomic
def api_token_create(
    *, membership: Membership, actor: User, name: str, expires_in_days: int | None = None
) -> IssuedToken:
    name = (name or "").strip()
    errors = {}
    if not name or len(name) > 100:
        errors["name"] = _("Name the token (1 to 100 characters), e.g. 'ci-pipeline'.")
    if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
        errors["expires_in_days"] = _("Choose between 1 and 3650 days, or leave empty for no expiry.")
    if errors:
        raise ValidationError(errors)
    prefix = secrets.token_hex(4)
    secret = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(
        tenant_id=membership.tenant_id,
        user=actor,
        name=name,
        prefix=prefix,
        token_hash=_hash(secret),
        expires_at=timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    audit_record(
        actor=actor,
        tenant=membership.tenant,
        action="api_token.created",
        target=token,
        after={"name": name, "prefix": prefix, "expires_at": snapshot(token, ["expires_at"])["expires_at"]},
    )
    return IssuedToken(token=token, secret=secret)


@transaction.atomic
def api_token_revoke(*, membership: Membership, actor: User, token: ApiToken) -> ApiToken:
    if token.user_id != actor.pk:
        require(membership, Capability.MANAGE_KEYS)
    token = ApiToken.objects.select_for_update().get(pk=token.pk, tenant_id=membership.tenant_id)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            tenant=membership.tenant,
            action="api_token.revoked",
            target=token,
            before={"revoked_at": None},
            after=snapshot(token, ["revoked_at"]),
        )
    return token


def api_token_authenticate(secret: str) -> ApiToken | None:
    """The active token for a presented secret, with its tenant and user, or None."""
    parts = (secret or "").split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    token = (
        ApiToken.objects.select_related("user", "tenant__tier").filter(prefix=parts[1], revoked_at__isnull=True).first()
    )
    if token is None or not secrets.compare_digest(token.token_hash, _hash(secret)):
        return None
    if not token.is_active or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() >= settings.PORTAL_TOKEN_TOUCH_SECONDS:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


# --- Quotas ------------------------------------------------------------------

QUOTA_FIELDS = ["vcpus", "memory_gib", "hugepages_gib", "vms", "concurrent_tasks", "storage_gib"]


@transaction.atomic
def quota_update(*, tenant: Tenant, actor: User, limits: dict[str, int], gpus: dict[str, int]) -> TenantQuota:
    """Staff change a tenant's limits. Lowering below current use is allowed (nothing new starts) but audited."""
    if not actor.is_staff:
        raise PermissionDenied(_("Only staff can change quotas."))
    errors = {}
    for field, value in {**limits, **{f"gpu_{k}": v for k, v in gpus.items()}}.items():
        if not isinstance(value, int) or value < 0 or value > 1_000_000:
            errors[field] = _("Enter a whole number between 0 and 1,000,000.")
    unknown = set(limits) - set(QUOTA_FIELDS)
    for field in unknown:
        errors[field] = _("Unknown quota.")
    known_models = {m.code: m for m in GpuModel.objects.all()}
    for code in set(gpus) - set(known_models):
        errors[f"gpu_{code}"] = _("Unknown GPU model.")
    if errors:
        raise ValidationError(errors)
    quota = TenantQuota.objects.select_for_update().get(tenant=tenant)
    before = snapshot(quota, QUOTA_FIELDS)
    before["gpus"] = {g.gpu_model.code: g.limit for g in quota.tenant.gpu_quotas.select_related("gpu_model")}
    for field, value in limits.items():
        setattr(quota, field, value)
    quota.save()
    for code, limit in gpus.items():
        GpuQuota.objects.update_or_create(tenant=tenant, gpu_model=known_models[code], defaults={"limit": limit})
    after = snapshot(quota, QUOTA_FIELDS)
    after["gpus"] = {**before["gpus"], **gpus}
    audit_record(actor=actor, tenant=tenant, action="quota.updated", target=quota, before=before, after=after)
    emit_dashboard_event(tenant.pk, "quota.changed", {})
    return quota


@dataclass(frozen=True)
class ResourceDemand:
    gpu_model: str | None = None  # GpuModel.code
    gpus: int = 0
    vcpus: int = 0
    memory_gib: int = 0
    hugepages_gib: int = 0
    vms: int = 0
    tasks: int = 0
    storage_gib: int = 0


class QuotaExceeded(ValidationError):
    """Raised with one message per exceeded limit: {"quota": ["vCPUs: 24 requested, 8 of 32 free", ...]}."""


_RESERVABLE = [
    ("vcpus", "vcpus", gettext_lazy("vCPUs")),
    ("memory_gib", "memory_gib", gettext_lazy("Memory (GiB)")),
    ("hugepages_gib", "hugepages_gib", gettext_lazy("Hugepages (GiB)")),
    ("vms", "vms", gettext_lazy("Virtual machines")),
    ("tasks", "concurrent_tasks", gettext_lazy("Concurrent tasks")),
    ("storage_gib", "storage_gib", gettext_lazy("Storage (GiB)")),
]


@transaction.atomic
def quota_reserve(*, tenant: Tenant, holder_type: str, holder_id: str, demand: ResourceDemand) -> QuotaReservation:
    """Hold resources for one VM or task, or refuse with what is short.

    The tenant's quota row is locked for the check-and-insert, so concurrent
    orders of one tenant queue here and can never together exceed a limit.
    """
    quota = TenantQuota.objects.select_for_update().get(tenant=tenant)
    active = QuotaReservation.objects.filter(tenant=tenant, released_at__isnull=True)
    used = active.aggregate(**{name: Sum(name) for name, _field, _label in _RESERVABLE})
    problems = []
    for name, field, label in _RESERVABLE:
        wanted = getattr(demand, name)
        if not wanted:
            continue
        limit = getattr(quota, field)
        in_use = used[name] or 0
        if in_use + wanted > limit:
            problems.append(
                _("%(label)s: %(wanted)s requested, %(free)s of %(limit)s free")
                % {"label": label, "wanted": wanted, "free": max(limit - in_use, 0), "limit": limit}
            )
    gpu_model = None
    if demand.gpus:
        gpu_model = GpuModel.objects.filter(code=demand.gpu_model).first()
        if gpu_model is None:
            raise ValidationError({"gpu_model": _("Unknown GPU model.")})
        limit = GpuQuota.objects.filter(tenant=tenant, gpu_model=gpu_model).values_list("limit", flat=True).first() or 0
        in_use = active.filter(gpu_model=gpu_model).aggregate(n=Sum("gpus"))["n"] or 0
        if in_use + demand.gpus > limit:
            problems.append(
                _("%(model)s GPUs: %(wanted)s requested, %(free)s of %(limit)s free")
                % {"model": gpu_model.code, "wanted": demand.gpus, "free": max(limit - in_use, 0), "limit": limit}
            )
    if problems:
        raise QuotaExceeded({"quota": problems})
    try:
        with transaction.atomic():
            reservation = QuotaReservation.objects.create(
                tenant=tenant,
                holder_type=holder_type,
                holder_id=str(holder_id),
                gpu_model=gpu_model,
                gpus=demand.gpus,
                vcpus=demand.vcpus,
                memory_gib=demand.memory_gib,
                hugepages_gib=demand.hugepages_gib,
                vms=demand.vms,
                tasks=demand.tasks,
                storage_gib=demand.storage_gib,
            )
    except IntegrityError as exc:
        raise ValidationError(_("%(holder)s already holds a reservation.") % {"holder": holder_id}) from exc
    emit_dashboard_event(tenant.pk, "quota.changed", {})
    return reservation


@transaction.atomic
def quota_release(*, holder_type: str, holder_id: str) -> int:
    """Give back what a VM or task held. Idempotent: releasing twice releases once."""
    held = QuotaReservation.objects.select_for_update().filter(
        holder_type=holder_type, holder_id=str(holder_id), released_at__isnull=True
    )
    tenant_ids = set(held.values_list("tenant_id", flat=True))
    released = held.update(released_at=timezone.now())
    for tenant_id in tenant_ids:
        emit_dashboard_event(tenant_id, "quota.changed", {})
    return released
