"""Customer management data. Business rules live in crm/services.py (console actions) and
crm/tiering.py, crm/churn.py, crm/upsell.py, crm/reviews.py (automation)."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class StaffRole(models.TextChoices):
    ACCOUNT_MANAGER = "account_manager", _("Account manager")
    SUPPORT = "support", _("Support")
    FINANCE = "finance", _("Finance")
    ADMIN = "admin", _("Admin")


class StaffProfile(models.Model):
    """A staff member's console role. Superusers count as admin without a profile."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staff_profile")
    role = models.CharField(max_length=20, choices=StaffRole.choices)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.user} ({self.role})"


class CustomerAccount(models.Model):
    """Per-tenant account-management state: manager, tier pin, churn flag, upsell suggestion."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="account")
    account_manager = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="managed_accounts",
        help_text=_("Diamond: dedicated account manager; Gold: service specialist."),
    )
    tier_pinned = models.BooleanField(
        default=False, help_text=_("Set by a staff override: automatic evaluation leaves the tier alone.")
    )
    churn_risk = models.BooleanField(default=False)
    churn_reason = models.CharField(max_length=40, blank=True, help_text=_("Rule code of the churn flag."))
    churn_detail = models.JSONField(default=dict, blank=True, help_text=_("Figures behind the churn flag."))
    churn_flagged_at = models.DateTimeField(null=True, blank=True)
    upsell = models.JSONField(
        default=dict, blank=True, help_text=_("The package that would have saved the most over the last 30 days.")
    )
    upsell_computed_at = models.DateTimeField(null=True, blank=True)
    tier_evaluated_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["churn_risk"], name="crm_account_churn"),
            models.Index(fields=["account_manager"], name="crm_account_manager"),
        ]

    def __str__(self) -> str:
        return f"account of {self.tenant_id}"


class TierChangeSource(models.TextChoices):
    AUTOMATIC = "automatic", _("Automatic")
    STAFF = "staff", _("Staff override")


class TierChange(models.Model):
    """Every tier change with the rule or reason behind it. Append-only."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="tier_changes")
    from_tier = models.ForeignKey("tenants.Tier", on_delete=models.PROTECT, related_name="+")
    to_tier = models.ForeignKey("tenants.Tier", on_delete=models.PROTECT, related_name="+")
    source = models.CharField(max_length=16, choices=TierChangeSource.choices)
    rule = models.CharField(max_length=40, blank=True, help_text=_("Code of the rule that triggered it."))
    reason = models.TextField(blank=True)
    figures = models.JSONField(default=dict, blank=True, help_text=_("The spend figures the rule saw."))
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="crm_tierchange_tenant")]

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.from_tier_id} → {self.to_tier_id}"


class CreditRequestStatus(models.TextChoices):
    PENDING = "pending", _("Waiting for approval")
    APPLIED = "applied", _("Applied")
    REJECTED = "rejected", _("Rejected")


class CreditKind(models.TextChoices):
    """The ledger entry a staff credit becomes (the same values as billing.models.LedgerKind)."""

    ADJUSTMENT = "adjustment", _("Staff adjustment")
    REFUND = "refund", _("Refund")


class CreditAdjustment(models.Model):
    """A staff credit adjustment or refund (a debit when negative). Above
    settings.PORTAL_CREDIT_APPROVAL_THRESHOLD, either way, it waits for a second staff member
    (maker-checker) and is applied once, when approved."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="credit_adjustments")
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    kind = models.CharField(max_length=16, choices=CreditKind.choices, default=CreditKind.ADJUSTMENT)
    reason = models.TextField()
    status = models.CharField(max_length=16, choices=CreditRequestStatus.choices, default=CreditRequestStatus.PENDING)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    requested_at = models.DateTimeField(default=timezone.now)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.TextField(blank=True)
    ledger_reference = models.CharField(max_length=120, blank=True)

    class Meta:
        ordering = ["-requested_at"]
        indexes = [models.Index(fields=["status", "requested_at"], name="crm_credit_status")]

    def __str__(self) -> str:
        return f"{self.amount} for {self.tenant_id} ({self.status})"


class NoteKind(models.TextChoices):
    NOTE = "note", _("Note")
    CALL = "call", _("Call")
    EMAIL = "email", _("Email")
    MEETING = "meeting", _("Meeting")


class CustomerNote(models.Model):
    """A staff note or a record of contact with the customer."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="customer_notes")
    kind = models.CharField(max_length=16, choices=NoteKind.choices, default=NoteKind.NOTE)
    body = models.TextField()
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} on {self.tenant_id}"


class ViewAsSession(models.Model):
    """Read-only, time-limited impersonation of a customer by a staff member. Audited both ways."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    staff = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="view_as_sessions")
    reason = models.CharField(max_length=300)
    started_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.staff_id} as {self.tenant_id}"

    def is_active(self, now=None) -> bool:
        now = now or timezone.now()
        return self.ended_at is None and self.expires_at > now


class UsageReviewStatus(models.TextChoices):
    READY = "ready", _("Ready")
    SENT = "sent", _("Sent")


class UsageReview(models.Model):
    """A periodic usage review (Gold quarterly, Diamond monthly) for the manager to open and send."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="usage_reviews")
    period_start = models.DateField()
    period_end = models.DateField(help_text=_("Exclusive."))
    report = models.JSONField(
        default=dict, help_text=_("Usage by GPU model, utilisation, spend trend, recommendations.")
    )
    status = models.CharField(max_length=8, choices=UsageReviewStatus.choices, default=UsageReviewStatus.READY)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-period_start"]
        constraints = [models.UniqueConstraint(fields=["tenant", "period_start"], name="crm_review_unique_period")]

    def __str__(self) -> str:
        return f"review {self.tenant_id} {self.period_start}"
