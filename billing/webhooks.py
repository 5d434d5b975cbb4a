"""Stripe webhooks at /billing/stripe/webhook/: the only way a Stripe payment is credited.

An event is applied only after its signature is verified (billing.providers.stripe). Each handled
event id is stored in PaymentEvent — unique per (provider, event id) — in the same transaction as
its effect, under a lock on the payment row, so a replay or a concurrent duplicate delivery
changes nothing. The effects commute, so events in any order end in the same state:

- checkout.session.completed with payment_status "paid", and
  checkout.session.async_payment_succeeded: credit the payment (payment_fulfil; once, whichever
  of the two arrives first; a payment the customer had cancelled on the portal is credited too,
  because the money did arrive);
- checkout.session.completed with "unpaid" (Alipay, WeChat Pay and other delayed methods): the
  payment stays pending until one of the async events;
- checkout.session.async_payment_failed and checkout.session.expired: a pending payment is
  cancelled; a paid one is never un-credited;
- anything else: acknowledged and ignored.

The metadata is trusted only after the signature, and then only as far as it agrees with the
stored Payment: provider, tenant, reference, Checkout Session, amount and currency. An event that
disagrees credits nothing; it is logged, audited and answered 200, because its signed body never
changes and Stripe would otherwise retry it for days and eventually disable the endpoint.
"""

import logging

from django.db import IntegrityError, transaction
from django.http import HttpResponseBadRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing.models import Payment, PaymentEvent, PaymentStatus
from billing.providers import get_provider
from billing.providers.stripe import StripeEvent, WebhookRejected, amount_in_fen
from billing.services import payment_fulfil
from portal import metrics
from tenants.audit import audit_record

log = logging.getLogger("billing.stripe")

PROVIDER = "stripe"
COMPLETED = "checkout.session.completed"
ASYNC_SUCCEEDED = "checkout.session.async_payment_succeeded"
ASYNC_FAILED = "checkout.session.async_payment_failed"
EXPIRED = "checkout.session.expired"
HANDLED = {COMPLETED, ASYNC_SUCCEEDED, ASYNC_FAILED, EXPIRED}


@csrf_exempt
@require_POST
@metrics.count_webhook_failures(PROVIDER)
def stripe_webhook(request):
    try:
        event = get_provider(PROVIDER).parse_webhook(
            payload=request.body, signature=request.headers.get("Stripe-Signature", "")
        )
    except WebhookRejected as exc:
        log.warning("Stripe webhook rejected: %s", exc)
        return HttpResponseBadRequest("Invalid Stripe webhook signature or body.")
    return JsonResponse({"received": True, "outcome": stripe_event_apply(event=event)})


def stripe_event_apply(*, event: StripeEvent) -> str:
    """Apply one verified Stripe event, once. Returns what happened (for the response and logs)."""
    if event.type not in HANDLED:
        return "ignored"
    if not event.payment_id:
        log.info("Stripe event %s (%s) is not for a portal payment; ignored", event.event_id, event.type)
        return "ignored"
    with transaction.atomic():
        payment = (
            Payment.objects.select_for_update(of=("self",)).select_related("tenant").filter(pk=event.payment_id).first()
        )
        if payment is None:
            log.warning("Stripe event %s names payment %s, which does not exist", event.event_id, event.payment_id)
            return "unknown_payment"
        # Events of one payment queue on its row lock, so this check is exact; the unique
        # constraint below still guards the insert.
        if PaymentEvent.objects.filter(provider=PROVIDER, event_id=event.event_id).exists():
            return "duplicate"
        problems = _disagreements(payment, event)
        if problems:
            return _refuse(payment, event, problems)
        if event.type == ASYNC_SUCCEEDED or (event.type == COMPLETED and event.payment_status == "paid"):
            already_paid = payment.status == PaymentStatus.SUCCEEDED
            payment_fulfil(payment_id=payment.pk, provider_event_id=event.event_id)
            return "already_succeeded" if already_paid else "fulfilled"
        if not _record(payment, event):
            return "duplicate"
        if event.type == COMPLETED:
            audit_record(
                actor=None,
                tenant=payment.tenant,
                action="billing.payment_processing",
                target=payment,
                after={"event": event.event_id, "payment_status": event.payment_status},
            )
            return "awaiting_payment"
        if payment.status != PaymentStatus.PENDING:
            return f"already_{payment.status}"
        payment.status = PaymentStatus.CANCELLED
        payment.save(update_fields=["status"])
        audit_record(
            actor=None,
            tenant=payment.tenant,
            action="billing.payment_failed" if event.type == ASYNC_FAILED else "billing.payment_expired",
            target=payment,
            before={"status": PaymentStatus.PENDING},
            after={"status": payment.status, "event": event.event_id},
        )
        return "cancelled"


def _record(payment: Payment, event: StripeEvent) -> bool:
    """Store the event id with the payment; False when it was already stored."""
    try:
        with transaction.atomic():
            PaymentEvent.objects.create(provider=PROVIDER, event_id=event.event_id, payment=payment)
    except IntegrityError:
        return False
    return True


def _disagreements(payment: Payment, event: StripeEvent) -> list[str]:
    problems = []
    if payment.provider != PROVIDER:
        problems.append(f"the payment is paid through {payment.provider}, not Stripe")
    if event.tenant_slug != payment.tenant.slug:
        problems.append(f"tenant {event.tenant_slug!r} is not the payment's tenant {payment.tenant.slug!r}")
    if event.reference != payment.reference:
        problems.append(f"reference {event.reference!r} is not {payment.reference!r}")
    if event.client_reference_id and event.client_reference_id != str(payment.pk):
        problems.append(f"client_reference_id {event.client_reference_id!r} is not the payment id")
    if payment.provider_reference and event.session_id != payment.provider_reference:
        problems.append(f"session {event.session_id!r} is not the payment's session {payment.provider_reference!r}")
    if event.amount_total != amount_in_fen(payment.amount) or event.currency != "cny":
        problems.append(f"{event.amount_total} {event.currency} is not {amount_in_fen(payment.amount)} cny")
    return problems


def _refuse(payment: Payment, event: StripeEvent, problems: list[str]) -> str:
    """Credit nothing, and leave a trail for staff: the money may have to be refunded by hand."""
    if not _record(payment, event):
        return "duplicate"
    log.error(
        "Stripe event %s (%s) for payment %s refused: %s",
        event.event_id,
        event.type,
        payment.reference,
        "; ".join(problems),
    )
    audit_record(
        actor=None,
        tenant=payment.tenant,
        action="billing.payment_refused",
        target=payment,
        after={
            "event": event.event_id,
            "type": event.type,
            "session": event.session_id,
            "amount_total": event.amount_total,
            "currency": event.currency,
            "problems": problems,
        },
    )
    return "refused"
