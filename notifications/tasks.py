"""Celery tasks: thin wrappers that call one service each."""

from celery import shared_task

from notifications import services


@shared_task
def notify_packages_expiring() -> int:
    return services.notify_packages_expiring()


@shared_task(acks_late=True)
def send_notification_emails(notification_ids: list[int]) -> int:
    return services.send_emails(notification_ids)
