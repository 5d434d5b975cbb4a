"""Stripe Checkout: cards, and Alipay / WeChat Pay where the Stripe account allows them.

The only module that imports the Stripe SDK. It starts a hosted Checkout Session for a portal
payment and turns a signed webhook body into a StripeEvent; it never credits anything itself.
Credit comes from billing.webhooks, which applies verified events through
billing.services.payment_fulfil — never from the success page the browser returns to.

Amounts go to Stripe as integers in fen (CNY's minor unit); a Decimal that is not a whole number
of fen is refused rather than rounded. Every session is created with an idempotency key derived
from the portal payment id, so a retried request or a repeated call for the same payment gets the
same session back instead of a second one.
"""

import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal

import stripe
from django.conf import settings

from billing.providers.base import CheckoutRequest, CheckoutResult, PaymentProvider, PaymentProviderError

log = logging.getLogger("billing.stripe")

# The keys under which a Checkout Session carries the portal's payment; Stripe signs them back to
# us in every checkout.session.* webhook.
METADATA_PAYMENT_ID = "portal_payment_id"
METADATA_TENANT = "portal_tenant"
METADATA_REFERENCE = "portal_reference"

# Stripe takes at most eight digits in the minor unit per amount (¥999,999.99).
MAX_AMOUNT_FEN = 99_999_999


class WebhookRejected(Exception):
    """The body is not a Stripe event signed with our webhook secret inside the tolerance window."""


@dataclass(frozen=True)
class StripeEvent:
    """What the portal needs from a verified checkout.session.* webhook."""

    event_id: str
    type: str
    livemode: bool
    session_id: str = ""
    payment_id: str = ""
    tenant_slug: str = ""
    reference: str = ""
    client_reference_id: str = ""
    amount_total: int | None = None
    currency: str = ""
    payment_status: str = ""


def amount_in_fen(amount: Decimal) -> int:
    """A CNY Decimal as whole fen. Exact: a fraction of a fen is an error, never rounded away."""
    fen = Decimal(amount) * 100
    if fen != fen.to_integral_value():
        raise PaymentProviderError(f"{amount} is not a whole number of fen.")
    return int(fen)


def checkout_idempotency_key(payment_id: str) -> str:
    """One Checkout Session per portal payment, however often its creation is sent."""
    return f"portal-checkout-{payment_id}"


def checkout_session_params(request: CheckoutRequest) -> dict:
    """The Checkout Session for one portal payment (mode payment, one line item)."""
    fen = amount_in_fen(request.amount)
    if not 0 < fen <= MAX_AMOUNT_FEN:
        raise PaymentProviderError(f"Stripe takes ¥0.01 to ¥{Decimal(MAX_AMOUNT_FEN) / 100:,} in one payment.")
    methods = list(dict.fromkeys(settings.STRIPE_PAYMENT_METHODS))
    metadata = {
        METADATA_PAYMENT_ID: request.payment_id,
        METADATA_TENANT: request.tenant_slug,
        METADATA_REFERENCE: request.reference,
    }
    params: dict = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": request.currency.lower(),
                    "unit_amount": fen,
                    "product_data": {"name": request.description},
                },
            }
        ],
        "payment_method_types": methods,
        "client_reference_id": request.payment_id,
        "metadata": metadata,
        # The PaymentIntent carries the same ids, so a refund or dispute traces back to the payment.
        "payment_intent_data": {"metadata": metadata, "description": f"{request.reference} {request.description}"},
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
    }
    if "wechat_pay" in methods:
        params["payment_method_options"] = {"wechat_pay": {"client": "web"}}
    if request.customer_email:
        params["customer_email"] = request.customer_email
    return params


class StripeProvider(PaymentProvider):
    code = "stripe"

    def _client(self) -> stripe.StripeClient:
        if not settings.STRIPE_SECRET_KEY:
            log.error("PORTAL_PAYMENT_PROVIDER is stripe but STRIPE_SECRET_KEY is not set")
            raise PaymentProviderError("Stripe is not configured (STRIPE_SECRET_KEY is not set).")
        return stripe.StripeClient(
            settings.STRIPE_SECRET_KEY,
            base_addresses={"api": settings.STRIPE_API_BASE},
            max_network_retries=settings.STRIPE_MAX_NETWORK_RETRIES,
            http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_SECONDS),
        )

    def create_checkout(self, request: CheckoutRequest) -> CheckoutResult:
        params = checkout_session_params(request)
        try:
            session = self._client().v1.checkout.sessions.create(
                params, {"idempotency_key": checkout_idempotency_key(request.payment_id)}
            )
        except stripe.StripeError as exc:
            log.warning("Stripe refused a checkout session for payment %s: %s", request.payment_id, exc)
            raise PaymentProviderError(exc.user_message or "Stripe could not start the payment.") from exc
        return CheckoutResult(
            provider_reference=session.id,
            url=session.url,
            extra={"payment_method_types": params["payment_method_types"]},
        )

    def parse_webhook(self, *, payload: bytes, signature: str) -> StripeEvent:
        """Verify the Stripe-Signature header (HMAC-SHA256 with STRIPE_WEBHOOK_SECRET, timestamp
        inside STRIPE_WEBHOOK_TOLERANCE_SECONDS) and read the event. Raises WebhookRejected."""
        if not settings.STRIPE_WEBHOOK_SECRET:
            log.error("A Stripe webhook arrived but STRIPE_WEBHOOK_SECRET is not set; it cannot be verified")
            raise WebhookRejected("STRIPE_WEBHOOK_SECRET is not set.")
        try:
            event = stripe.Webhook.construct_event(
                payload,
                signature,
                settings.STRIPE_WEBHOOK_SECRET,
                tolerance=settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS,
            )
        except stripe.SignatureVerificationError as exc:
            raise WebhookRejected(str(exc)) from exc
        except ValueError as exc:  # not UTF-8, not JSON, or not a snapshot event
            raise WebhookRejected(f"Unreadable webhook body: {exc}") from exc
        return _stripe_event(event.to_dict())


def _stripe_event(body: dict) -> StripeEvent:
    if not isinstance(body.get("id"), str) or not isinstance(body.get("type"), str):
        raise WebhookRejected("The event has no id or type.")
    event_type = body["type"]
    common = {"event_id": body["id"], "type": event_type, "livemode": bool(body.get("livemode"))}
    session = (body.get("data") or {}).get("object") or {}
    if not event_type.startswith("checkout.session.") or not isinstance(session, dict):
        return StripeEvent(**common)
    metadata = session.get("metadata") or {}
    amount_total = session.get("amount_total")
    return StripeEvent(
        **common,
        session_id=str(session.get("id") or ""),
        payment_id=_uuid_or_blank(metadata.get(METADATA_PAYMENT_ID)),
        tenant_slug=str(metadata.get(METADATA_TENANT) or ""),
        reference=str(metadata.get(METADATA_REFERENCE) or ""),
        client_reference_id=str(session.get("client_reference_id") or ""),
        amount_total=amount_total if isinstance(amount_total, int) and not isinstance(amount_total, bool) else None,
        currency=str(session.get("currency") or "").lower(),
        payment_status=str(session.get("payment_status") or ""),
    )


def _uuid_or_blank(value) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return ""
