"""The money rules: a hand-calculated month to the fen, bands, packages, the ledger, invoices,
statements, subscriptions, admission checks and what happens when credit runs out."""

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import call_command
from django.utils import timezone

from billing import checks, selectors, services
from billing.models import (
    ChargeDay,
    CreditGrant,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerEntry,
    LedgerKind,
    Subscription,
    SubscriptionStatus,
    UsageRecord,
    Wallet,
)
from billing.money import exact_amount, to_fen
from billing.pricing import PriceBook
from billing.verification import verify_balances
from provisioning.models import Plan
from tenants.models import Role, Tier
from tests.factories import UserFactory, make_tenant
from tests.test_billing_helpers import (
    at,
    buy_package,
    lifecycle,
    make_vm,
    meter_and_rate,
    owner_membership_of,
    scale_up,
    task_run,
    top_up,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def enforce(settings):
    settings.PORTAL_BILLING_ENFORCE = True
    return settings


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


def march_invoice(tenant) -> Invoice:
    return Invoice.objects.get(tenant=tenant, period_start="2026-03-01")


def line_amounts(invoice) -> dict[str, Decimal]:
    return {
        line.description_en.split(" · ")[0] + " · " + line.description_en.split(" · ")[1]: line.amount
        for line in invoice.lines.all()
    }


def charges_of(invoice) -> Decimal:
    return -sum(
        LedgerEntry.objects.filter(invoice_line__invoice=invoice, kind=LedgerKind.CHARGE).values_list(
            "amount", flat=True
        ),
        Decimal("0.00"),
    )


# --- Rounding -----------------------------------------------------------------------------------


def test_rounding_is_half_up_to_the_fen_once():
    assert to_fen(Decimal("0.005")) == Decimal("0.01")
    assert to_fen(Decimal("2.675")) == Decimal("2.68")  # a float would say 2.67
    assert to_fen(Decimal("1.004999999")) == Decimal("1.00")
    # 8 h 30 min 30 s at 3.00 an hour is exactly 25.525: a half fen, rounded up.
    assert to_fen(exact_amount(Decimal(30630), Decimal("3.00"), Decimal("0"), 3600)) == Decimal("25.53")


# --- The hand-calculated month ------------------------------------------------------------------


@pytest.fixture
def march(tenant, staff):
    """March 2026 of one tenant (Asia/Shanghai): a package and cash; four task runs, one preempted;
    a monthly A100 VM with a 3-day scale-up and its disk; an on-demand T4 VM for 8 h 30 min 30 s."""
    buy_package(tenant, "pkg-1000")  # pays 1,000, gets 1,050 of task credit
    top_up(tenant, "40000")
    runs = [
        task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 3, 10), gpus="2", vcpus=8, memory_gib=32),
        task_run(tenant, start=at(2026, 3, 10, 0), end=at(2026, 3, 10, 20), gpus="4", vcpus=16, memory_gib=64),
        task_run(tenant, start=at(2026, 3, 12, 0), end=at(2026, 3, 12, 10), gpu="T4", chargeable=False),
        task_run(
            tenant,
            start=at(2026, 3, 15, 8),
            end=at(2026, 3, 15, 9, 30, 45),
            gpu="T4",
            gpus="0.25",
            vcpus=2,
            memory_gib=8,
        ),
    ]
    for run in runs:
        services.usage_meter_task_run(run_id=run.pk)
    monthly = make_vm(tenant, plan="a100-1x-general", billing_mode="monthly", name="trainer")
    started = lifecycle(monthly, "started", at(2026, 3, 5, 12))
    services.subscription_start(event_id=started.pk)
    scale_up(monthly, start=at(2026, 3, 20, 12), days=3, gpus=1, vcpus=4, memory_gib=16)
    services.usage_meter_scale_ups(vm_id=monthly.pk, now=at(2026, 3, 31, 12))
    on_demand = make_vm(tenant, plan="t4-1x-general", billing_mode="on_demand", name="notebook", state="released")
    lifecycle(on_demand, "started", at(2026, 3, 25, 9, 15))
    lifecycle(on_demand, "released", at(2026, 3, 25, 17, 45, 30))
    on_demand.released_at = at(2026, 3, 25, 17, 45, 30)
    on_demand.save(update_fields=["released_at"])
    services.usage_meter_vm(vm_id=on_demand.pk, until=at(2026, 3, 26))
    services.usage_meter_storage(now=at(2026, 4, 1, 0, 30), tenant_id=tenant.pk)
    services.usage_rate_pending(tenant_id=tenant.pk)
    return march_invoice(tenant)


def test_hand_calculated_month_matches_to_the_fen(tenant, march):
    lines = {(line.kind, line.resource, line.discount_percent): line.amount for line in march.lines.all()}
    assert lines == {
        # A100: run 1 is 48 GPU-h, run 2 is 80 GPU-h: the 100th hour falls on March 10 (graduated band).
        ("task", "gpu:A100", Decimal("0")): Decimal("5000.00"),  # 100 h × 50
        ("task", "gpu:A100", Decimal("5")): Decimal("1330.00"),  # 28 h × 50 × 0.95
        ("task", "gpu:T4", Decimal("5")): Decimal("1.80"),  # 0.25 × 1.5125 h × 5 × 0.95 = 1.79609375
        ("task", "cpu", Decimal("0")): Decimal("257.51"),  # 515.025 core-h × 0.50 = 257.5125
        ("task", "memory", Decimal("0")): Decimal("206.01"),  # 2,060.1 GiB-h × 0.10
        ("subscription", "vm_monthly:a100-1x-general", Decimal("0")): Decimal("15000.00"),
        ("scale_up", "scale_up_gpu_day:A100", Decimal("0")): Decimal("1800.00"),  # 3 days × 600
        ("scale_up", "scale_up_cpu_core_day", Decimal("0")): Decimal("240.00"),  # 12 core-days × 20
        ("scale_up", "scale_up_memory_gib_day", Decimal("0")): Decimal("96.00"),  # 48 GiB-days × 2
        # 200 GiB from Mar 5 12:00 (5,300 GiB-days) + 100 GiB for 8 h 30 min 30 s: 5,335.451… × 0.05
        ("storage", "storage", Decimal("0")): Decimal("266.77"),
        ("vm_on_demand", "vm_on_demand:t4-1x-general", Decimal("0")): Decimal("25.53"),  # 25.525, half up
    }
    assert march.total == Decimal("24223.62") == sum(lines.values())
    assert charges_of(march) == march.total
    paid = selectors.invoice_payments(march)
    assert paid.packages == Decimal("1050.00")  # all the package credit, on task hosting only
    assert paid.cash == Decimal("23173.62")
    wallet = Wallet.objects.get(tenant=tenant)
    assert wallet.cash_balance == Decimal("40000.00") - Decimal("23173.62")
    assert verify_balances() == []


def test_preempted_time_is_never_metered(tenant, march):
    assert not UsageRecord.objects.filter(resource="gpu:T4", quantity=Decimal(36000)).exists()
    t4 = UsageRecord.objects.get(resource="gpu:T4")
    assert t4.quantity == Decimal("1361.25")  # 0.25 GPU × 5,445 s


def test_a_vm_that_never_started_costs_nothing(tenant):
    vm = make_vm(tenant, billing_mode="on_demand", state="failed")
    assert services.usage_meter_vm(vm_id=vm.pk, until=timezone.now()) == 0
    assert services.usage_meter_storage(tenant_id=tenant.pk) == 0
    assert not UsageRecord.objects.exists() and not LedgerEntry.objects.filter(kind="charge").exists()


def test_finalised_invoice_never_changes_and_late_usage_goes_to_the_next(tenant, march, settings):
    settings.PORTAL_INVOICE_GRACE_DAYS = 2
    assert services.invoice_finalise(invoice_id=march.pk, now=at(2026, 4, 2, 23)).status == InvoiceStatus.DRAFT
    final = services.invoice_finalise(invoice_id=march.pk, now=at(2026, 4, 3, 0, 1))
    assert final.status == InvoiceStatus.FINAL and final.number == f"INV-202603-{tenant.pk:06d}"
    before = [(line.key, line.amount_unrounded, line.amount) for line in final.lines.all()]
    late = task_run(tenant, start=at(2026, 3, 31, 20), end=at(2026, 3, 31, 22), gpus="1")
    meter_and_rate(late)
    march_again = march_invoice(tenant)
    assert march_again.total == Decimal("24223.62") and march_again.status == InvoiceStatus.FINAL
    assert [(line.key, line.amount_unrounded, line.amount) for line in march_again.lines.all()] == before
    april = Invoice.objects.get(tenant=tenant, period_start="2026-04-01")
    assert april.status == InvoiceStatus.DRAFT
    # Late usage counts towards the bands of the invoice that carries it: April starts at 0 h.
    assert april.lines.get(resource="gpu:A100").amount == Decimal("100.00")
    with pytest.raises(ValidationError):
        InvoiceLine.objects.filter(invoice=march_again).first().save()
    with pytest.raises(ValidationError):
        march_again.save()
    assert charges_of(march_again) == march_again.total


@pytest.mark.parametrize("granularity", ["day", "week", "month"])
def test_statement_reconciles_with_invoice_and_ledger(api, user, tenant, march, granularity):
    response = api(user).get(
        "/api/v1/usage/", {"from": "2026-03-01", "to": "2026-04-01", "granularity": granularity, "format": "csv"}
    )
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert {row["invoice_id"] for row in rows} == {str(march.pk)}
    total = sum(Decimal(row["amount"]) for row in rows)
    assert total == march.total == charges_of(march)
    per_line = {}
    for row in rows:
        key = (row["kind"], row["resource"], Decimal(row["discount_percent"]))
        per_line[key] = per_line.get(key, Decimal(0)) + Decimal(row["amount"])
    assert per_line == {(line.kind, line.resource, line.discount_percent): line.amount for line in march.lines.all()}
    if granularity == "day":
        storage_days = [row for row in rows if row["kind"] == "storage"]
        assert len(storage_days) == 27  # March 5 to 31
    json_body = (
        api(user).get("/api/v1/usage/", {"from": "2026-03-01", "to": "2026-04-01", "granularity": granularity}).json()
    )
    assert Decimal(json_body["total"]) == march.total


def test_statement_bad_dates_are_a_400(api, user, tenant):
    client = api(user)
    assert client.get("/api/v1/usage/", {"from": "2026-03-10", "to": "2026-03-01"}).status_code == 400
    body = client.get("/api/v1/usage/", {"from": "yesterday", "to": "2026-03-01"}).json()
    assert "from" in body


# --- Bands, prices, replays -----------------------------------------------------------------------


def test_volume_bands_are_graduated_over_the_local_calendar_month(tenant):
    # 1,100 A100 GPU-hours in one run: 100 at 0%, 900 at 5%, 100 at 10%.
    run = task_run(
        tenant, start=at(2026, 5, 1, 0), end=at(2026, 5, 1, 0) + timedelta(hours=137.5), gpus="8", vcpus=1, memory_gib=1
    )
    meter_and_rate(run)
    invoice = Invoice.objects.get(tenant=tenant, period_start="2026-05-01")
    gpu = {line.discount_percent: line.amount for line in invoice.lines.filter(resource="gpu:A100")}
    assert gpu == {
        Decimal("0"): Decimal("5000.00"),
        Decimal("5"): Decimal("42750.00"),
        Decimal("10"): Decimal("4500.00"),
    }


def test_a_run_across_midnight_at_month_end_is_split_in_the_tenants_time_zone(tenant):
    # 23:00–01:00 in Shanghai crosses into April locally (it is 15:00–17:00 UTC on March 31).
    run = task_run(tenant, start=at(2026, 3, 31, 23), end=at(2026, 4, 1, 1), gpus="1", vcpus=1, memory_gib=1)
    meter_and_rate(run)
    march = Invoice.objects.get(tenant=tenant, period_start="2026-03-01")
    april = Invoice.objects.get(tenant=tenant, period_start="2026-04-01")
    assert march.lines.get(resource="gpu:A100").quantity == Decimal(3600)
    assert april.lines.get(resource="gpu:A100").quantity == Decimal(3600)


def test_a_replayed_event_counts_once(tenant, django_capture_on_commit_callbacks):
    from hosting.lifecycle import task_run_finished

    run = task_run(tenant, start=at(2026, 6, 1, 0), end=at(2026, 6, 1, 1), gpus="1", vcpus=2, memory_gib=4)
    with django_capture_on_commit_callbacks(execute=True):
        for _ in range(3):
            task_run_finished.send(sender=type(run), run=run)  # the signal, replayed
        services.usage_meter_task_runs_sweep(now=at(2026, 6, 2))  # and the sweeper
    assert UsageRecord.objects.filter(source_id=str(run.pk)).count() == 3  # gpu, cpu, memory
    invoice = Invoice.objects.get(tenant=tenant, period_start="2026-06-01")
    assert invoice.total == Decimal("50.00") + Decimal("1.00") + Decimal("0.40")


def test_the_sweeper_meters_runs_the_signal_missed(tenant):
    task_run(tenant, start=timezone.now() - timedelta(hours=2), end=timezone.now() - timedelta(hours=1))
    assert services.usage_meter_task_runs_sweep() == 3
    assert services.usage_meter_task_runs_sweep() == 0


def test_price_changes_take_effect_at_their_date_and_never_reprice_history(tenant, staff):
    early = task_run(
        tenant, start=at(2026, 7, 1, 0), end=at(2026, 7, 1, 1), gpu="H100", gpus="1", vcpus=1, memory_gib=1
    )
    meter_and_rate(early)
    effective = timezone.now() + timedelta(hours=1)
    services.price_book_version_create(
        actor=staff, effective_from=effective, prices={"task_gpu_hour:H100": Decimal("95")}
    )
    with pytest.raises(ValidationError):
        services.price_book_version_create(actor=staff, effective_from=at(2026, 1, 2), prices={})
    with pytest.raises(PermissionDenied):
        services.price_book_version_create(actor=owner_membership_of(tenant).user, effective_from=effective, prices={})
    book = PriceBook()
    assert book.item("task_gpu_hour:H100", at(2026, 7, 1)).unit_price == Decimal("90")
    assert book.item("task_gpu_hour:H100", effective).unit_price == Decimal("95")
    assert book.item("task_gpu_hour:A100", effective).unit_price == Decimal("50")  # carried over
    later = task_run(
        tenant, start=effective + timedelta(minutes=1), end=effective + timedelta(hours=1, minutes=1), gpu="H100"
    )
    meter_and_rate(later)
    h100 = {line.unit_price for line in InvoiceLine.objects.filter(resource="gpu:H100")}
    assert h100 == {Decimal("90"), Decimal("95")}


# --- Packages and the ledger --------------------------------------------------------------------


def test_package_credit_is_spent_before_cash_earliest_expiry_first(tenant):
    top_up(tenant, "1000")
    buy_package(tenant, "pkg-1000", months=12)
    buy_package(tenant, "pkg-1000", months=3)  # expires first: spent first
    short, long_ = CreditGrant.objects.order_by("expires_at")
    assert (short.granted, long_.granted) == (Decimal("1050.00"), Decimal("1050.00"))
    run = task_run(
        tenant, start=at(2026, 8, 1, 0), end=at(2026, 8, 1, 22), gpus="1", vcpus=1, memory_gib=1
    )  # 1,100 + 11 + 2.2
    meter_and_rate(run)
    short.refresh_from_db()
    long_.refresh_from_db()
    assert short.remaining == Decimal("0.00")
    assert long_.remaining == Decimal("1050.00") * 2 - Decimal("1113.20")
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("1000.00")


def test_package_credit_never_pays_for_vms(tenant):
    buy_package(tenant, "pkg-1000")
    vm = make_vm(tenant, billing_mode="monthly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 9, 1, 0)).pk)
    assert CreditGrant.objects.get().remaining == Decimal("1050.00")
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("-15000.00")


def test_expired_package_credit_is_written_off_by_an_entry(tenant):
    buy_package(tenant, "pkg-1000", months=3)
    grant = CreditGrant.objects.get()
    assert services.credit_grants_expire(now=grant.expires_at - timedelta(seconds=1)) == 0
    assert services.credit_grants_expire(now=grant.expires_at) == 1
    assert services.credit_grants_expire(now=grant.expires_at + timedelta(days=1)) == 0
    grant.refresh_from_db()
    assert grant.remaining == Decimal("0.00") and grant.written_off_at
    entry = LedgerEntry.objects.get(kind=LedgerKind.EXPIRY_WRITE_OFF)
    assert entry.amount == Decimal("-1050.00") and entry.grant == grant and "expired" in entry.reason
    assert LedgerEntry.objects.filter(grant=grant).count() == 3  # grant, bonus, write-off: nothing deleted
    assert verify_balances() == []


def test_ledger_entries_are_append_only(tenant):
    top_up(tenant, "500")
    entry = LedgerEntry.objects.get()
    entry.amount = Decimal("1000000")
    with pytest.raises(ValidationError):
        entry.save()
    with pytest.raises(ValidationError):
        entry.delete()


def test_balance_check_command_proves_the_cache_equals_the_ledger(tenant, capsys):
    top_up(tenant, "500")
    buy_package(tenant, "pkg-5000")
    call_command("check_wallet_balances")
    assert "OK" in capsys.readouterr().out
    Wallet.objects.filter(tenant=tenant).update(cash_balance=Decimal("501.00"))
    with pytest.raises(SystemExit) as exit_:
        call_command("check_wallet_balances")
    assert exit_.value.code == 1
    assert "cash balance is 501.00 but its ledger entries sum to 500.00" in capsys.readouterr().out


def test_staff_adjustment_needs_staff_and_a_reason(tenant, staff):
    with pytest.raises(ValidationError) as error:
        services.wallet_adjust(tenant=tenant, actor=staff, amount=Decimal("100"), reason="")
    assert "reason" in error.value.message_dict
    with pytest.raises(PermissionDenied):
        services.wallet_adjust(tenant=tenant, actor=owner_membership_of(tenant).user, amount=Decimal("100"), reason="x")
    refund = services.wallet_adjust(tenant=tenant, actor=staff, amount=Decimal("20.50"), reason="Refund", kind="refund")
    assert refund.kind == "refund"
    entry = services.wallet_adjust(tenant=tenant, actor=staff, amount=Decimal("-20.50"), reason="Goodwill reversal")
    assert entry.kind == "adjustment" and entry.reason == "Goodwill reversal" and entry.actor == staff
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("0.00")


def test_a_staff_debit_never_overdraws_the_wallet(tenant, staff):
    top_up(tenant, "100")
    with pytest.raises(ValidationError) as error:
        services.wallet_adjust(tenant=tenant, actor=staff, amount=Decimal("-100.01"), reason="Clawback")
    assert error.value.message_dict["amount"] == [
        "Taking ¥100.01 would overdraw the wallet: ¥100.00 is available (cash balance plus credit limit). "
        "Take at most that, or raise the credit limit first."
    ]
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("100.00")
    assert not LedgerEntry.objects.filter(kind="adjustment").exists()
    services.wallet_set_credit_limit(tenant=tenant, actor=staff, credit_limit=Decimal("50"), reason="Terms")
    services.wallet_adjust(tenant=tenant, actor=staff, amount=Decimal("-150.00"), reason="Clawback")  # down to -limit
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("-50.00")


def test_payment_is_credited_once_whatever_the_events(tenant):
    membership = owner_membership_of(tenant)
    payment = services.top_up_create(membership=membership, actor=membership.user, amount=Decimal("300"))
    assert payment.instructions["reference"] == payment.reference and payment.provider == "offline"
    for event in ["evt-1", "evt-1", "evt-2"]:
        services.payment_fulfil(payment_id=payment.pk, provider_event_id=event)
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("300.00")
    assert LedgerEntry.objects.filter(kind="top_up").count() == 1
    assert payment.events.count() == 2


# --- Subscriptions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "renewal"), [("standard", "150000.00"), ("gold", "120000.00"), ("diamond", "90000.00")]
)
def test_yearly_renewal_at_the_tiers_percent_of_list(tenant, tier, renewal):
    tenant.tier = Tier.objects.get(code=tier)
    tenant.save()
    top_up(tenant, "300000")
    vm = make_vm(tenant, billing_mode="yearly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 1, 10, 8)).pk)
    subscription = Subscription.objects.get()
    assert subscription.current_period_end == at(2027, 1, 10, 8)
    assert services.subscriptions_renew_due(now=at(2027, 1, 10, 7)) == {"renewed": 0, "ended": 0, "past_due": 0}
    assert services.subscriptions_renew_due(now=at(2027, 1, 10, 9))["renewed"] == 1
    assert services.subscriptions_renew_due(now=at(2027, 1, 10, 9))["renewed"] == 0  # once
    charges = list(subscription.charges.values_list("amount", "is_renewal"))
    assert charges == [(Decimal("150000.00"), False), (Decimal(renewal), True)]
    subscription.refresh_from_db()
    assert subscription.current_period_end == at(2028, 1, 10, 8)


def test_monthly_renewal_and_restart_do_not_charge_twice(tenant):
    top_up(tenant, "40000")
    vm = make_vm(tenant, billing_mode="monthly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 1, 31, 10)).pk)
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 2, 2, 10)).pk)  # a restart
    assert Subscription.objects.get().current_period_end == at(2026, 2, 28, 10)  # clamped to the month's end
    services.subscriptions_renew_due(now=at(2026, 2, 28, 11))
    assert list(Subscription.objects.get().charges.values_list("amount", flat=True)) == [Decimal("15000.00")] * 2
    assert Invoice.objects.get(period_start="2026-02-01").lines.get(kind="subscription").amount == Decimal("15000.00")


def test_unpaid_renewal_is_past_due_until_paid(tenant, enforce, django_capture_on_commit_callbacks):
    top_up(tenant, "15000")
    vm = make_vm(tenant, billing_mode="monthly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 1, 5, 10)).pk)
    assert services.subscriptions_renew_due(now=at(2026, 2, 5, 11)) == {"renewed": 0, "ended": 0, "past_due": 1}
    subscription = Subscription.objects.get()
    assert subscription.status == SubscriptionStatus.PAST_DUE and subscription.charges.count() == 1
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("0.00")  # refused whole, nothing written
    with django_capture_on_commit_callbacks(execute=True):
        top_up(tenant, "15000")  # paying retries the renewal
    subscription.refresh_from_db()
    assert subscription.status == SubscriptionStatus.ACTIVE and subscription.charges.count() == 2


def test_cancel_at_period_end_needs_billing_rights_and_ends_it(tenant, member_of):
    top_up(tenant, "15000")
    vm = make_vm(tenant, billing_mode="monthly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 1, 5, 10)).pk)
    subscription = Subscription.objects.get()
    member = tenant.memberships.get(user=member_of(tenant, Role.MEMBER))
    with pytest.raises(PermissionDenied):
        services.subscription_cancel(membership=member, actor=member.user, subscription=subscription)
    billing = tenant.memberships.get(user=member_of(tenant, Role.BILLING))
    services.subscription_cancel(membership=billing, actor=billing.user, subscription=subscription)
    assert services.subscriptions_renew_due(now=at(2026, 2, 5, 11))["ended"] == 1
    subscription.refresh_from_db()
    assert subscription.status == SubscriptionStatus.ENDED and subscription.charges.count() == 1
    vm.refresh_from_db()
    assert vm.state in ("releasing", "released")


# --- Admission checks and running out of credit ---------------------------------------------------


def test_vm_order_check_covers_the_first_period(tenant, enforce):
    plan = Plan.objects.get(code="a100-1x-general")
    with pytest.raises(ValidationError) as error:
        checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="monthly")
    assert "15000.00" in str(error.value) and "Top up" in str(error.value)
    with pytest.raises(ValidationError, match="no credit left"):
        checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="on_demand")
    buy_package(tenant, "pkg-10000")  # packages pay for tasks only
    with pytest.raises(ValidationError):
        checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="on_demand")
    top_up(tenant, "15000")
    checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="monthly")
    checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="on_demand")
    with pytest.raises(ValidationError):
        checks.vm_order_can_pay(tenant=tenant, plan=plan, billing_mode="yearly")


def test_checks_pass_when_enforcement_is_off(tenant, settings):
    settings.PORTAL_BILLING_ENFORCE = False
    checks.vm_order_can_pay(tenant=tenant, plan=Plan.objects.get(code="a100-2x-training"), billing_mode="yearly")
    assert checks.task_can_pay(tenant=tenant) == (True, "")


def test_task_check_and_package_holders(tenant, enforce):
    other = make_tenant(name="Other")
    ok, reason = checks.task_can_pay(tenant=tenant)
    assert not ok and "package" in reason
    buy_package(tenant, "pkg-1000")
    assert checks.task_can_pay(tenant=tenant) == (True, "")
    assert selectors.tenants_holding_packages([tenant.pk, other.pk]) == {tenant.pk}
    CreditGrant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert selectors.tenants_holding_packages([tenant.pk, other.pk]) == set()


def test_the_credit_limit_lets_cash_go_negative(tenant, enforce, staff):
    services.wallet_set_credit_limit(tenant=tenant, actor=staff, credit_limit=Decimal("500"), reason="Trusted lab")
    assert checks.task_can_pay(tenant=tenant) == (True, "")
    checks.vm_order_can_pay(tenant=tenant, plan=Plan.objects.get(code="t4-1x-general"), billing_mode="on_demand")


stopped_for_credit = []


def fake_task_stopper(*, tenant, reason):
    stopped_for_credit.append((tenant.pk, reason))
    return 2


def test_running_out_of_credit_stops_tasks_through_the_hook(tenant, enforce, django_capture_on_commit_callbacks):
    enforce.PORTAL_TASK_STOPPER = "tests.test_billing_money.fake_task_stopper"
    stopped_for_credit.clear()
    top_up(tenant, "100")
    run = task_run(tenant, start=at(2026, 10, 1, 0), end=at(2026, 10, 1, 3), gpus="1", vcpus=1, memory_gib=1)
    with django_capture_on_commit_callbacks(execute=True):
        meter_and_rate(run)
    assert stopped_for_credit and stopped_for_credit[0][0] == tenant.pk and "credit" in stopped_for_credit[0][1]
    assert Wallet.objects.get(tenant=tenant).credit_exhausted_at is not None
    enforce.PORTAL_TASK_STOPPER = "tests.test_billing_money.no_such_function"
    assert services.credit_enforce(tenant_id=tenant.pk, stop_tasks=True) == {"vms": 0, "tasks": 0}  # logged, not raised
    enforce.PORTAL_TASK_STOPPER = ""
    assert services.credit_enforce(tenant_id=tenant.pk, stop_tasks=True) == {"vms": 0, "tasks": 0}


def test_nothing_is_stopped_when_enforcement_is_off(tenant, settings, django_capture_on_commit_callbacks):
    settings.PORTAL_BILLING_ENFORCE = False
    settings.PORTAL_TASK_STOPPER = "tests.test_billing_money.fake_task_stopper"
    stopped_for_credit.clear()
    run = task_run(tenant, start=at(2026, 10, 1, 0), end=at(2026, 10, 1, 3))
    with django_capture_on_commit_callbacks(execute=True):
        meter_and_rate(run)
    assert stopped_for_credit == []
    assert Wallet.objects.get(tenant=tenant).cash_balance < 0  # still charged


def test_low_balance_warns_once_per_crossing(tenant, django_capture_on_commit_callbacks, member_of):
    member_of(tenant, Role.BILLING)
    membership = owner_membership_of(tenant)
    top_up(tenant, "1000")
    services.wallet_set_low_balance_threshold(membership=membership, actor=membership.user, threshold=Decimal("500"))
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        meter_and_rate(task_run(tenant, start=at(2026, 11, 1, 0), end=at(2026, 11, 1, 12)))  # 600 + 48 + 38.4
    # One email each (through notifications.notify), to the owner and the billing member.
    assert len(mail.outbox) == 2 and all("Low balance" in m.subject for m in mail.outbox)
    assert {m.to[0] for m in mail.outbox} == {m.user.email for m in tenant.memberships.select_related("user")}
    assert Wallet.objects.get(tenant=tenant).low_balance_warned_at is not None
    assert callbacks  # the dashboard event is sent after commit
    with django_capture_on_commit_callbacks(execute=True):
        meter_and_rate(task_run(tenant, start=at(2026, 11, 2, 0), end=at(2026, 11, 2, 1)))
    assert len(mail.outbox) == 2  # still below: no second warning
    top_up(tenant, "5000")
    assert Wallet.objects.get(tenant=tenant).low_balance_warned_at is None  # back above: armed again


def test_a_member_cannot_change_billing_settings(tenant, member_of):
    member = tenant.memberships.get(user=member_of(tenant, Role.MEMBER))
    with pytest.raises(PermissionDenied):
        services.wallet_set_low_balance_threshold(membership=member, actor=member.user, threshold=Decimal("1"))
    with pytest.raises(PermissionDenied):
        services.top_up_create(membership=member, actor=member.user, amount=Decimal("100"))


def test_charge_days_add_up_to_their_line(tenant, march):
    for line in march.lines.all():
        quantity = sum(ChargeDay.objects.filter(line=line).values_list("quantity", flat=True), Decimal(0))
        assert quantity == line.quantity
