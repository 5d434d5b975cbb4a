from django.apps import AppConfig


class CrmConfig(AppConfig):
    """The account-manager side: staff roles, customer accounts (manager, churn, upsell),
    tier changes, credit approvals, notes, view-as sessions and usage reviews."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "crm"
    verbose_name = "Customer management"

    def ready(self):
        from django.db.backends.signals import connection_created

        from crm.spend import register_sqlite_functions

        # Month-of-a-tenant arithmetic in SQL (crm.spend.LocalMonthIndex, LocalMonthStart) on SQLite.
        connection_created.connect(register_sqlite_functions, dispatch_uid="crm_sqlite_functions")
