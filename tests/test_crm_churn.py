"""Churn risk: two empty months, a drop below half of the three months before, month edges in the
tenant's time zone, and the flag clearing itself when spend returns."""

from datetime import UTC, datetime

import pytest

from crm import churn
from crm.models import CustomerAccount
from notifications.models import Notification, NotificationKind
from tenants.models import AuditEvent, Tenant
from tests.crm_helpers import at, charge
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = at(2026, 12, 10, 3)  # December: the last complete month is November


@pytest.fixture
def manager(tenant):
    user = UserFactory(is_staff=True)
    CustomerAccount.objects.create(tenant=tenant, account_manager=user)
    return user


def account(tenant) -> CustomerAccount:
    return CustomerAccount.objects.get(tenant=tenant)


def scan(now=NOW) -> dict:
    return churn.churn_scan(now=now)


def steady(tenant, *months, amount="1000.00"):
    for month in months:
        charge(tenant, amount, at(2026, month, 12))


def test_two_empty_months_after_spending_flag(tenant, manager):
    steady(tenant, 7, 8, 9)  # nothing in October, November, or December so far
    assert scan()["flagged"] == 1
    flagged = account(tenant)
    assert flagged.churn_risk and flagged.churn_reason == churn.NO_SPEND
    assert flagged.churn_flagged_at == NOW
    assert flagged.churn_detail["months"] == {"2026-10": "0.00", "2026-11": "0.00", "2026-12": "0.00"}
    assert flagged.churn_detail["last_month_with_spend"] == "2026-09"
    assert "No spend in 2026-10 and 2026-11" in flagged.churn_detail["reason"]["en"]
    note = Notification.objects.get(kind=NotificationKind.CHURN_FLAGGED)
    assert note.user == manager and note.params["reason"] == flagged.churn_detail["reason"]
    event = AuditEvent.objects.get(action="churn.flagged")
    assert event.tenant_id == tenant.pk and event.after["reason"] == churn.NO_SPEND


def test_one_empty_month_does_not_flag(tenant, manager):
    charge(tenant, "300.00", at(2026, 9, 12))
    charge(tenant, "100.00", at(2026, 11, 12))  # October empty; November a third of the average
    assert churn.churn_assess(churn.monthly_spend([tenant.pk], None, now=NOW)[tenant.pk]) is None
    assert scan()["flagged"] == 0
    assert not CustomerAccount.objects.get(tenant=tenant).churn_risk
    assert not Notification.objects.filter(kind=NotificationKind.CHURN_FLAGGED).exists()


def test_two_empty_months_with_spend_back_this_month(tenant):
    steady(tenant, 7, 8, 9)
    charge(tenant, "1.00", at(2026, 12, 1, 9))
    scan()  # not "no spend" any more, but a token yuan is still far below the old average
    assert account(tenant).churn_reason == churn.SPEND_DROP
    charge(tenant, "332.34", at(2026, 12, 2, 9))  # 333.34 this month: above half of (1000 + 1000 + 0) / 3
    assert scan()["cleared"] == 1


def test_a_tenant_that_never_spent_is_not_churning(tenant):
    assert scan() == {"scanned": 1, "flagged": 0, "cleared": 0, "failed": 0}
    assert not CustomerAccount.objects.filter(tenant=tenant, churn_risk=True).exists()


def test_last_month_below_half_of_the_three_before_flags(tenant, manager):
    steady(tenant, 8, 9, 10)
    charge(tenant, "499.99", at(2026, 11, 20))
    scan()
    flagged = account(tenant)
    assert flagged.churn_risk and flagged.churn_reason == churn.SPEND_DROP
    assert flagged.churn_detail["previous_average"] == "1000.00"
    assert flagged.churn_detail["half_average"] == "500.00"
    assert flagged.churn_detail["spend"] == "499.99"
    assert "below half of the ¥1,000.00 monthly average" in flagged.churn_detail["reason"]["en"]


def test_exactly_half_does_not_flag(tenant):
    steady(tenant, 8, 9, 10)
    charge(tenant, "500.00", at(2026, 11, 20))
    assert scan()["flagged"] == 0


def test_a_drop_needs_an_average_above_zero(tenant):
    charge(tenant, "10.00", at(2026, 4, 2))  # spend long before: the three months before were empty
    charge(tenant, "0.01", at(2026, 11, 2))
    assert scan()["flagged"] == 0


def test_one_empty_last_month_is_a_drop_not_two_empty_months(tenant):
    steady(tenant, 8, 9, 10)  # November empty
    scan()
    assert account(tenant).churn_reason == churn.SPEND_DROP


def test_month_edges_are_the_tenants_time_zone(tenant):
    steady(tenant, 8, 9, 10)
    charge(tenant, "500.00", datetime(2026, 10, 31, 16, 30, tzinfo=UTC))  # 1 November, 00:30 in Shanghai
    assert scan()["flagged"] == 0  # November has exactly half of the average: not a drop
    Tenant.objects.filter(pk=tenant.pk).update(time_zone="UTC")
    assert scan()["flagged"] == 1  # in UTC it is October's, and November is empty
    assert account(tenant).churn_reason == churn.SPEND_DROP


def test_the_flag_clears_itself_when_spend_returns(tenant, manager):
    steady(tenant, 7, 8, 9)
    scan()
    assert account(tenant).churn_risk
    assert scan()["flagged"] == 0  # still flagged: no second notification
    assert Notification.objects.filter(kind=NotificationKind.CHURN_FLAGGED).count() == 1
    charge(tenant, "800.00", at(2026, 12, 9))
    assert scan()["cleared"] == 1
    cleared = account(tenant)
    assert not cleared.churn_risk and cleared.churn_reason == "" and cleared.churn_detail == {}
    assert cleared.churn_flagged_at is None
    assert AuditEvent.objects.filter(action="churn.cleared", tenant=tenant).count() == 1


def test_a_flag_that_changes_rule_keeps_its_date_and_is_not_told_twice(tenant, manager):
    steady(tenant, 8, 9, 10)
    scan(now=at(2026, 12, 10))
    assert account(tenant).churn_reason == churn.SPEND_DROP
    scan(now=at(2027, 1, 5))  # November and December both empty now
    flagged = account(tenant)
    assert flagged.churn_reason == churn.NO_SPEND and flagged.churn_flagged_at == at(2026, 12, 10)
    assert Notification.objects.filter(kind=NotificationKind.CHURN_FLAGGED).count() == 1
    assert AuditEvent.objects.filter(action="churn.flagged").count() == 2
