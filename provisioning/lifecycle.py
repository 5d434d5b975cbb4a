"""The one place VM lifecycle events for billing are written.

A VM is billable from the moment it is Running and reachable until it stops, is resized or
released; a VM that never reached Running emits nothing, so a failed boot costs nothing.
Each event has an idempotency key, so replaying a transition records it once.
"""

from django.db import IntegrityError, transaction
from django.dispatch import Signal

from provisioning.models import LifecycleEvent, LifecycleKind, VirtualMachine

# Sent after commit with the LifecycleEvent; the billing module meters from it.
vm_lifecycle = Signal()


def emit_lifecycle(*, vm: VirtualMachine, kind: LifecycleKind, at, key: str, details: dict | None = None):
    try:
        with transaction.atomic():
            event = LifecycleEvent.objects.create(
                idempotency_key=f"vm:{vm.pk}:{kind}:{key}",
                vm=vm,
                tenant_id=vm.tenant_id,
                kind=kind,
                at=at,
                details=details or {},
            )
    except IntegrityError:
        return None  # already recorded: a replay counts once
    transaction.on_commit(lambda: vm_lifecycle.send(sender=VirtualMachine, event=event))
    return event
