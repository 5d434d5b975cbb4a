"""Stripe Checkout and its webhooks: the real stripe client against a local fake of the API, and
webhook bodies signed in the test exactly as Stripe signs them. Credit appears once, only from a
verified webhook, whatever the order or number of deliveries."""

import itertools
import json
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client
from django.utils import timezone

from billing import selectors, services
from billing.models import (
    CreditGrant,
    LedgerEntry,
    PackageOffer,
    Payment,
    PaymentEvent,
    PaymentStatus,
    PriceBookVersion,
)
from billing.providers import get_provider
from billing.providers.base import CheckoutRequest, PaymentProviderError
from billing.providers.stripe import amount_in_fen
from billing.verification import verify_balances
from tenants.models import AuditEvent
from tests.factories import make_tenant
from tests.stripe_fake import FakeStripe, checkout_event, signature_header
from tests.test_billing_helpers import owner_membership_of
from tests.test_settings import manage

SECRET = "whsec_portal_test_secret"
API_KEY = "sk_test_portal"
WEBHOOK = "/billing/stripe/webhook/"
BASE_URL = "https://portal.example.com"

COMPLETED = "checkout.session.completed"
ASYNC_SUCCEEDED = "checkout.session.async_payment_succeeded"
ASYNC_FAILED = "checkout.session.async_payment_failed"
EXPIRED = "checkout.session.expired"


@pytest.fixture
def fake_stripe(settings):
    with FakeStripe() as fake:
        settings.PORTAL_PAYMENT_PROVIDER = "stripe"
        settings.STRIPE_SECRET_KEY = API_KEY
        settings.STRIPE_WEBHOOK_SECRET = SECRET
        settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS = 300
        settings.STRIPE_API_BASE = fake.url
        settings.STRIPE_PAYMENT_METHODS = ["card"]
        settings.STRIPE_MAX_NETWORK_RETRIES = 2
        settings.PORTAL_BASE_URL = BASE_URL
        yield fake


@pytest.fixture
def stripe_client():
    """Stripe's side of the webhook: no session, no cookie, CSRF enforced as for any outsider."""
    return Client(enforce_csrf_checks=True)


def top_up_by_stripe(tenant, amount: str = "1234.56") -> Payment:
    membership = owner_membership_of(tenant)
    return services.top_up_create(membership=membership, actor=membership.user, amount=Decimal(amount))


def deliver(client, payload: str, *, secret: str = SECRET, timestamp: int | None = None):
    return client.post(
        WEBHOOK,
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature_header(payload, secret, timestamp),
    )


def event_for(fake, payment, event_type, *, payment_status="paid", **changes) -> str:
    return checkout_event(
        fake.sessions[payment.provider_reference], event_type, payment_status=payment_status, **changes
    )


def cash(tenant) -> Decimal:
    return selectors.wallet_of(tenant).cash_balance


def credited(payment) -> Decimal:
    return sum(LedgerEntry.objects.filter(payment=payment).values_list("amount", flat=True), Decimal("0.00"))


def test_a_stripe_key_selects_stripe_and_needs_the_webhook_secret_to_start():
    refused = manage("check", env={"STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_WEBHOOK_SECRET": ""})
    assert refused.returncode != 0 and "STRIPE_WEBHOOK_SECRET" in refused.stderr
    shown = "from django.conf import settings as s; print(s.PORTAL_PAYMENT_PROVIDER, s.STRIPE_PAYMENT_METHODS)"
    started = manage(
        "shell",
        "-c",
        shown,
        env={
            "STRIPE_SECRET_KEY": "sk_test_x",
            "STRIPE_WEBHOOK_SECRET": "whsec_x",
            "STRIPE_PAYMENT_METHODS": "card,alipay",
        },
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip().endswith("stripe ['card', 'alipay']")
    without_key = manage("shell", "-c", shown, env={"STRIPE_SECRET_KEY": ""})
    assert without_key.stdout.strip().endswith("offline ['card']")


# --- Checkout ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_top_up_opens_a_checkout_session_through_the_stripe_client(fake_stripe, client, user, tenant):
    client.force_login(user)
    response = client.post("/billing/top-up/", {"amount": "1234.56"})
    payment = Payment.objects.get()
    session = fake_stripe.sessions[payment.provider_reference]
    assert response.status_code == 302 and response["Location"] == session["url"] == payment.checkout_url
    assert payment.provider == "stripe" and payment.status == PaymentStatus.PENDING

    [call] = fake_stripe.calls
    assert call.authorization == f"Bearer {API_KEY}"
    assert call.idempotency_key == f"portal-checkout-{payment.pk}"
    params = call.params
    assert params["mode"] == "payment"
    assert params["line_items"] == [
        {
            "quantity": "1",
            "price_data": {"currency": "cny", "unit_amount": "123456", "product_data": {"name": "Top-up ¥1234.56"}},
        }
    ]
    assert params["payment_method_types"] == ["card"]
    assert "payment_method_options" not in params
    metadata = {
        "portal_payment_id": str(payment.pk),
        "portal_tenant": tenant.slug,
        "portal_reference": payment.reference,
    }
    assert params["metadata"] == metadata
    assert params["payment_intent_data"]["metadata"] == metadata
    assert params["client_reference_id"] == str(payment.pk)
    assert params["customer_email"] == user.email
    assert params["success_url"] == f"{BASE_URL}/billing/payments/{payment.pk}/"
    assert params["cancel_url"] == f"{BASE_URL}/billing/"
    assert not LedgerEntry.objects.exists()


@pytest.mark.django_db
def test_alipay_and_wechat_pay_are_offered_when_configured(fake_stripe, settings, tenant):
    settings.STRIPE_PAYMENT_METHODS = ["card", "alipay", "wechat_pay"]
    top_up_by_stripe(tenant, "500")
    params = fake_stripe.calls[-1].params
    assert params["payment_method_types"] == ["card", "alipay", "wechat_pay"]
    assert params["payment_method_options"] == {"wechat_pay": {"client": "web"}}
    assert params["line_items"][0]["price_data"]["unit_amount"] == "50000"


@pytest.mark.django_db
def test_one_payment_never_makes_two_sessions(fake_stripe, tenant):
    payment = top_up_by_stripe(tenant, "300")
    request = CheckoutRequest(
        payment_id=str(payment.pk),
        reference=payment.reference,
        tenant_slug=tenant.slug,
        tenant_name=tenant.name,
        amount=payment.amount,
        currency="CNY",
        description="Top-up ¥300.00",
        customer_email=payment.created_by.email,
        success_url=f"{BASE_URL}/billing/payments/{payment.pk}/",
        cancel_url=f"{BASE_URL}/billing/",
    )
    again = get_provider("stripe").create_checkout(request)  # a double click reaching the provider twice
    assert again.provider_reference == payment.provider_reference and again.url == payment.checkout_url
    assert len(fake_stripe.sessions) == 1
    assert {call.idempotency_key for call in fake_stripe.calls} == {f"portal-checkout-{payment.pk}"}


@pytest.mark.django_db
def test_a_lost_response_is_retried_with_the_same_key_and_makes_one_session(fake_stripe, tenant):
    fake_stripe.fail_next(500, "api_error", "Something went wrong on Stripe's end.", after_creating=True)
    payment = top_up_by_stripe(tenant, "300")
    assert len(fake_stripe.calls) == 2  # the SDK retried
    assert fake_stripe.calls[0].idempotency_key == fake_stripe.calls[1].idempotency_key
    assert list(fake_stripe.sessions) == [payment.provider_reference]


@pytest.mark.django_db
def test_stripe_refusing_the_session_cancels_the_payment(fake_stripe, tenant):
    fake_stripe.fail_next(400, "invalid_request_error", "The payment method type wechat_pay is not activated.")
    with pytest.raises(ValidationError, match="wechat_pay is not activated"):
        top_up_by_stripe(tenant, "300")
    assert Payment.objects.get().status == PaymentStatus.CANCELLED
    assert not fake_stripe.sessions


@pytest.mark.django_db
def test_amounts_go_to_stripe_as_whole_fen(fake_stripe, settings, tenant):
    assert amount_in_fen(Decimal("1234.56")) == 123456 and isinstance(amount_in_fen(Decimal("0.10")), int)
    with pytest.raises(PaymentProviderError):
        amount_in_fen(Decimal("0.001"))
    settings.PORTAL_TOP_UP_MAX = Decimal("2000000")
    with pytest.raises(ValidationError, match=r"999,999\.99"):
        top_up_by_stripe(tenant, "1000000")  # over Stripe's eight digits of fen
    assert not fake_stripe.calls


# --- Webhooks --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_paid_checkout_credits_once(fake_stripe, stripe_client, tenant):
    payment = top_up_by_stripe(tenant)
    payload = event_for(fake_stripe, payment, COMPLETED)
    response = deliver(stripe_client, payload)
    assert response.status_code == 200 and response.json() == {"received": True, "outcome": "fulfilled"}
    replay = deliver(stripe_client, payload)  # Stripe delivers again (e.g. our 200 was lost)
    assert replay.status_code == 200 and replay.json()["outcome"] == "duplicate"
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED
    assert cash(tenant) == Decimal("1234.56")
    [entry] = LedgerEntry.objects.filter(tenant=tenant)
    assert (entry.kind, entry.amount, entry.reference) == ("top_up", Decimal("1234.56"), f"payment:{payment.reference}")
    assert PaymentEvent.objects.get().event_id == json.loads(payload)["id"]
    assert verify_balances([tenant.pk]) == []


def _wrong_secret(payload):
    return {"HTTP_STRIPE_SIGNATURE": signature_header(payload, "whsec_someone_else")}


def _stale(payload):
    return {"HTTP_STRIPE_SIGNATURE": signature_header(payload, SECRET, int(time.time()) - 301)}


def _missing(payload):
    return {}


def _garbled(payload):
    return {"HTTP_STRIPE_SIGNATURE": "t=abc,v1=zzz"}


def _other_scheme(payload):
    return {"HTTP_STRIPE_SIGNATURE": signature_header(payload, SECRET).replace("v1=", "v0=")}


@pytest.mark.django_db
@pytest.mark.parametrize("headers", [_wrong_secret, _stale, _missing, _garbled, _other_scheme])
def test_a_bad_signature_is_a_400_and_changes_nothing(fake_stripe, stripe_client, tenant, headers):
    payment = top_up_by_stripe(tenant)
    payload = event_for(fake_stripe, payment, COMPLETED)
    response = stripe_client.post(WEBHOOK, data=payload, content_type="application/json", **headers(payload))
    assert response.status_code == 400
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.PENDING
    assert not PaymentEvent.objects.exists() and not LedgerEntry.objects.exists() and cash(tenant) == 0


@pytest.mark.django_db
def test_a_body_changed_after_signing_is_a_400(fake_stripe, stripe_client, tenant):
    payment = top_up_by_stripe(tenant, "100")
    payload = event_for(fake_stripe, payment, COMPLETED, payment_status="unpaid")
    header = signature_header(payload, SECRET)
    forged = payload.replace('"payment_status": "unpaid"', '"payment_status": "paid"')
    assert forged != payload
    response = stripe_client.post(WEBHOOK, data=forged, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)
    assert response.status_code == 400
    assert not PaymentEvent.objects.exists() and cash(tenant) == 0


@pytest.mark.django_db
def test_without_a_webhook_secret_nothing_verifies(fake_stripe, settings, stripe_client, tenant):
    payment = top_up_by_stripe(tenant)
    settings.STRIPE_WEBHOOK_SECRET = None
    assert deliver(stripe_client, event_for(fake_stripe, payment, COMPLETED)).status_code == 400
    assert not PaymentEvent.objects.exists() and cash(tenant) == 0


@pytest.mark.django_db
def test_the_webhook_takes_post_only(stripe_client):
    assert stripe_client.get(WEBHOOK).status_code == 405


@pytest.mark.django_db
def test_the_success_page_never_credits(fake_stripe, client, stripe_client, user, tenant):
    client.force_login(user)
    client.post("/billing/top-up/", {"amount": "800"})
    payment = Payment.objects.get()
    success_path = fake_stripe.calls[0].params["success_url"].removeprefix(BASE_URL)
    for _ in range(3):  # the browser comes back, reloads, comes back again
        page = client.get(success_path)
        assert page.status_code == 200 and 'data-status="pending"' in page.content.decode()
    assert cash(tenant) == 0 and not LedgerEntry.objects.exists() and not PaymentEvent.objects.exists()
    deliver(stripe_client, event_for(fake_stripe, payment, COMPLETED))
    assert 'data-status="succeeded"' in client.get(success_path).content.decode()
    assert cash(tenant) == Decimal("800.00")


@pytest.mark.django_db
def test_alipay_completes_unpaid_then_the_async_success_credits_once(fake_stripe, settings, stripe_client, tenant):
    settings.STRIPE_PAYMENT_METHODS = ["card", "alipay", "wechat_pay"]
    payment = top_up_by_stripe(tenant, "2000")
    completed = event_for(fake_stripe, payment, COMPLETED, payment_status="unpaid")
    assert deliver(stripe_client, completed).json()["outcome"] == "awaiting_payment"
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.PENDING and cash(tenant) == 0
    succeeded = event_for(fake_stripe, payment, ASYNC_SUCCEEDED)
    assert deliver(stripe_client, succeeded).json()["outcome"] == "fulfilled"
    for payload in (completed, succeeded):
        assert deliver(stripe_client, payload).json()["outcome"] == "duplicate"
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED
    assert cash(tenant) == Decimal("2000.00") and LedgerEntry.objects.filter(tenant=tenant).count() == 1
    assert PaymentEvent.objects.filter(payment=payment).count() == 2


@pytest.mark.django_db
def test_a_failed_async_payment_credits_nothing(fake_stripe, stripe_client, tenant):
    payment = top_up_by_stripe(tenant, "2000")
    deliver(stripe_client, event_for(fake_stripe, payment, COMPLETED, payment_status="unpaid"))
    response = deliver(stripe_client, event_for(fake_stripe, payment, ASYNC_FAILED, payment_status="unpaid"))
    assert response.status_code == 200 and response.json()["outcome"] == "cancelled"
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.CANCELLED
    assert cash(tenant) == 0 and not LedgerEntry.objects.exists()
    assert AuditEvent.objects.filter(action="billing.payment_failed", target_id=str(payment.pk)).count() == 1


@pytest.mark.django_db
def test_an_expired_session_cancels_a_pending_payment_and_never_uncredits_a_paid_one(
    fake_stripe, stripe_client, tenant
):
    abandoned = top_up_by_stripe(tenant, "100")
    assert deliver(stripe_client, event_for(fake_stripe, abandoned, EXPIRED, payment_status="unpaid")).json() == {
        "received": True,
        "outcome": "cancelled",
    }
    abandoned.refresh_from_db()
    assert abandoned.status == PaymentStatus.CANCELLED

    paid = top_up_by_stripe(tenant, "300")
    deliver(stripe_client, event_for(fake_stripe, paid, COMPLETED))
    late = deliver(stripe_client, event_for(fake_stripe, paid, EXPIRED, payment_status="unpaid"))
    assert late.json()["outcome"] == "already_succeeded"
    paid.refresh_from_db()
    assert paid.status == PaymentStatus.SUCCEEDED and cash(tenant) == Decimal("300.00")


SCENARIOS = {
    "async success": (
        [(COMPLETED, "unpaid"), (ASYNC_SUCCEEDED, "paid")],
        PaymentStatus.SUCCEEDED,
        Decimal("1234.56"),
    ),
    "async failure": ([(COMPLETED, "unpaid"), (ASYNC_FAILED, "unpaid")], PaymentStatus.CANCELLED, Decimal("0.00")),
    "paid, reported twice, then expiry": (
        [(COMPLETED, "paid"), (ASYNC_SUCCEEDED, "paid"), (EXPIRED, "unpaid")],
        PaymentStatus.SUCCEEDED,
        Decimal("1234.56"),
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_events_in_any_order_converge(fake_stripe, stripe_client, tenant, scenario):
    events, status, amount = SCENARIOS[scenario]
    outcomes = set()
    for order in itertools.permutations(events):
        payment = top_up_by_stripe(tenant)
        for event_type, payment_status in order:
            response = deliver(
                stripe_client, event_for(fake_stripe, payment, event_type, payment_status=payment_status)
            )
            assert response.status_code == 200
        payment.refresh_from_db()
        outcomes.add((payment.status, credited(payment), PaymentEvent.objects.filter(payment=payment).count()))
    assert outcomes == {(status, amount, len(events))}
    assert verify_balances([tenant.pk]) == []


@pytest.mark.django_db
def test_a_package_bought_through_stripe_grants_price_and_bonus(fake_stripe, api, stripe_client, user, tenant):
    version = PriceBookVersion.objects.order_by("-effective_from").first()
    offer = PackageOffer.objects.get(version=version, price=Decimal("5000.00"))
    response = api(user).post(f"/api/v1/packages/{offer.pk}/purchase/", {"validity_months": 6}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["provider"] == "stripe" and body["checkout_url"].startswith("https://checkout.stripe.com/")
    item = fake_stripe.calls[0].params["line_items"][0]
    assert item["price_data"]["unit_amount"] == "500000"
    assert item["price_data"]["product_data"]["name"] == f"{offer.name_en} (6 months)"
    assert not CreditGrant.objects.exists()

    payment = Payment.objects.get(pk=body["id"])
    payload = event_for(fake_stripe, payment, COMPLETED)
    deliver(stripe_client, payload)
    deliver(stripe_client, payload)
    grant = CreditGrant.objects.get()
    assert grant.granted == grant.remaining == Decimal("5500.00")
    assert timezone.now() + timedelta(days=180) < grant.expires_at < timezone.now() + timedelta(days=186)
    entries = {e.kind: e.amount for e in LedgerEntry.objects.filter(tenant=tenant)}
    assert entries == {"package_grant": Decimal("5000.00"), "bonus": Decimal("500.00")}
    assert cash(tenant) == 0
    assert selectors.wallet_summary(tenant).package_balance == Decimal("5500.00")
    assert verify_balances([tenant.pk]) == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("changes", "problem"),
    [({"amount_total": 123455}, "123455 cny is not 123456 cny"), ({"currency": "usd"}, "123456 usd is not 123456 cny")],
)
def test_an_amount_or_currency_mismatch_is_refused_audited_and_acknowledged(
    fake_stripe, stripe_client, tenant, changes, problem, caplog
):
    payment = top_up_by_stripe(tenant)
    payload = event_for(fake_stripe, payment, COMPLETED, **changes)
    response = deliver(stripe_client, payload)
    assert response.status_code == 200 and response.json()["outcome"] == "refused"  # Stripe stops retrying
    assert deliver(stripe_client, payload).json()["outcome"] == "duplicate"
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.PENDING and cash(tenant) == 0 and not LedgerEntry.objects.exists()
    [audit] = AuditEvent.objects.filter(action="billing.payment_refused")
    assert audit.target_id == str(payment.pk) and audit.after["problems"] == [problem]
    assert any(r.levelname == "ERROR" and payment.reference in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "forge",
    [
        # the other tenant's payment id in an event about our session
        lambda ours, theirs: {
            "metadata": {**ours["metadata"], "portal_payment_id": theirs["metadata"]["portal_payment_id"]}
        },
        # their payment id and reference, our tenant and session
        lambda ours, theirs: {"metadata": {**theirs["metadata"], "portal_tenant": ours["metadata"]["portal_tenant"]}},
        # everything theirs but our session (and its amount)
        lambda ours, theirs: {
            "metadata": theirs["metadata"],
            "client_reference_id": theirs["client_reference_id"],
            "id": ours["id"],
        },
    ],
)
def test_a_webhook_cannot_touch_another_tenants_payment(fake_stripe, stripe_client, forge):
    ours = top_up_by_stripe(make_tenant(name="Ours"), "1000")
    theirs = top_up_by_stripe(make_tenant(name="Theirs"), "1000")
    ours_session, theirs_session = (
        fake_stripe.sessions[ours.provider_reference],
        fake_stripe.sessions[theirs.provider_reference],
    )
    payload = checkout_event(ours_session, COMPLETED, payment_status="paid", **forge(ours_session, theirs_session))
    assert deliver(stripe_client, payload).json()["outcome"] == "refused"
    for payment in (ours, theirs):
        payment.refresh_from_db()
        assert payment.status == PaymentStatus.PENDING and cash(payment.tenant) == 0
    assert not LedgerEntry.objects.exists()
    # the genuine event for their payment still credits them, and only them
    deliver(stripe_client, event_for(fake_stripe, theirs, COMPLETED))
    assert (cash(theirs.tenant), cash(ours.tenant)) == (Decimal("1000.00"), 0)


@pytest.mark.django_db
def test_a_stripe_event_cannot_pay_an_offline_payment(fake_stripe, settings, stripe_client, tenant):
    stripe_payment = top_up_by_stripe(tenant, "500")
    settings.PORTAL_PAYMENT_PROVIDER = "offline"
    offline = top_up_by_stripe(tenant, "500")
    session = fake_stripe.sessions[stripe_payment.provider_reference]
    metadata = {
        "portal_payment_id": str(offline.pk),
        "portal_tenant": tenant.slug,
        "portal_reference": offline.reference,
    }
    payload = checkout_event(
        session, COMPLETED, payment_status="paid", metadata=metadata, client_reference_id=str(offline.pk)
    )
    assert deliver(stripe_client, payload).json()["outcome"] == "refused"
    offline.refresh_from_db()
    assert offline.status == PaymentStatus.PENDING and cash(tenant) == 0


@pytest.mark.django_db
def test_other_events_and_foreign_sessions_are_acknowledged_and_ignored(fake_stripe, stripe_client, tenant):
    payment = top_up_by_stripe(tenant)
    session = fake_stripe.sessions[payment.provider_reference]
    other_type = json.dumps(
        {"id": "evt_pi", "object": "event", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}
    )
    not_ours = checkout_event(session, COMPLETED, payment_status="paid", metadata={})
    unknown = checkout_event(
        session, COMPLETED, payment_status="paid", metadata={**session["metadata"], "portal_payment_id": "0" * 32}
    )
    outcomes = [deliver(stripe_client, payload).json()["outcome"] for payload in (other_type, not_ours, unknown)]
    assert outcomes == ["ignored", "ignored", "unknown_payment"]
    assert not PaymentEvent.objects.exists() and cash(tenant) == 0
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.PENDING


# --- Concurrent deliveries, on PostgreSQL ----------------------------------------------------------


def deliver_all_at_once(payloads: list[str]) -> list[int]:
    barrier = threading.Barrier(len(payloads))
    statuses: list[int | None] = [None] * len(payloads)

    def run(i):
        try:
            client = Client(enforce_csrf_checks=True)
            barrier.wait()
            statuses[i] = deliver(client, payloads[i]).status_code
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_one_event_delivered_by_ten_threads_at_once_credits_once(fake_stripe):
    tenant = make_tenant(name="Webhook race")
    payment = top_up_by_stripe(tenant, "500")
    payload = event_for(fake_stripe, payment, COMPLETED)
    assert deliver_all_at_once([payload] * 10) == [200] * 10
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED
    assert cash(tenant) == Decimal("500.00")
    assert LedgerEntry.objects.filter(tenant=tenant, kind="top_up").count() == 1
    assert PaymentEvent.objects.filter(payment=payment).count() == 1
    assert verify_balances([tenant.pk]) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_completed_and_async_succeeded_racing_credit_once(fake_stripe):
    tenant = make_tenant(name="Webhook race two")
    payment = top_up_by_stripe(tenant, "700")
    completed = event_for(fake_stripe, payment, COMPLETED)
    succeeded = event_for(fake_stripe, payment, ASYNC_SUCCEEDED)
    assert deliver_all_at_once([completed, succeeded] * 5) == [200] * 10
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED
    assert cash(tenant) == Decimal("700.00") and credited(payment) == Decimal("700.00")
    assert PaymentEvent.objects.filter(payment=payment).count() == 2
