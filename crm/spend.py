"""What a tenant has spent: the one definition every tier, churn, upsell and console figure uses.

**Spend** is the net of the tenant's ledger entries of kind CHARGE and REFUND:
``-Sum(amount)`` over ``kind in (charge, refund)``. Charges are posted negative and refunds
positive, so spend is positive and a refund lowers it. It counts every charge whatever paid it
(cash or package credit, bonus credit included: a charge paid from a package is usage the customer
consumed). It does **not** count top-ups, package purchases (package_grant, bonus), expired credit
written off, or staff adjustments: buying credit is not spending it.

**Months** are calendar months in the tenant's own time zone (``Tenant.time_zone``, default
Asia/Shanghai): an entry at 2026-10-31 16:30 UTC is 2026-11-01 00:30 in Shanghai and belongs to
November. A month is keyed by the date of its first day.

**Windows**, all relative to ``now`` (default: the current time) and counting only entries created
at or before ``now``:

- ``spend_mtd``: the calendar month containing ``now`` (month to date);
- ``spend_12m`` (trailing twelve months): the calendar month containing ``now`` plus the eleven
  calendar months before it (so on 15 March 2026 it covers 1 April 2025 – 15 March 2026, not the
  last 365 days);
- ``spend_total`` / ``cumulative_spend``: everything up to ``now``.

Month arithmetic runs in SQL: ``LocalMonthIndex`` (the month of each entry, for grouping) and
``LocalMonthStart`` (where a tenant's window begins, computed once per tenant so the ledger's
(tenant, created_at) index bounds the scan). PostgreSQL converts with ``AT TIME ZONE`` the tenant's
own column; SQLite calls Python functions registered on each connection (crm.apps). So a list of
10,000 tenants of mixed time zones is annotated and sorted in one query.
"""

from collections import defaultdict
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache

from django.db import NotSupportedError
from django.db.models import (
    DateTimeField,
    DecimalField,
    ExpressionWrapper,
    FilteredRelation,
    Func,
    IntegerField,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing import money
from billing.models import LedgerEntry, LedgerKind
from billing.money import add_months, zone
from tenants.models import Tenant

SPEND_KINDS = (LedgerKind.CHARGE, LedgerKind.REFUND)
ZERO = Decimal("0.00")
CENT = Decimal("0.01")


class MoneyField(DecimalField):
    """Output field of the spend expressions: a two-place Decimal from every backend (SQLite hands
    computed sums back as floats, which Django turns into Decimals without fixing their places)."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else Decimal(value).quantize(CENT) + ZERO


MONEY = MoneyField(max_digits=16, decimal_places=2)
SQLITE_MONTH_INDEX_FUNCTION = "crm_local_month_index"
SQLITE_MONTH_START_FUNCTION = "crm_local_month_start"


# --- Month arithmetic ---------------------------------------------------------------------------


def month_index(day: date) -> int:
    """Months since year 0: year * 12 + (month - 1). Consecutive months have consecutive indexes."""
    return day.year * 12 + day.month - 1


def month_from_index(index: int) -> date:
    year, month = divmod(index, 12)
    return date(year, month + 1, 1)


def month_start(dt: datetime, tz_name: str | None) -> date:
    """First day of the calendar month that `dt` falls in, in time zone `tz_name`."""
    return dt.astimezone(zone(tz_name)).date().replace(day=1)


def month_bounds(tz_name: str | None, year: int, month: int) -> tuple[datetime, datetime]:
    """[start, end) of calendar month `year`-`month` in time zone `tz_name`, as UTC datetimes."""
    start, end = money.month_bounds(date(year, month, 1), zone(tz_name))
    return start.astimezone(UTC), end.astimezone(UTC)


@lru_cache(maxsize=256)
def _zone(name):
    return zone(name)


def _sqlite_local_month_index(value, tz_name):
    """SQLite side of LocalMonthIndex: `value` is Django's UTC text form of a datetime."""
    if value is None:
        return None
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    local = moment.astimezone(_zone(tz_name))
    return local.year * 12 + local.month - 1


def _sqlite_local_month_start(value, tz_name, months_back):
    """SQLite side of LocalMonthStart, in Django's UTC text form of a datetime (so it compares as text)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    tz = _zone(tz_name)
    first = add_months(moment.astimezone(tz).date().replace(day=1), -int(months_back))
    start = datetime.combine(first, datetime.min.time(), tzinfo=tz).astimezone(UTC)
    return start.strftime("%Y-%m-%d %H:%M:%S")


def register_sqlite_functions(sender, connection, **kwargs) -> None:
    """connection_created receiver (crm.apps): teach each SQLite connection LocalMonthIndex and
    LocalMonthStart."""
    if connection.vendor == "sqlite":
        connection.connection.create_function(
            SQLITE_MONTH_INDEX_FUNCTION, 2, _sqlite_local_month_index, deterministic=True
        )
        connection.connection.create_function(
            SQLITE_MONTH_START_FUNCTION, 3, _sqlite_local_month_start, deterministic=True
        )


class LocalMonthIndex(Func):
    """year * 12 + (month - 1) of a moment as seen in a time zone named by another expression
    (typically the tenant's ``time_zone`` column), as an integer."""

    arity = 2
    output_field = IntegerField()

    def as_sql(self, compiler, connection, **extra_context):
        raise NotSupportedError("LocalMonthIndex supports PostgreSQL and SQLite.")

    def as_sqlite(self, compiler, connection, **extra_context):
        return super().as_sql(compiler, connection, function=SQLITE_MONTH_INDEX_FUNCTION, **extra_context)

    def as_postgresql(self, compiler, connection, **extra_context):
        moment_sql, moment_params = compiler.compile(self.source_expressions[0])
        zone_sql, zone_params = compiler.compile(self.source_expressions[1])
        local = f"(({moment_sql})::timestamptz AT TIME ZONE ({zone_sql}))"
        sql = f"(EXTRACT(YEAR FROM {local}) * 12 + EXTRACT(MONTH FROM {local}) - 1)::integer"
        params = (*moment_params, *zone_params)
        return sql, params * 2


class LocalMonthStart(Func):
    """The moment the calendar month `months_back` months before the one containing a moment began,
    in a time zone named by another expression (the tenant's column). Computed once per tenant,
    it bounds an index range scan on created_at: no time-zone arithmetic per ledger row."""

    output_field = DateTimeField()

    def __init__(self, moment, zone_name, months_back: int):
        super().__init__(moment, zone_name, Value(int(months_back)))

    def as_sql(self, compiler, connection, **extra_context):
        raise NotSupportedError("LocalMonthStart supports PostgreSQL and SQLite.")

    def as_sqlite(self, compiler, connection, **extra_context):
        return super().as_sql(compiler, connection, function=SQLITE_MONTH_START_FUNCTION, **extra_context)

    def as_postgresql(self, compiler, connection, **extra_context):
        moment_sql, moment_params = compiler.compile(self.source_expressions[0])
        zone_sql, zone_params = compiler.compile(self.source_expressions[1])
        back_sql, back_params = compiler.compile(self.source_expressions[2])
        sql = (
            f"((date_trunc('month', ({moment_sql})::timestamptz AT TIME ZONE ({zone_sql})) "
            f"- make_interval(months => ({back_sql})::integer)) AT TIME ZONE ({zone_sql}))"
        )
        return sql, (*moment_params, *zone_params, *back_params, *zone_params)


# --- Queries ------------------------------------------------------------------------------------


def monthly_spend(tenant_ids, months: int | None, now: datetime | None = None) -> dict[int, dict[date, Decimal]]:
    """Spend per tenant per calendar month of its own time zone, in ONE query.

    `tenant_ids`: ids (or a queryset of tenants / ids). `months`: how many calendar months, the
    one containing `now` included (its spend so far) and the ones before it; None for the whole
    history, from the tenant's first month with spend. Every requested tenant gets every month of
    its window as a key, zero where nothing was spent, oldest first.
    """
    now = now or timezone.now()
    condition = Q(ledger_entries__kind__in=SPEND_KINDS, ledger_entries__created_at__lte=now)
    if months is not None:
        if months < 1:
            raise ValueError("months must be at least 1")
        # Coarse, index-friendly bound: one month more than the window in UTC covers every time
        # zone (a local month differs from the UTC month by at most one); exact cut below.
        utc_month = now.astimezone(UTC).date().replace(day=1)
        condition &= Q(
            ledger_entries__created_at__gte=datetime.combine(
                add_months(utc_month, -months), datetime.min.time(), tzinfo=UTC
            )
        )
    rows = (
        Tenant.objects.filter(pk__in=tenant_ids)
        .annotate(spend_entries=FilteredRelation("ledger_entries", condition=condition))
        .values("pk", "time_zone", month=LocalMonthIndex("spend_entries__created_at", "time_zone"))
        .annotate(total=Sum("spend_entries__amount"))
        .order_by()
    )
    found: dict[int, dict[int, Decimal]] = defaultdict(dict)
    zones: dict[int, str] = {}
    for row in rows:
        zones[row["pk"]] = row["time_zone"]
        if row["month"] is not None:
            found[row["pk"]][row["month"]] = -(row["total"] or ZERO)
    result = {}
    for tenant_id, tz_name in zones.items():
        current = month_index(month_start(now, tz_name))
        spent = found.get(tenant_id, {})
        first = current - months + 1 if months is not None else min([current, *spent])
        result[tenant_id] = {
            month_from_index(index): Decimal(spent.get(index, ZERO)).quantize(CENT) + ZERO  # no -0.00
            for index in range(first, current + 1)
        }
    return result


def _spend_subquery(now: datetime, *, months: int | None):
    """-(sum of charge/refund amounts) of the outer tenant up to `now`, in the last `months`
    calendar months of its time zone (the current one included), or all of them when None."""
    entries = LedgerEntry.objects.filter(tenant=OuterRef("pk"), kind__in=SPEND_KINDS, created_at__lte=now)
    if months is not None:
        window_start = LocalMonthStart(Value(now, output_field=DateTimeField()), OuterRef("time_zone"), months - 1)
        entries = entries.filter(created_at__gte=window_start)
    total = entries.order_by().values("tenant").annotate(total=Sum("amount")).values("total")
    spent = Coalesce(Subquery(total, output_field=MONEY), Value(ZERO), output_field=MONEY)
    return ExpressionWrapper(Value(ZERO, output_field=MONEY) - spent, output_field=MONEY)


def spend_annotations(now: datetime | None = None) -> dict:
    """Expressions for ``Tenant.objects.annotate(**spend_annotations())``: ``spend_mtd``,
    ``spend_12m`` and ``spend_total`` (see the module docstring for exactly what each covers).
    Correlated subqueries on the ledger's (tenant, created_at) index: the query count stays one
    whatever the number of tenants, and the list can be ordered by any of them."""
    now = now or timezone.now()
    return {
        "spend_mtd": _spend_subquery(now, months=1),
        "spend_12m": _spend_subquery(now, months=12),
        "spend_total": _spend_subquery(now, months=None),
    }


def cumulative_spend(tenant: Tenant, now: datetime | None = None) -> Decimal:
    """Everything the tenant has spent up to `now` (all of its history)."""
    now = now or timezone.now()
    total = LedgerEntry.objects.filter(tenant=tenant, kind__in=SPEND_KINDS, created_at__lte=now).aggregate(
        total=Sum("amount")
    )["total"]
    return (-(total or ZERO)).quantize(CENT) + ZERO
