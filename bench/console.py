"""The console's customer list at scale on PostgreSQL: 10,000 tenants with 14 months of charges,
wallets, package credit, running VMs and tasks, account managers and churn flags, then the list
rendered through the whole Django stack (middleware, view, template) sorted by spend and balance,
filtered and searched, and the CSV export of every customer. Prints the time of each page and the
number of SQL queries it took: the count must not depend on the number of tenants.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/portal_bench_console .venv/bin/python bench/console.py

The database named in DATABASE_URL is dropped and created afresh. BENCH_TENANTS changes the size
(default 10,000), BENCH_CHARGES the charges per tenant (default 14, one a month).
"""

import os
import random
import statistics
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal_bench_console")
os.environ["CELERY_TASK_ALWAYS_EAGER"] = "1"

TENANTS = int(os.environ.get("BENCH_TENANTS", "10000"))
CHARGES = int(os.environ.get("BENCH_CHARGES", "14"))
RUNS = 3  # each page is rendered this many times; the median is printed
BATCH = 5000


def recreate_database() -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def seed() -> None:
    """TENANTS customers, each with an owner, a wallet, CHARGES monthly charges, and for some: package
    credit, a running VM and task, an account manager, a churn flag. bulk_create throughout."""
    from django.utils import timezone

    from billing.models import CreditGrant, LedgerEntry, LedgerKind, Wallet
    from crm.models import CustomerAccount, StaffProfile, StaffRole
    from hosting.models import Task, TaskState
    from provisioning.models import GpuModel, Plan, VirtualMachine, VmState
    from tenants.models import Membership, Role, Tenant, Tier, User

    rng = random.Random(11)
    now = timezone.now()
    tiers = list(Tier.objects.order_by("rank"))
    managers = [User.objects.create_user(email=f"am{n}@example.com", password=None, is_staff=True) for n in range(20)]
    StaffProfile.objects.bulk_create(StaffProfile(user=m, role=StaffRole.ACCOUNT_MANAGER) for m in managers)
    owners = User.objects.bulk_create(
        (User(email=f"owner{t}@customer{t}.example", password="!") for t in range(TENANTS)), batch_size=BATCH
    )
    tenants = Tenant.objects.bulk_create(
        (
            Tenant(slug=f"customer-{t:05d}", name=f"Customer {t:05d}", tier=tiers[rng.choice([0, 0, 0, 1, 2])])
            for t in range(TENANTS)
        ),
        batch_size=BATCH,
    )
    Membership.objects.bulk_create(
        (Membership(tenant=t, user=o, role=Role.OWNER) for t, o in zip(tenants, owners, strict=True)),
        batch_size=BATCH,
    )
    CustomerAccount.objects.bulk_create(
        (
            CustomerAccount(
                tenant=t,
                account_manager=rng.choice(managers) if rng.random() < 0.5 else None,
                churn_risk=rng.random() < 0.05,
                churn_reason="no_spend_two_months",
            )
            for t in tenants
        ),
        batch_size=BATCH,
    )
    Wallet.objects.bulk_create(
        (Wallet(tenant=t, cash_balance=Decimal(rng.randrange(-5000, 50000))) for t in tenants), batch_size=BATCH
    )
    entries = (
        LedgerEntry(
            tenant=t,
            kind=LedgerKind.CHARGE,
            amount=-Decimal(rng.randrange(1, 200000)) / 100,
            reason="usage",
            reference=f"bench:{t.pk}:{m}",
            created_at=now - timedelta(days=30 * m + rng.randrange(0, 28)),
        )
        for t in tenants
        for m in range(CHARGES)
    )
    LedgerEntry.objects.bulk_create(entries, batch_size=BATCH)
    CreditGrant.objects.bulk_create(
        (
            CreditGrant(
                tenant=t,
                name="Package",
                granted=Decimal(5500),
                remaining=Decimal(rng.randrange(0, 5500)),
                expires_at=now + timedelta(days=rng.randrange(-30, 300)),
            )
            for t in tenants
            if rng.random() < 0.3
        ),
        batch_size=BATCH,
    )
    plan = Plan.objects.get(code="t4-1x-general")
    t4 = GpuModel.objects.get(code="T4")
    busy = [(t, o) for t, o in zip(tenants, owners, strict=True) if rng.random() < 0.2]
    VirtualMachine.objects.bulk_create(
        (
            VirtualMachine(
                tenant=t, created_by=o, plan=plan, name="vm", billing_mode="on_demand", state=VmState.RUNNING
            )
            for t, o in busy
        ),
        batch_size=BATCH,
    )
    Task.objects.bulk_create(
        (
            Task(
                tenant=t,
                created_by=o,
                name="train",
                framework="pytorch",
                image="pytorch:latest",
                command="python train.py",
                gpu_model=t4,
                gpus=1,
                state=TaskState.RUNNING,
            )
            for t, o in busy
        ),
        batch_size=BATCH,
    )
    print(
        f"seeded: {TENANTS:,} tenants, {LedgerEntry.objects.count():,} ledger entries, "
        f"{CreditGrant.objects.count():,} package grants, {len(busy):,} running VMs and as many tasks"
    )


def measure(client, path: str, params: dict) -> tuple[float, int, int]:
    """(median seconds, queries, bytes) of rendering `path` with `params`, RUNS times after a warm-up."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(path, params)
    times = []
    for _ in range(RUNS):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = client.get(path, params)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            times.append(time.perf_counter() - started)
        assert response.status_code == 200, (path, params, response.status_code)
    return statistics.median(times), len(queries), len(body)


def main() -> None:
    import logging

    import django

    django.setup()
    logging.getLogger("celery").setLevel(logging.WARNING)
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        sys.exit("bench/console.py needs PostgreSQL: set DATABASE_URL=postgres://…")
    recreate_database()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    seed()
    print(f"seeding took {time.perf_counter() - started:.1f} s")
    with django.db.connection.cursor() as cursor:
        cursor.execute("ANALYZE")

    from django.test import Client

    from tenants.models import User

    # The console asks staff for a second factor used in the session; the bench measures the page.
    settings.PORTAL_STAFF_MFA_REQUIRED = False
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    settings.DEBUG = False  # no per-query bookkeeping beyond what CaptureQueriesContext does
    admin = User.objects.create_superuser(email="bench-admin@example.com", password=None)
    client = Client()
    client.force_login(admin)
    manager = User.objects.get(email="am0@example.com")
    manager_client = Client()
    manager_client.force_login(manager)
    last = (TENANTS + 49) // 50

    cases = [
        ("admin", client, "/console/", {"sort": "-spend_12m"}, "sorted by 12-month spend, page 1"),
        ("admin", client, "/console/", {"sort": "-spend_12m", "page": last // 2}, f"… page {last // 2}"),
        ("admin", client, "/console/", {"sort": "-spend_12m", "page": last}, f"… page {last} (last)"),
        ("admin", client, "/console/", {"sort": "-spend_mtd"}, "sorted by spend this month"),
        ("admin", client, "/console/", {"sort": "-balance"}, "sorted by balance"),
        ("admin", client, "/console/", {"sort": "name"}, "sorted by name"),
        ("admin", client, "/console/", {"churn": "yes", "sort": "-spend_12m"}, "churn-flagged, by 12-month spend"),
        ("admin", client, "/console/", {"q": "owner123@", "sort": "-spend_12m"}, "search by member email"),
        ("manager", manager_client, "/console/", {"sort": "-spend_12m"}, "an account manager's own customers"),
        ("admin", client, "/console/", {"sort": "-spend_12m", "export": "csv"}, f"CSV export of all {TENANTS:,}"),
    ]
    print(f"\ncustomer list over {TENANTS:,} tenants (median of {RUNS} renders, whole Django stack):")
    print(f"{'who':8} {'page':46} {'ms':>9} {'queries':>8} {'KiB':>8}")
    counts = set()
    for who, c, path, params, label in cases:
        seconds, queries, size = measure(c, path, params)
        if "export" not in params:
            counts.add(queries)
        print(f"{who:8} {label:46} {seconds * 1000:9.1f} {queries:8d} {size / 1024:8.1f}")
    print(f"\nqueries per list page: {sorted(counts)} (the same whatever the page, sort, filter or tenant count)")


if __name__ == "__main__":
    main()
