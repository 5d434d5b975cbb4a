"""Reads for billing. Every read of a tenant's money takes the tenant it reads from."""

from collections import defaultdict
from copy import copy
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from billing.models import (
    ChargeDay,
    CreditGrant,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerEntry,
    LedgerKind,
    LineKind,
    Payment,
    PriceBookVersion,
    Subscription,
    UsageRecord,
    UsageSource,
    Wallet,
)
from billing.money import (
    MICROSECONDS_PER_HOUR,
    ZERO,
    add_months,
    exact,
    exact_amount,
    in_priced_units,
    local_date,
    local_midnight,
    microseconds,
    month_start,
    quantity,
    to_fen,
    zone,
)
from billing.pricing import MissingPrice, PriceBook
from provisioning.models import BillingMode, Plan, VirtualMachine, VmState
from tenants.models import Tenant

# --- Price book --------------------------------------------------------------------------------


def price_book_in_force(at: datetime | None = None) -> PriceBookVersion | None:
    """The version in force now (or at `at`), with its items, bands and packages."""
    at = at or timezone.now()
    return (
        PriceBookVersion.objects.filter(effective_from__lte=at)
        .order_by("-effective_from")
        .prefetch_related("items", "bands", "packages")
        .first()
    )


def price_book_versions() -> QuerySet[PriceBookVersion]:
    return PriceBookVersion.objects.order_by("-effective_from").prefetch_related("items", "bands", "packages")


def packages_on_sale() -> list:
    version = price_book_in_force()
    return list(version.packages.all()) if version else []


# --- Wallet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageBalance:
    id: int
    name: str
    granted: Decimal
    remaining: Decimal
    expires_at: datetime


@dataclass(frozen=True)
class WalletSummary:
    cash_balance: Decimal
    credit_limit: Decimal
    packages: list[PackageBalance]
    package_balance: Decimal
    balance: Decimal  # cash + package credit
    available_for_tasks: Decimal  # package credit + cash + credit limit
    available_for_vms: Decimal  # cash + credit limit
    reserved: Decimal
    daily_burn: Decimal
    days_left: int | None
    low_balance_threshold: Decimal | None
    low_balance: bool
    credit_exhausted: bool


def wallet_of(tenant: Tenant) -> Wallet:
    """The tenant's wallet; an empty one (not saved) before its first movement of money."""
    return Wallet.objects.filter(tenant=tenant).first() or Wallet(tenant=tenant)


def active_grants(tenant: Tenant, now: datetime | None = None) -> QuerySet[CreditGrant]:
    now = now or timezone.now()
    return CreditGrant.objects.filter(tenant=tenant, remaining__gt=0, expires_at__gt=now).order_by("expires_at", "id")


def tenants_holding_packages(tenant_ids) -> set[int]:
    """Tenants with an unexpired compute package that still has credit (the scheduler favours them)."""
    return set(
        CreditGrant.objects.filter(
            tenant_id__in=list(tenant_ids), remaining__gt=0, expires_at__gt=timezone.now(), payment__isnull=False
        )
        .values_list("tenant_id", flat=True)
        .distinct()
    )


def _hourly_cost_of_running_work(tenant: Tenant, book: PriceBook, now: datetime) -> tuple[Decimal, Decimal]:
    """(cost accrued since the last metering, cost of the next hour) of running tasks and on-demand VMs."""
    from hosting.models import TaskRun

    accrued = ZERO
    next_hour = ZERO
    with exact():
        for run in TaskRun.objects.filter(tenant=tenant, ended_at__isnull=True).select_related("gpu_model"):
            try:
                rate = book.item("task_cpu_core_hour", now).unit_price * run.vcpus
                rate += book.item("task_memory_gib_hour", now).unit_price * run.memory_gib
                if run.gpu_model_id and run.gpus:
                    rate += book.item(f"task_gpu_hour:{run.gpu_model.code}", now).unit_price * run.gpus
            except MissingPrice:
                continue
            accrued += rate * max(Decimal(microseconds(now - run.started_at)), ZERO) / MICROSECONDS_PER_HOUR
            next_hour += rate
        vms = VirtualMachine.objects.filter(
            tenant=tenant, billing_mode=BillingMode.ON_DEMAND, state=VmState.RUNNING
        ).select_related("plan")
        for vm in vms:
            try:
                rate = book.plan_price(vm.plan.code, now).hourly
            except MissingPrice:
                continue
            since_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(minutes=5)
            start = max(vm.running_since or now, since_hour)
            accrued += rate * max(Decimal(microseconds(now - start)), ZERO) / MICROSECONDS_PER_HOUR
            next_hour += rate
    return accrued, next_hour


def wallet_summary(tenant: Tenant, now: datetime | None = None) -> WalletSummary:
    now = now or timezone.now()
    wallet = wallet_of(tenant)
    grants = list(active_grants(tenant, now))
    package_balance = sum((g.remaining for g in grants), Decimal("0.00"))
    book = PriceBook()
    accrued, next_hour = _hourly_cost_of_running_work(tenant, book, now)
    reserved = to_fen(accrued + next_hour)
    week_ago = now - timedelta(days=7)
    charges = LedgerEntry.objects.filter(tenant=tenant, kind=LedgerKind.CHARGE, created_at__gte=week_ago)
    spent = -sum(charges.values_list("amount", flat=True), Decimal("0.00"))
    daily_burn = to_fen(spent / 7)
    spendable = wallet.cash_balance + wallet.credit_limit + package_balance
    days_left = None
    if daily_burn > 0:
        days_left = max(int(spendable / daily_burn), 0) if spendable > 0 else 0
    balance = wallet.cash_balance + package_balance
    return WalletSummary(
        cash_balance=wallet.cash_balance,
        credit_limit=wallet.credit_limit,
        packages=[
            PackageBalance(id=g.pk, name=g.name, granted=g.granted, remaining=g.remaining, expires_at=g.expires_at)
            for g in grants
        ],
        package_balance=package_balance,
        balance=balance,
        available_for_tasks=spendable,
        available_for_vms=wallet.cash_balance + wallet.credit_limit,
        reserved=reserved,
        daily_burn=daily_burn,
        days_left=days_left,
        low_balance_threshold=wallet.low_balance_threshold,
        low_balance=wallet.low_balance_threshold is not None and balance < wallet.low_balance_threshold,
        # Ran out, as billing.services._after_money_moved records it: a new wallet with nothing in it
        # yet has not run out of anything (and is not told so).
        credit_exhausted=wallet.credit_exhausted_at is not None and wallet.cash_balance + wallet.credit_limit <= 0,
    )


def ledger_of(tenant: Tenant) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(tenant=tenant).select_related("grant", "invoice_line__invoice")


def payments_of(tenant: Tenant) -> QuerySet[Payment]:
    return Payment.objects.filter(tenant=tenant).select_related("offer")


def payment_of(tenant: Tenant, pk) -> Payment:
    try:
        return payments_of(tenant).get(pk=pk)
    except (ValueError, TypeError) as exc:
        raise Payment.DoesNotExist from exc


def subscriptions_of(tenant: Tenant) -> QuerySet[Subscription]:
    return Subscription.objects.filter(tenant=tenant).select_related("plan", "vm")


# --- Invoices ----------------------------------------------------------------------------------


def invoices_of(tenant: Tenant) -> QuerySet[Invoice]:
    return Invoice.objects.filter(tenant=tenant)


def invoice_of(tenant: Tenant, pk) -> Invoice:
    """One invoice of the tenant with its lines. Another tenant's invoice does not exist."""
    return (
        invoices_of(tenant)
        .prefetch_related(Prefetch("lines", queryset=InvoiceLine.objects.order_by("kind", "resource", "id")))
        .get(pk=pk)
    )


@dataclass(frozen=True)
class InvoicePayments:
    packages: Decimal
    cash: Decimal


def invoice_payments(invoice: Invoice) -> InvoicePayments:
    """How the invoice's charges were paid: package credit and cash (with credit)."""
    rows = LedgerEntry.objects.filter(invoice_line__invoice=invoice, kind=LedgerKind.CHARGE).values_list(
        "grant_id", "amount"
    )
    packages = sum((-amount for grant, amount in rows if grant is not None), Decimal("0.00"))
    cash = sum((-amount for grant, amount in rows if grant is None), Decimal("0.00"))
    return InvoicePayments(packages=packages, cash=cash)


# --- Statements --------------------------------------------------------------------------------


GRANULARITIES = ("day", "week", "month")


def _bucket(day: date, granularity: str) -> date:
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    return month_start(day)


def _bucket_end(start: date, granularity: str) -> date:
    if granularity == "day":
        return start + timedelta(days=1)
    if granularity == "week":
        return start + timedelta(days=7)
    return add_months(start, 1)


@dataclass(frozen=True)
class StatementRow:
    period_start: date
    period_end: date
    invoice_id: int
    invoice_month: date
    kind: str
    resource: str
    description: str
    unit: str
    unit_price: Decimal
    discount_percent: Decimal
    metered_unit: str
    quantity: Decimal
    billed_quantity: Decimal
    amount_unrounded: Decimal
    amount: Decimal


def statement(tenant: Tenant, *, start: date, end: date, granularity: str) -> list[StatementRow]:
    """Charges by day, week or month in [start, end), per invoice line.

    A line's exact amount is a function of its cumulative quantity; each period shows the change
    of that amount rounded to the fen, so the periods of a month add up to the invoice line
    exactly, and the invoice lines to the ledger's charges, whatever the granularity."""
    lines = list(
        InvoiceLine.objects.filter(invoice__tenant=tenant, invoice__period_end__gt=start, invoice__period_start__lt=end)
        .select_related("invoice")
        .order_by("invoice__period_start", "kind", "resource", "id")
    )
    days = defaultdict(list)
    for row in ChargeDay.objects.filter(line__in=lines).order_by("day"):
        days[row.line_id].append(row)
    rows = []
    for line in lines:
        per_bucket: dict[date, Decimal] = {}
        for row in days[line.pk]:
            bucket = _bucket(row.day, granularity)
            with exact():
                per_bucket[bucket] = per_bucket.get(bucket, ZERO) + row.quantity
        cumulative = ZERO
        exact_before = ZERO
        rounded_before = Decimal("0.00")
        for bucket in sorted(per_bucket):
            with exact():
                cumulative += per_bucket[bucket]
            exact_now = line.exact_amount(cumulative)
            rounded_now = to_fen(exact_now)
            row = StatementRow(
                period_start=bucket,
                period_end=_bucket_end(bucket, granularity),
                invoice_id=line.invoice_id,
                invoice_month=line.invoice.period_start,
                kind=line.kind,
                resource=line.resource,
                description=line.description,
                unit=line.unit,
                unit_price=line.unit_price,
                discount_percent=line.discount_percent,
                metered_unit=line.metered_unit,
                quantity=per_bucket[bucket],
                billed_quantity=in_priced_units(per_bucket[bucket], line.per_unit),
                amount_unrounded=exact_now - exact_before,
                amount=rounded_now - rounded_before,
            )
            exact_before, rounded_before = exact_now, rounded_now
            if bucket < end and row.period_end > start:
                rows.append(row)
    rows.sort(key=lambda r: (r.period_start, r.kind, r.resource, r.invoice_id))
    return rows


def usage_records_of(
    tenant: Tenant, *, start: datetime | None = None, end: datetime | None = None
) -> QuerySet[UsageRecord]:
    """The tenant's usage log in chain order (optionally records created in [start, end))."""
    records = UsageRecord.objects.filter(tenant=tenant).order_by("sequence")
    if start is not None:
        records = records.filter(created_at__gte=start)
    if end is not None:
        records = records.filter(created_at__lt=end)
    return records


def month_range(tenant: Tenant, day: date) -> tuple[datetime, datetime]:
    tz = zone(tenant.time_zone)
    first = month_start(day)
    return local_midnight(first, tz), local_midnight(add_months(first, 1), tz)


def today_of(tenant: Tenant) -> date:
    return local_date(timezone.now(), zone(tenant.time_zone))


# --- What a task cost so far -------------------------------------------------------------------------


@dataclass
class _Metered:
    """A task usage record for the replay: one the log holds, or one a run will append."""

    sequence: int
    resource: str
    period_start: datetime
    created_at: datetime
    quantity: Decimal
    record: UsageRecord | None = None  # set for the task's own records


class _Replay:
    """Stands in for the invoice lines of a rating pass (billing.services._Lines), so that billing's own
    _rate_record rates the task's records again without writing anything: invoice_for gives the invoice
    month the record went (or will go) to, task_gpu_seconds the task GPU-seconds that invoice had rated
    before it (the volume bands), and add collects the task's own quantity per invoice line."""

    def __init__(self):
        self.month: date | None = None
        self.gpu_before = ZERO
        self.lines: dict[tuple[date, str], list] = {}

    def invoice_for(self, moment: datetime) -> tuple[date | None, None]:
        return self.month, None

    def task_gpu_seconds(self, invoice) -> Decimal:
        return self.gpu_before

    def add(self, invoice, day, *, key, unit_price, discount_percent, per_unit, amount_quantity, **_line) -> None:
        line = self.lines.setdefault((invoice, key), [ZERO, unit_price, discount_percent, per_unit])
        with exact():
            line[0] += amount_quantity

    def amount(self) -> Decimal:
        """Each line's share rounded once, as the line itself is rounded, then summed."""
        return sum(
            (to_fen(exact_amount(q, price, off, per_unit)) for q, price, off, per_unit in self.lines.values()),
            Decimal("0.00"),
        )


def _next_month(month: date) -> date:
    return add_months(month, 1)


def _route(tenant: Tenant, tz, own: list[_Metered]) -> dict[int, tuple[date, Decimal]]:
    """For each of the task's records (by sequence): the invoice month rating put it on (or will), and
    the task GPU-seconds that invoice had rated before it.

    A record goes on the invoice of its month unless that invoice was final when it was rated; then on
    the next one still open. Rating takes a tenant's records in sequence order and an invoice is final
    from one moment on, so the records that reached a final invoice are the first of those headed for
    it, in sequence order, up to its task quantity; the rest go on. Records from before the task's
    first month are placed by when they were appended against when those invoices were finalised.
    """
    month_of = {m.sequence: month_start(local_date(m.period_start, tz)) for m in own}
    first = min(month_of.values())
    invoices = {i.period_start: i for i in Invoice.objects.filter(tenant=tenant)}

    def final(month: date) -> bool:
        invoice = invoices.get(month)
        return invoice is not None and invoice.status == InvoiceStatus.FINAL

    last = max(month_of.values())
    while final(last):
        last = _next_month(last)
    start, end = local_midnight(first, tz), local_midnight(_next_month(last), tz)
    caps: dict[date, Decimal] = defaultdict(lambda: ZERO)
    final_ids = {i.pk: month for month, i in invoices.items() if first <= month <= last and final(month)}
    with exact():
        for invoice_id, line_quantity in InvoiceLine.objects.filter(
            invoice_id__in=list(final_ids), kind=LineKind.TASK
        ).values_list("invoice_id", "quantity"):
            caps[final_ids[invoice_id]] += line_quantity

    rows = UsageRecord.objects.filter(tenant=tenant, source=UsageSource.TASK, period_start__lt=end).filter(
        Q(period_start__gte=start) | Q(created_at__gte=start)
    )
    own_sequences = {m.sequence for m in own}
    heading: dict[date, list[_Metered]] = defaultdict(list)
    carry: list[_Metered] = []
    for sequence, resource, period_start, created_at, amount in rows.values_list(
        "sequence", "resource", "period_start", "created_at", "quantity"
    ):
        if sequence in own_sequences:
            continue
        metered = _Metered(sequence, resource, period_start, created_at, amount)
        month = month_start(local_date(period_start, tz))
        if month >= first:
            heading[month].append(metered)
            continue
        while month < first and final(month) and created_at > (invoices[month].finalised_at or created_at):
            month = _next_month(month)
        if month >= first:
            carry.append(metered)  # late usage of an earlier month, carried on to the task's months
    for metered in own:
        heading[month_of[metered.sequence]].append(metered)

    placed: dict[int, tuple[date, Decimal]] = {}
    month = first
    while month <= last or carry:
        toward = sorted(carry + heading.pop(month, []), key=lambda m: m.sequence)
        carry = []
        if final(month):
            taken, total = [], ZERO
            with exact():
                for index, metered in enumerate(toward):
                    if total + metered.quantity > caps[month]:
                        carry = toward[index:]
                        break
                    total += metered.quantity
                    taken.append(metered)
        else:
            taken = toward
        gpu = ZERO
        with exact():
            for metered in taken:
                if metered.sequence in own_sequences:
                    placed[metered.sequence] = (month, gpu)
                if metered.resource.startswith("gpu:"):
                    gpu += metered.quantity
        month = _next_month(month)
    return placed


def task_cost(task, now: datetime | None = None) -> Decimal | None:
    """What the task has cost so far, in CNY (2 places): billing's own rating of its usage.

    Each usage record of the task's runs is rated as the rating pass rates it (billing.services
    ._rate_record: the price in force when the usage began, the volume band the tenant's month had
    reached at that record, the invoice it went on), and the task's share of each invoice line is
    rounded to the fen once, as the line is. So for a task that is alone on its invoice lines this is
    exactly what the invoice charges for it; tasks sharing a line may each differ from an even split
    of that line's rounding by under a fen.

    Records a run will append but the log does not hold yet are rated the same way after everything
    the log holds: a finished run not yet metered, and, as an estimate, a run still going as if it
    ended now (if that attempt is preempted or its node is lost, it will cost nothing). Runs that were
    not chargeable cost nothing. None when some usage has no price in force (it stays unrated until
    staff add one).
    """
    from billing.services import _rate_record, _task_run_events
    from hosting.models import TaskRun

    now = now or timezone.now()
    runs = list(TaskRun.objects.filter(task=task).select_related("gpu_model"))
    if not runs:
        return Decimal("0.00")
    tenant = task.tenant
    tz = zone(tenant.time_zone)
    records = list(
        UsageRecord.objects.filter(
            tenant=tenant, source=UsageSource.TASK, source_id__in=[str(run.pk) for run in runs]
        ).order_by("sequence")
    )
    own = [_Metered(r.sequence, r.resource, r.period_start, r.created_at, r.quantity, r) for r in records]
    keys = {r.idempotency_key for r in records}
    head = (
        UsageRecord.objects.filter(tenant=tenant).order_by("-sequence").values_list("sequence", flat=True).first() or 0
    )
    for run in runs:
        if run.ended_at is None:  # still going: as if it ended now
            run = copy(run)
            run.ended_at, run.chargeable = now, True
        for event in _task_run_events(run, tz):
            if event.idempotency_key in keys:
                continue
            head += 1
            record = UsageRecord(
                tenant=tenant,
                sequence=head,
                source=event.source,
                source_id=event.source_id,
                resource=event.resource,
                unit=event.unit,
                quantity=quantity(event.quantity),
                period_start=event.period_start,
                period_end=event.period_end,
                created_at=now,
            )
            own.append(_Metered(head, record.resource, record.period_start, now, record.quantity, record))
    if not own:
        return Decimal("0.00")
    placed = _route(tenant, tz, own)
    book = PriceBook()
    replay = _Replay()
    try:
        for metered in sorted(own, key=lambda m: m.sequence):
            replay.month, replay.gpu_before = placed[metered.sequence]
            _rate_record(metered.record, replay, book)
    except MissingPrice:
        return None
    return to_fen(replay.amount())


def gpu_plans(codes) -> dict[str, tuple[str, int]]:
    """{plan code: (GPU model code, GPUs)} for the plans among `codes` that have GPUs: how GPU-hours are
    read off on-demand VM lines (resource vm_on_demand:<plan>, hours × the plan's GPUs). One query."""
    rows = Plan.objects.filter(code__in=set(codes), gpu_count__gt=0).values_list("code", "gpu_model__code", "gpu_count")
    return {code: (model, gpus) for code, model, gpus in rows}
