"""Billing at scale on PostgreSQL: 1,000,000 usage events from 1,000 tenants (with replays mixed in)
appended to the tamper-evident usage log, then the month's invoicing (rating every record into
invoice lines and the ledger, then finalising the invoices), against a plain SQL GROUP BY over the
same rows as the floor.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/portal_bench_billing .venv/bin/python bench/billing.py

The database named in DATABASE_URL is dropped and created afresh. BENCH_EVENTS and BENCH_TENANTS
shrink the run for a quick look.
"""

import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal_bench_billing")
os.environ["CELERY_TASK_ALWAYS_EAGER"] = "1"

EVENTS = int(os.environ.get("BENCH_EVENTS", "1000000"))
TENANTS = int(os.environ.get("BENCH_TENANTS", "1000"))
BATCH = int(os.environ.get("BENCH_BATCH", "20000"))
DUPLICATE_SHARE = 0.05  # one event in twenty is a replay of one already sent
MONTH_START = datetime(2026, 9, 30, 16, tzinfo=UTC)  # October 2026 in Asia/Shanghai
MONTH_SECONDS = 31 * 86400


def recreate_database() -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def make_events(tenant_ids: list[int]):
    """EVENTS usage events (task runs on A100, T4 and CPU/memory), replays included, in send order."""
    from billing.services import UsageEvent

    rng = random.Random(7)
    resources = [
        ("gpu:A100", "gpu_second", 8),
        ("gpu:T4", "gpu_second", 4),
        ("cpu", "core_second", 64),
        ("memory", "gib_second", 512),
    ]
    sent: list = []
    fresh = 0
    while len(sent) < EVENTS:
        if sent and rng.random() < DUPLICATE_SHARE:
            sent.append(sent[rng.randrange(len(sent))])
            continue
        tenant_id = tenant_ids[fresh % len(tenant_ids)]
        resource, unit, most = resources[rng.randrange(len(resources))]
        start = MONTH_START + timedelta(seconds=rng.randrange(MONTH_SECONDS - 7200))
        seconds = rng.randrange(60, 7200)
        sent.append(
            UsageEvent(
                tenant_id=tenant_id,
                idempotency_key=f"bench:{fresh}",
                source="task",
                source_id=str(fresh),
                resource=resource,
                unit=unit,
                quantity=Decimal(rng.randrange(1, most + 1) * seconds),
                period_start=start,
                period_end=start + timedelta(seconds=seconds),
            )
        )
        fresh += 1
    return sent, fresh


def main() -> None:
    import logging

    import django

    django.setup()
    logging.getLogger("celery").setLevel(logging.WARNING)
    logging.getLogger("billing").setLevel(logging.WARNING)
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        sys.exit("bench/billing.py needs PostgreSQL: set DATABASE_URL=postgres://…")
    recreate_database()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from django.db import connection

    from billing import services
    from billing.models import Invoice, InvoiceStatus, LedgerEntry, UsageRecord
    from billing.verification import verify_balances, verify_chain
    from tenants.models import Tenant, Tier

    standard = Tier.objects.get(code="standard")
    Tenant.objects.bulk_create(Tenant(slug=f"bench-{t}", name=f"Bench {t}", tier=standard) for t in range(TENANTS))
    tenant_ids = list(Tenant.objects.filter(slug__startswith="bench-").values_list("pk", flat=True))
    events, unique = make_events(tenant_ids)
    print(
        f"{len(events):,} events for {len(tenant_ids):,} tenants ({len(events) - unique:,} replays), "
        f"batches of {BATCH:,}"
    )

    started = time.perf_counter()
    appended = duplicates = 0
    for i in range(0, len(events), BATCH):
        result = services.usage_append(events=events[i : i + BATCH])
        appended += result.appended
        duplicates += result.duplicates
    ingest = time.perf_counter() - started
    print(
        f"ingest: {appended:,} appended, {duplicates:,} replays counted once, {ingest:.1f} s "
        f"→ {len(events) / ingest:,.0f} events/s (hash chain computed in Python, COPY into PostgreSQL)"
    )
    assert appended == unique == UsageRecord.objects.count(), "an event was lost or counted twice"

    started = time.perf_counter()
    rated = services.usage_rate_all()
    rating = time.perf_counter() - started
    started = time.perf_counter()
    finalised = services.invoices_finalise_due(now=MONTH_START + timedelta(days=34))
    closing = time.perf_counter() - started
    print(
        f"invoicing: {rated:,} records rated in {rating:.1f} s ({rated / rating:,.0f} records/s), "
        f"{finalised:,} invoices finalised in {closing:.1f} s; total {rating + closing:.1f} s"
    )

    with connection.cursor() as cursor:
        started = time.perf_counter()
        cursor.execute(
            "SELECT tenant_id, resource, sum(quantity) FROM billing_usagerecord GROUP BY tenant_id, resource"
        )
        groups = cursor.fetchall()
        floor = time.perf_counter() - started
    print(f"floor: plain SQL GROUP BY over the same {appended:,} rows: {len(groups):,} groups in {floor:.2f} s")

    # The invoices must say what the plain sums say.
    sums = {(t, r): q for t, r, q in groups}
    invoices = Invoice.objects.filter(status=InvoiceStatus.FINAL).prefetch_related("lines")
    checked = 0
    for invoice in invoices.filter(tenant_id__in=tenant_ids[:50]):
        per_resource: dict[str, Decimal] = {}
        for line in invoice.lines.all():
            per_resource[line.resource] = per_resource.get(line.resource, Decimal(0)) + line.quantity
        assert per_resource == {r: q for (t, r), q in sums.items() if t == invoice.tenant_id}, invoice.tenant_id
        charged = -sum(
            LedgerEntry.objects.filter(invoice_line__invoice=invoice).values_list("amount", flat=True), Decimal(0)
        )
        assert charged == invoice.total == sum(line.amount for line in invoice.lines.all())
        checked += 1
    broken = sum(bool(verify_chain(t)) for t in tenant_ids[:50])
    print(
        f"checks: {checked} invoices equal the GROUP BY and their ledger charges; "
        f"{broken} broken chains of 50 verified; balance mismatches: {len(verify_balances(tenant_ids[:50]))}"
    )


if __name__ == "__main__":
    main()
