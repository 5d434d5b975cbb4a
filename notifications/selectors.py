"""Reads for the notification centre. A notification belongs to one user: nobody reads another's."""

from django.db.models import Q, QuerySet

from notifications.messages import CUSTOMER_KINDS, EMAIL_DEFAULTS, NOT_EMAILED, STAFF_KINDS
from notifications.models import EmailPreference, Notification, NotificationKind


def notifications_of(user, *, tenant=None, unread_only: bool = False) -> QuerySet[Notification]:
    """The user's notifications, newest first. With `tenant` (an API token's), only those about that
    tenant or about no tenant at all: a token fixed to one tenant learns nothing of the others."""
    qs = Notification.objects.filter(user=user).select_related("tenant")
    if tenant is not None:
        qs = qs.filter(Q(tenant=tenant) | Q(tenant__isnull=True))
    if unread_only:
        qs = qs.filter(read_at__isnull=True)
    return qs


def unread_count(user, *, tenant=None) -> int:
    return notifications_of(user, tenant=tenant, unread_only=True).count()


def email_choices(user) -> list[tuple[str, str, bool]]:
    """(kind, label, emailed?) for each kind the user can receive by email: customer kinds, and staff kinds
    for staff."""
    kinds = [kind for kind in CUSTOMER_KINDS + (STAFF_KINDS if user.is_staff else []) if kind not in NOT_EMAILED]
    chosen = dict(EmailPreference.objects.filter(user=user).values_list("kind", "email"))
    return [(kind, NotificationKind(kind).label, chosen.get(kind, EMAIL_DEFAULTS.get(kind, False))) for kind in kinds]
