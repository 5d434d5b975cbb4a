"""Writes for billing: the usage log, rating, the ledger, subscriptions, payments, invoices, prices.

The money rules live here and nowhere else:

* Usage is appended to a per-tenant hash chain (usage_append) under a lock on the tenant's chain
  head; the idempotency key is unique, so a replayed event counts once.
* Rating (usage_rate_pending) turns unrated records into invoice-line amounts under a lock on the
  tenant's wallet row. Each line keeps its exact unrounded amount; its amount is that rounded once
  (ROUND_HALF_UP), and the ledger posts exactly the change of the rounded amount. So the ledger's
  charges of a month equal the invoice, line by line, to the fen.
* Every movement of money locks the wallet row: concurrent charges never overdraw or double-spend.
  Package credit is spent first (earliest expiry first) and only on task hosting.
* When pay-as-you-go credit runs out, on-demand VMs and running tasks are stopped (after commit).
"""

import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Min
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from billing import hashing
from billing.models import (
    ChargeDay,
    CreditGrant,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerEntry,
    LedgerKind,
    LineKind,
    PackageOffer,
    Payment,
    PaymentEvent,
    PaymentKind,
    PaymentStatus,
    PriceBookVersion,
    PriceItem,
    Subscription,
    SubscriptionCharge,
    SubscriptionStatus,
    UsageChainHead,
    UsageRecord,
    UsageSource,
    VolumeBand,
    Wallet,
)
from billing.money import (
    HUNDRED,
    ZERO,
    add_months,
    add_months_dt,
    exact,
    local_date,
    local_midnight,
    month_start,
    quantity,
    seconds_between,
    split_at_month_boundaries,
    split_hourly,
    to_fen,
    whole_second,
    zone,
)
from billing.pricing import MissingPrice, PriceBook, split_into_bands
from billing.providers import get_provider
from billing.providers.base import CheckoutRequest, PaymentProviderError
from notifications.models import NotificationKind
from notifications.services import BILLING_ROLES, notify
from portal.events import emit_dashboard_event
from provisioning.models import BillingMode, LifecycleEvent, LifecycleKind, ScaleUp, VirtualMachine, VmState
from tenants.audit import audit_record
from tenants.models import Membership, Tenant
from tenants.roles import Capability
from tenants.services import require

logger = logging.getLogger(__name__)

COPY_THRESHOLD = 500  # appends at least this big use COPY on PostgreSQL


class InsufficientFunds(ValidationError):
    """A charge the wallet (cash, package credit and credit limit) cannot cover."""


# --- The usage log -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageEvent:
    """One measured quantity to append to a tenant's usage log."""

    tenant_id: int
    idempotency_key: str
    source: str
    source_id: str
    resource: str
    unit: str
    quantity: Decimal
    period_start: datetime
    period_end: datetime
    meta: dict = field(default_factory=dict)


@dataclass
class AppendResult:
    appended: int = 0
    duplicates: int = 0
    tenant_ids: set[int] = field(default_factory=set)


def _check_event(event: UsageEvent) -> None:
    if event.source not in UsageSource.values:
        raise ValueError(f"unknown usage source {event.source!r}")
    if not event.idempotency_key or len(event.idempotency_key) > 200:
        raise ValueError("an idempotency key of 1 to 200 characters is required")
    if event.quantity < 0:
        raise ValueError("usage quantities are never negative")
    if event.period_end < event.period_start:
        raise ValueError("a usage period ends after it starts")


def usage_append(*, events) -> AppendResult:
    """Append events to their tenants' chains, in one transaction. Events whose idempotency key is
    already in the log (or earlier in the same batch) are counted as duplicates and skipped.

    Each tenant's chain head is locked (in tenant order, so two appenders never deadlock); the
    hashes are computed here and the rows written in bulk (COPY on PostgreSQL)."""
    unique: dict[str, UsageEvent] = {}
    result = AppendResult()
    for event in events:
        _check_event(event)
        if event.idempotency_key in unique:
            result.duplicates += 1
        else:
            unique[event.idempotency_key] = event
    if not unique:
        return result
    tenant_ids = sorted({e.tenant_id for e in unique.values()})
    with transaction.atomic():
        UsageChainHead.objects.bulk_create(
            [UsageChainHead(tenant_id=t) for t in tenant_ids], ignore_conflicts=True, batch_size=1000
        )
        heads = {
            head.tenant_id: head
            for head in UsageChainHead.objects.select_for_update()
            .filter(tenant_id__in=tenant_ids)
            .order_by("tenant_id")
        }
        keys = list(unique)
        existing: set[str] = set()
        for start in range(0, len(keys), 5000):
            existing.update(
                UsageRecord.objects.filter(idempotency_key__in=keys[start : start + 5000]).values_list(
                    "idempotency_key", flat=True
                )
            )
        result.duplicates += len(existing)
        now = timezone.now()
        rows: list[UsageRecord] = []
        touched: dict[int, UsageChainHead] = {}
        for key, event in unique.items():
            if key in existing:
                continue
            head = heads[event.tenant_id]
            sequence = head.last_sequence + 1
            amount = quantity(event.quantity)
            fields = hashing.canonical_fields(
                tenant_id=event.tenant_id,
                sequence=sequence,
                idempotency_key=key,
                source=event.source,
                source_id=event.source_id,
                resource=event.resource,
                unit=event.unit,
                quantity=amount,
                period_start=event.period_start,
                period_end=event.period_end,
                meta=event.meta,
                created_at=now,
                prev_hash=head.last_hash,
            )
            digest = hashing.record_hash(fields)
            rows.append(
                UsageRecord(
                    tenant_id=event.tenant_id,
                    sequence=sequence,
                    idempotency_key=key,
                    source=event.source,
                    source_id=event.source_id,
                    resource=event.resource,
                    unit=event.unit,
                    quantity=amount,
                    period_start=event.period_start,
                    period_end=event.period_end,
                    meta=event.meta or {},
                    created_at=now,
                    prev_hash=head.last_hash,
                    hash=digest,
                )
            )
            head.last_sequence = sequence
            head.last_hash = digest
            touched[head.tenant_id] = head
        if rows:
            _insert_usage_rows(rows)
            UsageChainHead.objects.bulk_update(list(touched.values()), ["last_sequence", "last_hash"], batch_size=1000)
        result.appended = len(rows)
        result.tenant_ids = set(touched)
    return result


USAGE_COLUMNS = (*hashing.HASHED_FIELDS, "hash")


def _insert_usage_rows(rows: list[UsageRecord]) -> None:
    if connection.vendor != "postgresql" or len(rows) < COPY_THRESHOLD:
        UsageRecord.objects.bulk_create(rows, batch_size=2000)
        return
    import json

    table = UsageRecord._meta.db_table
    with (
        connection.cursor() as cursor,
        cursor.cursor.copy(f"COPY {table} ({', '.join(USAGE_COLUMNS)}) FROM STDIN") as copy,
    ):
        for r in rows:
            copy.write_row(
                (
                    r.tenant_id,
                    r.sequence,
                    r.idempotency_key,
                    r.source,
                    r.source_id,
                    r.resource,
                    r.unit,
                    r.quantity,
                    r.period_start,
                    r.period_end,
                    json.dumps(r.meta),
                    r.created_at,
                    r.prev_hash,
                    r.hash,
                )
            )


def _append_and_rate(events: list[UsageEvent]) -> int:
    if not events:
        return 0
    result = usage_append(events=events)
    for tenant_id in result.tenant_ids:
        _rate_soon(tenant_id)
    return result.appended


def _rate_soon(tenant_id: int) -> None:
    from billing.tasks import rate_usage

    transaction.on_commit(lambda: rate_usage.delay(tenant_id))


# --- Metering: task runs ------------------------------------------------------------------------


def _task_run_events(run, tz) -> list[UsageEvent]:
    """Chargeable seconds of one finished run, per resource (GPU-, core- and GiB-seconds), cut at
    month boundaries. A preempted attempt or a lost node is not chargeable and meters nothing."""
    if run.ended_at is None or not run.chargeable:
        return []
    started, ended = whole_second(run.started_at), whole_second(run.ended_at)
    if ended <= started:
        return []
    events = []
    gpu_model = run.gpu_model.code if run.gpu_model_id else None
    for start, end in split_at_month_boundaries(started, ended, tz):
        seconds = seconds_between(start, end)
        amounts = [
            (f"gpu:{gpu_model}", "gpu_second", run.gpus * seconds) if gpu_model else None,
            ("cpu", "core_second", Decimal(run.vcpus * seconds)),
            ("memory", "gib_second", Decimal(run.memory_gib * seconds)),
        ]
        for item in amounts:
            if item is None or item[2] <= 0:
                continue
            resource, unit, amount = item
            events.append(
                UsageEvent(
                    tenant_id=run.tenant_id,
                    idempotency_key=f"task-run:{run.pk}:{resource}:{hashing.format_time(start)}",
                    source=UsageSource.TASK,
                    source_id=str(run.pk),
                    resource=resource,
                    unit=unit,
                    quantity=amount,
                    period_start=start,
                    period_end=end,
                    meta={"task": str(run.task_id), "attempt": str(run.attempt)},
                )
            )
    return events


def usage_meter_task_run(*, run_id: int) -> int:
    """Meter one finished task run (its chargeable seconds only). Safe to call any number of times."""
    from hosting.models import TaskRun

    run = TaskRun.objects.select_related("gpu_model", "tenant").filter(pk=run_id).first()
    if run is None:
        return 0
    return _append_and_rate(_task_run_events(run, zone(run.tenant.time_zone)))


def usage_meter_task_runs_sweep(*, now: datetime | None = None) -> int:
    """Meter finished runs the signal missed (a lost signal never loses usage)."""
    from hosting.models import TaskRun

    now = now or timezone.now()
    since = now - timedelta(days=settings.PORTAL_BILLING_SWEEP_DAYS)
    runs = (
        TaskRun.objects.select_related("gpu_model", "tenant")
        .filter(ended_at__isnull=False, ended_at__gte=since, chargeable=True)
        .order_by("pk")
    )
    appended = 0
    batch: list = []
    for run in runs.iterator(chunk_size=1000):
        batch.append(run)
        if len(batch) >= 1000:
            appended += _meter_runs(batch)
            batch = []
    return appended + _meter_runs(batch)


def _meter_runs(runs) -> int:
    events = [e for run in runs for e in _task_run_events(run, zone(run.tenant.time_zone))]
    keys = [e.idempotency_key for e in events]
    present = set(UsageRecord.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    return _append_and_rate([e for e in events if e.idempotency_key not in present])


# --- Metering: on-demand VMs ----------------------------------------------------------------------


def _running_intervals(events) -> list[tuple[LifecycleEvent, datetime | None]]:
    """(started event, end or None while running) from a VM's lifecycle events in order."""
    intervals = []
    opened = None
    for event in events:
        if event.kind == LifecycleKind.STARTED:
            opened = opened or event
        elif event.kind in (LifecycleKind.STOPPED, LifecycleKind.RELEASED) and opened is not None:
            intervals.append((opened, event.at))
            opened = None
    if opened is not None:
        intervals.append((opened, None))
    return intervals


def _vm_events(vm: VirtualMachine, until: datetime) -> list[UsageEvent]:
    tz = zone(vm.tenant.time_zone)
    events = []
    history = list(vm.lifecycle_events.order_by("at", "id"))
    for started, end in _running_intervals(history):
        if (started.details or {}).get("billing_mode", vm.billing_mode) != BillingMode.ON_DEMAND:
            continue
        plan_code = (started.details or {}).get("plan") or vm.plan.code
        # While running, only whole hours are metered; the last part is metered when it stops.
        begin = whole_second(started.at)
        stop = (
            whole_second(end) if end is not None else until.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        )
        for start, piece_end in split_hourly(begin, stop, tz) if stop > begin else []:
            events.append(
                UsageEvent(
                    tenant_id=vm.tenant_id,
                    idempotency_key=f"vm:{vm.pk}:on_demand:{hashing.format_time(start)}",
                    source=UsageSource.VM,
                    source_id=str(vm.pk),
                    resource=f"vm_on_demand:{plan_code}",
                    unit="second",
                    quantity=Decimal(seconds_between(start, piece_end)),
                    period_start=start,
                    period_end=piece_end,
                    meta={"vm": vm.name, "plan": plan_code},
                )
            )
    return events


def usage_meter_vm(*, vm_id, until: datetime | None = None) -> int:
    """Meter an on-demand VM per second between its started and stopped/released events."""
    vm = VirtualMachine.objects.select_related("tenant", "plan").filter(pk=vm_id).first()
    if vm is None or vm.billing_mode != BillingMode.ON_DEMAND:
        return 0
    # A stop being committed right now must not be overtaken by a sweep: meter up to a margin ago.
    until = until or timezone.now() - timedelta(minutes=5)
    events = _vm_events(vm, until)
    keys = [e.idempotency_key for e in events]
    present = set(UsageRecord.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    return _append_and_rate([e for e in events if e.idempotency_key not in present])


def usage_meter_on_demand_sweep(*, now: datetime | None = None) -> int:
    """Meter the whole hours of every on-demand VM that ran recently (hourly by beat)."""
    now = now or timezone.now()
    since = now - timedelta(days=settings.PORTAL_BILLING_SWEEP_DAYS)
    vm_ids = (
        LifecycleEvent.objects.filter(vm__billing_mode=BillingMode.ON_DEMAND)
        .filter(at__gte=since)
        .values_list("vm_id", flat=True)
        .distinct()
    )
    running = VirtualMachine.objects.filter(
        billing_mode=BillingMode.ON_DEMAND, state__in=[VmState.RUNNING, VmState.STOPPING, VmState.STARTING]
    ).values_list("pk", flat=True)
    return sum(usage_meter_vm(vm_id=vm_id, until=now - timedelta(minutes=5)) for vm_id in {*vm_ids, *running})


# --- Metering: storage and scale-ups ------------------------------------------------------------


def _storage_end(vm: VirtualMachine) -> datetime | None:
    if vm.released_at:
        return vm.released_at
    if vm.state == VmState.FAILED:
        return vm.state_changed_at
    return None


def usage_meter_storage(*, now: datetime | None = None, tenant_id: int | None = None) -> int:
    """One record per tenant and complete local day: GiB-seconds of the disks of its VMs.

    A VM's disks count from its first start (a boot that never ran is never charged) until it is
    released."""
    now = now or timezone.now()
    vms = (
        VirtualMachine.objects.filter(lifecycle_events__kind=LifecycleKind.STARTED)
        .annotate(first_start=Min("lifecycle_events__at"))
        .select_related("plan", "tenant")
    )
    horizon = now - timedelta(days=settings.PORTAL_BILLING_SWEEP_DAYS)
    vms = vms.exclude(released_at__lt=horizon)
    if tenant_id is not None:
        vms = vms.filter(tenant_id=tenant_id)
    vms = [vm for vm in vms if (_storage_end(vm) or now) > horizon]
    by_tenant: dict[int, list[VirtualMachine]] = defaultdict(list)
    for vm in vms:
        by_tenant[vm.tenant_id].append(vm)
    events = []
    for tenant_vms in by_tenant.values():
        tenant = tenant_vms[0].tenant
        tz = zone(tenant.time_zone)
        first_day = max(min(local_date(vm.first_start, tz) for vm in tenant_vms), local_date(horizon, tz))
        last_day = local_date(now, tz) - timedelta(days=1)
        day = first_day
        while day <= last_day:
            day_start, day_end = local_midnight(day, tz), local_midnight(day + timedelta(days=1), tz)
            per_vm = {}
            total = ZERO
            for vm in tenant_vms:
                start = max(day_start, whole_second(vm.first_start))
                end = min(day_end, whole_second(_storage_end(vm) or day_end))
                if end <= start:
                    continue
                gib_seconds = Decimal(vm.plan.total_disk_gib * seconds_between(start, end))
                per_vm[str(vm.pk)] = str(gib_seconds)
                total += gib_seconds
            if total > 0:
                events.append(
                    UsageEvent(
                        tenant_id=tenant.pk,
                        idempotency_key=f"storage:{tenant.pk}:{day.isoformat()}",
                        source=UsageSource.STORAGE,
                        source_id=day.isoformat(),
                        resource="storage",
                        unit="gib_second",
                        quantity=total,
                        period_start=day_start.astimezone(UTC),
                        period_end=day_end.astimezone(UTC),
                        meta={"vms": per_vm},
                    )
                )
            day += timedelta(days=1)
    keys = [e.idempotency_key for e in events]
    present = set(UsageRecord.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    return _append_and_rate([e for e in events if e.idempotency_key not in present])


def _scale_up_end(scale_up: ScaleUp) -> datetime:
    ends = [scale_up.ends_at]
    if scale_up.reverted_at:
        ends.append(scale_up.reverted_at)
    vm_end = _storage_end(scale_up.vm)
    if vm_end:
        ends.append(vm_end)
    return min(ends)


def usage_meter_scale_ups(*, vm_id=None, now: datetime | None = None) -> int:
    """Each scale-up is charged per day it has begun (a day is paid when it starts)."""
    now = now or timezone.now()
    scale_ups = ScaleUp.objects.select_related("vm__plan__gpu_model", "vm__tenant").filter(
        starts_at__lte=now, ends_at__gte=now - timedelta(days=settings.PORTAL_BILLING_SWEEP_DAYS)
    )
    if vm_id is not None:
        scale_ups = scale_ups.filter(vm_id=vm_id)
    events = []
    for scale_up in scale_ups:
        vm = scale_up.vm
        end = min(_scale_up_end(scale_up), now + timedelta(microseconds=1))
        gpu_model = vm.plan.gpu_model.code if vm.plan.gpu_model_id else None
        resources = [
            (f"scale_up_gpu_day:{gpu_model}", "gpu_day", scale_up.extra_gpus) if gpu_model else None,
            ("scale_up_cpu_core_day", "core_day", scale_up.extra_vcpus),
            ("scale_up_memory_gib_day", "gib_day", scale_up.extra_memory_gib),
        ]
        for k in range(scale_up.days):
            day_start = scale_up.starts_at + timedelta(days=k)
            if day_start >= end:
                break
            for item in resources:
                if item is None or not item[2]:
                    continue
                resource, unit, amount = item
                events.append(
                    UsageEvent(
                        tenant_id=vm.tenant_id,
                        idempotency_key=f"scale-up:{scale_up.pk}:{k}:{resource}",
                        source=UsageSource.SCALE_UP,
                        source_id=str(scale_up.pk),
                        resource=resource,
                        unit=unit,
                        quantity=Decimal(amount),
                        period_start=day_start,
                        period_end=day_start + timedelta(days=1),
                        meta={"vm": vm.name, "day": str(k + 1)},
                    )
                )
    keys = [e.idempotency_key for e in events]
    present = set(UsageRecord.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    return _append_and_rate([e for e in events if e.idempotency_key not in present])


# --- Wallet and ledger -----------------------------------------------------------------------------


def _locked_wallet(tenant_id: int) -> Wallet:
    """The tenant's wallet row, locked until the transaction ends (created on first use)."""
    Wallet.objects.get_or_create(tenant_id=tenant_id)
    wallet = Wallet.objects.select_for_update(of=("self",)).select_related("tenant__tier").get(tenant_id=tenant_id)
    wallet.available_at_lock = _cash_available(wallet)  # _after_money_moved tells a crossing from this
    return wallet


def _spendable_grants(tenant_id: int, now: datetime) -> list[CreditGrant]:
    return list(
        CreditGrant.objects.filter(tenant_id=tenant_id, remaining__gt=0, expires_at__gt=now).order_by(
            "expires_at", "id"
        )
    )


def _post_charge(
    *,
    wallet: Wallet,
    amount: Decimal,
    package_first: bool,
    reason: str,
    reference: str,
    invoice_line: InvoiceLine | None = None,
    actor=None,
    now: datetime,
) -> list[LedgerEntry]:
    """Take `amount` from package credit (task hosting only, earliest expiry first), then cash."""
    entries = []
    left = amount
    if package_first and left > 0:
        for grant in _spendable_grants(wallet.tenant_id, now):
            take = min(grant.remaining, left)
            grant.remaining -= take
            grant.save(update_fields=["remaining"])
            entries.append(
                LedgerEntry(
                    tenant_id=wallet.tenant_id,
                    kind=LedgerKind.CHARGE,
                    grant=grant,
                    amount=-take,
                    reason=reason,
                    reference=reference,
                    invoice_line=invoice_line,
                    actor=actor,
                    created_at=now,
                )
            )
            left -= take
            if left <= 0:
                break
    if left > 0:
        wallet.cash_balance -= left
        entries.append(
            LedgerEntry(
                tenant_id=wallet.tenant_id,
                kind=LedgerKind.CHARGE,
                amount=-left,
                reason=reason,
                reference=reference,
                invoice_line=invoice_line,
                actor=actor,
                created_at=now,
            )
        )
    LedgerEntry.objects.bulk_create(entries)
    wallet.save(update_fields=["cash_balance", "updated_at"])
    return entries


def _post_credit(*, wallet: Wallet, kind: str, amount: Decimal, reason: str, reference: str, grant=None, **extra):
    entry = LedgerEntry.objects.create(
        tenant_id=wallet.tenant_id, kind=kind, grant=grant, amount=amount, reason=reason, reference=reference, **extra
    )
    if grant is None:
        wallet.cash_balance += amount
        wallet.save(update_fields=["cash_balance", "updated_at"])
    return entry


def _cash_available(wallet: Wallet) -> Decimal:
    return wallet.cash_balance + wallet.credit_limit


def _require_cash(wallet: Wallet, amount: Decimal) -> None:
    if _cash_available(wallet) < amount:
        raise InsufficientFunds(
            _("Your balance (¥%(available)s available) does not cover ¥%(amount)s. Top up first.")
            % {"available": _cash_available(wallet), "amount": amount}
        )


def _package_total(tenant_id: int, now: datetime) -> Decimal:
    grants = CreditGrant.objects.filter(tenant_id=tenant_id, remaining__gt=0, expires_at__gt=now)
    return sum(grants.values_list("remaining", flat=True), Decimal("0.00"))


def _after_money_moved(wallet: Wallet) -> None:
    """Keep the exhausted-credit and low-balance flags true to the balances; act on crossings."""
    now = timezone.now()
    packages = _package_total(wallet.tenant_id, now)
    cash_out = _cash_available(wallet) <= 0
    all_out = cash_out and packages <= 0
    # Running out means pay-as-you-go credit went down to nothing here. A wallet that never had any (its
    # first purchase a compute package, a task paid from that package) has not run out of anything.
    before = getattr(wallet, "available_at_lock", None)
    ran_out = before is None or before > 0 or _cash_available(wallet) < before
    changed = []
    if cash_out:
        if wallet.credit_exhausted_at is None and ran_out:
            wallet.credit_exhausted_at = now
            changed.append("credit_exhausted_at")
            audit_record(
                actor=None,
                tenant=wallet.tenant,
                action="billing.credit_exhausted",
                target=wallet,
                after={"cash_balance": str(wallet.cash_balance), "credit_limit": str(wallet.credit_limit)},
            )
            if settings.PORTAL_BILLING_ENFORCE:  # once per exhaustion: the flag above is set until credit returns
                notify(
                    kind=NotificationKind.CREDIT_EXHAUSTED,
                    tenant=wallet.tenant,
                    roles=BILLING_ROLES,
                    params={"cash_balance": str(wallet.cash_balance)},
                    url=reverse("billing"),
                )
        if settings.PORTAL_BILLING_ENFORCE:
            tenant_id = wallet.tenant_id
            transaction.on_commit(lambda: credit_enforce(tenant_id=tenant_id, stop_tasks=all_out))
    elif wallet.credit_exhausted_at is not None:
        wallet.credit_exhausted_at = None
        changed.append("credit_exhausted_at")
    if wallet.low_balance_threshold is not None:
        balance = wallet.cash_balance + packages
        if balance < wallet.low_balance_threshold and wallet.low_balance_warned_at is None:
            wallet.low_balance_warned_at = now
            changed.append("low_balance_warned_at")
            _warn_low_balance(wallet, balance)
        elif balance >= wallet.low_balance_threshold and wallet.low_balance_warned_at is not None:
            wallet.low_balance_warned_at = None
            changed.append("low_balance_warned_at")
    if changed:
        wallet.save(update_fields=[*changed, "updated_at"])


def _warn_low_balance(wallet: Wallet, balance: Decimal) -> None:
    """Tell the tenant's billing people (in the portal, and by email unless they turned it off)."""
    payload = {"balance": str(balance), "threshold": str(wallet.low_balance_threshold)}
    emit_dashboard_event(wallet.tenant_id, "billing.low_balance", payload)
    notify(
        kind=NotificationKind.LOW_BALANCE,
        tenant=wallet.tenant,
        roles=BILLING_ROLES,
        params=payload,
        url=reverse("billing"),
    )


def credit_enforce(*, tenant_id: int, stop_tasks: bool) -> dict:
    """Credit ran out: stop the tenant's running on-demand VMs and, when package credit is gone
    too, ask task hosting to stop its running tasks. Safe to call again: only running work stops."""
    result = {"vms": 0, "tasks": 0}
    if not settings.PORTAL_BILLING_ENFORCE:
        return result
    wallet = Wallet.objects.select_related("tenant").filter(tenant_id=tenant_id).first()
    if wallet is None or _cash_available(wallet) > 0:
        return result
    reason = _("Stopped: your pay-as-you-go credit ran out. Top up to continue.")
    for vm in VirtualMachine.objects.filter(
        tenant_id=tenant_id, billing_mode=BillingMode.ON_DEMAND, state__in=[VmState.RUNNING, VmState.STARTING]
    ):
        if _system_stop_vm(vm, reason):
            result["vms"] += 1
    if stop_tasks and _package_total(tenant_id, timezone.now()) <= 0:
        result["tasks"] = _stop_tasks(wallet.tenant, reason)
    return result


def _system_stop_vm(vm: VirtualMachine, reason: str) -> bool:
    """Stop a VM as the system (no member, no actor): the audit log shows the system and the reason."""
    from provisioning.services import vm_stop

    try:
        vm_stop(membership=None, actor=None, vm=vm, reason=reason)
    except (ValidationError, PermissionDenied) as exc:
        logger.warning("Could not stop VM %s for credit: %s", vm.pk, exc)
        return False
    audit_record(
        actor=None, tenant=vm.tenant, action="billing.vm_stopped_for_credit", target=vm, after={"reason": reason}
    )
    return True


def _stop_tasks(tenant: Tenant, reason: str) -> int:
    path = settings.PORTAL_TASK_STOPPER
    if not path:
        return 0
    try:
        stopper = import_string(path)
    except ImportError:
        logger.warning("PORTAL_TASK_STOPPER %s cannot be imported; running tasks keep running", path)
        return 0
    return stopper(tenant=tenant, reason=reason) or 0


# --- Invoice lines: where every charge is accumulated --------------------------------------------


def _invoice_number(invoice: Invoice) -> str:
    return f"INV-{invoice.period_start:%Y%m}-{invoice.tenant_id:06d}"


class _Lines:
    """The invoice lines one transaction adds to, for one tenant whose wallet row it holds locked.

    Amounts accumulate exactly; flush() rounds each touched line once and posts to the ledger
    exactly the change of its rounded amount."""

    def __init__(self, wallet: Wallet, now: datetime):
        self.wallet = wallet
        self.tenant = wallet.tenant
        self.tz = zone(self.tenant.time_zone)
        self.now = now
        self.invoices: dict[date, Invoice] = {}
        self.lines: dict[int, dict[str, InvoiceLine]] = {}
        self.rounded_before: dict[int, Decimal] = {}
        self.touched: dict[int, InvoiceLine] = {}
        self.days: dict[tuple[int, date], list[Decimal]] = defaultdict(lambda: [ZERO, ZERO])
        self._new_id = -1

    def invoice_for(self, moment: datetime) -> tuple[Invoice, date]:
        """The open invoice for the month of `moment`, or the next open one when that month's
        invoice is final (late usage goes to the next invoice). Also the statement day."""
        day = local_date(moment, self.tz)
        month = month_start(day)
        while True:
            invoice = self.invoices.get(month)
            if invoice is None:
                invoice = Invoice.objects.filter(tenant=self.tenant, period_start=month).first()
                if invoice is None:
                    invoice = Invoice.objects.create(
                        tenant=self.tenant,
                        period_start=month,
                        period_end=add_months(month, 1),
                        time_zone=self.tenant.time_zone,
                    )
                self.invoices[month] = invoice
            if invoice.status == InvoiceStatus.DRAFT:
                break
            month = add_months(month, 1)
        if not invoice.period_start <= day < invoice.period_end:
            day = max(invoice.period_start, min(local_date(self.now, self.tz), invoice.period_end - timedelta(days=1)))
        return invoice, day

    def _lines_of(self, invoice: Invoice) -> dict[str, InvoiceLine]:
        if invoice.pk not in self.lines:
            self.lines[invoice.pk] = {line.key: line for line in invoice.lines.all()}
        return self.lines[invoice.pk]

    def task_gpu_seconds(self, invoice: Invoice) -> Decimal:
        return sum(
            (
                line.quantity
                for line in self._lines_of(invoice).values()
                if line.kind == LineKind.TASK and line.resource.startswith("gpu:")
            ),
            ZERO,
        )

    def add(
        self,
        invoice: Invoice,
        day: date,
        *,
        key: str,
        kind: str,
        resource: str,
        unit: str,
        unit_price: Decimal,
        metered_unit: str,
        per_unit: int,
        amount_quantity: Decimal,
        description: tuple[str, str],
        discount_percent: Decimal = ZERO,
        package_eligible: bool = False,
    ) -> InvoiceLine:
        lines = self._lines_of(invoice)
        line = lines.get(key)
        if line is None:
            line = InvoiceLine(
                invoice=invoice,
                key=key,
                kind=kind,
                resource=resource,
                description_en=description[0][:200],
                description_zh=description[1][:200],
                unit=unit,
                unit_price=unit_price,
                discount_percent=discount_percent,
                metered_unit=metered_unit,
                per_unit=per_unit,
                package_eligible=package_eligible,
            )
            lines[key] = line
        ident = id(line)
        if ident not in self.touched:
            self.touched[ident] = line
            self.rounded_before[ident] = line.amount if line.pk else Decimal("0.00")
        with exact():
            line.quantity += amount_quantity
            self.days[(ident, day)][0] += amount_quantity
        # Recomputed from the exact total quantity, never summed from rounded parts.
        line.amount_unrounded = line.exact_amount(line.quantity)
        return line

    def flush(self, *, reason_prefix: str = "", actor=None) -> Decimal:
        """Save the touched lines and their days, move invoice totals, post ledger charges.
        Returns the fen charged."""
        if not self.touched:
            return Decimal("0.00")
        lines = list(self.touched.values())
        for line in lines:
            line.amount = to_fen(line.amount_unrounded)
        new = [line for line in lines if line.pk is None]
        old = [line for line in lines if line.pk is not None]
        InvoiceLine.objects.bulk_create(new)
        if old:
            InvoiceLine.objects.bulk_update(old, ["quantity", "amount_unrounded", "amount"])
        by_id = {id(line): line for line in lines}
        wanted = defaultdict(set)
        for ident, day in self.days:
            wanted[by_id[ident].pk].add(day)
        existing = {
            (row.line_id, row.day): row
            for row in ChargeDay.objects.filter(
                line_id__in=list(wanted), day__in={d for ds in wanted.values() for d in ds}
            )
        }
        create, update = [], []
        for (ident, day), (q, _unused) in self.days.items():
            line = by_id[ident]
            row = existing.get((line.pk, day))
            if row is None:
                row = ChargeDay(line=line, day=day, quantity=q)
                create.append(row)
            else:
                with exact():
                    row.quantity += q
                update.append(row)
            row.amount_unrounded = line.exact_amount(row.quantity)
        ChargeDay.objects.bulk_create(create)
        if update:
            ChargeDay.objects.bulk_update(update, ["quantity", "amount_unrounded"])
        totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
        charged = Decimal("0.00")
        for ident, line in self.touched.items():
            delta = line.amount - self.rounded_before[ident]
            if delta == 0:
                continue
            totals[line.invoice_id] += delta
            charged += delta
            _post_charge(
                wallet=self.wallet,
                amount=delta,
                package_first=line.package_eligible,
                reason=f"{reason_prefix}{line.description_en} ({line.invoice.period_start:%Y-%m})",
                reference=f"invoice-line:{line.pk}",
                invoice_line=line,
                actor=actor,
                now=self.now,
            )
        for invoice_id, delta in totals.items():
            Invoice.objects.filter(pk=invoice_id, status=InvoiceStatus.DRAFT).update(total=F("total") + delta)
        self.touched.clear()
        self.days.clear()
        self.rounded_before.clear()
        return charged


# --- Rating ----------------------------------------------------------------------------------------


def _percent(value: Decimal) -> str:
    return format(value.normalize(), "f") if value == value.to_integral() else format(value, "f")


def _task_description(resource: str, discount: Decimal, band) -> tuple[str, str]:
    if resource.startswith("gpu:"):
        model = resource.split(":", 1)[1]
        en, zh = f"Task hosting · {model} GPU-hours", f"任务托管 · {model} GPU 小时"
    elif resource == "cpu":
        en, zh = "Task hosting · CPU core-hours", "任务托管 · CPU 核·小时"
    else:
        en, zh = "Task hosting · memory GiB-hours", "任务托管 · 内存 GiB·小时"
    if band is not None and discount:
        upper = f"{band.to_hours.normalize():f}" if band.to_hours is not None else "∞"
        span = f"{band.from_hours.normalize():f}–{upper} h"
        en += f" · {span} of the month at {_percent(discount)}% off"
        zh += f" · 当月第 {span} 阶梯折扣 {_percent(discount)}%"
    return en, zh


TASK_PRICES = {"cpu": "task_cpu_core_hour", "memory": "task_memory_gib_hour"}
SECONDS_PER = {"hour": 3600, "day": 86400}


def _per_unit(metered_unit: str, price_unit: str) -> int:
    """Metered units in one priced unit: GPU-seconds in a GPU-hour is 3600; days in a day, 1."""
    if metered_unit.endswith("second"):
        return SECONDS_PER[price_unit.rsplit("_", 1)[-1]]
    return 1


def _rate_record(record: UsageRecord, lines: _Lines, book: PriceBook) -> None:
    invoice, day = lines.invoice_for(record.period_start)
    at = record.period_start
    if record.source == UsageSource.TASK:
        if record.resource.startswith("gpu:"):
            item = book.item(f"task_gpu_hour:{record.resource.split(':', 1)[1]}", at)
            per_unit = _per_unit(record.unit, item.unit)
            pieces = split_into_bands(lines.task_gpu_seconds(invoice), record.quantity, book.bands(at), scale=per_unit)
        else:
            item = book.item(TASK_PRICES[record.resource], at)
            per_unit = _per_unit(record.unit, item.unit)
            pieces = [(record.quantity, None)]
        for amount_quantity, band in pieces:
            discount = band.discount_percent if band is not None else ZERO
            lines.add(
                invoice,
                day,
                key=f"task:{record.resource}:{item.unit_price}:{discount}",
                kind=LineKind.TASK,
                resource=record.resource,
                unit=item.unit,
                unit_price=item.unit_price,
                discount_percent=discount,
                metered_unit=record.unit,
                per_unit=per_unit,
                amount_quantity=amount_quantity,
                description=_task_description(record.resource, discount, band),
                package_eligible=True,
            )
    elif record.source == UsageSource.VM:
        plan_code = record.resource.split(":", 1)[1]
        price = book.plan_price(plan_code, at)
        lines.add(
            invoice,
            day,
            key=f"vm:{record.resource}:{price.hourly}",
            kind=LineKind.VM_ON_DEMAND,
            resource=record.resource,
            unit="hour",
            unit_price=price.hourly,
            metered_unit=record.unit,
            per_unit=_per_unit(record.unit, "hour"),
            amount_quantity=record.quantity,
            description=(f"On-demand VM · {price.plan.name} · hours", f"按需虚拟机 · {price.plan.name} · 小时"),
        )
    elif record.source == UsageSource.STORAGE:
        item = book.item("storage_gib_day", at)
        per_unit = _per_unit(record.unit, item.unit)
        tier = lines.tenant.tier
        free = Decimal(tier.free_storage_gib)
        # The free allowance is per day and the record is one day: free GiB × the day's seconds.
        billable = max(record.quantity - free * seconds_between(record.period_start, record.period_end), ZERO)
        discount = Decimal(tier.storage_discount_percent)
        en, zh = "Storage · GiB-days", "存储 · GiB·天"
        if discount:
            en += f" · {tier.name_en} {_percent(discount)}% off"
            zh += f" · {tier.name_zh}等级 {_percent(discount)}% 折扣"
        if free:
            en += f" · first {free.normalize():f} GiB free each day"
            zh += f" · 每日前 {free.normalize():f} GiB 免费"
        if billable > 0:
            lines.add(
                invoice,
                day,
                key=f"storage:{item.unit_price}:{discount}:{free}",
                kind=LineKind.STORAGE,
                resource=record.resource,
                unit=item.unit,
                unit_price=item.unit_price,
                discount_percent=discount,
                metered_unit=record.unit,
                per_unit=per_unit,
                amount_quantity=billable,
                description=(en, zh),
            )
    elif record.source == UsageSource.SCALE_UP:
        item = book.item(record.resource, at)
        lines.add(
            invoice,
            day,
            key=f"scale_up:{record.resource}:{item.unit_price}",
            kind=LineKind.SCALE_UP,
            resource=record.resource,
            unit=item.unit,
            unit_price=item.unit_price,
            metered_unit=record.unit,
            per_unit=_per_unit(record.unit, item.unit),
            amount_quantity=record.quantity,
            description=(f"Elastic scale-up · {item.label_en}", f"弹性扩容 · {item.label_zh}"),
        )


def usage_rate_pending(*, tenant_id: int, batch_size: int = 20000, book: PriceBook | None = None) -> int:
    """Rate the tenant's usage records not rated yet, in sequence order. Returns how many.

    Runs under the wallet lock, so two workers never rate the same record; a record without a
    price in force stops the pass (logged) and is rated once staff add the price."""
    book = book or PriceBook()
    rated = 0
    while True:
        with transaction.atomic():
            wallet = _locked_wallet(tenant_id)
            records = list(
                UsageRecord.objects.filter(tenant_id=tenant_id, sequence__gt=wallet.rated_sequence).order_by(
                    "sequence"
                )[:batch_size]
            )
            if not records:
                break
            lines = _Lines(wallet, timezone.now())
            try:
                for record in records:
                    _rate_record(record, lines, book)
            except MissingPrice as exc:
                logger.error("Usage of tenant %s cannot be rated: %s", tenant_id, exc)
                transaction.set_rollback(True)
                break
            wallet.rated_sequence = records[-1].sequence
            wallet.save(update_fields=["rated_sequence", "updated_at"])
            lines.flush()
            _after_money_moved(wallet)
        rated += len(records)
        if len(records) < batch_size:
            break
    return rated


def usage_rate_all(*, book: PriceBook | None = None) -> int:
    """Rate every tenant's pending usage (beat, and before invoices are finalised)."""
    book = book or PriceBook()
    tenant_ids = UsageChainHead.objects.filter(last_sequence__gt=0).values_list("tenant_id", flat=True)
    pending = Wallet.objects.filter(tenant_id__in=tenant_ids).values_list("tenant_id", "rated_sequence")
    rated_upto = dict(pending)
    total = 0
    for head in UsageChainHead.objects.filter(last_sequence__gt=0).only("tenant_id", "last_sequence"):
        if rated_upto.get(head.tenant_id, 0) < head.last_sequence:
            total += usage_rate_pending(tenant_id=head.tenant_id, book=book)
    return total


# --- One-off charges, adjustments, limits (staff) -------------------------------------------------


def _require_staff(actor) -> None:
    if actor is None or not getattr(actor, "is_staff", False):
        raise PermissionDenied(_("Only staff can do this."))


def wallet_charge(
    *, tenant: Tenant, actor, amount: Decimal, description: str, reference: str, strict: bool = True
) -> InvoiceLine:
    """A one-off charge (e.g. model optimisation, entered by staff) on this month's invoice, paid in
    cash. Strict charges are refused, with nothing written, when cash and credit limit fall short."""
    amount = to_fen(Decimal(amount))
    description = (description or "").strip()
    errors = {}
    if amount <= 0:
        errors["amount"] = _("Charge a positive amount.")
    if not description:
        errors["description"] = _("Say what the charge is for.")
    if not reference or len(reference) > 100:
        errors["reference"] = _("Give the charge a reference of 1 to 100 characters.")
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        wallet = _locked_wallet(tenant.pk)
        if strict:
            _require_cash(wallet, amount)
        now = timezone.now()
        lines = _Lines(wallet, now)
        invoice, day = lines.invoice_for(now)
        key = f"one_off:{reference}"
        if key in lines._lines_of(invoice):
            raise ValidationError({"reference": _("A charge with this reference is already on the invoice.")})
        line = lines.add(
            invoice,
            day,
            key=key,
            kind=LineKind.ONE_OFF,
            resource="one_off",
            unit="item",
            unit_price=amount,
            metered_unit="item",
            per_unit=1,
            amount_quantity=Decimal(1),
            description=(description, description),
        )
        lines.flush(actor=actor)
        audit_record(
            actor=actor,
            tenant=tenant,
            action="billing.charged",
            target=line,
            after={"amount": str(amount), "description": description, "reference": reference},
        )
        _after_money_moved(wallet)
    return line


def wallet_adjust(
    *, tenant: Tenant, actor, amount: Decimal, reason: str, kind: str = LedgerKind.ADJUSTMENT
) -> LedgerEntry:
    """A staff adjustment or refund of cash, with the reason recorded. A debit may use the cash
    available (balance plus credit limit) down to nothing, never beyond: it is refused, with nothing
    written, when it would overdraw the wallet."""
    _require_staff(actor)
    amount = to_fen(Decimal(amount))
    reason = (reason or "").strip()
    errors = {}
    if kind not in (LedgerKind.ADJUSTMENT, LedgerKind.REFUND):
        errors["kind"] = _("Choose adjustment or refund.")
    if amount == 0:
        errors["amount"] = _("Enter a non-zero amount.")
    if kind == LedgerKind.REFUND and amount < 0:
        errors["amount"] = _("A refund gives money back: enter a positive amount.")
    if not reason:
        errors["reason"] = _("Give the reason; it is kept with the entry.")
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        wallet = _locked_wallet(tenant.pk)
        if amount < 0 and _cash_available(wallet) + amount < 0:
            raise ValidationError(
                {
                    "amount": _(
                        "Taking ¥%(debit)s would overdraw the wallet: ¥%(available)s is available (cash balance "
                        "plus credit limit). Take at most that, or raise the credit limit first."
                    )
                    % {"debit": -amount, "available": max(_cash_available(wallet), Decimal("0.00"))}
                }
            )
        entry = _post_credit(
            wallet=wallet, kind=kind, amount=amount, reason=reason, reference=f"staff:{actor.pk}", actor=actor
        )
        audit_record(
            actor=actor,
            tenant=tenant,
            action=f"billing.{kind}",
            target=entry,
            after={"amount": str(amount), "reason": reason},
        )
        _after_money_moved(wallet)
    return entry


def wallet_set_credit_limit(*, tenant: Tenant, actor, credit_limit: Decimal, reason: str) -> Wallet:
    _require_staff(actor)
    credit_limit = to_fen(Decimal(credit_limit))
    if credit_limit < 0:
        raise ValidationError({"credit_limit": _("A credit limit is zero or more.")})
    if not (reason or "").strip():
        raise ValidationError({"reason": _("Give the reason; it is kept in the audit log.")})
    with transaction.atomic():
        wallet = _locked_wallet(tenant.pk)
        before = str(wallet.credit_limit)
        wallet.credit_limit = credit_limit
        wallet.save(update_fields=["credit_limit", "updated_at"])
        audit_record(
            actor=actor,
            tenant=tenant,
            action="billing.credit_limit_changed",
            target=wallet,
            before={"credit_limit": before},
            after={"credit_limit": str(credit_limit), "reason": reason},
        )
        _after_money_moved(wallet)
    return wallet


def wallet_set_low_balance_threshold(*, membership: Membership, actor, threshold: Decimal | None) -> Wallet:
    """The balance (cash + package credit) under which the tenant is warned by email and on the dashboard."""
    require(membership, Capability.MANAGE_BILLING)
    if threshold is not None:
        threshold = to_fen(Decimal(threshold))
        if threshold < 0:
            raise ValidationError({"low_balance_threshold": _("Enter zero or more, or leave it empty for no warning.")})
    with transaction.atomic():
        wallet = _locked_wallet(membership.tenant_id)
        before = None if wallet.low_balance_threshold is None else str(wallet.low_balance_threshold)
        wallet.low_balance_threshold = threshold
        wallet.low_balance_warned_at = None  # judged afresh against the new threshold
        wallet.save(update_fields=["low_balance_threshold", "low_balance_warned_at", "updated_at"])
        audit_record(
            actor=actor,
            tenant=membership.tenant,
            action="billing.low_balance_threshold_set",
            target=wallet,
            before={"low_balance_threshold": before},
            after={"low_balance_threshold": None if threshold is None else str(threshold)},
        )
        _after_money_moved(wallet)
    return wallet


def credit_grants_expire(*, now: datetime | None = None) -> int:
    """Write off what is left of expired package credit, by a ledger entry (never by deleting)."""
    now = now or timezone.now()
    expired = CreditGrant.objects.filter(expires_at__lte=now, remaining__gt=0).values_list("pk", "tenant_id")
    count = 0
    for grant_id, tenant_id in list(expired):
        with transaction.atomic():
            wallet = _locked_wallet(tenant_id)
            grant = CreditGrant.objects.get(pk=grant_id)
            if grant.remaining <= 0:
                continue
            _post_credit(
                wallet=wallet,
                kind=LedgerKind.EXPIRY_WRITE_OFF,
                amount=-grant.remaining,
                reason=f"{grant.name} expired on {grant.expires_at:%Y-%m-%d}",
                reference=f"grant:{grant.pk}",
                grant=grant,
            )
            grant.remaining = Decimal("0.00")
            grant.written_off_at = now
            grant.save(update_fields=["remaining", "written_off_at"])
            _after_money_moved(wallet)
            count += 1
    return count


# --- Subscriptions ---------------------------------------------------------------------------------


def _subscription_months(billing_mode: str) -> int:
    return 12 if billing_mode == BillingMode.YEARLY else 1


def _charge_period(
    *,
    wallet: Wallet,
    subscription: Subscription,
    start: datetime,
    end: datetime,
    list_price: Decimal,
    amount: Decimal,
    renewal_percent: int | None,
    strict: bool,
) -> SubscriptionCharge | None:
    if SubscriptionCharge.objects.filter(subscription=subscription, period_start=start).exists():
        return None
    if strict:
        _require_cash(wallet, amount)
    now = timezone.now()
    lines = _Lines(wallet, now)
    invoice, day = lines.invoice_for(start)
    tz = lines.tz
    plan = subscription.plan
    yearly = subscription.billing_mode == BillingMode.YEARLY
    span = f"{local_date(start, tz):%Y-%m-%d} – {local_date(end, tz):%Y-%m-%d}"
    en = f"VM subscription · {plan.name} · {subscription.vm.name} · {'yearly' if yearly else 'monthly'} · {span}"
    zh = f"虚拟机{'包年' if yearly else '包月'} · {plan.name} · {subscription.vm.name} · {span}"
    if renewal_percent is not None and renewal_percent != 100:
        en += f" · renewal at {renewal_percent}% of list"
        zh += f" · 续费按标价 {renewal_percent}%"
    line = lines.add(
        invoice,
        day,
        key=f"sub:{subscription.pk}:{hashing.format_time(start)}",
        kind=LineKind.SUBSCRIPTION,
        resource=f"vm_{subscription.billing_mode}:{plan.code}",
        unit="year" if yearly else "month",
        unit_price=amount,
        metered_unit="year" if yearly else "month",
        per_unit=1,
        amount_quantity=Decimal(1),
        description=(en, zh),
    )
    lines.flush()
    return SubscriptionCharge.objects.create(
        subscription=subscription,
        period_start=start,
        period_end=end,
        list_price=list_price,
        amount=amount,
        is_renewal=renewal_percent is not None,
        invoice_line=line,
    )


def subscription_start(*, event_id: int) -> Subscription | None:
    """A monthly or yearly VM ran for the first time: its subscription begins and the first period
    is charged at the plan price in force (the order check made sure the wallet could pay)."""
    event = LifecycleEvent.objects.select_related("vm__plan", "vm__tenant").filter(pk=event_id).first()
    if event is None or event.kind != LifecycleKind.STARTED:
        return None
    vm = event.vm
    if vm.billing_mode not in (BillingMode.MONTHLY, BillingMode.YEARLY):
        return None
    with transaction.atomic():
        wallet = _locked_wallet(vm.tenant_id)
        existing = Subscription.objects.filter(vm=vm).first()
        if existing is not None:
            return existing  # a restart: the period already runs
        tz = zone(vm.tenant.time_zone)
        start = event.at
        end = add_months_dt(start, _subscription_months(vm.billing_mode), tz)
        price = PriceBook().plan_price(vm.plan.code, start)
        list_price = price.yearly if vm.billing_mode == BillingMode.YEARLY else price.monthly
        subscription = Subscription.objects.create(
            tenant_id=vm.tenant_id,
            vm=vm,
            plan=vm.plan,
            billing_mode=vm.billing_mode,
            started_at=start,
            current_period_start=start,
            current_period_end=end,
        )
        _charge_period(
            wallet=wallet,
            subscription=subscription,
            start=start,
            end=end,
            list_price=list_price,
            amount=list_price,
            renewal_percent=None,
            strict=False,
        )
        audit_record(
            actor=None,
            tenant=vm.tenant,
            action="billing.subscription_started",
            target=subscription,
            after={"vm": vm.name, "plan": vm.plan.code, "mode": vm.billing_mode, "amount": str(list_price)},
        )
        _after_money_moved(wallet)
    return subscription


def subscription_end_for_vm(*, vm_id, reason: str) -> None:
    """The VM was released: its subscription ends (the period paid in advance is not refunded)."""
    with transaction.atomic():
        subscription = Subscription.objects.select_for_update().filter(vm_id=vm_id).first()
        if subscription is None or subscription.status == SubscriptionStatus.ENDED:
            return
        subscription.status = SubscriptionStatus.ENDED
        subscription.ended_at = timezone.now()
        subscription.end_reason = reason
        subscription.save(update_fields=["status", "ended_at", "end_reason"])
        audit_record(
            actor=None,
            tenant=subscription.tenant,
            action="billing.subscription_ended",
            target=subscription,
            after={"reason": reason},
        )


def _renewal_terms(subscription: Subscription, book: PriceBook, at: datetime) -> tuple[Decimal, Decimal, int]:
    price = book.plan_price(subscription.plan.code, at)
    if subscription.billing_mode == BillingMode.YEARLY:
        percent = subscription.tenant.tier.yearly_renewal_percent
        with exact():
            return price.yearly, to_fen(price.yearly * percent / HUNDRED), percent
    return price.monthly, price.monthly, 100


def subscriptions_renew_due(*, now: datetime | None = None) -> dict:
    """Renew subscriptions whose period ended (Gold and Diamond renew yearly at their tier's
    percent of list), end those cancelled at period end (releasing the VM), and mark renewals the
    wallet cannot pay as past due (the VM is stopped until they are paid)."""
    now = now or timezone.now()
    book = PriceBook()
    counts = {"renewed": 0, "ended": 0, "past_due": 0}
    due = Subscription.objects.filter(
        status__in=[SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE], current_period_end__lte=now
    ).values_list("pk", flat=True)
    for pk in list(due):
        outcome = _subscription_renew(pk, book=book, now=now)
        if outcome:
            counts[outcome] += 1
    return counts


def _subscription_renew(pk: int, *, book: PriceBook, now: datetime) -> str | None:
    release = None
    with transaction.atomic():
        subscription = Subscription.objects.select_related("tenant__tier", "plan", "vm").get(pk=pk)
        wallet = _locked_wallet(subscription.tenant_id)
        subscription = (
            Subscription.objects.select_for_update(of=("self",)).select_related("tenant__tier", "plan", "vm").get(pk=pk)
        )
        if subscription.status == SubscriptionStatus.ENDED or subscription.current_period_end > now:
            return None
        vm = subscription.vm
        if vm.state in (VmState.RELEASED, VmState.FAILED) or subscription.cancel_at_period_end:
            subscription.status = SubscriptionStatus.ENDED
            subscription.ended_at = subscription.current_period_end
            subscription.end_reason = "cancelled at period end" if subscription.cancel_at_period_end else "VM gone"
            subscription.save(update_fields=["status", "ended_at", "end_reason"])
            audit_record(
                actor=None,
                tenant=subscription.tenant,
                action="billing.subscription_ended",
                target=subscription,
                after={"reason": subscription.end_reason},
            )
            if vm.state not in (VmState.RELEASED, VmState.FAILED, VmState.RELEASING):
                release = vm
        else:
            start = subscription.current_period_end
            end = add_months_dt(
                start, _subscription_months(subscription.billing_mode), zone(subscription.tenant.time_zone)
            )
            list_price, amount, percent = _renewal_terms(subscription, book, start)
            try:
                with transaction.atomic():
                    _charge_period(
                        wallet=wallet,
                        subscription=subscription,
                        start=start,
                        end=end,
                        list_price=list_price,
                        amount=amount,
                        renewal_percent=percent,
                        strict=True,
                    )
            except InsufficientFunds:
                if subscription.status != SubscriptionStatus.PAST_DUE:
                    subscription.status = SubscriptionStatus.PAST_DUE
                    subscription.save(update_fields=["status"])
                    audit_record(
                        actor=None,
                        tenant=subscription.tenant,
                        action="billing.subscription_past_due",
                        target=subscription,
                        after={"amount": str(amount)},
                    )
                    if settings.PORTAL_BILLING_ENFORCE and vm.state in (VmState.RUNNING, VmState.STARTING):
                        transaction.on_commit(
                            lambda: _system_stop_vm(vm, _("Stopped: the subscription renewal is unpaid."))
                        )
                    return "past_due"
                return None
            subscription.current_period_start = start
            subscription.current_period_end = end
            subscription.status = SubscriptionStatus.ACTIVE
            subscription.save(update_fields=["current_period_start", "current_period_end", "status"])
            _after_money_moved(wallet)
            return "renewed"
    if release is not None:
        from provisioning.services import vm_release

        try:
            vm_release(membership=None, actor=None, vm=release, reason=_("The subscription ended."))
        except ValidationError as exc:
            logger.warning("Releasing %s at subscription end: %s", release.pk, exc)
    return "ended"


def subscription_cancel(
    *, membership: Membership, actor, subscription: Subscription, cancel: bool = True
) -> Subscription:
    """Cancel at the end of the paid period (or take the cancellation back). The VM keeps running
    until then and is released when the period ends."""
    require(membership, Capability.MANAGE_BILLING)
    with transaction.atomic():
        subscription = Subscription.objects.select_for_update().get(pk=subscription.pk, tenant_id=membership.tenant_id)
        if subscription.status == SubscriptionStatus.ENDED:
            raise ValidationError(_("This subscription has already ended."))
        if subscription.cancel_at_period_end == cancel:
            return subscription
        subscription.cancel_at_period_end = cancel
        subscription.save(update_fields=["cancel_at_period_end"])
        audit_record(
            actor=actor,
            tenant=membership.tenant,
            action="billing.subscription_cancelled" if cancel else "billing.subscription_resumed",
            target=subscription,
            before={"cancel_at_period_end": not cancel},
            after={"cancel_at_period_end": cancel, "period_end": subscription.current_period_end.isoformat()},
        )
    return subscription


# --- Payments ---------------------------------------------------------------------------------------


def _payment_reference() -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "GP-" + "".join(secrets.choice(alphabet) for _ in range(8))


def _start_checkout(payment: Payment, actor, description: str) -> Payment:
    provider = get_provider(payment.provider)
    base = settings.PORTAL_BASE_URL.rstrip("/")
    try:
        result = provider.create_checkout(
            CheckoutRequest(
                payment_id=str(payment.pk),
                reference=payment.reference,
                tenant_slug=payment.tenant.slug,
                tenant_name=payment.tenant.name,
                amount=payment.amount,
                currency="CNY",
                description=description,
                customer_email=getattr(actor, "email", "") or "",
                success_url=f"{base}{reverse('billing_payment', args=[payment.pk])}",
                cancel_url=f"{base}{reverse('billing')}",
            )
        )
    except PaymentProviderError as exc:
        Payment.objects.filter(pk=payment.pk).update(status=PaymentStatus.CANCELLED)
        raise ValidationError(
            _("The payment provider could not start the payment: %(error)s") % {"error": exc}
        ) from exc
    payment.provider_reference = result.provider_reference
    payment.checkout_url = result.url
    transfer = result.bank_transfer
    payment.instructions = (
        {
            "account_name": transfer.account_name,
            "bank_name": transfer.bank_name,
            "account_number": transfer.account_number,
            "amount": str(transfer.amount),
            "currency": transfer.currency,
            "reference": transfer.reference,
            "note": transfer.note,
        }
        if transfer
        else {}
    )
    payment.save(update_fields=["provider_reference", "checkout_url", "instructions"])
    return payment


def package_purchase(
    *, membership: Membership, actor, offer: PackageOffer, validity_months: int | None = None
) -> Payment:
    """Buy a compute package: a pending payment through the provider; credit arrives when paid."""
    require(membership, Capability.MANAGE_BILLING)
    now = timezone.now()
    current = PriceBook().version_at(now)
    if offer.version_id != current.pk:
        raise ValidationError({"package": _("This package is no longer on sale. Pick one from the current list.")})
    months = validity_months or offer.default_validity_months
    if not offer.min_validity_months <= months <= offer.max_validity_months:
        raise ValidationError(
            {
                "validity_months": _("Choose a validity of %(min)s to %(max)s months.")
                % {"min": offer.min_validity_months, "max": offer.max_validity_months}
            }
        )
    payment = _payment_order(
        membership=membership,
        actor=actor,
        action="billing.package_ordered",
        after={"package": offer.code, "amount": str(offer.price), "validity_months": months},
        kind=PaymentKind.PACKAGE,
        offer=offer,
        validity_months=months,
        amount=offer.price,
        bonus_amount=offer.bonus,
    )
    return _start_checkout(payment, actor, f"{offer.name_en} ({months} months)")


def top_up_create(*, membership: Membership, actor, amount: Decimal) -> Payment:
    """Add cash to the wallet through the provider."""
    require(membership, Capability.MANAGE_BILLING)
    amount = to_fen(Decimal(amount))
    if not settings.PORTAL_TOP_UP_MIN <= amount <= settings.PORTAL_TOP_UP_MAX:
        raise ValidationError(
            {
                "amount": _("Top up between ¥%(min)s and ¥%(max)s.")
                % {"min": settings.PORTAL_TOP_UP_MIN, "max": settings.PORTAL_TOP_UP_MAX}
            }
        )
    payment = _payment_order(
        membership=membership,
        actor=actor,
        action="billing.top_up_ordered",
        after={"amount": str(amount)},
        kind=PaymentKind.TOP_UP,
        amount=amount,
    )
    return _start_checkout(payment, actor, f"Top-up ¥{amount}")


@transaction.atomic
def _payment_order(*, membership: Membership, actor, action: str, after: dict, **fields) -> Payment:
    """A new payment through the configured provider, audited in the same transaction."""
    payment = Payment.objects.create(
        reference=_payment_reference(),
        tenant=membership.tenant,
        provider=settings.PORTAL_PAYMENT_PROVIDER,
        created_by=actor,
        **fields,
    )
    audit_record(actor=actor, tenant=membership.tenant, action=action, target=payment, after=after)
    return payment


def payment_fulfil(*, payment_id, provider_event_id: str, actor=None) -> Payment:
    """The provider (or staff, for a bank transfer) says the payment arrived: credit it, once.

    The provider's event id is stored unique in the same transaction as the credit, so a replayed
    event does nothing; a second event for an already paid payment is recorded and credits nothing."""
    with transaction.atomic():
        payment = Payment.objects.select_for_update(of=("self",)).select_related("tenant", "offer").get(pk=payment_id)
        try:
            with transaction.atomic():
                PaymentEvent.objects.create(
                    provider=payment.provider, event_id=provider_event_id, payment=payment, actor=actor
                )
        except IntegrityError:
            return payment
        if payment.status == PaymentStatus.SUCCEEDED:
            return payment
        wallet = _locked_wallet(payment.tenant_id)
        now = timezone.now()
        reference = f"payment:{payment.reference}"
        if payment.kind == PaymentKind.PACKAGE:
            offer = payment.offer
            grant = CreditGrant.objects.create(
                tenant_id=payment.tenant_id,
                payment=payment,
                offer=offer,
                name=offer.name_en,
                granted=payment.amount + payment.bonus_amount,
                remaining=payment.amount + payment.bonus_amount,
                expires_at=add_months_dt(now, payment.validity_months or 12, zone(payment.tenant.time_zone)),
            )
            _post_credit(
                wallet=wallet,
                kind=LedgerKind.PACKAGE_GRANT,
                amount=payment.amount,
                reason=f"{offer.name_en} paid",
                reference=reference,
                grant=grant,
                payment=payment,
                actor=actor,
            )
            if payment.bonus_amount:
                _post_credit(
                    wallet=wallet,
                    kind=LedgerKind.BONUS,
                    amount=payment.bonus_amount,
                    reason=f"{offer.name_en}: {_percent(offer.bonus_percent)}% bonus",
                    reference=reference,
                    grant=grant,
                    payment=payment,
                    actor=actor,
                )
        else:
            _post_credit(
                wallet=wallet,
                kind=LedgerKind.TOP_UP,
                amount=payment.amount,
                reason="Top-up paid",
                reference=reference,
                payment=payment,
                actor=actor,
            )
        before = payment.status
        payment.status = PaymentStatus.SUCCEEDED
        payment.fulfilled_at = now
        payment.save(update_fields=["status", "fulfilled_at"])
        audit_record(
            actor=actor,
            tenant=payment.tenant,
            action="billing.payment_received",
            target=payment,
            before={"status": before},
            after={"status": payment.status, "amount": str(payment.amount), "event": provider_event_id},
        )
        _after_money_moved(wallet)
        emit_dashboard_event(
            payment.tenant_id,
            "billing.payment_received",
            {"reference": payment.reference, "amount": str(payment.amount)},
        )
        tenant_id = payment.tenant_id
        transaction.on_commit(lambda: _retry_past_due(tenant_id))
        # Tiers are re-evaluated after each payment (DESIGN.md section 4). robust: a failure there is
        # logged and left to the nightly run; it never fails a payment that is already credited.
        transaction.on_commit(
            lambda: import_string("crm.tasks.tier_evaluate_tenant").delay(tenant_id, trigger="payment"), robust=True
        )
    return payment


def _retry_past_due(tenant_id: int) -> None:
    ids = Subscription.objects.filter(tenant_id=tenant_id, status=SubscriptionStatus.PAST_DUE).values_list(
        "pk", flat=True
    )
    if ids:
        book = PriceBook()
        for pk in list(ids):
            _subscription_renew(pk, book=book, now=timezone.now())


def payment_cancel(*, payment: Payment, actor, membership: Membership | None = None) -> Payment:
    """Withdraw a payment that has not arrived (the customer, or staff)."""
    if membership is not None:
        require(membership, Capability.MANAGE_BILLING)
    else:
        _require_staff(actor)
    with transaction.atomic():
        payment = Payment.objects.select_for_update().get(pk=payment.pk)
        if payment.status != PaymentStatus.PENDING:
            raise ValidationError(_("Only a payment that is still waiting can be cancelled."))
        payment.status = PaymentStatus.CANCELLED
        payment.save(update_fields=["status"])
        audit_record(actor=actor, tenant=payment.tenant, action="billing.payment_cancelled", target=payment)
    return payment


# --- Invoices ---------------------------------------------------------------------------------------


def invoice_finalise(*, invoice_id: int, now: datetime | None = None) -> Invoice | None:
    """Close a month's invoice once its grace window has passed. From then on it never changes;
    usage that arrives later goes to the next invoice."""
    now = now or timezone.now()
    invoice = Invoice.objects.filter(pk=invoice_id).first()
    if invoice is None or invoice.status != InvoiceStatus.DRAFT:
        return invoice
    tz = zone(invoice.time_zone)
    if local_midnight(invoice.period_end, tz) + timedelta(days=settings.PORTAL_INVOICE_GRACE_DAYS) > now:
        return invoice
    usage_rate_pending(tenant_id=invoice.tenant_id)
    with transaction.atomic():
        _locked_wallet(invoice.tenant_id)
        invoice = Invoice.objects.select_for_update().get(pk=invoice_id)
        if invoice.status != InvoiceStatus.DRAFT:
            return invoice
        total = sum(invoice.lines.values_list("amount", flat=True), Decimal("0.00"))
        invoice.total = total
        invoice.status = InvoiceStatus.FINAL
        invoice.number = _invoice_number(invoice)
        invoice.finalised_at = now
        invoice.save(update_fields=["total", "status", "number", "finalised_at"])
        audit_record(
            actor=None,
            tenant=invoice.tenant,
            action="billing.invoice_finalised",
            target=invoice,
            after={"number": invoice.number, "total": str(total)},
        )
        notify(
            kind=NotificationKind.INVOICE_ISSUED,
            tenant=invoice.tenant,
            roles=BILLING_ROLES,
            params={"number": invoice.number, "total": str(total)},
            url=reverse("billing_invoice", args=[invoice.pk]),
            dedupe_key=f"invoice_issued:{invoice.pk}",
        )
    return invoice


def invoices_finalise_due(*, now: datetime | None = None) -> int:
    now = now or timezone.now()
    # Any month that ended at least the grace window ago, in any time zone (checked per invoice).
    cutoff = (now - timedelta(days=settings.PORTAL_INVOICE_GRACE_DAYS - 1)).date()
    drafts = Invoice.objects.filter(status=InvoiceStatus.DRAFT, period_end__lte=cutoff).values_list("pk", flat=True)
    finalised = 0
    for pk in list(drafts):
        invoice = invoice_finalise(invoice_id=pk, now=now)
        finalised += bool(invoice and invoice.status == InvoiceStatus.FINAL)
    return finalised


# --- Price book (staff) -----------------------------------------------------------------------------


def price_book_version_create(
    *,
    actor,
    effective_from: datetime,
    prices: dict[str, Decimal] | None = None,
    bands: list[tuple[Decimal, Decimal | None, Decimal]] | None = None,
    note: str = "",
) -> PriceBookVersion:
    """Publish a new price book version taking effect at `effective_from` (now or later). Items,
    bands and packages not given are carried over from the latest version; history is never edited."""
    _require_staff(actor)
    now = timezone.now()
    errors = {}
    if effective_from is None or effective_from < now - timedelta(minutes=1):
        errors["effective_from"] = _("A new price takes effect now or later, never in the past.")
    latest = PriceBookVersion.objects.order_by("-effective_from").prefetch_related("items", "bands", "packages").first()
    if latest is not None and effective_from is not None and effective_from <= latest.effective_from:
        errors["effective_from"] = _("Take effect after the latest version (%(date)s).") % {
            "date": f"{latest.effective_from:%Y-%m-%d %H:%M}"
        }
    prices = {code: Decimal(value) for code, value in (prices or {}).items()}
    known = {item.code for item in latest.items.all()} if latest else set()
    unknown = sorted(set(prices) - known)
    if unknown:
        errors["prices"] = _("Unknown price items: %(codes)s.") % {"codes": ", ".join(unknown)}
    if any(value < 0 for value in prices.values()):
        errors["prices"] = _("Prices are zero or more.")
    if bands is not None:
        ordered = sorted(bands, key=lambda b: b[0])
        if not ordered or ordered[0][0] != 0:
            errors["bands"] = _("Bands start at 0 hours.")
        for (_lo, hi, pct), following in zip(ordered, [*ordered[1:], None], strict=True):
            if not 0 <= pct <= 100:
                errors["bands"] = _("Discounts are between 0 and 100 percent.")
            if following is not None and hi != following[0]:
                errors["bands"] = _("Each band ends where the next begins.")
            if following is None and hi is not None:
                errors["bands"] = _("The last band has no upper end.")
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        version = PriceBookVersion.objects.create(effective_from=effective_from, note=note, created_by=actor)
        if latest is not None:
            PriceItem.objects.bulk_create(
                PriceItem(
                    version=version,
                    code=item.code,
                    unit=item.unit,
                    unit_price=prices.get(item.code, item.unit_price),
                    set_by_staff=item.set_by_staff,
                    label_en=item.label_en,
                    label_zh=item.label_zh,
                )
                for item in latest.items.all()
            )
            PackageOffer.objects.bulk_create(
                PackageOffer(
                    version=version,
                    code=p.code,
                    name_en=p.name_en,
                    name_zh=p.name_zh,
                    price=p.price,
                    bonus_percent=p.bonus_percent,
                    min_validity_months=p.min_validity_months,
                    max_validity_months=p.max_validity_months,
                    default_validity_months=p.default_validity_months,
                )
                for p in latest.packages.all()
            )
        source_bands = (
            [(b.from_hours, b.to_hours, b.discount_percent) for b in latest.bands.all()]
            if bands is None and latest
            else bands or []
        )
        VolumeBand.objects.bulk_create(
            VolumeBand(version=version, from_hours=lo, to_hours=hi, discount_percent=pct)
            for lo, hi, pct in source_bands
        )
        audit_record(
            actor=actor,
            tenant=None,
            action="billing.price_book_published",
            target=version,
            after={
                "effective_from": effective_from.isoformat(),
                "changed": {code: str(value) for code, value in prices.items()},
                "note": note,
            },
        )
    return version
