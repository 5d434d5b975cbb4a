"""notify(): the one way any part of the portal tells people something.

It writes one Notification per recipient (always kept in the portal), pushes a dashboard event
so open pages update, and emails the recipients whose preference allows it, after commit and in
each recipient's own language."""

from collections.abc import Iterable

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone, translation

from notifications.messages import EMAIL_DEFAULTS, render
from notifications.models import EmailPreference, Notification

User = get_user_model()


def _recipients(*, tenant, users, roles) -> list:
    if users is not None:
        return list({u.pk: u for u in users}.values())
    if tenant is None:
        return []
    qs = User.objects.filter(memberships__tenant=tenant, is_active=True)
    if roles:
        qs = qs.filter(memberships__role__in=list(roles))
    return list(qs.distinct())


def wants_email(user, kind: str) -> bool:
    pref = EmailPreference.objects.filter(user=user, kind=kind).values_list("email", flat=True).first()
    return EMAIL_DEFAULTS.get(kind, False) if pref is None else pref


def notify(
    *,
    kind: str,
    tenant=None,
    users: Iterable | None = None,
    roles: Iterable[str] | None = None,
    params: dict | None = None,
    url: str = "",
    dedupe_key: str = "",
) -> list[Notification]:
    """Notify `users`, or else the members of `tenant` (only those with `roles` when given).

    `params` fill the kind's message (notifications/messages.py); values that are data in two
    languages may be {"en": ..., "zh": ...}. A `dedupe_key` makes the call idempotent per user.
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

    if tenant is not None:
        emit_dashboard_event(tenant.pk, "notification", {"kind": kind})
    ids = [n.pk for n in created if wants_email(n.user, kind)]
    if ids:
        transaction.on_commit(lambda: send_emails(ids))
    return created


def send_emails(notification_ids: list[int]) -> int:
    sent = 0
    base = settings.PORTAL_BASE_URL.rstrip("/")
    for note in Notification.objects.filter(pk__in=notification_ids, emailed_at__isnull=True).select_related("user"):
        with translation.override(note.user.language or settings.LANGUAGE_CODE):
            title, body = render(note.kind, note.params)
            if note.url:
                body = f"{body}\n\n{base}{note.url}"
        send_mail(subject=f"[GPU Portal] {title}", message=body, from_email=None, recipient_list=[note.user.email])
        Notification.objects.filter(pk=note.pk).update(emailed_at=timezone.now())
        sent += 1
    return sent


def mark_read(*, user, ids: Iterable[int] | None = None) -> int:
    qs = Notification.objects.filter(user=user, read_at__isnull=True)
    if ids is not None:
        qs = qs.filter(pk__in=list(ids))
    return qs.update(read_at=timezone.now())


def set_email_preferences(*, user, choices: dict[str, bool]) -> None:
    for kind, email in choices.items():
        EmailPreference.objects.update_or_create(user=user, kind=kind, defaults={"email": bool(email)})
