"""Celery tasks: thin wrappers that take ids and call one service each."""

from celery import shared_task

from provisioning import services


@shared_task(acks_late=True)
def provision_vm(vm_id: str) -> None:
    services.vm_provision(vm_id)


@shared_task(acks_late=True)
def sync_vm(vm_id: str) -> None:
    services.vm_sync(vm_id)


@shared_task
def reconcile_vms() -> dict:
    return services.reconcile()


@shared_task
def revert_scale_ups() -> int:
    return services.scale_ups_revert_due()


@shared_task
def sync_inventory() -> int:
    return services.inventory_sync()
