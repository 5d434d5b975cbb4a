"""Celery tasks: thin wrappers that take ids and call one service each."""

from celery import shared_task

from billing import services
from provisioning.models import LifecycleEvent, LifecycleKind


@shared_task(acks_late=True)
def bill_vm_event(event_id: int) -> None:
    event = LifecycleEvent.objects.filter(pk=event_id).first()
    if event is None:
        return
    if event.kind == LifecycleKind.STARTED:
        services.subscription_start(event_id=event.pk)
    elif event.kind in (LifecycleKind.STOPPED, LifecycleKind.RELEASED):
        services.usage_meter_vm(vm_id=event.vm_id, until=event.at)
        if event.kind == LifecycleKind.RELEASED:
            services.subscription_end_for_vm(vm_id=event.vm_id, reason="VM released")
    elif event.kind == LifecycleKind.RESIZED:
        services.usage_meter_scale_ups(vm_id=event.vm_id)


@shared_task(acks_late=True)
def meter_task_run(run_id: int) -> int:
    return services.usage_meter_task_run(run_id=run_id)


@shared_task(acks_late=True)
def rate_usage(tenant_id: int) -> int:
    return services.usage_rate_pending(tenant_id=tenant_id)


@shared_task
def meter_usage() -> dict:
    return {
        "tasks": services.usage_meter_task_runs_sweep(),
        "vms": services.usage_meter_on_demand_sweep(),
        "scale_ups": services.usage_meter_scale_ups(),
    }


@shared_task
def meter_storage() -> int:
    return services.usage_meter_storage()


@shared_task
def rate_all_usage() -> int:
    return services.usage_rate_all()


@shared_task
def renew_subscriptions() -> dict:
    return services.subscriptions_renew_due()


@shared_task
def expire_credit() -> int:
    return services.credit_grants_expire()


@shared_task
def finalise_invoices() -> int:
    return services.invoices_finalise_due()
