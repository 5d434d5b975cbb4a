"""Money and calendar arithmetic for billing: exact Decimals, one rounding rule, tenant-local months.

Money is never a float. Quantities carry 9 decimal places (per-second precision for hours and
days); unrounded amounts are exact products of quantity × rate × discount; rounding to the fen
happens once, at the charge line, ROUND_HALF_UP.
"""

from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext
from zoneinfo import ZoneInfo

FEN = Decimal("0.01")
QUANTITY_QUANTUM = Decimal("1e-9")
ZERO = Decimal("0")
HUNDRED = Decimal("100")
MICROSECONDS_PER_HOUR = Decimal(3_600_000_000)
MICROSECONDS_PER_DAY = Decimal(86_400_000_000)
# Wide enough that no product or sum of billing amounts is ever rounded by the context.
EXACT = Context(prec=60, rounding=ROUND_HALF_UP)


def exact():
    """`with exact():` — Decimal arithmetic that never rounds billing figures."""
    return localcontext(EXACT)


UNROUNDED_QUANTUM = Decimal("1e-20")
DISPLAY_QUANTUM = Decimal("1e-6")


def exact_amount(quantity: Decimal, unit_price: Decimal, discount_percent: Decimal, per_unit: int) -> Decimal:
    """quantity × unit_price × (1 − discount), with quantity in metered units (e.g. GPU-seconds) and
    the price per `per_unit` of them (e.g. 3600 per GPU-hour). Quantities are exact, so this is
    exact to 20 places: a true half fen is always found and rounded up."""
    with exact():
        value = Decimal(quantity) * unit_price * (HUNDRED - discount_percent) / (HUNDRED * per_unit)
        return value.quantize(UNROUNDED_QUANTUM, rounding=ROUND_HALF_UP)


def in_priced_units(quantity: Decimal, per_unit: int) -> Decimal:
    with exact():
        return (Decimal(quantity) / per_unit).quantize(DISPLAY_QUANTUM, rounding=ROUND_HALF_UP).normalize()


def to_fen(amount: Decimal) -> Decimal:
    """The one rounding rule: to the fen, half up."""
    return Decimal(amount).quantize(FEN, rounding=ROUND_HALF_UP, context=EXACT)


def quantity(value: Decimal) -> Decimal:
    """A metered quantity at its stored precision (9 places, half up)."""
    return Decimal(value).quantize(QUANTITY_QUANTUM, rounding=ROUND_HALF_UP, context=EXACT)


def microseconds(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def whole_second(moment: datetime) -> datetime:
    """Usage is metered per second: boundaries are taken to the whole second (floor)."""
    return moment.replace(microsecond=0)


def seconds_between(start: datetime, end: datetime) -> int:
    delta = whole_second(end) - whole_second(start)
    return delta.days * 86_400 + delta.seconds


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "Asia/Shanghai")
    except (KeyError, ValueError):
        return ZoneInfo("Asia/Shanghai")


def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(day: date, months: int) -> date:
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    last = (date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)).day
    return date(year, month, min(day.day, last))


def add_months_dt(moment: datetime, months: int, tz: ZoneInfo) -> datetime:
    """The same local wall-clock time `months` calendar months later (clamped to the month's end)."""
    local = moment.astimezone(tz)
    target = add_months(local.date(), months)
    return datetime.combine(target, local.timetz().replace(tzinfo=None), tzinfo=tz)


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=tz)


def month_bounds(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of the calendar month containing `day`, as aware datetimes in `tz`."""
    first = month_start(day)
    return local_midnight(first, tz), local_midnight(add_months(first, 1), tz)


def local_date(moment: datetime, tz: ZoneInfo) -> date:
    return moment.astimezone(tz).date()


def split_at_month_boundaries(start: datetime, end: datetime, tz: ZoneInfo) -> list[tuple[datetime, datetime]]:
    """[start, end) cut where a calendar month of `tz` begins: each piece lies in one month."""
    pieces = []
    cursor = start.astimezone(UTC)
    end = end.astimezone(UTC)
    while cursor < end:
        _, month_end = month_bounds(local_date(cursor, tz), tz)
        piece_end = min(end, month_end.astimezone(UTC))
        pieces.append((cursor, piece_end))
        cursor = piece_end
    return pieces


def split_hourly(start: datetime, end: datetime, tz: ZoneInfo) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at every whole UTC hour and every month boundary of `tz`."""
    pieces = []
    for month_piece_start, month_piece_end in split_at_month_boundaries(start, end, tz):
        cursor = month_piece_start
        while cursor < month_piece_end:
            next_hour = cursor.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            piece_end = min(month_piece_end, next_hour)
            pieces.append((cursor, piece_end))
            cursor = piece_end
    return pieces
