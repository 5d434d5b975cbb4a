"""Console actions of staff on customers. Each checks the actor's staff role (crm.permissions),
writes an audit event on the customer's tenant, and is safe to call twice.

Automation (tiers, churn, upsell, usage reviews) lives in crm/tiering.py, crm/churn.py,
crm/upsell.py and crm/reviews.py; the actions here that reach into it only add the role check.
"""

from datetime import timedelta
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from billing import services as billing_services
from billing.money import to_fen
from crm.models import (
    CreditAdjustment,
    CreditKind,
    CreditRequestStatus,
    CustomerAccount,
    CustomerNote,
    NoteKind,
    StaffRole,
    UsageReview,
    ViewAsSession,
)
from crm.permissions import StaffCapability, require_staff, staff_role
from crm.selectors import account_of
from notifications.models import NotificationKind
from notifications.services import notify
from portal.events import emit_dashboard_event
from tenants.audit import audit_record
from tenants.models import Tenant

User = get_user_model()

CREDIT_MAX = Decimal("10000000.00")  # a typo guard: no single staff credit moves ten million
NOTE_MAX_CHARS = 5000
VIEW_AS_REASON_MAX_CHARS = 300


# --- Notes and contact history ---------------------------------------------------------------------


def note_add(*, tenant: Tenant, actor, kind: str, body: str) -> CustomerNote:
    require_staff(actor, StaffCapability.ADD_NOTE, tenant)
    body = (body or "").strip()
    errors = {}
    if kind not in NoteKind.values:
        errors["kind"] = _("Choose a note, call, email or meeting.")
    if not body:
        errors["body"] = _("Write what was said or agreed.")
    elif len(body) > NOTE_MAX_CHARS:
        errors["body"] = _("Keep it under %(count)s characters.") % {"count": NOTE_MAX_CHARS}
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        note = CustomerNote.objects.create(tenant=tenant, kind=kind, body=body, author=actor)
        audit_record(actor=actor, tenant=tenant, action="crm.note.added", target=note, after={"kind": kind})
    return note


# --- Account manager -----------------------------------------------------------------------------


def account_managers() -> list:
    """Staff who can be assigned to customers: active staff with the account-manager role."""
    return list(
        User.objects.filter(is_active=True, is_staff=True, staff_profile__role=StaffRole.ACCOUNT_MANAGER).order_by(
            "email"
        )
    )


def account_manager_assign(*, tenant: Tenant, actor, manager) -> CustomerAccount:
    """Give the customer a dedicated account manager (Diamond) or service specialist (Gold), or none."""
    require_staff(actor, StaffCapability.ASSIGN_MANAGER, tenant)
    if manager is not None and staff_role(manager) != StaffRole.ACCOUNT_MANAGER:
        raise ValidationError({"manager": _("Only staff with the account manager role can be assigned.")})
    with transaction.atomic():
        account_of(tenant)
        account = CustomerAccount.objects.select_for_update().get(tenant=tenant)
        if account.account_manager_id == (manager.pk if manager else None):
            return account
        before = {"account_manager": account.account_manager.email if account.account_manager else None}
        account.account_manager = manager
        account.save(update_fields=["account_manager", "updated_at"])
        audit_record(
            actor=actor,
            tenant=tenant,
            action="crm.manager.assigned",
            target=account,
            before=before,
            after={"account_manager": manager.email if manager else None},
        )
    return account


# --- Credit adjustments (maker-checker) ---------------------------------------------------------------


def _clean_credit(amount, reason: str, kind: str) -> tuple[Decimal, str]:
    errors = {}
    if kind not in CreditKind.values:
        errors["kind"] = _("Choose adjustment or refund.")
    try:
        value = to_fen(Decimal(amount))
    except (InvalidOperation, TypeError, ValueError):
        value = None
        errors["amount"] = _("Enter an amount in yuan, e.g. 500.00.")
    if value is not None:
        if value == 0:
            errors["amount"] = _("Enter a non-zero amount.")
        elif abs(value) > CREDIT_MAX:
            errors["amount"] = _("A single credit is at most ¥%(max)s.") % {"max": CREDIT_MAX}
        elif kind == CreditKind.REFUND and value < 0:
            errors["amount"] = _("A refund gives money back: enter a positive amount.")
    reason = (reason or "").strip()
    if not reason:
        errors["reason"] = _("Give the reason; it is kept with the credit and in the ledger.")
    if errors:
        raise ValidationError(errors)
    return value, reason


def approval_threshold() -> Decimal:
    return to_fen(Decimal(settings.PORTAL_CREDIT_APPROVAL_THRESHOLD))


def credit_approvers(*, exclude=None):
    """Staff who may approve credits: finance and admin (superusers included)."""
    roles = [StaffRole.FINANCE, StaffRole.ADMIN]
    who = Q(is_superuser=True) | Q(staff_profile__role__in=roles)
    if settings.PORTAL_STAFF_DEFAULT_ROLE in roles:
        who |= Q(staff_profile__isnull=True)
    approvers = User.objects.filter(is_active=True, is_staff=True).filter(who)
    if exclude is not None:
        approvers = approvers.exclude(pk=exclude.pk)
    return approvers.order_by("email")


def _apply(credit: CreditAdjustment, *, actor) -> None:
    """Post the credit to the wallet through billing's staff adjustment (call with the row locked).
    A debit that would overdraw the wallet as it stands now is refused there, and nothing changes."""
    entry = billing_services.wallet_adjust(
        tenant=credit.tenant, actor=actor, amount=credit.amount, reason=credit.reason, kind=credit.kind
    )
    credit.status = CreditRequestStatus.APPLIED
    credit.decided_by = actor
    credit.decided_at = timezone.now()
    credit.ledger_reference = str(entry.pk)
    credit.save(update_fields=["status", "decided_by", "decided_at", "ledger_reference"])
    emit_dashboard_event(credit.tenant_id, "billing.credit_applied", {"amount": str(credit.amount)})


def credit_propose(
    *, tenant: Tenant, actor, amount, reason: str, kind: str = CreditKind.ADJUSTMENT
) -> CreditAdjustment:
    """A staff credit (or debit, when negative) to the customer's cash balance, posted as a staff
    adjustment or a refund. Up to settings.PORTAL_CREDIT_APPROVAL_THRESHOLD (either way: a debit can
    hurt the customer as much as a credit can cost us) it is applied at once; above it waits for a
    different finance or admin member of staff to approve it, and they are notified. A debit that
    would overdraw the wallet is refused when it is applied, now or at approval."""
    require_staff(actor, StaffCapability.PROPOSE_CREDIT, tenant)
    amount, reason = _clean_credit(amount, reason, kind)
    needs_approval = abs(amount) > approval_threshold()
    with transaction.atomic():
        credit = CreditAdjustment.objects.create(
            tenant=tenant, amount=amount, kind=kind, reason=reason, requested_by=actor
        )
        audit_record(
            actor=actor,
            tenant=tenant,
            action="crm.credit.proposed",
            target=credit,
            after={"amount": str(amount), "kind": kind, "reason": reason, "needs_approval": needs_approval},
        )
        if not needs_approval:
            _apply(credit, actor=actor)
            audit_record(
                actor=actor,
                tenant=tenant,
                action="crm.credit.applied",
                target=credit,
                before={"status": CreditRequestStatus.PENDING},
                after={"status": credit.status, "amount": str(amount), "ledger_entry": credit.ledger_reference},
            )
            return credit
        notify(
            kind=NotificationKind.CREDIT_APPROVAL_REQUESTED,
            users=credit_approvers(exclude=actor),
            params={"amount": str(amount), "tenant": tenant.name, "requester": actor.email, "reason": reason},
            url=reverse("console_credits"),
            dedupe_key=f"credit-approval:{credit.pk}",
        )
    return credit


def _locked_pending(credit: CreditAdjustment) -> CreditAdjustment:
    locked = CreditAdjustment.objects.select_for_update().select_related("tenant").get(pk=credit.pk)
    if locked.status != CreditRequestStatus.PENDING:
        raise ValidationError(
            _("This credit was already %(status)s by %(who)s.")
            % {
                "status": locked.get_status_display().lower(),
                "who": locked.decided_by.email if locked.decided_by else "—",
            }
        )
    return locked


def credit_approve(*, request: CreditAdjustment, approver, note: str = "") -> CreditAdjustment:
    """Apply a waiting credit, once: the request row is locked, so of two approvals at the same time
    one applies it and the other is told it was already applied. The proposer cannot approve it."""
    require_staff(approver, StaffCapability.APPROVE_CREDIT, request.tenant)
    if request.requested_by_id == approver.pk:
        raise ValidationError(_("You proposed this credit: another member of finance or admin staff must approve it."))
    with transaction.atomic():
        credit = _locked_pending(request)
        credit.decision_note = (note or "").strip()
        credit.save(update_fields=["decision_note"])
        _apply(credit, actor=approver)
        audit_record(
            actor=approver,
            tenant=credit.tenant,
            action="crm.credit.approved",
            target=credit,
            before={"status": CreditRequestStatus.PENDING},
            after={"status": credit.status, "amount": str(credit.amount), "ledger_entry": credit.ledger_reference},
        )
    return credit


def credit_reject(*, request: CreditAdjustment, approver, note: str = "") -> CreditAdjustment:
    """Turn a waiting credit down; nothing reaches the wallet. The proposer may withdraw their own."""
    if request.requested_by_id != approver.pk:
        require_staff(approver, StaffCapability.APPROVE_CREDIT, request.tenant)
    else:
        require_staff(approver, StaffCapability.PROPOSE_CREDIT, request.tenant)
    with transaction.atomic():
        credit = _locked_pending(request)
        credit.status = CreditRequestStatus.REJECTED
        credit.decided_by = approver
        credit.decided_at = timezone.now()
        credit.decision_note = (note or "").strip()
        credit.save(update_fields=["status", "decided_by", "decided_at", "decision_note"])
        audit_record(
            actor=approver,
            tenant=credit.tenant,
            action="crm.credit.rejected",
            target=credit,
            before={"status": CreditRequestStatus.PENDING},
            after={"status": credit.status, "note": credit.decision_note},
        )
    return credit


# --- Tier and usage reviews (the automation's own functions, behind the role check) ----------------


def customer_tier_override(*, tenant: Tenant, actor, tier, reason: str):
    """Set the customer's tier by hand, with a reason; it stays until unpinned."""
    from crm import tiering

    require_staff(actor, StaffCapability.CHANGE_TIER, tenant)
    if not (reason or "").strip():
        raise ValidationError({"reason": _("Give the reason; it is kept with the tier change.")})
    return tiering.tier_override(tenant=tenant, actor=actor, tier=tier, reason=reason.strip())


def customer_tier_unpin(*, tenant: Tenant, actor):
    """Hand the customer's tier back to automatic evaluation."""
    from crm import tiering

    require_staff(actor, StaffCapability.CHANGE_TIER, tenant)
    return tiering.tier_unpin(tenant=tenant, actor=actor)


def customer_usage_review_send(*, review: UsageReview, actor):
    from crm import reviews

    require_staff(actor, StaffCapability.SEND_USAGE_REVIEW, review.tenant)
    return reviews.usage_review_send(review=review, actor=actor)


# --- View as the customer --------------------------------------------------------------------------


def view_as_start(*, tenant: Tenant, actor, reason: str, minutes: int | None = None) -> ViewAsSession:
    """Start a read-only, time-limited look at the customer's own pages. Recorded on the customer's
    audit log, which its owners and admins read. Ends any other view-as session of the same staff."""
    require_staff(actor, StaffCapability.VIEW_AS, tenant)
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": _("Say why you need to see the customer's pages; they can read it.")})
    if len(reason) > VIEW_AS_REASON_MAX_CHARS:
        raise ValidationError(
            {"reason": _("Keep it under %(count)s characters.") % {"count": VIEW_AS_REASON_MAX_CHARS}}
        )
    minutes = minutes or settings.PORTAL_VIEW_AS_MINUTES
    now = timezone.now()
    with transaction.atomic():
        for other in ViewAsSession.objects.select_for_update().filter(staff=actor, ended_at__isnull=True):
            view_as_stop(session=other, actor=actor)
        session = ViewAsSession.objects.create(
            staff=actor, tenant=tenant, reason=reason, started_at=now, expires_at=now + timedelta(minutes=minutes)
        )
        audit_record(
            actor=actor,
            tenant=tenant,
            action="crm.view_as.started",
            target=session,
            after={"staff": actor.email, "reason": reason, "expires_at": session.expires_at.isoformat()},
        )
    return session


def view_as_stop(*, session: ViewAsSession, actor=None, expired: bool = False) -> ViewAsSession:
    """End a view-as session (on stop, or once it has expired). Recorded once, whoever calls twice."""
    now = timezone.now()
    ended_at = min(now, session.expires_at) if expired else now
    with transaction.atomic():
        if not ViewAsSession.objects.filter(pk=session.pk, ended_at__isnull=True).update(ended_at=ended_at):
            session.refresh_from_db()
            return session
        session.ended_at = ended_at
        audit_record(
            actor=None if expired else actor,
            tenant=session.tenant,
            action="crm.view_as.ended",
            target=session,
            before={"ended_at": None},
            after={
                "staff": session.staff.email,
                "ended_at": ended_at.isoformat(),
                "how": "expired" if expired else "stopped",
            },
        )
    return session
