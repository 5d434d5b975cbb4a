"""Reads for the account-manager console. Every read of customers goes through the staff member's
visible tenants (crm.permissions.visible_tenants), and list reads run a fixed number of queries
whatever the number of rows: figures per customer are correlated subqueries, not loops."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.paginator import Page, Paginator
from django.db.models import (
    Count,
    DecimalField,
    Exists,
    F,
    IntegerField,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import CreditGrant, InvoiceLine, LineKind, Wallet
from billing.money import add_months, local_date, zone
from billing.selectors import gpu_plans
from crm.models import CreditAdjustment, CreditRequestStatus, CustomerNote, TierChange, UsageReview
from crm.permissions import sees_all_customers, visible_tenants
from crm.spend import spend_annotations
from hosting.models import ACTIVE_TASK_STATES, Task
from hosting.selectors import WAITING_STATES
from provisioning.capacity import free_capacity
from provisioning.models import Node, Pool, VirtualMachine, VmState
from tenants.models import AuditEvent, Membership, Tenant

MONEY = DecimalField(max_digits=16, decimal_places=2)
ZERO = Decimal("0.00")

# Sort keys of the customer list → ordering (the name breaks ties, so pages never overlap).
CUSTOMER_SORTS = {
    "name": ("name",),
    "-name": ("-name",),
    "tier": ("tier__rank",),
    "-tier": ("-tier__rank",),
    "spend_mtd": ("spend_mtd",),
    "-spend_mtd": ("-spend_mtd",),
    "spend_12m": ("spend_12m",),
    "-spend_12m": ("-spend_12m",),
    "balance": ("balance",),
    "-balance": ("-balance",),
}


def _count_of(queryset) -> Coalesce:
    """Rows of `queryset` (already filtered on tenant=OuterRef('pk')) as an integer subquery."""
    counted = queryset.order_by().values("tenant").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def customer_list(
    user,
    *,
    query: str = "",
    tier: str = "",
    manager: str = "",
    churn: str = "",
    sort: str = "name",
    now: datetime | None = None,
) -> QuerySet[Tenant]:
    """The customers `user` may see, filtered and sorted, each annotated with what the list shows:
    spend_mtd, spend_12m (crm.spend), cash_balance, package_credit (unexpired, not written off),
    balance (their sum), running_vms, running_tasks, member_count, manager_email, churn_risk,
    churn_reason. One query for a page, however many customers there are."""
    now = now or timezone.now()
    tenants = visible_tenants(user).select_related("tier")
    query = query.strip()
    if query:
        members = Membership.objects.filter(tenant=OuterRef("pk"), user__email__icontains=query)
        tenants = tenants.filter(Q(name__icontains=query) | Q(slug__icontains=query) | Exists(members))
    if tier:
        tenants = tenants.filter(tier__code=tier)
    if manager == "none":
        tenants = tenants.filter(Q(account__isnull=True) | Q(account__account_manager__isnull=True))
    elif manager:
        tenants = tenants.filter(account__account_manager_id=manager)
    if churn == "yes":
        tenants = tenants.filter(account__churn_risk=True)
    elif churn == "no":
        tenants = tenants.exclude(account__churn_risk=True)
    cash = Wallet.objects.filter(tenant=OuterRef("pk")).values("cash_balance")[:1]
    grants = (
        CreditGrant.objects.filter(
            tenant=OuterRef("pk"), remaining__gt=0, expires_at__gt=now, written_off_at__isnull=True
        )
        .order_by()
        .values("tenant")
        .annotate(total=Sum("remaining"))
        .values("total")
    )
    tenants = tenants.annotate(
        **spend_annotations(now),
        cash_balance=Coalesce(Subquery(cash, output_field=MONEY), Value(ZERO), output_field=MONEY),
        package_credit=Coalesce(Subquery(grants, output_field=MONEY), Value(ZERO), output_field=MONEY),
        running_vms=_count_of(VirtualMachine.objects.filter(tenant=OuterRef("pk"), state=VmState.RUNNING)),
        running_tasks=_count_of(Task.objects.filter(tenant=OuterRef("pk"), state__in=ACTIVE_TASK_STATES)),
        member_count=_count_of(Membership.objects.filter(tenant=OuterRef("pk"))),
        manager_email=F("account__account_manager__email"),
        churn_risk=Coalesce(F("account__churn_risk"), Value(False)),
        churn_reason=F("account__churn_reason"),
    ).annotate(balance=F("cash_balance") + F("package_credit"))
    return tenants.order_by(*CUSTOMER_SORTS.get(sort, CUSTOMER_SORTS["name"]), "name", "pk")


def customer_page(user, *, number, per_page: int = 50, now: datetime | None = None, **filters) -> Page:
    """One page of customer_list, in three queries whatever the page: the count, the page's ids in
    order (only the sort key is computed for the rows before it), then the figures of those ids."""
    now = now or timezone.now()
    ordered = customer_list(user, now=now, **filters)
    page = Paginator(ordered.values_list("pk", flat=True), per_page).get_page(number)
    ids = list(page.object_list)
    rows = {tenant.pk: tenant for tenant in customer_list(user, now=now).filter(pk__in=ids)}
    page.object_list = [rows[pk] for pk in ids]
    return page


# --- Customer 360 ------------------------------------------------------------------------------------


def vms_of(tenant: Tenant, limit: int = 20) -> list[VirtualMachine]:
    return list(VirtualMachine.objects.filter(tenant=tenant).select_related("plan").order_by("-requested_at")[:limit])


def recent_tasks_of(tenant: Tenant, limit: int = 20) -> list[Task]:
    return list(Task.objects.filter(tenant=tenant).select_related("gpu_model").order_by("-submitted_at")[:limit])


def notes_of(tenant: Tenant, limit: int = 50) -> list[CustomerNote]:
    return list(CustomerNote.objects.filter(tenant=tenant).select_related("author")[:limit])


def tier_changes_of(tenant: Tenant, limit: int = 50) -> list[TierChange]:
    return list(TierChange.objects.filter(tenant=tenant).select_related("from_tier", "to_tier", "actor")[:limit])


def credits_of(tenant: Tenant, limit: int = 20) -> list[CreditAdjustment]:
    return list(CreditAdjustment.objects.filter(tenant=tenant).select_related("requested_by", "decided_by")[:limit])


def usage_reviews_of(tenant: Tenant, limit: int = 12) -> list[UsageReview]:
    return list(UsageReview.objects.filter(tenant=tenant).select_related("sent_by")[:limit])


def audit_of(tenant: Tenant) -> QuerySet[AuditEvent]:
    """What the customer and staff did for this tenant, newest first."""
    return AuditEvent.objects.filter(tenant=tenant).order_by("-created_at", "-id")


@dataclass
class GpuUsage:
    """GPU-hours per calendar month (the tenant's time zone) and GPU model."""

    months: list[date]
    models: list[str]
    hours: dict[tuple[date, str], Decimal] = field(default_factory=dict)

    def of(self, month: date, model: str) -> Decimal:
        return self.hours.get((month, model), Decimal("0"))

    def month_total(self, month: date) -> Decimal:
        return sum((self.of(month, m) for m in self.models), Decimal("0"))

    @property
    def total(self) -> Decimal:
        return sum(self.hours.values(), Decimal("0"))

    @property
    def rows(self) -> list[tuple[date, list[Decimal], Decimal]]:
        return [(m, [self.of(m, model) for model in self.models], self.month_total(m)) for m in self.months]


def gpu_hours_by_month(tenant: Tenant, *, months: int = 12, now: datetime | None = None) -> GpuUsage:
    """GPU-hours the customer was billed for, per month and GPU model, over the last `months` months
    (this one included), from the invoice lines: task hosting GPU lines (gpu:<model>, GPU-seconds)
    and on-demand VM lines (vm_on_demand:<plan>, seconds × the plan's GPUs). Two queries."""
    now = now or timezone.now()
    this_month = local_date(now, zone(tenant.time_zone)).replace(day=1)
    first = add_months(this_month, -(months - 1))
    month_list = [add_months(first, k) for k in range(months)]
    rows = InvoiceLine.objects.filter(invoice__tenant=tenant, invoice__period_start__gte=first).filter(
        Q(kind=LineKind.TASK, resource__startswith="gpu:") | Q(kind=LineKind.VM_ON_DEMAND)
    )
    lines = list(rows.values_list("invoice__period_start", "kind", "resource", "quantity"))
    plan_codes = {resource.split(":", 1)[1] for _m, kind, resource, _q in lines if kind == LineKind.VM_ON_DEMAND}
    plans = gpu_plans(plan_codes)
    hours: dict[tuple[date, str], Decimal] = defaultdict(Decimal)
    for month, kind, resource, quantity in lines:
        if kind == LineKind.TASK:
            model, gpu_seconds = resource.split(":", 1)[1], quantity
        elif resource.split(":", 1)[1] in plans:
            model, gpus = plans[resource.split(":", 1)[1]]
            gpu_seconds = quantity * gpus
        else:
            continue  # a CPU-only plan
        hours[(month, model)] += Decimal(gpu_seconds) / 3600
    hours = {key: value.quantize(Decimal("0.1")) for key, value in hours.items() if value}
    models = sorted({model for _month, model in hours})
    return GpuUsage(months=month_list, models=models, hours=hours)


# --- Credits waiting for approval ----------------------------------------------------------------------


def credits_pending(user) -> QuerySet[CreditAdjustment]:
    return (
        CreditAdjustment.objects.filter(status=CreditRequestStatus.PENDING, tenant__in=visible_tenants(user))
        .select_related("tenant", "requested_by")
        .order_by("requested_at")
    )


def credits_decided(user, limit: int = 20) -> list[CreditAdjustment]:
    return list(
        CreditAdjustment.objects.exclude(status=CreditRequestStatus.PENDING)
        .filter(tenant__in=visible_tenants(user))
        .select_related("tenant", "requested_by", "decided_by")
        .order_by("-decided_at")[:limit]
    )


# --- Pools ---------------------------------------------------------------------------------------------


@dataclass
class PoolLine:
    """Capacity of one pool for one GPU model (or of CPU-only nodes), as the portal accounts for it."""

    pool: str
    pool_label: str
    gpu_model: str  # "" for CPU-only nodes
    nodes: int
    gpus: int
    gpus_used: Decimal  # a vGPU slice in use counts as its fraction of the GPU
    cpus: int
    cpus_used: int
    memory_gib: int
    memory_used_gib: int
    running_vms: int = 0
    running_tasks: int = 0

    @property
    def used_percent(self) -> int:
        """GPUs in use (CPUs for CPU-only nodes), in percent of what the pool has."""
        if self.gpus:
            return round(100 * self.gpus_used / self.gpus)
        return round(100 * self.cpus_used / self.cpus) if self.cpus else 0

    @property
    def free_percent(self) -> int:
        return 100 - self.used_percent

    @property
    def low(self) -> bool:
        return self.free_percent < settings.PORTAL_POOL_FREE_WARNING_PERCENT


@dataclass
class QueueLine:
    gpu_model: str  # "" for CPU-only work
    tasks_waiting: int
    oldest_task_since: datetime | None
    vms_waiting: int
    oldest_vm_since: datetime | None

    @property
    def oldest_since(self) -> datetime | None:
        """When the longest-waiting task or VM order of this model started waiting."""
        starts = [t for t in (self.oldest_task_since, self.oldest_vm_since) if t is not None]
        return min(starts) if starts else None

    def oldest_wait(self, now: datetime) -> timedelta | None:
        return now - self.oldest_since if self.oldest_since else None


def pool_lines() -> list[PoolLine]:
    """Utilisation per pool and GPU model from placements on schedulable nodes (provisioning.capacity),
    with the VMs and tasks running there. Five queries whatever the size of the cluster."""
    nodes = list(Node.objects.filter(schedulable=True).select_related("gpu_model").order_by("pool", "name"))
    pool_of = {n.name: (n.pool, n.gpu_model.code if n.gpu_model_id else "") for n in nodes}
    lines: dict[tuple[str, str], PoolLine] = {}
    labels = dict(Pool.choices)
    for free in free_capacity(nodes):
        node = free.node
        key = pool_of[node.name]
        line = lines.setdefault(
            key,
            PoolLine(
                pool=key[0],
                pool_label=str(labels.get(key[0], key[0])),
                gpu_model=key[1],
                nodes=0,
                gpus=0,
                gpus_used=Decimal("0"),
                cpus=0,
                cpus_used=0,
                memory_gib=0,
                memory_used_gib=0,
            ),
        )
        line.nodes += 1
        line.gpus += node.gpus
        line.gpus_used += sum(
            (
                Decimal(min(used, node.vgpu_slices_per_gpu)) / node.vgpu_slices_per_gpu
                for used in free.slices_used.values()
            ),
            Decimal("0"),
        )
        line.cpus += node.cpus
        line.cpus_used += node.cpus - free.cpus
        line.memory_gib += node.memory_gib
        line.memory_used_gib += node.memory_gib - free.memory_gib
    running_vms = (
        VirtualMachine.objects.filter(state=VmState.RUNNING, node_name__in=list(pool_of))
        .values("node_name")
        .annotate(n=Count("pk"))
        .values_list("node_name", "n")
    )
    running_tasks = (
        Task.objects.filter(state__in=ACTIVE_TASK_STATES, node_name__in=list(pool_of))
        .values("node_name")
        .annotate(n=Count("pk"))
        .values_list("node_name", "n")
    )
    for node_name, n in running_vms:
        lines[pool_of[node_name]].running_vms += n
    for node_name, n in running_tasks:
        lines[pool_of[node_name]].running_tasks += n
    for line in lines.values():
        line.gpus_used = line.gpus_used.quantize(Decimal("0.01"))
    return list(lines.values())


def queue_lines() -> list[QueueLine]:
    """Work waiting for capacity, per GPU model: queued tasks (hosting) and queued VM orders
    (provisioning), with when the longest-waiting of each started waiting. Two queries."""
    tasks = {
        row["gpu_model__code"] or "": row
        for row in Task.objects.filter(state__in=WAITING_STATES)
        .values("gpu_model__code")
        .annotate(n=Count("pk"), oldest=Min("queued_since"))
    }
    vms = {
        row["plan__gpu_model__code"] or "": row
        for row in VirtualMachine.objects.filter(state=VmState.QUEUED)
        .values("plan__gpu_model__code")
        .annotate(n=Count("pk"), oldest=Min("queued_at"))
    }
    return [
        QueueLine(
            gpu_model=model,
            tasks_waiting=tasks.get(model, {}).get("n", 0),
            oldest_task_since=tasks.get(model, {}).get("oldest"),
            vms_waiting=vms.get(model, {}).get("n", 0),
            oldest_vm_since=vms.get(model, {}).get("oldest"),
        )
        for model in sorted(set(tasks) | set(vms))
    ]


# --- Audit search --------------------------------------------------------------------------------------


def audit_search(
    user,
    *,
    actor: str = "",
    tenant: str = "",
    action: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Audit events the user may see (an account manager: their customers'), newest first.
    `actor`: part of the actor's email; `tenant`: a customer's slug or part of its name;
    `action`: the start of the action code; [since, until)."""
    events = AuditEvent.objects.select_related("tenant").order_by("-created_at", "-id")
    if not sees_all_customers(user):
        events = events.filter(tenant__in=visible_tenants(user))
    if actor.strip():
        events = events.filter(actor_label__icontains=actor.strip())
    if tenant.strip():
        events = events.filter(Q(tenant__slug=tenant.strip()) | Q(tenant__name__icontains=tenant.strip()))
    if action.strip():
        events = events.filter(action__startswith=action.strip())
    if since is not None:
        events = events.filter(created_at__gte=since)
    if until is not None:
        events = events.filter(created_at__lt=until)
    return events
