"""Reads for GPU VM rental: the catalogue with its current prices and capacity, and a tenant's VMs.

Every VM read takes the tenant it reads from; list reads run a fixed number of queries whatever
the number of rows.
"""

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery
from django.utils import timezone

from provisioning import capacity
from provisioning.models import Plan, PlanPrice, ScaleUp, ScaleUpState, VirtualMachine, VmEvent, VmState
from tenants.models import Tenant


def _current_price_versions(now=None) -> QuerySet[PlanPrice]:
    """For each plan, only the price version in force: the latest effective_from not in the future."""
    now = now or timezone.now()
    latest = (
        PlanPrice.objects.filter(plan=OuterRef("plan"), effective_from__lte=now)
        .order_by("-effective_from")
        .values("pk")[:1]
    )
    return PlanPrice.objects.filter(pk=Subquery(latest))


def active_plans() -> QuerySet[Plan]:
    """Plans on offer, each with its current price version prefetched (two queries in all)."""
    return (
        Plan.objects.filter(is_active=True)
        .select_related("gpu_model")
        .prefetch_related(Prefetch("prices", queryset=_current_price_versions(), to_attr="current_price_versions"))
    )


def current_price(plan: Plan) -> PlanPrice | None:
    """The price version in force for the plan, or None when none has started yet."""
    versions = getattr(plan, "current_price_versions", None)
    if versions is None:
        versions = list(_current_price_versions().filter(plan=plan))
    return versions[0] if versions else None


def plan_availability(plans) -> dict[int, int]:
    """How many VMs of each plan could start right now: plan id → count (two queries whatever the number)."""
    return capacity.availability(plans)


def plans_with_availability() -> list[tuple[Plan, PlanPrice | None, int]]:
    """The catalogue as (plan, current price, VMs of it that could start now), in display order."""
    plans = list(active_plans())
    available = plan_availability(plans)
    return [(plan, current_price(plan), available.get(plan.pk, 0)) for plan in plans]


def vms_of(tenant: Tenant) -> QuerySet[VirtualMachine]:
    """Every VM of the tenant, released ones included (callers hide those), newest first."""
    return (
        VirtualMachine.objects.filter(tenant=tenant)
        .select_related("plan__gpu_model", "created_by")
        .prefetch_related(
            Prefetch(
                "scale_ups",
                queryset=ScaleUp.objects.filter(state=ScaleUpState.ACTIVE).order_by("ends_at"),
                to_attr="active_scale_ups",
            )
        )
    )


def vm_of(tenant: Tenant, pk) -> VirtualMachine:
    """One VM of the tenant. Raises VirtualMachine.DoesNotExist for another tenant's VM or a bad id."""
    try:
        return vms_of(tenant).get(pk=pk)
    except (ValueError, TypeError) as exc:  # not a UUID
        raise VirtualMachine.DoesNotExist from exc


def active_scale_ups(vm: VirtualMachine) -> list[ScaleUp]:
    prefetched = getattr(vm, "active_scale_ups", None)
    if prefetched is not None:
        return prefetched
    return list(vm.scale_ups.filter(state=ScaleUpState.ACTIVE).order_by("ends_at"))


def scale_ups_of(vm: VirtualMachine) -> QuerySet[ScaleUp]:
    return ScaleUp.objects.filter(vm=vm).select_related("created_by")


def vm_events(vm: VirtualMachine) -> QuerySet[VmEvent]:
    """The VM's history, oldest first."""
    return VmEvent.objects.filter(vm=vm).order_by("at", "id")


def queue_positions(vms) -> dict:
    """Place in line of each queued VM among `vms`: vm id → 1 for the next to start (one query, or none).

    Same rule as services.queue_position: VMs waiting for the same GPU model and profile that
    were queued earlier are ahead.
    """
    queued = [vm for vm in vms if vm.state == VmState.QUEUED and vm.queued_at]
    if not queued:
        return {}
    line: dict[tuple, list] = {}
    for gpu_model_id, profile, queued_at in VirtualMachine.objects.filter(state=VmState.QUEUED).values_list(
        "plan__gpu_model_id", "plan__profile", "queued_at"
    ):
        line.setdefault((gpu_model_id, profile), []).append(queued_at)
    return {
        vm.pk: 1 + sum(1 for at in line.get((vm.plan.gpu_model_id, vm.plan.profile), []) if at < vm.queued_at)
        for vm in queued
    }
