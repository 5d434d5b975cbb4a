from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class NotificationKind(models.TextChoices):
    # Customers
    LOW_BALANCE = "low_balance", _("Low balance")
    CREDIT_EXHAUSTED = "credit_exhausted", _("Credit exhausted, work stopped")
    PACKAGE_EXPIRING = "package_expiring", _("Compute package expiring")
    VM_IDLE_WARNING = "vm_idle_warning", _("Idle VM about to be released")
    TASK_FINISHED = "task_finished", _("Task finished")
    TASK_FAILED = "task_failed", _("Task failed")
    TASK_TIMED_OUT = "task_timed_out", _("Task timed out")
    TASK_PREEMPTED = "task_preempted", _("Task preempted")
    INVOICE_ISSUED = "invoice_issued", _("Invoice issued")
    TIER_CHANGED = "tier_changed", _("Tier changed")
    INVITATION_RECEIVED = "invitation_received", _("Invitation received")
    # Staff
    CREDIT_APPROVAL_REQUESTED = "credit_approval_requested", _("Credit adjustment waiting for approval")
    CUSTOMER_TIER_CHANGED = "customer_tier_changed", _("A customer's tier changed")
    CHURN_FLAGGED = "churn_flagged", _("A customer is at risk of churn")
    USAGE_REVIEW_READY = "usage_review_ready", _("Usage review ready")
    UPSELL_SUGGESTED = "upsell_suggested", _("Package suggestion for a customer")


class Notification(models.Model):
    """One notification for one user. Title and body are rendered from kind + params in the
    reader's language (notifications/messages.py), so nothing English is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="notifications"
    )
    kind = models.CharField(max_length=40, choices=NotificationKind.choices)
    params = models.JSONField(default=dict, blank=True)
    url = models.CharField(max_length=500, blank=True)
    dedupe_key = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["user", "read_at", "created_at"], name="notif_user_unread")]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "dedupe_key"], condition=~models.Q(dedupe_key=""), name="notif_unique_dedupe"
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} → {self.user_id}"

    @property
    def title(self) -> str:
        """The title in the active language."""
        from notifications.messages import render

        return render(self.kind, self.params)[0]

    @property
    def body(self) -> str:
        from notifications.messages import render

        return render(self.kind, self.params)[1]

    @property
    def is_unread(self) -> bool:
        return self.read_at is None


class EmailPreference(models.Model):
    """Whether a kind of notification also reaches the user by email. No row means the default
    (notifications.messages.EMAIL_DEFAULTS). In-portal notifications are always kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="email_preferences")
    kind = models.CharField(max_length=40, choices=NotificationKind.choices)
    email = models.BooleanField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "kind"], name="notif_pref_unique")]

    def __str__(self) -> str:
        return f"{self.user_id} {self.kind}={self.email}"
