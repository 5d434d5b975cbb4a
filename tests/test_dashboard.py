"""The customer dashboard: spend per day at the tenant's day edges, GPU-hours that reconcile with the
statement, wallet and forecast, tier progress and the upsell, what each role sees, live panels, and a
number of queries that does not grow with the data."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import selectors as billing_selectors
from billing import services as billing_services
from billing.models import CreditGrant, LedgerEntry, LedgerKind
from crm.models import CustomerAccount
from hosting.models import Task, TaskState
from portal import selectors
from provisioning.models import VmState
from tenants.models import Role
from tests.factories import UserFactory, add_member, make_tenant
from tests.test_billing_helpers import at, lifecycle, make_vm, meter_and_rate, task_run, top_up

pytestmark = pytest.mark.django_db


def charge(tenant, amount, when, *, grant=None, kind=LedgerKind.CHARGE):
    return LedgerEntry.objects.create(
        tenant=tenant, kind=kind, grant=grant, amount=Decimal(amount), reason="test", reference="test", created_at=when
    )


# --- Spend per day ---------------------------------------------------------------------------------


def test_spend_per_day_buckets_charges_by_the_tenants_day(tenant):
    now = at(2026, 3, 31, 12)
    charge(tenant, "-1.00", at(2026, 3, 1, 23, 59, 59))  # the day before the 30-day window
    charge(tenant, "-2.00", at(2026, 3, 2, 0, 0, 0))  # its first instant
    charge(tenant, "-10.00", datetime(2026, 3, 30, 15, 59, 59, tzinfo=UTC))  # 23:59:59 in Shanghai
    charge(tenant, "-5.00", datetime(2026, 3, 30, 16, 0, 0, tzinfo=UTC))  # midnight in Shanghai: the 31st
    grant = CreditGrant.objects.create(
        tenant=tenant, name="pkg", granted=Decimal(100), remaining=Decimal(50), expires_at=now + timedelta(days=90)
    )
    charge(tenant, "-0.25", at(2026, 3, 31, 11), grant=grant)  # package credit is spend too
    charge(tenant, "1000.00", at(2026, 3, 31, 9), kind=LedgerKind.TOP_UP)  # money in is not
    charge(tenant, "1.50", at(2026, 3, 30, 10), kind=LedgerKind.REFUND)  # a refund lowers that day's spend
    charge(tenant, "-7.00", at(2026, 4, 1, 0))  # tomorrow
    charge(make_tenant(name="Other"), "-99.00", at(2026, 3, 31, 10))  # another tenant's

    days = selectors.spend_per_day(tenant, now=now)
    assert len(days) == 30 and days[0].day.isoformat() == "2026-03-02" and days[-1].day.isoformat() == "2026-03-31"
    spent = {d.day.isoformat(): d.amount for d in days if d.amount}
    assert spent == {"2026-03-02": Decimal("2.00"), "2026-03-30": Decimal("8.50"), "2026-03-31": Decimal("5.25")}

    tenant.time_zone = "UTC"  # the same charges, cut at UTC midnights
    spent = {d.day.isoformat(): d.amount for d in selectors.spend_per_day(tenant, now=now) if d.amount}
    assert spent == {"2026-03-30": Decimal("13.50"), "2026-03-31": Decimal("7.25")}  # 16:00 UTC on the 31st


# --- GPU-hours -------------------------------------------------------------------------------------


def test_gpu_hours_by_model_reconcile_with_the_statement(tenant):
    top_up(tenant, "50000")
    runs = [
        task_run(tenant, start=at(2026, 3, 10, 0), end=at(2026, 3, 10, 3), gpus="2"),  # 6 A100-hours
        task_run(tenant, start=at(2026, 3, 11, 22), end=at(2026, 3, 12, 2), gpu="T4", gpus="0.25"),  # 1 T4-hour
        task_run(tenant, start=at(2026, 3, 12, 0), end=at(2026, 3, 12, 5), chargeable=False),  # preempted: free
        task_run(tenant, start=at(2026, 2, 10, 0), end=at(2026, 2, 10, 9)),  # before the window
        task_run(tenant, start=at(2026, 3, 13, 0), end=at(2026, 3, 13, 1), gpu=None, gpus="0"),  # CPU only
    ]
    for run in runs:
        meter_and_rate(run)
    vm = make_vm(tenant, plan="t4-1x-general", billing_mode="on_demand", name="notebook", state="stopped")
    lifecycle(vm, "started", at(2026, 3, 20, 8))
    lifecycle(vm, "stopped", at(2026, 3, 20, 12, 30))  # 4.5 h × 1 T4
    billing_services.usage_meter_vm(vm_id=vm.pk, until=at(2026, 3, 21))
    billing_services.usage_rate_pending(tenant_id=tenant.pk)

    rows = selectors.gpu_hours_by_model(tenant, now=at(2026, 3, 31, 12))
    assert [(r.model, r.task_hours, r.vm_hours, r.total) for r in rows] == [
        ("A100", Decimal(6), Decimal(0), Decimal(6)),
        ("T4", Decimal(1), Decimal("4.5"), Decimal("5.5")),
    ]
    statement = billing_selectors.statement(
        tenant, start=at(2026, 3, 2).date(), end=at(2026, 4, 1).date(), granularity="day"
    )
    task_gpu = {}
    for row in statement:
        if row.resource.startswith("gpu:"):
            model = row.resource.split(":")[1]
            task_gpu[model] = task_gpu.get(model, 0) + row.billed_quantity
    assert task_gpu == {r.model: r.task_hours for r in rows if r.task_hours}
    assert selectors.gpu_hours_by_model(tenant, now=at(2026, 5, 1)) == []  # nothing in April


# --- The page --------------------------------------------------------------------------------------


def test_the_dashboard_shows_wallet_forecast_work_charts_tier_and_upsell(client, user, tenant):
    top_up(tenant, "1000")
    staff = UserFactory(is_staff=True)
    for i in range(7):  # ¥70 this week: ¥10 a day on average
        billing_services.wallet_charge(
            tenant=tenant, actor=staff, amount=Decimal("10"), description="Model review", reference=f"review-{i}"
        )
    now = timezone.now()
    make_vm(tenant, plan="t4-1x-general", name="notebook", state=VmState.RUNNING)
    make_vm(tenant, name="gone", state=VmState.RELEASED)
    task = task_run(tenant, start=now - timedelta(hours=1), end=now).task
    Task.objects.filter(pk=task.pk).update(state=TaskState.RUNNING, progress=40)
    CustomerAccount.objects.create(
        tenant=tenant,
        upsell={"offer_code": "pkg-1000", "name_en": "Package 1,000", "name_zh": "1,000 元算力包", "saving": "45.00"},
    )
    client.force_login(user)
    page = client.get("/").content.decode()
    assert 'data-balance="930.00"' in page  # 1,000 in, 7 × 10 charged
    assert "At your last 7 days' rate (¥10.00 a day), your credit lasts 93 days." in page
    assert 'id="vm-state-' in page and "notebook" in page and "gone" not in page
    assert f'id="task-state-{task.pk}"' in page and 'aria-valuenow="40"' in page
    assert "Spend ¥4,930.00 more to reach Gold." in page  # cumulative spend 70 of 5,000
    assert "Package 1,000 would have saved you ¥45.00 over the last 30 days." in page
    charts = json.loads(page.split('<script id="dashboard-charts" type="application/json">')[1].split("</script>")[0])
    assert len(charts["spend"]["labels"]) == 30 and charts["spend"]["values"][-1] == "70.00"
    assert '<canvas id="spend-chart"' in page and 'id="spend-table"' in page
    assert "vendor/chartjs/chart.umd.min.js" in page and "js/charts.js" in page and "js/live.js" in page


def test_each_role_sees_what_it_may(client, tenant):
    make_vm(tenant, name="notebook")
    member, billing, viewer = (add_member(tenant, role).user for role in (Role.MEMBER, Role.BILLING, Role.VIEWER))
    client.force_login(member)
    page = client.get("/").content.decode()
    assert "notebook" in page and "dashboard-wallet" not in page and "spend-chart" not in page
    assert "more to reach" not in page  # the tier, not what the tenant spent
    client.force_login(billing)
    page = client.get("/").content.decode()
    assert "dashboard-wallet" in page and "spend-chart" in page and "notebook" not in page
    assert client.get("/?fragment=work", headers={"HX-Request": "true"}).content.decode().count("dashboard-vms") == 0
    client.force_login(viewer)
    page = client.get("/").content.decode()
    assert "dashboard-wallet" in page and "notebook" in page


def test_the_live_panel_is_served_alone_for_htmx(client, user, tenant):
    make_vm(tenant, name="notebook")
    client.force_login(user)
    fragment = client.get("/?fragment=work", headers={"HX-Request": "true"}).content.decode()
    assert 'id="dashboard-vms"' in fragment and "notebook" in fragment and "<html" not in fragment


def test_the_dashboard_in_chinese(client, user, tenant):
    user.language = "zh-hans"
    user.save()
    client.force_login(user)
    page = client.get("/").content.decode()
    assert '<html lang="zh-hans">' in page and "余额" in page


def _queries(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get("/").status_code == 200
    return len(captured)


def test_the_number_of_queries_does_not_grow_with_the_data(client, user, tenant, django_assert_max_num_queries):
    client.force_login(user)
    top_up(tenant, "100000")
    meter_and_rate(task_run(tenant, start=timezone.now() - timedelta(days=2, hours=3), end=timezone.now()))
    make_vm(tenant, name="vm-0")
    few = _queries(client)
    now = timezone.now()
    for i in range(12):
        meter_and_rate(
            task_run(
                tenant, start=now - timedelta(days=i, hours=2), end=now - timedelta(days=i), gpu=["A100", "T4"][i % 2]
            )
        )
        make_vm(tenant, name=f"vm-{i + 1}", plan="t4-1x-general")
        task_run(tenant, start=now - timedelta(minutes=i + 1), end=None)  # running
    vm = make_vm(tenant, plan="t4-1x-general", billing_mode="on_demand", name="od", state="stopped")
    lifecycle(vm, "started", now - timedelta(days=3, hours=5))
    lifecycle(vm, "stopped", now - timedelta(days=3))
    billing_services.usage_meter_vm(vm_id=vm.pk)
    billing_services.usage_rate_pending(tenant_id=tenant.pk)
    assert len(selectors.gpu_hours_by_model(tenant)) == 2
    with django_assert_max_num_queries(few):
        client.get("/")
    with django_assert_max_num_queries(32):  # and few in absolute terms (30 today)
        client.get("/")


def test_someone_without_a_tenant_sees_how_to_start(client):
    client.force_login(UserFactory())
    page = client.get("/").content.decode()
    assert "Create an organisation" in page and "dashboard-charts" not in page and "js/live.js" not in page
