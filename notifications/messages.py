"""What each kind of notification says. Rendered in the reader's language at display time."""

from django.utils import translation
from django.utils.translation import gettext_lazy as _

from notifications.models import NotificationKind as K

# kind -> (title, body); both are %-formatted with the notification's params.
MESSAGES = {
    K.LOW_BALANCE: (
        _("Low balance: %(tenant)s"),
        _(
            "The balance of %(tenant)s is ¥%(balance)s, below the ¥%(threshold)s you asked to be warned at. "
            "Top up or buy a compute package to keep your VMs and tasks running."
        ),
    ),
    K.CREDIT_EXHAUSTED: (
        _("Credit exhausted: work stopped in %(tenant)s"),
        _(
            "%(tenant)s has no pay-as-you-go credit left. Running on-demand VMs are stopped, and running tasks "
            "too once package credit is used up. Top up to start them again."
        ),
    ),
    K.PACKAGE_EXPIRING: (
        _("Compute package expiring: %(package)s"),
        _("¥%(remaining)s of %(package)s in %(tenant)s expires on %(expires)s. Unused credit is written off."),
    ),
    K.VM_IDLE_WARNING: (
        _("VM %(vm)s will be released"),
        _("%(vm)s has been idle and will be released in %(minutes)s minutes unless it is used."),
    ),
    K.TASK_FINISHED: (_("Task %(task)s finished"), _("%(task)s in %(tenant)s finished successfully.")),
    K.TASK_FAILED: (_("Task %(task)s failed"), _("%(task)s in %(tenant)s failed: %(reason)s")),
    K.TASK_TIMED_OUT: (
        _("Task %(task)s timed out"),
        _("%(task)s in %(tenant)s reached its maximum runtime and was stopped."),
    ),
    K.TASK_PREEMPTED: (
        _("Task %(task)s preempted"),
        _("%(task)s in %(tenant)s was preempted by higher-priority work and requeued; lost time is not charged."),
    ),
    K.INVOICE_ISSUED: (
        _("Invoice %(number)s issued"),
        _("Invoice %(number)s for %(tenant)s is ¥%(total)s."),
    ),
    K.TIER_CHANGED: (
        _("%(tenant)s is now %(tier)s"),
        _("%(tenant)s moved from %(from_tier)s to %(tier)s. %(reason)s"),
    ),
    K.INVITATION_RECEIVED: (
        _("Invitation to %(tenant)s"),
        _("%(inviter)s invited you to join %(tenant)s as %(role)s. Accept with the link in the invitation email."),
    ),
    K.CREDIT_APPROVAL_REQUESTED: (
        _("Credit of ¥%(amount)s for %(tenant)s needs approval"),
        _("%(requester)s proposed ¥%(amount)s for %(tenant)s: %(reason)s"),
    ),
    K.CUSTOMER_TIER_CHANGED: (
        _("Your customer %(tenant)s is now %(tier)s"),
        _("%(tenant)s moved from %(from_tier)s to %(tier)s. %(reason)s"),
    ),
    K.CHURN_FLAGGED: (
        _("%(tenant)s is at risk of churn"),
        _("%(reason)s"),
    ),
    K.USAGE_REVIEW_READY: (
        _("Usage review ready for %(tenant)s"),
        _("The usage review of %(tenant)s for %(period)s is ready to open and send."),
    ),
    K.UPSELL_SUGGESTED: (
        _("Package suggestion for %(tenant)s"),
        _("%(package)s would have saved %(tenant)s ¥%(saving)s over the last 30 days."),
    ),
}

# What customers hear about; the rest go to staff (the console).
CUSTOMER_KINDS = [
    K.LOW_BALANCE,
    K.CREDIT_EXHAUSTED,
    K.PACKAGE_EXPIRING,
    K.VM_IDLE_WARNING,
    K.TASK_FINISHED,
    K.TASK_FAILED,
    K.TASK_TIMED_OUT,
    K.TASK_PREEMPTED,
    K.INVOICE_ISSUED,
    K.TIER_CHANGED,
    K.INVITATION_RECEIVED,
]
STAFF_KINDS = [kind for kind in K.values if kind not in CUSTOMER_KINDS]
# Never emailed by notify(): the invitation email itself (tenants.services) carries the secret link and
# always goes, so a preference for it would promise what it cannot keep.
NOT_EMAILED = {K.INVITATION_RECEIVED}

# Kinds that are emailed unless the user turns them off. The rest are emailed only on request.
EMAIL_DEFAULTS = {
    K.LOW_BALANCE: True,
    K.CREDIT_EXHAUSTED: True,
    K.PACKAGE_EXPIRING: True,
    K.VM_IDLE_WARNING: True,
    K.TASK_FINISHED: False,
    K.TASK_FAILED: True,
    K.TASK_TIMED_OUT: True,
    K.TASK_PREEMPTED: False,
    K.INVOICE_ISSUED: True,
    K.TIER_CHANGED: True,
    K.INVITATION_RECEIVED: True,
    K.CREDIT_APPROVAL_REQUESTED: True,
    K.CUSTOMER_TIER_CHANGED: True,
    K.CHURN_FLAGGED: True,
    K.USAGE_REVIEW_READY: True,
    K.UPSELL_SUGGESTED: False,
}


class _Safe(dict):
    def __missing__(self, key):
        return ""


def render(kind: str, params: dict) -> tuple[str, str]:
    """(title, body) in the active language."""
    title, body = MESSAGES[kind]
    values = _Safe({k: _translate_value(v) for k, v in (params or {}).items()})
    return str(title) % values, str(body) % values


def bilingual(text) -> dict:
    """{"en": ..., "zh": ...} of a translatable string (a lazy gettext or a choice label), for params
    whose words must follow the reader's language rather than the sender's."""
    with translation.override("en"):
        en = str(text)
    with translation.override("zh-hans"):
        zh = str(text)
    return {"en": en, "zh": zh}


def _translate_value(value):
    """Params may carry {"en": ..., "zh": ...} pairs for words that are data (tier names, reasons)."""
    if isinstance(value, dict) and "en" in value:
        return value.get("zh", value["en"]) if (translation.get_language() or "").startswith("zh") else value["en"]
    return value
