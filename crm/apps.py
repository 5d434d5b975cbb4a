from django.apps import AppConfig


class CrmConfig(AppConfig):
    """The account-manager side: staff roles, customer accounts (manager, churn, upsell),
    tier changes, credit approvals, notes, view-as sessions and usage reviews."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "crm"
    verbose_name = "Customer management"
