"""Spend figures and customer tiers: the thresholds at the fen, month edges in the tenant's time
zone, upgrades only, pins and staff overrides, quotas, notifications, the after-payment hook and
the nightly run."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing import services as billing_services
from billing.models import InvoiceLine, LineKind
from billing.services import UsageEvent
from crm import spend, tiering
from crm.models import CustomerAccount, TierChange, TierChangeSource
from crm.selectors import account_of, next_tier_progress, tier_change_reason
from notifications.models import Notification, NotificationKind
from tenants.models import AuditEvent, GpuQuota, Role, Tenant, TenantQuota, Tier, TierCode
from tests.crm_helpers import at, charge, credit, refund
from tests.factories import UserFactory, add_member, make_tenant
from tests.test_billing_helpers import top_up

pytestmark = pytest.mark.django_db

NOW = at(2026, 11, 15, 12)


def rule(code: str) -> tiering.TierRule:
    return next(r for r in tiering.RULES if r.code == code)


def figures(tenant, now=NOW) -> tiering.SpendFigures:
    return tiering.spend_figures(tenant, now=now)


def reload(tenant) -> Tenant:
    return Tenant.objects.select_related("tier").get(pk=tenant.pk)


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


# --- Spend ----------------------------------------------------------------------------------------


def test_a_charge_at_1630_utc_on_31_october_is_novembers_in_shanghai(tenant):
    charge(tenant, "100.00", datetime(2026, 10, 31, 16, 30, tzinfo=UTC))  # 00:30 on 1 November there
    charge(tenant, "50.00", datetime(2026, 10, 31, 15, 59, 59, tzinfo=UTC))  # 23:59:59 on 31 October
    months = spend.monthly_spend([tenant.pk], 2, now=NOW)[tenant.pk]
    assert months == {date(2026, 10, 1): Decimal("50.00"), date(2026, 11, 1): Decimal("100.00")}
    assert spend.month_start(datetime(2026, 10, 31, 16, 30, tzinfo=UTC), "Asia/Shanghai") == date(2026, 11, 1)
    assert spend.month_bounds("Asia/Shanghai", 2026, 11) == (
        datetime(2026, 10, 31, 16, tzinfo=UTC),
        datetime(2026, 11, 30, 16, tzinfo=UTC),
    )


def test_spend_is_charges_net_of_refunds_and_nothing_else(tenant):
    charge(tenant, "300.00", at(2026, 11, 2))
    refund(tenant, "20.00", at(2026, 11, 3))
    credit(tenant, "5000.00", at(2026, 11, 3))  # a top-up is money in, not spend
    credit(tenant, "1000.00", at(2026, 11, 3), kind="package_grant")
    credit(tenant, "-40.00", at(2026, 11, 4), kind="adjustment")
    assert spend.cumulative_spend(tenant, now=NOW) == Decimal("280.00")
    assert spend.monthly_spend([tenant.pk], 1, now=NOW)[tenant.pk] == {date(2026, 11, 1): Decimal("280.00")}


def test_a_month_refunded_in_full_is_zero_not_minus_zero(tenant):
    charge(tenant, "10.00", at(2026, 11, 2))
    refund(tenant, "10.00", at(2026, 11, 3))
    assert str(spend.monthly_spend([tenant.pk], 1, now=NOW)[tenant.pk][date(2026, 11, 1)]) == "0.00"
    assert str(spend.cumulative_spend(tenant, now=NOW)) == "0.00"


def test_entries_after_now_do_not_count(tenant):
    charge(tenant, "10.00", at(2026, 11, 15, 11))
    charge(tenant, "99.00", at(2026, 11, 15, 13))
    assert spend.cumulative_spend(tenant, now=NOW) == Decimal("10.00")


def test_monthly_spend_is_one_query_for_tenants_of_several_time_zones(tenant):
    york = make_tenant(name="New York lab")
    Tenant.objects.filter(pk=york.pk).update(time_zone="America/New_York")
    quiet = make_tenant(name="Quiet")
    charge(york, "7.00", datetime(2026, 11, 1, 3, tzinfo=UTC))  # still 31 October in New York
    charge(tenant, "5.00", datetime(2026, 11, 1, 3, tzinfo=UTC))  # 1 November in Shanghai
    charge(tenant, "1.00", at(2025, 1, 10))
    with CaptureQueriesContext(connection) as queries:
        result = spend.monthly_spend([tenant.pk, york.pk, quiet.pk], 3, now=NOW)
    assert len(queries) == 1
    assert result[york.pk] == {date(2026, 9, 1): 0, date(2026, 10, 1): Decimal("7.00"), date(2026, 11, 1): 0}
    assert result[tenant.pk][date(2026, 11, 1)] == Decimal("5.00")
    assert result[quiet.pk] == dict.fromkeys([date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1)], 0)
    history = spend.monthly_spend([tenant.pk], None, now=NOW)[tenant.pk]
    assert next(iter(history)) == date(2025, 1, 1) and len(history) == 23  # Jan 2025 … Nov 2026, zero-filled


def test_spend_annotations_sort_tenants_in_one_query(tenant):
    other = make_tenant(name="Other")
    charge(tenant, "10.00", at(2026, 11, 1, 0, 30))  # this month
    charge(tenant, "20.00", at(2025, 12, 1, 0, 0))  # 12th month back: in the trailing twelve
    charge(tenant, "40.00", at(2025, 11, 30, 23, 59))  # 13th month back: only in the total
    charge(other, "500.00", at(2026, 10, 31, 23, 0))
    with CaptureQueriesContext(connection) as queries:
        rows = list(Tenant.objects.annotate(**spend.spend_annotations(NOW)).order_by("-spend_12m"))
    assert len(queries) == 1
    assert [t.pk for t in rows][:2] == [other.pk, tenant.pk]
    mine = next(t for t in rows if t.pk == tenant.pk)
    assert str(mine.spend_mtd) == "10.00"  # two places on every backend
    assert (mine.spend_mtd, mine.spend_12m, mine.spend_total) == (
        Decimal("10.00"),
        Decimal("30.00"),
        Decimal("70.00"),
    )
    theirs = next(t for t in rows if t.pk == other.pk)
    assert (theirs.spend_mtd, theirs.spend_12m, theirs.spend_total) == (
        Decimal("0.00"),
        Decimal("500.00"),
        Decimal("500.00"),
    )


def test_spend_annotations_cut_months_in_each_tenants_time_zone(tenant):
    york = make_tenant(name="New York lab")
    Tenant.objects.filter(pk=york.pk).update(time_zone="America/New_York")
    for who in (tenant, york):
        charge(who, "100.00", datetime(2026, 10, 31, 16, 30, tzinfo=UTC))  # Nov in Shanghai, Oct in New York
        charge(who, "1.00", datetime(2026, 10, 31, 15, 59, tzinfo=UTC))  # Oct in both
    rows = {t.pk: t for t in Tenant.objects.annotate(**spend.spend_annotations(NOW))}
    assert rows[tenant.pk].spend_mtd == Decimal("100.00")
    assert rows[york.pk].spend_mtd == Decimal("0.00")
    assert rows[york.pk].spend_12m == rows[tenant.pk].spend_12m == Decimal("101.00")


# --- Rules at their thresholds ---------------------------------------------------------------------


def test_cumulative_5000_upgrades_to_gold(tenant):
    charge(tenant, "4000.00", at(2025, 3, 1))
    charge(tenant, "1000.00", at(2026, 11, 2))
    change = tiering.tier_evaluate(tenant=tenant, now=NOW)
    assert change is not None and change.to_tier.code == TierCode.GOLD
    assert change.rule == "cumulative_5000" and change.source == TierChangeSource.AUTOMATIC
    assert change.figures["cumulative"] == "5000.00" and change.figures["trigger"] == "nightly"
    assert change.figures["reason"]["en"].startswith("Cumulative spend ¥5,000.00 reached")
    assert "累计消费" in change.figures["reason"]["zh"]
    assert reload(tenant).tier.code == TierCode.GOLD


def test_4999_99_cumulative_does_not_upgrade(tenant):
    charge(tenant, "4999.99", at(2026, 11, 2))
    assert tiering.tier_evaluate(tenant=tenant, now=NOW) is None
    assert reload(tenant).tier.code == TierCode.STANDARD
    assert account_of(tenant).tier_evaluated_at == NOW
    assert not TierChange.objects.exists()


def test_a_refund_can_bring_cumulative_below_the_threshold(tenant):
    charge(tenant, "5000.00", at(2026, 11, 2))
    refund(tenant, "0.01", at(2026, 11, 3))
    assert tiering.tier_evaluate(tenant=tenant, now=NOW) is None


def test_trailing_12_months_100000_and_99999_99(tenant):
    trailing = rule("trailing_12m_100000")
    charge(tenant, "60000.00", at(2025, 12, 1, 0, 0))  # first day of the 12th month back
    charge(tenant, "39999.99", at(2026, 11, 10))
    charge(tenant, "80000.00", at(2025, 11, 30, 23, 59))  # the 13th month back: outside
    assert figures(tenant).trailing_12m == Decimal("99999.99")
    assert not trailing.met(figures(tenant))
    charge(tenant, "0.01", at(2026, 11, 15, 11))
    assert figures(tenant).trailing_12m == Decimal("100000.00")
    assert trailing.met(figures(tenant))


def test_trailing_months_follow_the_tenants_time_zone(tenant):
    charge(tenant, "100000.00", datetime(2025, 11, 30, 16, 0, tzinfo=UTC))  # 1 Dec 2025, 00:00 in Shanghai
    assert rule("trailing_12m_100000").met(figures(tenant))
    Tenant.objects.filter(pk=tenant.pk).update(time_zone="UTC")
    assert not rule("trailing_12m_100000").met(figures(reload(tenant)))  # 30 Nov 2025 in UTC


def test_three_consecutive_months_each_50000(tenant):
    three = rule("three_months_50000")
    for month in (3, 4, 5):
        charge(tenant, "50000.00", at(2024, month, 10))  # long ago: any three months of history count
    assert three.met(figures(tenant))
    assert figures(tenant).consecutive_run(3, Decimal("50000")) == [
        date(2024, 3, 1),
        date(2024, 4, 1),
        date(2024, 5, 1),
    ]


def test_three_months_with_one_short_by_a_fen_do_not_qualify(tenant):
    three = rule("three_months_50000")
    charge(tenant, "50000.00", at(2026, 6, 10))
    charge(tenant, "49999.99", at(2026, 7, 10))
    charge(tenant, "50000.00", at(2026, 8, 10))
    charge(tenant, "50000.00", at(2026, 10, 10))  # with a gap in September: not consecutive
    assert not three.met(figures(tenant))
    found = tiering.rules_met(figures(tenant))
    assert [r.code for r in found] == ["cumulative_5000", "trailing_12m_100000"]  # the other Gold rules hold


def test_three_months_edge_in_shanghai_counts_the_charge_in_november(tenant):
    three = rule("three_months_50000")
    charge(tenant, "50000.00", at(2026, 9, 10))
    charge(tenant, "50000.00", at(2026, 10, 10))
    charge(tenant, "50000.00", datetime(2026, 10, 31, 16, 30, tzinfo=UTC))  # November in Shanghai
    assert three.met(figures(tenant))  # Sep, Oct, Nov (the current month, already at 50,000)
    assert not three.met(figures(tenant, now=datetime(2026, 10, 31, 16, 29, tzinfo=UTC)))


def test_500000_in_12_months_makes_diamond_directly(tenant):
    charge(tenant, "500000.00", at(2026, 2, 1))
    change = tiering.tier_evaluate(tenant=tenant, now=NOW)
    assert change.from_tier.code == TierCode.STANDARD and change.to_tier.code == TierCode.DIAMOND
    assert change.rule == "trailing_12m_500000"
    assert TierChange.objects.count() == 1


def test_499999_99_in_12_months_is_gold_not_diamond(tenant):
    charge(tenant, "499999.99", at(2026, 2, 1))
    change = tiering.tier_evaluate(tenant=tenant, now=NOW)
    assert change.to_tier.code == TierCode.GOLD
    assert set(change.figures["rules_met"]) == {"cumulative_5000", "trailing_12m_100000"}


# --- Upgrades only; pins; overrides -----------------------------------------------------------------


def test_gold_goes_on_to_diamond_later(tenant):
    charge(tenant, "6000.00", at(2026, 1, 5))
    assert tiering.tier_evaluate(tenant=tenant, now=NOW).to_tier.code == TierCode.GOLD
    assert tiering.tier_evaluate(tenant=tenant, now=NOW) is None  # nothing new
    charge(tenant, "494000.00", at(2026, 11, 10))
    assert tiering.tier_evaluate(tenant=tenant, now=NOW).to_tier.code == TierCode.DIAMOND


def test_never_an_automatic_downgrade(tenant, staff, django_capture_on_commit_callbacks):
    tiering.tier_override(tenant=tenant, actor=staff, tier=TierCode.DIAMOND, reason="Strategic account")
    with django_capture_on_commit_callbacks(execute=True):
        tiering.tier_unpin(tenant=tenant, actor=staff)
    assert reload(tenant).tier.code == TierCode.DIAMOND  # evaluated at unpin: spends nothing, stays
    assert tiering.tier_evaluate(tenant=tenant, now=NOW) is None
    assert reload(tenant).tier.code == TierCode.DIAMOND
    assert TierChange.objects.filter(source=TierChangeSource.AUTOMATIC).count() == 0


def test_pinned_tenants_are_left_alone(tenant, staff, django_capture_on_commit_callbacks):
    tiering.tier_override(tenant=tenant, actor=staff, tier=TierCode.STANDARD, reason="Reseller contract")
    charge(tenant, "600000.00", at(2026, 11, 2))
    assert tiering.tier_evaluate(tenant=tenant, now=NOW) is None
    assert tiering.tiers_evaluate_all(now=NOW)["pinned"] == 1
    assert reload(tenant).tier.code == TierCode.STANDARD
    with django_capture_on_commit_callbacks(execute=True):
        tiering.tier_unpin(tenant=tenant, actor=staff)  # back to automatic: evaluated at once
    assert reload(tenant).tier.code == TierCode.DIAMOND


def test_override_needs_staff_and_a_reason(tenant, user, staff):
    with pytest.raises(PermissionDenied):
        tiering.tier_override(tenant=tenant, actor=user, tier=TierCode.GOLD, reason="Because")
    with pytest.raises(ValidationError) as refused:
        tiering.tier_override(tenant=tenant, actor=staff, tier=TierCode.GOLD, reason="   ")
    assert "reason" in refused.value.message_dict
    with pytest.raises(PermissionDenied):
        tiering.tier_unpin(tenant=tenant, actor=user)
    assert not TierChange.objects.exists() and reload(tenant).tier.code == TierCode.STANDARD


def test_staff_may_downgrade_with_a_reason_and_it_pins(tenant, staff):
    charge(tenant, "8000.00", at(2026, 11, 2))
    tiering.tier_evaluate(tenant=tenant, now=NOW)
    quota_before = TenantQuota.objects.get(tenant=tenant).vcpus
    change = tiering.tier_override(tenant=tenant, actor=staff, tier=TierCode.STANDARD, reason="Chargeback dispute")
    assert (change.from_tier.code, change.to_tier.code, change.source) == (TierCode.GOLD, TierCode.STANDARD, "staff")
    assert change.actor == staff and change.reason == "Chargeback dispute"
    assert tier_change_reason(change) == "Chargeback dispute"
    assert account_of(tenant).tier_pinned
    told = Notification.objects.filter(kind=NotificationKind.TIER_CHANGED).latest("id")
    assert told.params["reason"]["en"] == "Set by your account team."  # the internal reason stays inside
    assert TenantQuota.objects.get(tenant=tenant).vcpus == quota_before  # a downgrade lowers no quota
    event = AuditEvent.objects.filter(action="tenant.tier_changed", actor=staff).get()
    assert event.before["tier"] == "gold" and event.after["tier"] == "standard" and event.after["pinned"]


# --- What an upgrade does -------------------------------------------------------------------------


def test_upgrade_raises_quotas_to_the_tier_defaults_but_never_lowers_one(tenant, staff):
    quota = TenantQuota.objects.get(tenant=tenant)
    quota.vcpus = 500  # staff raised it above Gold's 256
    quota.save()
    GpuQuota.objects.filter(tenant=tenant, gpu_model__code="A100").update(limit=20)
    charge(tenant, "5000.00", at(2026, 11, 2))
    change = tiering.tier_evaluate(tenant=tenant, now=NOW)
    gold = Tier.objects.get(code=TierCode.GOLD)
    quota.refresh_from_db()
    assert quota.vcpus == 500
    assert quota.memory_gib == gold.default_memory_gib and quota.vms == gold.default_vms
    limits = dict(GpuQuota.objects.filter(tenant=tenant).values_list("gpu_model__code", "limit"))
    assert limits["A100"] == 20 and limits["T4"] == gold.default_gpus["T4"] and limits["H100"] == 4
    assert "vcpus" not in change.figures["quotas_raised"]
    assert change.figures["quotas_raised"]["memory_gib"] == [256, gold.default_memory_gib]


def test_upgrade_is_audited_and_told_to_customer_and_manager(tenant, user):
    manager = UserFactory(is_staff=True)
    CustomerAccount.objects.create(tenant=tenant, account_manager=manager)
    admin = add_member(tenant, Role.ADMIN).user
    billing = add_member(tenant, Role.BILLING).user
    member = add_member(tenant, Role.MEMBER).user
    charge(tenant, "5000.00", at(2026, 11, 2))
    change = tiering.tier_evaluate(tenant=tenant, now=NOW)
    told = set(Notification.objects.filter(kind=NotificationKind.TIER_CHANGED).values_list("user_id", flat=True))
    assert told == {user.pk, admin.pk, billing.pk}
    assert member.pk not in told
    note = Notification.objects.get(kind=NotificationKind.CUSTOMER_TIER_CHANGED)
    assert note.user == manager and note.params["tier"] == {"en": "Gold", "zh": "黄金"}
    event = AuditEvent.objects.get(action="tenant.tier_changed")
    assert event.actor is None and event.actor_label == "system"
    assert event.before["tier"] == "standard" and event.after["rule"] == "cumulative_5000"
    assert event.after["tier_change"] == change.pk


def test_storage_rated_after_the_upgrade_gets_golds_50_percent_discount(tenant):
    def store_one_day(day):
        start = at(2026, 11, day)
        billing_services.usage_append(
            events=[
                UsageEvent(
                    tenant_id=tenant.pk,
                    idempotency_key=f"storage:{tenant.pk}:{day}",
                    source="storage",
                    source_id=str(day),
                    resource="storage",
                    unit="gib_second",
                    quantity=Decimal(100 * 86400),  # 100 GiB for a day
                    period_start=start,
                    period_end=start + timedelta(days=1),
                )
            ]
        )
        billing_services.usage_rate_pending(tenant_id=tenant.pk)

    store_one_day(3)
    charge(tenant, "5000.00", at(2026, 11, 2))
    tiering.tier_evaluate(tenant=tenant, now=NOW)
    store_one_day(4)
    lines = {
        line.discount_percent: line.amount for line in InvoiceLine.objects.filter(kind=LineKind.STORAGE).order_by("id")
    }
    assert lines == {Decimal("0"): Decimal("5.00"), Decimal("50"): Decimal("2.50")}  # 100 GiB-days × 0.05


# --- Triggers -------------------------------------------------------------------------------------


def test_a_payment_triggers_evaluation_after_commit(tenant, django_capture_on_commit_callbacks):
    charge(tenant, "5200.00", at(2026, 11, 2))
    with django_capture_on_commit_callbacks(execute=True):
        top_up(tenant, "100")
    change = TierChange.objects.get(tenant=tenant)
    assert change.to_tier.code == TierCode.GOLD and change.figures["trigger"] == "payment"


def test_nightly_run_evaluates_everyone_with_one_spend_query_per_batch(tenant, monkeypatch):
    others = [make_tenant(name=f"Lab {n}") for n in range(4)]
    charge(others[0], "5000.00", at(2026, 11, 2))
    charge(others[1], "700000.00", at(2026, 11, 2))
    charge(others[2], "10.00", at(2026, 11, 2))
    calls = []
    original = tiering.monthly_spend
    monkeypatch.setattr(tiering, "monthly_spend", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    monkeypatch.setattr(tiering, "BATCH_SIZE", 3)
    stats = tiering.tiers_evaluate_all(now=NOW)
    assert stats == {"evaluated": 5, "upgraded": 2, "pinned": 0, "failed": 0}
    assert len([c for c in calls if len(c[0]) > 1]) == 2  # two batches of up to 3 tenants
    assert reload(others[0]).tier.code == TierCode.GOLD and reload(others[1]).tier.code == TierCode.DIAMOND
    assert CustomerAccount.objects.filter(tier_evaluated_at=NOW).count() == 5


# --- Progress to the next tier --------------------------------------------------------------------


def test_next_tier_progress(tenant, staff):
    charge(tenant, "1200.00", at(2026, 11, 2))
    progress = next_tier_progress(tenant, now=NOW)
    assert progress["tier_code"] == TierCode.GOLD
    assert progress["amount"] == Decimal("3800.00") and progress["rule"] == "cumulative_5000"
    charge(tenant, "118800.00", at(2026, 11, 3))
    tiering.tier_evaluate(tenant=tenant, now=NOW)
    progress = next_tier_progress(reload(tenant), now=NOW)
    assert progress["tier_code"] == TierCode.DIAMOND and progress["amount"] == Decimal("380000.00")
    tiering.tier_override(tenant=tenant, actor=staff, tier=TierCode.DIAMOND, reason="Key account")
    assert next_tier_progress(reload(tenant), now=NOW) is None


def test_a_run_of_months_needs_its_earlier_months_already_there():
    three = rule("three_months_50000")
    months = {date(2026, 9, 1): Decimal("50000"), date(2026, 10, 1): Decimal("60000"), date(2026, 11, 1): Decimal("1")}
    shown = tiering.SpendFigures(time_zone="Asia/Shanghai", now=NOW, months=months)
    assert three.additional_spend(shown) == Decimal("49999")
    months[date(2026, 9, 1)] = Decimal("49999.99")
    assert three.additional_spend(shown) is None


# --- Concurrency ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_nightly_and_payment_evaluations_racing_make_one_change():
    tenant = make_tenant(name="Race to gold")
    charge(tenant, "9000.00", at(2026, 11, 2))
    workers = 8
    barrier = threading.Barrier(workers)
    results = [None] * workers

    def run(i):
        try:
            barrier.wait()
            results[i] = tiering.tier_evaluate(tenant=tenant, now=NOW, trigger="nightly" if i % 2 else "payment")
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(workers)))
    assert len([r for r in results if r is not None]) == 1
    assert TierChange.objects.filter(tenant=tenant).count() == 1
    assert AuditEvent.objects.filter(tenant=tenant, action="tenant.tier_changed").count() == 1
    assert Tenant.objects.get(pk=tenant.pk).tier.code == TierCode.GOLD
