"""Reads for the customer dashboard. Every function takes the tenant it reads from and runs a fixed
number of queries, whatever the number of charges, VMs or tasks."""

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone, translation

from billing.models import ChargeDay, LedgerEntry, LineKind
from billing.money import ZERO, exact, in_priced_units, local_date, local_midnight, zone
from billing.selectors import gpu_plans
from crm.spend import SPEND_KINDS
from hosting.models import Task, TaskState
from provisioning.models import VirtualMachine, VmState
from tenants.models import Tenant

DASHBOARD_DAYS = 30
LIVE_ROWS = 8
LIVE_TASK_STATES = [
    TaskState.QUEUED,
    TaskState.STARTING,
    TaskState.RUNNING,
    TaskState.RETRY_WAIT,
    TaskState.CANCELLING,
]


@dataclass(frozen=True)
class DaySpend:
    day: date
    amount: Decimal  # CNY charged that day (tenant's time zone), 2 places


@dataclass(frozen=True)
class GpuHours:
    model: str
    task_hours: Decimal
    vm_hours: Decimal

    @property
    def total(self) -> Decimal:
        return self.task_hours + self.vm_hours


def _days(tenant: Tenant, days: int, now: datetime | None) -> tuple[list[date], object]:
    tz = zone(tenant.time_zone)
    today = local_date(now or timezone.now(), tz)
    return [today - timedelta(days=days - 1 - i) for i in range(days)], tz


def spend_per_day(tenant: Tenant, *, days: int = DASHBOARD_DAYS, now: datetime | None = None) -> list[DaySpend]:
    """What the tenant spent on each of the last `days` days (today included), by day in its time zone,
    days without spend as 0.00. Spend as crm.spend defines it for tiers: ledger charges net of refunds,
    whether cash or package credit paid them. One query."""
    calendar, tz = _days(tenant, days, now)
    start, end = local_midnight(calendar[0], tz), local_midnight(calendar[-1] + timedelta(days=1), tz)
    rows = (
        LedgerEntry.objects.filter(tenant=tenant, kind__in=SPEND_KINDS, created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=tz))
        .values("day")
        .annotate(total=Sum("amount"))
        .values_list("day", "total")
    )
    # quantize: SQLite returns sums of decimals without their places (70, not 70.00).
    charged = {day: (-Decimal(total)).quantize(Decimal("0.01")) + 0 for day, total in rows}
    return [DaySpend(day=day, amount=charged.get(day, Decimal("0.00"))) for day in calendar]


def gpu_hours_by_model(tenant: Tenant, *, days: int = DASHBOARD_DAYS, now: datetime | None = None) -> list[GpuHours]:
    """GPU-hours billed by usage over the last `days` days, per GPU model: task hosting (its GPU-hour
    lines) and on-demand VMs (their hours × the plan's GPUs). From the invoice lines' days, so the hours
    are the statement's and the invoice's. Subscriptions are billed by the month, not the hour: not here.
    Largest first. Two queries."""
    calendar, _tz = _days(tenant, days, now)
    rows = ChargeDay.objects.filter(
        Q(line__kind=LineKind.TASK, line__resource__startswith="gpu:") | Q(line__kind=LineKind.VM_ON_DEMAND),
        line__invoice__tenant=tenant,
        day__gte=calendar[0],
        day__lte=calendar[-1],
    ).values_list("line__kind", "line__resource", "line__per_unit", "quantity")
    task: dict[str, Decimal] = {}
    vm_seconds: dict[tuple[str, int], Decimal] = {}
    with exact():
        for kind, resource, per_unit, quantity in rows:
            code = resource.split(":", 1)[1]
            if kind == LineKind.TASK:
                task[code] = task.get(code, ZERO) + Decimal(quantity) / per_unit
            else:
                vm_seconds[(code, per_unit)] = vm_seconds.get((code, per_unit), ZERO) + Decimal(quantity)
    vm: dict[str, Decimal] = {}
    if vm_seconds:
        plans = gpu_plans(code for code, _unit in vm_seconds)
        with exact():
            for (code, per_unit), seconds in vm_seconds.items():
                if code in plans:
                    model, gpus = plans[code]
                    vm[model] = vm.get(model, ZERO) + seconds * gpus / per_unit
    out = [
        GpuHours(
            model=model,
            task_hours=in_priced_units(task.get(model, ZERO), 1),
            vm_hours=in_priced_units(vm.get(model, ZERO), 1),
        )
        for model in {*task, *vm}
    ]
    out = [row for row in out if row.total > 0]
    return sorted(out, key=lambda row: (-row.total, row.model))


def live_work(tenant: Tenant) -> dict:
    """The tenant's VMs that exist (not released or failed) and its tasks not yet ended, newest first, at
    most LIVE_ROWS of each, with how many there are in all. Four queries."""
    vms = VirtualMachine.objects.filter(tenant=tenant).exclude(state__in=[VmState.RELEASED, VmState.FAILED])
    tasks = Task.objects.filter(tenant=tenant, state__in=LIVE_TASK_STATES)
    return {
        "vms": list(vms.select_related("plan").order_by("-requested_at")[:LIVE_ROWS]),
        "vm_count": vms.count(),
        "tasks": list(tasks.select_related("gpu_model").order_by("-submitted_at")[:LIVE_ROWS]),
        "task_count": tasks.count(),
    }


def _in_language(value):
    """A {"en": ..., "zh": ...} pair in the active language; anything else as it is."""
    if isinstance(value, dict) and "en" in value:
        return value.get("zh", value["en"]) if (translation.get_language() or "").startswith("zh") else value["en"]
    return value


def tier_outlook(tenant: Tenant) -> dict:
    """What it takes to reach the next tier, and the package that would have saved the most (crm)."""
    from crm.selectors import next_tier_progress, upsell_for

    progress = next_tier_progress(tenant)
    if progress is not None:
        progress = {
            **progress,
            "tier_name": _in_language(progress["tier_name"]),
            "rule_label": _in_language(progress.get("rule_label")),
        }
    upsell = upsell_for(tenant)
    if upsell is not None:
        upsell = {**upsell, "name": _in_language({"en": upsell.get("name_en", ""), "zh": upsell.get("name_zh", "")})}
    return {"next_tier": progress, "upsell": upsell}


def chart_data(spend: list[DaySpend], gpu: list[GpuHours]) -> dict:
    """The charts' numbers as text (money stays exact; the browser only draws them)."""
    return {
        "spend": {"labels": [d.day.isoformat() for d in spend], "values": [str(d.amount) for d in spend]},
        "gpu": {
            "labels": [row.model for row in gpu],
            "task": [str(row.task_hours) for row in gpu],
            "vm": [str(row.vm_hours) for row in gpu],
        },
    }
