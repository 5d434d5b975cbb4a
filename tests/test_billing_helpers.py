"""Shared pieces of the billing tests: money in, task runs and VMs that ran, rating on demand."""

from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing import services
from billing.models import PackageOffer, PriceBookVersion
from billing.providers.offline import staff_confirmation_event_id

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(*args) -> datetime:
    """A moment in Asia/Shanghai, e.g. at(2026, 3, 1, 9, 30)."""
    return datetime(*args, tzinfo=SHANGHAI)


def owner_membership_of(tenant):
    return tenant.memberships.select_related("tenant", "user").get(role="owner")


def top_up(tenant, amount) -> None:
    membership = owner_membership_of(tenant)
    payment = services.top_up_create(membership=membership, actor=membership.user, amount=Decimal(amount))
    services.payment_fulfil(payment_id=payment.pk, provider_event_id=staff_confirmation_event_id(payment.pk))


def buy_package(tenant, code: str, months: int | None = None):
    membership = owner_membership_of(tenant)
    version = PriceBookVersion.objects.order_by("-effective_from").first()
    offer = PackageOffer.objects.get(version=version, code=code)
    payment = services.package_purchase(
        membership=membership, actor=membership.user, offer=offer, validity_months=months
    )
    services.payment_fulfil(payment_id=payment.pk, provider_event_id=staff_confirmation_event_id(payment.pk))
    return payment


def task_run(
    tenant, *, start, end, gpu="A100", gpus="1", vcpus=8, memory_gib=32, chargeable=True, attempt=1, task=None
):
    from hosting.models import Task, TaskRun
    from provisioning.models import GpuModel

    model = GpuModel.objects.get(code=gpu) if gpu else None
    if task is None:
        task = Task.objects.create(
            tenant=tenant,
            created_by=owner_membership_of(tenant).user,
            name="train",
            framework="pytorch",
            image="pytorch:latest",
            command="python train.py",
            gpu_model=model,
            gpus=int(Decimal(gpus)) if Decimal(gpus) >= 1 else 0,
        )
    return TaskRun.objects.create(
        task=task,
        tenant=tenant,
        attempt=attempt,
        node_name="gpu-node-1",
        gpu_model=model,
        gpus=Decimal(gpus),
        vcpus=vcpus,
        memory_gib=memory_gib,
        started_at=start,
        ended_at=end,
        outcome="succeeded" if chargeable else "preempted",
        chargeable=chargeable,
    )


def meter_and_rate(run) -> None:
    services.usage_meter_task_run(run_id=run.pk)
    services.usage_rate_pending(tenant_id=run.tenant_id)


def make_vm(tenant, *, plan="a100-1x-general", billing_mode="monthly", name="box", state="running"):
    from provisioning.models import Plan, VirtualMachine

    return VirtualMachine.objects.create(
        tenant=tenant,
        created_by=owner_membership_of(tenant).user,
        plan=Plan.objects.get(code=plan),
        name=name,
        billing_mode=billing_mode,
        state=state,
    )


def lifecycle(vm, kind: str, when, **details):
    from provisioning.models import LifecycleEvent

    base = {"plan": vm.plan.code, "billing_mode": vm.billing_mode}
    return LifecycleEvent.objects.create(
        idempotency_key=f"vm:{vm.pk}:{kind}:{when.isoformat()}",
        vm=vm,
        tenant=vm.tenant,
        kind=kind,
        at=when,
        details={**base, **details},
    )


def scale_up(vm, *, start, days, gpus=0, vcpus=0, memory_gib=0):
    from datetime import timedelta

    from provisioning.models import ScaleUp

    return ScaleUp.objects.create(
        vm=vm,
        created_by=owner_membership_of(vm.tenant).user,
        extra_gpus=gpus,
        extra_vcpus=vcpus,
        extra_memory_gib=memory_gib,
        days=days,
        starts_at=start,
        ends_at=start + timedelta(days=days),
    )
