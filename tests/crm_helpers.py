"""Shared pieces of the crm automation tests: ledger rows with explicit times, Shanghai moments."""

from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing.models import LedgerEntry, LedgerKind

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(*args) -> datetime:
    """A moment in Asia/Shanghai, e.g. at(2026, 3, 1, 9, 30)."""
    return datetime(*args, tzinfo=SHANGHAI)


def charge(tenant, amount, when, *, grant=None) -> LedgerEntry:
    """A charge of `amount` (a positive number: what the customer spent) posted at `when`.

    LedgerEntry is append-only: rows are created, never edited, so tests create them directly
    with the time they need."""
    return LedgerEntry.objects.create(
        tenant=tenant,
        kind=LedgerKind.CHARGE,
        grant=grant,
        amount=-Decimal(str(amount)),
        reason="test charge",
        reference=f"test:{when.isoformat()}",
        created_at=when,
    )


def refund(tenant, amount, when) -> LedgerEntry:
    return LedgerEntry.objects.create(
        tenant=tenant,
        kind=LedgerKind.REFUND,
        amount=Decimal(str(amount)),
        reason="test refund",
        reference=f"test-refund:{when.isoformat()}",
        created_at=when,
    )


def credit(tenant, amount, when, kind=LedgerKind.TOP_UP) -> LedgerEntry:
    return LedgerEntry.objects.create(
        tenant=tenant, kind=kind, amount=Decimal(str(amount)), reason="test credit", reference="test", created_at=when
    )
