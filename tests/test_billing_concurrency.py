"""Money under concurrency, on PostgreSQL: the wallet row lock and the chain-head lock hold."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from billing import services
from billing.models import Invoice, LedgerEntry, UsageRecord, Wallet
from billing.providers.offline import staff_confirmation_event_id
from billing.services import UsageEvent
from billing.verification import verify_balances, verify_chain
from tests.factories import make_tenant
from tests.test_billing_helpers import at, owner_membership_of, top_up

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

WORKERS = 32  # PostgreSQL's default max_connections is 100: 32 connections hammer one row at once


def all_at_once(calls):
    """Run the callables on WORKERS threads (each with its own connection), released together."""
    barrier = threading.Barrier(min(WORKERS, len(calls)))
    outcomes = [None] * len(calls)

    def run(i):
        try:
            if i < WORKERS:
                barrier.wait()
            calls[i]()
            outcomes[i] = "ok"
        except ValidationError as exc:
            outcomes[i] = exc.messages[0]
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(run, range(len(calls))))
    return outcomes


def test_100_concurrent_charges_never_overdraw_one_wallet():
    tenant = make_tenant(name="Race lab")
    top_up(tenant, "1000")
    charges = [
        lambda n=n: services.wallet_charge(
            tenant=tenant, actor=None, amount=Decimal("15.00"), description="Race", reference=f"race-{n}"
        )
        for n in range(100)
    ]
    outcomes = all_at_once(charges)
    assert None not in outcomes
    assert outcomes.count("ok") == 66  # 66 × 15 = 990 fits in 1,000; a 67th would overdraw
    assert all(o == "ok" or o.startswith("Your balance") for o in outcomes)
    wallet = Wallet.objects.get(tenant=tenant)
    assert wallet.cash_balance == Decimal("10.00")
    assert LedgerEntry.objects.filter(tenant=tenant, kind="charge").count() == 66
    invoice = Invoice.objects.get(tenant=tenant)
    assert invoice.total == Decimal("990.00") == sum(invoice.lines.values_list("amount", flat=True))
    assert verify_balances([tenant.pk]) == []


def test_concurrent_usage_charges_lose_no_update():
    tenant = make_tenant(name="Usage race")
    top_up(tenant, "100000")
    start = at(2026, 3, 1)

    def usage(n):
        services.usage_append(
            events=[
                UsageEvent(
                    tenant_id=tenant.pk,
                    idempotency_key=f"race:{n}",
                    source="task",
                    source_id=str(n),
                    resource="gpu:A100",
                    unit="gpu_second",
                    quantity=Decimal(36),  # a hundredth of a GPU-hour: 0.50
                    period_start=start + timedelta(minutes=n),
                    period_end=start + timedelta(minutes=n, seconds=36),
                )
            ]
        )
        services.usage_rate_pending(tenant_id=tenant.pk)

    outcomes = all_at_once([lambda n=n: usage(n) for n in range(100)] + [lambda: usage(0)] * 20)  # with replays
    assert None not in outcomes and set(outcomes) == {"ok"}
    assert UsageRecord.objects.filter(tenant=tenant).count() == 100
    assert verify_chain(tenant.pk) == []
    invoice = Invoice.objects.get(tenant=tenant)
    assert invoice.total == Decimal("50.00")  # 100 × 36 GPU-s = 1 GPU-hour
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("99950.00")
    assert verify_balances([tenant.pk]) == []


def test_a_payment_confirmed_twice_at_once_is_credited_once():
    tenant = make_tenant(name="Pay race")
    membership = owner_membership_of(tenant)
    payment = services.top_up_create(membership=membership, actor=membership.user, amount=Decimal("500"))
    event = staff_confirmation_event_id(payment.pk)
    outcomes = all_at_once([lambda: services.payment_fulfil(payment_id=payment.pk, provider_event_id=event)] * 10)
    assert set(outcomes) == {"ok"}
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("500.00")
    assert LedgerEntry.objects.filter(tenant=tenant, kind="top_up").count() == 1
