from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    """In-portal notification centre and the email that goes with it, per user preference."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "notifications"
    verbose_name = "Notifications"
