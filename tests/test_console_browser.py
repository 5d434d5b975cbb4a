"""End to end in a real browser: the console's maker-checker credit.

An account manager logs in with password and TOTP, finds a churn-flagged customer through the churn
filter, opens its 360 page and proposes a credit above the approval threshold; it waits. A finance
member of staff logs in with TOTP in a browser of their own and approves it; the customer's balance
shows the credit, once.

Drives Debian's Chromium through Playwright against pytest-django's live server (tests/test_browser.py's
Browser and launch arguments). Screenshots go to $PORTAL_ARTIFACTS/screenshots/console when that is
set, else to tmp_path.
"""

import os
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import expect, sync_playwright

from billing.models import LedgerEntry, LedgerKind, Wallet
from crm.models import CreditAdjustment, CreditRequestStatus, CustomerAccount, StaffRole
from tests.conftest import CHROMIUM
from tests.factories import UserFactory, make_tenant
from tests.test_browser import CHROMIUM_ARGS, Browser
from tests.test_console import PASSWORD, current_code, make_staff, manage

pytestmark = [pytest.mark.browser]

AMOUNT = "2500.00"  # above the default approval threshold of ¥1,000.00


def _screens_dir(tmp_path: Path) -> Path:
    root = os.environ.get("PORTAL_ARTIFACTS")
    folder = Path(root) / "screenshots" / "console" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _log_in_with_totp(person: Browser, email: str, secret: str) -> None:
    page = person.page
    page.goto("/accounts/login/?next=/console/")
    page.fill("#id_login", email)
    page.fill("#id_password", PASSWORD)
    page.locator("main form button[type=submit]").click()
    page.wait_for_url("**/accounts/2fa/authenticate/**")
    page.fill("#id_code", current_code(secret))
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url("**/console/")
    expect(page.locator("#customers")).to_be_visible()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_manager_proposes_a_credit_and_finance_approves_it(live_server, monkeypatch, tmp_path):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's sync API runs a loop here
    screens = _screens_dir(tmp_path)
    manager, manager_secret = make_staff(StaffRole.ACCOUNT_MANAGER, email="manager@example.com")
    finance, finance_secret = make_staff(StaffRole.FINANCE, email="finance@example.com")
    fading = make_tenant(name="Fading Labs", owner=UserFactory(email="cto@fading.example"))
    happy = make_tenant(name="Happy Compute", owner=UserFactory(email="cto@happy.example"))
    manage(fading, manager)
    manage(happy, manager)
    CustomerAccount.objects.filter(tenant=fading).update(
        churn_risk=True,
        churn_reason="no_spend_two_months",
        churn_detail={"reason": {"en": "No spend in the last two months.", "zh": "近两个月无消费。"}},
        churn_flagged_at=timezone.now(),
    )
    errors: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # 1. The account manager logs in with the second factor and sees both customers.
            maker = Browser(browser, live_server.url, errors, "manager")
            page = maker.page
            _log_in_with_totp(maker, manager.email, manager_secret)
            expect(page.locator("#customers tbody tr")).to_have_count(2)
            maker.shot(screens, "01-customers.png")

            # 2. The churn filter leaves the flagged customer, with its reason.
            page.select_option("#id_churn", "yes")
            page.get_by_role("button", name="Apply").click()
            page.wait_for_url("**/console/?*churn=yes*")
            rows = page.locator("#customers tbody tr")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("Fading Labs")
            expect(rows.first).to_contain_text("No spend for two months")
            maker.shot(screens, "02-churn-filter.png")

            # 3. The 360 page.
            rows.first.get_by_role("link", name="Fading Labs").click()
            page.wait_for_url(f"**/console/customers/{fading.slug}/")
            expect(page.locator("#churn-flag")).to_contain_text("No spend in the last two months.")
            expect(page.locator("#cash-balance")).to_have_text("¥0.00")
            maker.shot(screens, "03-customer-360.png")

            # 4. A credit above the threshold waits for approval.
            form = page.locator("#credit-form")
            form.get_by_label("Amount").fill(AMOUNT)
            form.get_by_label("Reason").fill("Win-back credit agreed on the call")
            form.get_by_role("button", name="Propose credit").click()
            page.wait_for_url(f"**/console/customers/{fading.slug}/#credits")
            expect(page.locator("#messages")).to_contain_text("waits for approval")
            expect(page.locator('#credit-list tr[data-status="pending"]')).to_contain_text("¥2500.00")
            expect(page.locator("#cash-balance")).to_have_text("¥0.00")
            maker.shot(screens, "04-credit-proposed.png")
            credit = CreditAdjustment.objects.get()
            assert credit.status == CreditRequestStatus.PENDING and credit.requested_by == manager

            # 5. Finance, in a browser of their own, approves it.
            checker = Browser(browser, live_server.url, errors, "finance")
            fpage = checker.page
            _log_in_with_totp(checker, finance.email, finance_secret)
            fpage.goto("/console/credits/")
            row = fpage.locator(f"#credit-{credit.pk}")
            expect(row).to_contain_text("Fading Labs")
            expect(row).to_contain_text("manager@example.com")
            checker.shot(screens, "05-approvals.png")
            row.get_by_role("button", name="Approve").click()
            fpage.wait_for_url("**/console/credits/")
            expect(fpage.locator("#messages")).to_contain_text("¥2500.00 credited to Fading Labs")
            expect(fpage.locator(f"#credit-{credit.pk}")).to_have_count(0)
            checker.shot(screens, "06-approved.png")

            # 6. The manager's 360 page shows the credit in the balance, once.
            page.reload()
            expect(page.locator("#cash-balance")).to_have_text("¥2500.00")
            expect(page.locator('#credit-list tr[data-status="applied"]')).to_contain_text("finance@example.com")
            expect(page.locator("#ledger")).to_contain_text("Win-back credit agreed on the call")
            maker.shot(screens, "07-balance.png")
        finally:
            browser.close()

    assert LedgerEntry.objects.filter(tenant=fading, kind=LedgerKind.ADJUSTMENT).count() == 1
    assert Wallet.objects.get(tenant=fading).cash_balance == Decimal(AMOUNT)
    errors = [e for e in errors if "favicon.ico" not in e]
    assert errors == [], "\n".join(errors)
