"""notify(): the one way any part of the portal tells people something.

It writes one Notification per recipient (always kept in the portal), pushes a dashboard event
so open pages update, and emails the recipients whose preference allows it, after commit and in
each recipient's own language."""

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from notifications.messages import CUSTOMER_KINDS, EMAIL_DEFAULTS, render
from notifications.models import EmailPreference, Notification, NotificationKind
from tenants.audit import audit_record
from tenants.models import Role

User = get_user_model()
logger = logging.getLogger(__name__)

# Who hears about what (DESIGN.md section 1): money goes to those who pay, compute to those who run it.
BILLING_ROLES = (Role.OWNER, Role.ADMIN, Role.BILLING)
MANAGER_ROLES = (Role.OWNER, Role.ADMIN)


def _recipients(*, tenant, users, roles) -> list:
    if users is not None:
        return [u for u in {u.pk: u for u in users}.values() if u.is_active]
    if tenant is None:
        return []
    qs = User.objects.filter(memberships__tenant=tenant, is_active=True)
    if roles:
        qs = qs.filter(memberships__role__in=list(roles))
    return list(qs.distinct())


def tenant_people(tenant, *, roles: Iterable[str] = (), also: Iterable = ()) -> list:
    """Active members of `tenant` with one of `roles`, plus the users in `also` who are still members
    (a person who left the tenant no longer hears about its VMs and tasks). One query."""
    from django.db.models import Q

    also_ids = [u.pk for u in also if u is not None]
    wanted = Q(memberships__role__in=list(roles)) if roles else Q(pk__in=[])
    if also_ids:
        wanted |= Q(pk__in=also_ids)
    return list(User.objects.filter(wanted, memberships__tenant=tenant, is_active=True).distinct().order_by("pk"))


def _wanting_email(users: list, kind: str) -> set[int]:
    """Ids of the users who get `kind` by email: their preference, else the kind's default. One query."""
    chosen = dict(
        EmailPreference.objects.filter(user__in=[u.pk for u in users], kind=kind).values_list("user_id", "email")
    )
    default = EMAIL_DEFAULTS.get(kind, False)
    return {u.pk for u in users if chosen.get(u.pk, default) and u.email}


def wants_email(user, kind: str) -> bool:
    return user.pk in _wanting_email([user], kind)


def notify(
    *,
    kind: str,
    tenant=None,
    users: Iterable | None = None,
    roles: Iterable[str] | None = None,
    params: dict | None = None,
    url: str = "",
    dedupe_key: str = "",
    email: bool = True,
) -> list[Notification]:
    """Notify `users`, or else the members of `tenant` (only those with `roles` when given).

    `params` fill the kind's message (notifications/messages.py); values that are data in two
    languages may be {"en": ..., "zh": ...}. A `dedupe_key` makes the call idempotent per user.
    `email=False` keeps this one in the portal only, for a caller that already emails the person.
    """
    params = dict(params or {})
    if tenant is not None:
        params.setdefault("tenant", tenant.name)
    created = []
    for user in _recipients(tenant=tenant, users=users, roles=roles):
        try:
            with transaction.atomic():
                note = Notification.objects.create(
                    user=user, tenant=tenant, kind=kind, params=params, url=url, dedupe_key=dedupe_key
                )
        except IntegrityError:
            continue  # already told this user (dedupe_key)
        created.append(note)
    if not created:
        return created
    from portal.events import emit_dashboard_event

    if tenant is not None and kind in CUSTOMER_KINDS:
        # The tenant's dashboards refresh their bell. Staff kinds (churn, upsell, approvals…) name the
        # customer's tenant too, but are about the customer: its members must not even see the kind.
        emit_dashboard_event(tenant.pk, "notification", {"kind": kind})
    if email:
        emailed = _wanting_email([n.user for n in created], kind)
        ids = [n.pk for n in created if n.user_id in emailed]
        if ids:
            from notifications.tasks import send_notification_emails

            # robust: a broker or mail server that is down must not fail the work that notified.
            transaction.on_commit(lambda: send_notification_emails.delay(ids), robust=True)
    return created


def send_emails(notification_ids: list[int]) -> int:
    """Email each notification once, in its reader's language, with a link to the page it is about."""
    sent = 0
    base = settings.PORTAL_BASE_URL.rstrip("/")
    for note in Notification.objects.filter(pk__in=notification_ids, emailed_at__isnull=True).select_related("user"):
        with translation.override(note.user.language or settings.LANGUAGE_CODE):
            title, body = render(note.kind, note.params)
            if note.url:
                body = f"{body}\n\n{base}{note.url}"
            footer = _("Choose which notifications also reach you by email: %(url)s") % {
                "url": base + reverse("notification_preferences")
            }
            body = f"{body}\n\n--\n{footer}"
        try:
            send_mail(subject=f"[GPU Portal] {title}", message=body, from_email=None, recipient_list=[note.user.email])
        except Exception:  # the notification is kept in the portal; emailed_at stays empty for a retry
            logger.exception("Emailing notification %s to user %s failed", note.pk, note.user_id)
            continue
        Notification.objects.filter(pk=note.pk).update(emailed_at=timezone.now())
        sent += 1
    return sent


def mark_read(*, user, ids: Iterable[int] | None = None) -> int:
    """Mark the user's own notifications read: those in `ids`, or all when None. Returns how many changed."""
    qs = Notification.objects.filter(user=user, read_at__isnull=True)
    if ids is not None:
        ids = list(ids)
        qs = qs.filter(pk__in=ids)
    count = qs.update(read_at=timezone.now())
    if count:
        audit_record(
            actor=user,
            tenant=None,
            action="notifications.read",
            after={"count": count, "ids": ids} if ids is not None else {"count": count, "all": True},
        )
    return count


def set_email_preferences(*, user, choices: dict[str, bool]) -> None:
    """Which kinds also reach the user by email. In-portal notifications are always kept."""
    unknown = set(choices) - set(NotificationKind.values)
    if unknown:
        raise ValidationError({"kind": _("Unknown kind of notification: %(kind)s") % {"kind": sorted(unknown)[0]}})
    before = dict(EmailPreference.objects.filter(user=user, kind__in=list(choices)).values_list("kind", "email"))
    changed = {kind: bool(email) for kind, email in choices.items() if before.get(kind) != bool(email)}
    for kind, email in changed.items():
        EmailPreference.objects.update_or_create(user=user, kind=kind, defaults={"email": email})
    if changed:
        audit_record(
            actor=user,
            tenant=None,
            action="notifications.email_preferences_changed",
            before={kind: before.get(kind) for kind in changed},
            after=changed,
        )


def notify_packages_expiring(*, now: datetime | None = None, days: int = 7) -> int:
    """Warn each tenant's billing people once per package credit that expires within `days` with credit
    left (run daily). Returns how many notifications were written."""
    from billing.models import CreditGrant
    from billing.money import local_date, zone

    now = now or timezone.now()
    grants = CreditGrant.objects.filter(
        remaining__gt=0, expires_at__gt=now, expires_at__lte=now + timedelta(days=days)
    ).select_related("tenant")
    written = 0
    url = reverse("billing")
    for grant in grants:
        with transaction.atomic():
            written += len(
                notify(
                    kind=NotificationKind.PACKAGE_EXPIRING,
                    tenant=grant.tenant,
                    roles=BILLING_ROLES,
                    params={
                        "package": grant.name,
                        "remaining": str(grant.remaining),
                        "expires": local_date(grant.expires_at, zone(grant.tenant.time_zone)).isoformat(),
                    },
                    url=url,
                    dedupe_key=f"package_expiring:{grant.pk}",
                )
            )
    return written
