"""Bank transfer confirmed by staff: the default provider when no Stripe key is set.

The customer gets the bank details and a reference to quote; staff confirm the transfer on
/console/billing/, which calls payment_fulfil with an event id derived from the payment, so the
credit appears once however often the confirmation is sent.
"""

from django.conf import settings

from billing.providers.base import BankTransferInstructions, CheckoutRequest, CheckoutResult, PaymentProvider


class OfflineProvider(PaymentProvider):
    code = "offline"
    confirmed_by_staff = True

    def create_checkout(self, request: CheckoutRequest) -> CheckoutResult:
        return CheckoutResult(
            provider_reference=request.reference,
            bank_transfer=BankTransferInstructions(
                account_name=settings.PORTAL_BANK_ACCOUNT_NAME,
                bank_name=settings.PORTAL_BANK_NAME,
                account_number=settings.PORTAL_BANK_ACCOUNT_NUMBER,
                amount=request.amount,
                currency=request.currency,
                reference=request.reference,
                note=f"Quote {request.reference} so we can match the transfer to your order.",
            ),
        )


def staff_confirmation_event_id(payment_id) -> str:
    """One confirmation per payment: the same id however many times staff press confirm."""
    return f"staff-confirmed:{payment_id}"
