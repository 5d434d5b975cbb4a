"""What a task cost so far (billing.selectors.task_cost, settings.PORTAL_TASK_COST_ESTIMATOR): billing's own
rating of the task's usage — to the fen of the invoice lines it went on, volume bands and late usage as
rated, nothing for preempted time, an estimate for a run still going — and the task page and API show it."""

from decimal import Decimal

import pytest
from django.conf import settings as django_settings

from billing import services
from billing.models import Invoice, InvoiceStatus, UsageRecord
from billing.selectors import task_cost
from hosting import selectors as hosting_selectors
from hosting.models import TaskRun
from tests.factories import make_tenant
from tests.test_billing_helpers import at, meter_and_rate, task_run

pytestmark = pytest.mark.django_db


def invoice_of(tenant, month: str) -> Invoice:
    return Invoice.objects.get(tenant=tenant, period_start=month)


def task_lines(invoice: Invoice) -> Decimal:
    return sum((line.amount for line in invoice.lines.filter(kind="task")), Decimal("0.00"))


def test_the_hook_is_billings_task_cost_by_default():
    assert django_settings.PORTAL_TASK_COST_ESTIMATOR == "billing.selectors.task_cost"


def test_a_finished_task_costs_what_its_invoice_lines_charge_to_the_fen(tenant):
    # Two runs of 2 A100, 8 cores, 32 GiB: 3 h 20 min 7 s and 1 s, 12,008 s in all. Each line is rounded once:
    # 6.671111 GPU-h × 50 = 333.5556 → 333.56; 26.684444 core-h × 0.5 → 13.34; 106.737778 GiB-h × 0.1 → 10.67.
    run = task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 13, 20, 7), gpus="2", vcpus=8, memory_gib=32)
    second = task_run(
        tenant,
        start=at(2026, 3, 4, 9),
        end=at(2026, 3, 4, 9, 0, 1),
        gpus="2",
        vcpus=8,
        memory_gib=32,
        attempt=2,
        task=run.task,
    )
    meter_and_rate(run)
    meter_and_rate(second)
    march = invoice_of(tenant, "2026-03-01")
    cost = task_cost(run.task)
    assert cost == task_lines(march) == march.total == Decimal("357.57")
    assert cost.as_tuple().exponent == -2 and isinstance(cost, Decimal)


def test_volume_bands_count_as_rated_including_other_tasks_before_it(tenant):
    # Task A: 90 A100 GPU-hours. Task B then runs 20: 10 h at full price, 10 h in the 5% band.
    first = task_run(tenant, start=at(2026, 5, 1, 0), end=at(2026, 5, 1, 9), gpus="10", vcpus=1, memory_gib=1)
    meter_and_rate(first)
    second = task_run(tenant, start=at(2026, 5, 2, 0), end=at(2026, 5, 2, 2), gpus="10", vcpus=1, memory_gib=1)
    meter_and_rate(second)
    may = invoice_of(tenant, "2026-05-01")
    gpu_b = Decimal("10") * 50 + Decimal("10") * Decimal("47.5")  # 975.00
    assert task_cost(second.task) == gpu_b + Decimal("1.00") + Decimal("0.20")  # + 2 core-h + 2 GiB-h
    assert task_cost(first.task) == Decimal("4500.00") + Decimal("4.50") + Decimal("0.90")
    assert task_cost(first.task) + task_cost(second.task) == may.total


def test_a_preempted_run_adds_nothing(tenant):
    run = task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 11), gpus="1", vcpus=2, memory_gib=4)
    meter_and_rate(run)
    alone = task_cost(run.task)
    assert alone == Decimal("51.40")  # 50 + 2 × 0.5 + 4 × 0.1
    preempted = task_run(
        tenant,
        start=at(2026, 3, 3, 10),
        end=at(2026, 3, 3, 15),
        gpus="1",
        vcpus=2,
        memory_gib=4,
        chargeable=False,
        attempt=2,
        task=run.task,
    )
    meter_and_rate(preempted)
    assert not UsageRecord.objects.filter(source_id=str(preempted.pk)).exists()
    assert task_cost(run.task) == alone == invoice_of(tenant, "2026-03-01").total


def test_a_finished_run_not_metered_yet_costs_what_rating_will_charge(tenant):
    run = task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 12, 30), gpu="T4", gpus="0.25", vcpus=2)
    before = task_cost(run.task)
    assert not UsageRecord.objects.exists()
    meter_and_rate(run)
    assert before == task_cost(run.task) == invoice_of(tenant, "2026-03-01").total


def test_a_run_still_going_is_estimated_as_if_it_ended_now(tenant):
    run = task_run(tenant, start=at(2026, 6, 1, 8), end=None, gpu="T4", gpus="1", vcpus=2, memory_gib=8)
    # 2 h of 1 T4 (5.00/h), 2 cores (0.50/core-h) and 8 GiB (0.10/GiB-h): 2 × 6.80.
    assert task_cost(run.task, now=at(2026, 6, 1, 10)) == Decimal("13.60")
    assert task_cost(run.task, now=at(2026, 6, 1, 8)) == Decimal("0.00")
    assert not UsageRecord.objects.exists()  # an estimate writes nothing


def test_late_usage_counts_towards_the_bands_of_the_invoice_that_carries_it(tenant, settings):
    settings.PORTAL_INVOICE_GRACE_DAYS = 2
    big = task_run(tenant, start=at(2026, 3, 2, 0), end=at(2026, 3, 7, 0), gpus="1", vcpus=1, memory_gib=1)  # 120 h
    meter_and_rate(big)
    march = invoice_of(tenant, "2026-03-01")
    assert services.invoice_finalise(invoice_id=march.pk, now=at(2026, 4, 3, 0, 1)).status == InvoiceStatus.FINAL
    late = task_run(tenant, start=at(2026, 3, 31, 20), end=at(2026, 3, 31, 22), gpus="1", vcpus=1, memory_gib=1)
    meter_and_rate(late)
    april = invoice_of(tenant, "2026-04-01")
    # On March's invoice it would have been in the 5% band; April's starts at 0 h, so full price.
    assert task_cost(late.task) == Decimal("100.00") + Decimal("1.00") + Decimal("0.20") == april.total
    assert task_cost(big.task) == invoice_of(tenant, "2026-03-01").total


def test_usage_without_a_price_in_force_has_no_cost_yet(tenant):
    run = task_run(tenant, start=at(2025, 12, 30, 10), end=at(2025, 12, 30, 11), gpus="1")
    assert task_cost(run.task) is None


def test_a_task_that_never_ran_costs_nothing(tenant):
    run = task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 11))
    TaskRun.objects.filter(pk=run.pk).delete()
    assert task_cost(run.task) == Decimal("0.00")


def test_the_task_page_and_api_show_the_cost(settings, client, api, user, tenant):
    settings.PORTAL_TASK_COST_ESTIMATOR = "billing.selectors.task_cost"
    run = task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 13, 20, 7), gpus="2", vcpus=8, memory_gib=32)
    meter_and_rate(run)
    assert hosting_selectors.task_usage(run.task).cost == Decimal("357.54")
    detail = api(user).get(f"/api/v1/tasks/{run.task.pk}/").json()
    assert detail["usage"]["cost"] == "357.54" and detail["usage"]["currency"] == "CNY"
    client.force_login(user)
    assert "¥357.54 so far" in client.get(f"/tasks/{run.task.pk}/").content.decode()


def test_another_tenants_usage_does_not_move_the_bands(tenant):
    other = make_tenant(name="Other Co")
    theirs = task_run(other, start=at(2026, 5, 1, 0), end=at(2026, 5, 1, 20), gpus="10", vcpus=1, memory_gib=1)
    meter_and_rate(theirs)
    mine = task_run(tenant, start=at(2026, 5, 2, 0), end=at(2026, 5, 2, 1), gpus="1", vcpus=1, memory_gib=1)
    meter_and_rate(mine)
    assert task_cost(mine.task) == Decimal("50.60") == invoice_of(tenant, "2026-05-01").total
