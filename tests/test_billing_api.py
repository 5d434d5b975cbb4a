"""Billing over the API and in pages: wallet, packages, invoices, PDFs, roles, tenant isolation,
the staff console."""

import os
import re
import zlib
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from billing import services
from billing.models import CreditGrant, Invoice, LedgerEntry, PackageOffer, Payment, PaymentStatus, Subscription, Wallet
from crm.models import StaffRole
from tenants.models import Role
from tests.factories import UserFactory, make_tenant, staff_with_role
from tests.test_billing_helpers import at, buy_package, lifecycle, make_vm, meter_and_rate, task_run, top_up

pytestmark = pytest.mark.django_db

FONT = Path(django_settings.PORTAL_INVOICE_FONT)
needs_font = pytest.mark.skipif(
    not FONT.exists() and os.environ.get("PORTAL_REQUIRE_SERVICES") != "1",
    reason=f"needs a Chinese font at {FONT} (apt-get install fonts-wqy-zenhei)",
)


@pytest.fixture
def invoice(tenant):
    top_up(tenant, "2000")
    meter_and_rate(task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 12), gpus="1", vcpus=4, memory_gib=16))
    return Invoice.objects.get(tenant=tenant)


# --- Wallet ---------------------------------------------------------------------------------------


def test_wallet_shows_cash_packages_reserved_and_forecast(api, user, tenant):
    top_up(tenant, "1000")
    buy_package(tenant, "pkg-5000", months=6)
    running = task_run(tenant, start=at(2026, 1, 1), end=None, gpus="1", vcpus=2, memory_gib=4)
    assert running.ended_at is None
    body = api(user).get("/api/v1/wallet/").json()
    assert body["cash_balance"] == "1000.00"
    assert body["package_balance"] == "5500.00" and body["balance"] == "6500.00"
    assert body["packages"][0]["remaining"] == "5500.00" and body["packages"][0]["expires_at"]
    assert Decimal(body["reserved"]) > Decimal("51.20")  # a running A100 task: more than its next hour
    assert body["days_left"] is None and body["daily_burn"] == "0.00"
    assert body["available_for_tasks"] == "6500.00" and body["available_for_vms"] == "1000.00"


def test_burn_down_forecast_from_the_last_seven_days(api, user, tenant):
    top_up(tenant, "7000")
    services.wallet_charge(tenant=tenant, actor=None, amount=Decimal("700"), description="x", reference="r1")
    body = api(user).get("/api/v1/wallet/").json()
    assert body["daily_burn"] == "100.00" and body["days_left"] == 63


def test_low_balance_threshold_is_set_by_billing_roles(api, tenant, member_of):
    billing = member_of(tenant, Role.BILLING)
    response = api(billing).patch("/api/v1/wallet/", {"low_balance_threshold": "250.00"}, format="json")
    assert response.status_code == 200 and response.json()["low_balance_threshold"] == "250.00"
    assert response.json()["low_balance"] is True
    assert api(billing).post("/api/v1/wallet/", {"low_balance_threshold": None}, format="json").status_code == 200
    assert Wallet.objects.get(tenant=tenant).low_balance_threshold is None
    bad = api(billing).patch("/api/v1/wallet/", {"low_balance_threshold": "-1"}, format="json")
    assert bad.status_code == 400 and "low_balance_threshold" in bad.json()


@pytest.mark.parametrize(
    ("role", "read", "write"),
    [
        (Role.OWNER, 200, 201),
        (Role.ADMIN, 200, 201),
        (Role.BILLING, 200, 201),
        (Role.VIEWER, 200, 403),
        (Role.MEMBER, 403, 403),
    ],
)
def test_roles(api, tenant, member_of, role, read, write):
    person = member_of(tenant, role)
    client = api(person)
    assert client.get("/api/v1/wallet/").status_code == read
    assert client.get("/api/v1/invoices/").status_code == read
    assert client.get("/api/v1/usage/", {"from": "2026-03-01", "to": "2026-04-01"}).status_code == read
    package = client.get("/api/v1/packages/").json()[0]
    assert client.post(f"/api/v1/packages/{package['id']}/purchase/", {}, format="json").status_code == write
    assert client.post("/api/v1/wallet/top-up/", {"amount": "500"}, format="json").status_code == write
    assert client.patch("/api/v1/wallet/", {"low_balance_threshold": "1"}, format="json").status_code in (
        (200,) if write == 201 else (403,)
    )


# --- Packages and payments ------------------------------------------------------------------------


def test_price_book_and_packages_are_public_to_members(api, tenant, member_of):
    client = api(member_of(tenant, Role.MEMBER))
    book = client.get("/api/v1/price-book/").json()
    items = {item["code"]: item for item in book["items"]}
    assert items["task_gpu_hour:A100"]["unit_price"] == "50.000000"
    assert items["task_gpu_hour:H100"]["set_by_staff"] is True
    assert [band["discount_percent"] for band in book["bands"]] == ["0.00", "5.00", "10.00"]
    assert {p["plan"]: p["monthly"] for p in book["plans"]}["a100-2x-training"] == "28000.00"
    packages = client.get("/api/v1/packages/").json()
    assert [(p["price"], p["credit"]) for p in packages] == [
        ("1000.00", "1050.00"),
        ("5000.00", "5500.00"),
        ("10000.00", "11500.00"),
    ]


def test_purchase_offline_then_staff_confirm_credits_once(api, client, user, tenant, staff_client):
    package = api(user).get("/api/v1/packages/").json()[1]
    response = api(user).post(f"/api/v1/packages/{package['id']}/purchase/", {"validity_months": 6}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "pending" and body["provider"] == "offline" and body["checkout_url"] == ""
    assert body["instructions"]["reference"] == body["reference"] and body["instructions"]["amount"] == "5000.00"
    assert not CreditGrant.objects.exists()
    page = staff_client.get("/console/billing/")
    assert page.status_code == 200 and body["reference"] in page.content.decode()
    for _ in range(2):  # a double click
        assert staff_client.post(f"/console/billing/payments/{body['id']}/confirm/").status_code == 302
    grant = CreditGrant.objects.get()
    assert grant.granted == Decimal("5500.00")
    assert LedgerEntry.objects.filter(kind__in=["package_grant", "bonus"]).count() == 2
    assert Payment.objects.get().status == PaymentStatus.SUCCEEDED
    assert api(user).get(f"/api/v1/payments/{body['id']}/").json()["status"] == "succeeded"


def test_purchase_validity_out_of_range_is_a_400(api, user, tenant):
    package = api(user).get("/api/v1/packages/").json()[0]
    response = api(user).post(f"/api/v1/packages/{package['id']}/purchase/", {"validity_months": 13}, format="json")
    assert response.status_code == 400 and "validity_months" in response.json()
    assert not Payment.objects.exists()


def test_top_up_limits(api, user, tenant):
    response = api(user).post("/api/v1/wallet/top-up/", {"amount": "5"}, format="json")
    assert response.status_code == 400 and "amount" in response.json()


def test_console_needs_staff(client, user):
    client.force_login(user)
    assert client.get("/console/billing/").status_code == 403


@pytest.fixture
def staff_client(client, settings):
    settings.PORTAL_STAFF_MFA_REQUIRED = False
    client.force_login(staff_with_role(StaffRole.FINANCE))  # confirms payments, adjusts wallets, sets prices
    return client


def test_console_wallet_adjustment_and_one_off_charge(staff_client, tenant):
    url = f"/console/billing/tenants/{tenant.slug}/"
    assert staff_client.get(url).status_code == 200
    response = staff_client.post(
        url, {"form": "adjust", "adjust-kind": "adjustment", "adjust-amount": "100", "adjust-reason": ""}
    )
    assert response.status_code == 200 and response.context["adjust_form"].errors["reason"]
    staff_client.post(
        url, {"form": "adjust", "adjust-kind": "adjustment", "adjust-amount": "100", "adjust-reason": "Welcome credit"}
    )
    staff_client.post(
        url,
        {
            "form": "charge",
            "charge-amount": "5000",
            "charge-description": "Model optimisation",
            "charge-reference": "MO-1",
        },
    )
    staff_client.post(url, {"form": "limit", "limit-credit_limit": "10000", "limit-reason": "Enterprise terms"})
    wallet = Wallet.objects.get(tenant=tenant)
    assert wallet.cash_balance == Decimal("-4900.00") and wallet.credit_limit == Decimal("10000.00")
    assert Invoice.objects.get(tenant=tenant).lines.get(kind="one_off").amount == Decimal("5000.00")


def test_console_publishes_a_price_version(staff_client):
    response = staff_client.post(
        "/console/billing/price-book/", {"effective_from": "2030-01-01T00:00", "prices": "task_gpu_hour:H100 95.00"}
    )
    assert response.status_code == 302
    page = staff_client.get("/console/billing/price-book/").content.decode()
    assert "95.000000" in page
    bad = staff_client.post("/console/billing/price-book/", {"effective_from": "2031-01-01T00:00", "prices": "nope 1"})
    assert bad.status_code == 200 and "Unknown price items" in bad.content.decode()


# --- Invoices -------------------------------------------------------------------------------------


def test_invoices_list_and_detail(api, user, invoice):
    listed = api(user).get("/api/v1/invoices/").json()
    assert listed["count"] == 1 and listed["results"][0]["total"] == "107.20"
    detail = api(user).get(f"/api/v1/invoices/{invoice.pk}/").json()
    assert sum(Decimal(line["amount"]) for line in detail["lines"]) == Decimal(detail["total"])
    gpu = next(line for line in detail["lines"] if line["resource"] == "gpu:A100")
    assert gpu["quantity"] == "7200.000000000" and gpu["billed_quantity"] == "2.000000" and gpu["per_unit"] == 3600
    assert detail["paid_from_balance"] == "107.20" and detail["paid_from_packages"] == "0.00"


def test_another_tenants_invoice_is_a_404(api, client, invoice):
    stranger = UserFactory()
    make_tenant(owner=stranger, name="Rival")
    assert api(stranger).get(f"/api/v1/invoices/{invoice.pk}/").status_code == 404
    client.force_login(stranger)
    for path in ("", "print/", "pdf/"):
        assert client.get(f"/billing/invoices/{invoice.pk}/{path}").status_code == 404


def test_invoice_pages(client, user, invoice):
    client.force_login(user)
    page = client.get(f"/billing/invoices/{invoice.pk}/").content.decode()
    assert "Task hosting · A100 GPU-hours" in page and "107.20" in page
    printable = client.get(f"/billing/invoices/{invoice.pk}/print/").content.decode()
    assert "window.print()" in printable and "107.20" in printable
    chinese = client.get(f"/billing/invoices/{invoice.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "任务托管 · A100 GPU 小时" in chinese


def pdf_text_codepoints(pdf: bytes) -> set[int]:
    """Code points the PDF's embedded fonts map glyphs to (their ToUnicode CMaps, inflated)."""
    points = set()
    for stream in pdf.split(b"stream\n")[1:]:
        data = stream.split(b"\nendstream")[0]
        try:
            text = zlib.decompress(data).decode("latin-1")
        except zlib.error:
            text = data.decode("latin-1")
        if "beginbfchar" in text or "beginbfrange" in text:
            points |= {int(h, 16) for h in re.findall(r"<[0-9A-Fa-f]+>\s*<([0-9A-Fa-f]{4})>", text)}
    return points


@needs_font
def test_invoice_pdf_embeds_a_chinese_font(client, api, user, invoice):
    client.force_login(user)
    response = client.get(f"/billing/invoices/{invoice.pk}/pdf/")
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    pdf = response.content
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"WenQuanYi" in pdf
    points = pdf_text_codepoints(pdf)
    for char in "发票任务托管合计":
        assert ord(char) in points, char
    via_api = api(user).get(f"/api/v1/invoices/{invoice.pk}/", {"format": "pdf"})
    assert via_api.status_code == 200 and via_api.content.startswith(b"%PDF")


def test_invoice_pdf_without_the_font_says_what_to_install(client, user, invoice, settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.PORTAL_INVOICE_FONT = "/nonexistent/font.ttc"
    client.force_login(user)
    client.raise_request_exception = True
    with pytest.raises(ImproperlyConfigured, match="fonts-wqy-zenhei"):
        client.get(f"/billing/invoices/{invoice.pk}/pdf/")


# --- Pages ----------------------------------------------------------------------------------------


def test_billing_page_shows_wallet_packages_invoices_and_prices(client, user, invoice):
    client.force_login(user)
    html = client.get("/billing/").content.decode()
    for text in (
        'id="wallet"',
        'data-package="pkg-5000"',
        'id="invoices"',
        'id="statement-form"',
        'data-code="storage_gib_day"',
        "2026-03",
    ):
        assert text in html, text


def test_billing_page_roles(client, tenant, member_of):
    client.force_login(member_of(tenant, Role.MEMBER))
    assert client.get("/billing/").status_code == 403
    client.force_login(member_of(tenant, Role.VIEWER))
    html = client.get("/billing/").content.decode()
    assert "Buy</button>" not in html and 'id="price-items"' in html
    assert client.post("/billing/top-up/", {"amount": "500"}).status_code == 403


def test_buying_a_package_from_the_page_shows_bank_details(client, user, tenant):
    client.force_login(user)
    offer = PackageOffer.objects.get(code="pkg-1000")
    response = client.post(f"/billing/packages/{offer.pk}/buy/", {"validity_months": "12"})
    payment = Payment.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/billing/payments/{payment.pk}/"
    page = client.get(response["Location"]).content.decode()
    assert payment.reference in page and django_settings.PORTAL_BANK_ACCOUNT_NUMBER in page
    client.post(f"/billing/payments/{payment.pk}/cancel/")
    assert Payment.objects.get().status == PaymentStatus.CANCELLED


def test_low_balance_and_subscription_forms(client, user, tenant):
    client.force_login(user)
    assert client.post("/billing/low-balance/", {"low_balance_threshold": "300"}).status_code == 302
    assert Wallet.objects.get(tenant=tenant).low_balance_threshold == Decimal("300.00")
    top_up(tenant, "15000")
    vm = make_vm(tenant, billing_mode="monthly")
    services.subscription_start(event_id=lifecycle(vm, "started", at(2026, 3, 1)).pk)
    subscription = Subscription.objects.get()
    assert client.post(f"/billing/subscriptions/{subscription.pk}/cancel/").status_code == 302
    assert Subscription.objects.get().cancel_at_period_end is True
    api_response = client.post(f"/api/v1/subscriptions/{subscription.pk}/resume/")
    assert api_response.status_code == 200 and api_response.json()["cancel_at_period_end"] is False


@override_settings(LANGUAGE_CODE="en")
def test_ledger_api(api, user, tenant):
    top_up(tenant, "100")
    entries = api(user).get("/api/v1/ledger/").json()["results"]
    assert entries[0]["kind"] == "top_up" and entries[0]["amount"] == "100.00" and entries[0]["package"] is None
