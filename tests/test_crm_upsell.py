"""Upsell: the saving formula with numbers, and the suggestion kept for Standard pay-as-you-go tenants."""

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import PackageOffer
from billing.selectors import packages_on_sale
from crm import upsell
from crm.models import CustomerAccount
from crm.selectors import upsell_for
from notifications.models import Notification, NotificationKind
from tenants.models import Tenant, Tier, TierCode
from tests.crm_helpers import at
from tests.factories import UserFactory
from tests.test_billing_helpers import buy_package, meter_and_rate, task_run, top_up

pytestmark = pytest.mark.django_db

NOW = at(2026, 11, 20, 10)  # the window is the 30 local days 21 October – 19 November


def offers() -> dict[str, PackageOffer]:
    return {offer.code: offer for offer in packages_on_sale()}


def savings(usage: str) -> dict[str, Decimal | None]:
    return {code: upsell.package_saving(Decimal(usage), offer) for code, offer in offers().items()}


def test_saving_is_the_bonus_share_of_the_usage_the_credit_covers():
    # covered × bonus / credit: pkg-1000 covers 1,050 of it, the others all 3,000.
    assert savings("3000.00") == {
        "pkg-1000": Decimal("50.00"),  # 1,050 × 50 / 1,050
        "pkg-5000": Decimal("272.73"),  # 3,000 × 500 / 5,500 = 272.727…
        "pkg-10000": Decimal("391.30"),  # 3,000 × 1,500 / 11,500 = 391.304…
    }
    best, saving = upsell.best_package(Decimal("3000.00"), packages_on_sale())
    assert (best.code, saving) == ("pkg-10000", Decimal("391.30"))


def test_a_package_whose_credit_would_expire_unused_is_no_saving():
    # 500 a month × 12 months = 6,000: enough for 5,500 of credit, not for 11,500.
    assert savings("500.00") == {
        "pkg-1000": Decimal("23.81"),  # 500 × 50 / 1,050 = 23.809…
        "pkg-5000": Decimal("45.45"),  # 500 × 500 / 5,500 = 45.454…
        "pkg-10000": None,
    }
    assert upsell.best_package(Decimal("500.00"), packages_on_sale())[0].code == "pkg-5000"
    assert savings("87.49")["pkg-1000"] is None  # 87.49 × 12 = 1,049.88 < 1,050
    assert savings("87.50")["pkg-1000"] == Decimal("4.17")  # 1,050.00: just used up; 87.5 × 50 / 1,050
    assert upsell.best_package(Decimal("50.00"), packages_on_sale()) is None
    assert upsell.best_package(Decimal("0.00"), packages_on_sale()) is None


@pytest.fixture
def manager(tenant):
    user = UserFactory(is_staff=True)
    CustomerAccount.objects.create(tenant=tenant, account_manager=user)
    return user


@pytest.fixture
def busy(tenant):
    """50 A100-hours of task hosting with 8 vCPUs and 32 GiB in the window: 50 × (50 + 4 + 3.2) =
    2,860.00 of package-eligible charges; one more run before the window."""
    top_up(tenant, "10000")
    meter_and_rate(task_run(tenant, start=at(2026, 11, 10, 8), end=at(2026, 11, 12, 10)))
    meter_and_rate(task_run(tenant, start=at(2026, 10, 19, 8), end=at(2026, 10, 20, 8)))  # before the window
    return tenant


def test_the_suggestion_is_kept_and_the_manager_told_once(busy, manager):
    stats = upsell.upsell_compute_all(now=NOW)
    assert stats["suggested"] == 1 and stats["new_best"] == 1
    suggestion = upsell_for(busy)
    assert suggestion["offer_code"] == "pkg-10000"
    assert suggestion["usage_30d"] == Decimal("2860.00")
    assert suggestion["saving"] == Decimal("373.04")  # 2,860 × 1,500 / 11,500 = 373.043…
    assert suggestion["price"] == Decimal("10000.00") and suggestion["name_zh"] == "算力包 10,000"
    assert (suggestion["period_start"], suggestion["period_end"]) == ("2026-10-21", "2026-11-20")
    note = Notification.objects.get(kind=NotificationKind.UPSELL_SUGGESTED)
    assert note.user == manager and note.params["saving"] == "373.04"
    assert upsell.upsell_compute_all(now=NOW)["new_best"] == 0
    assert Notification.objects.filter(kind=NotificationKind.UPSELL_SUGGESTED).count() == 1
    assert CustomerAccount.objects.get(tenant=busy).upsell_computed_at == NOW


def test_usage_outside_the_window_is_not_counted(busy):
    later = NOW + timedelta(days=25)  # the window is 15 November – 14 December
    assert upsell.upsell_compute(tenant=busy, now=later) == {}  # the run was on 10–12 November


def test_package_holders_and_higher_tiers_get_no_suggestion(busy):
    upsell.upsell_compute_all(now=NOW)
    assert upsell_for(busy) is not None
    Tenant.objects.filter(pk=busy.pk).update(tier=Tier.objects.get(code=TierCode.GOLD))
    assert upsell.upsell_compute_all(now=NOW)["cleared"] == 1
    assert upsell_for(busy) is None
    Tenant.objects.filter(pk=busy.pk).update(tier=Tier.objects.get(code=TierCode.STANDARD))
    upsell.upsell_compute_all(now=NOW)
    assert upsell_for(busy) is not None
    buy_package(busy, "pkg-1000")  # now holds package credit: not paying as it goes
    upsell.upsell_compute_all(now=NOW)
    assert upsell_for(busy) is None


def test_a_tenant_without_usage_gets_nothing(tenant, manager):
    assert upsell.upsell_compute(tenant=tenant, now=NOW) == {}
    assert upsell_for(tenant) is None
    assert not Notification.objects.filter(kind=NotificationKind.UPSELL_SUGGESTED).exists()
