"""Celery tasks: thin wrappers that take ids and call one service each."""

from celery import shared_task

from tenants.models import Tenant


@shared_task(acks_late=True)
def tier_evaluate_tenant(tenant_id: int, trigger: str = "payment") -> int | None:
    """Evaluate one tenant's tier (after a payment, or after staff unpin it). Returns the TierChange id."""
    from crm.tiering import tier_evaluate

    tenant = Tenant.objects.filter(pk=tenant_id).first()
    if tenant is None:
        return None
    change = tier_evaluate(tenant=tenant, trigger=trigger)
    return change.pk if change else None


@shared_task
def tiers_evaluate_nightly() -> dict:
    from crm.tiering import tiers_evaluate_all

    return tiers_evaluate_all()


@shared_task
def churn_scan_daily() -> dict:
    from crm.churn import churn_scan

    return churn_scan()


@shared_task
def upsell_compute_daily() -> dict:
    from crm.upsell import upsell_compute_all

    return upsell_compute_all()


@shared_task
def usage_reviews_daily() -> dict:
    from crm.reviews import usage_reviews_generate

    return usage_reviews_generate()
