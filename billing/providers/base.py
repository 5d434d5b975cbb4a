"""The payment provider interface: plain dataclasses in and out, never ORM objects.

A provider starts a checkout for a Payment (create_checkout) and later tells the portal that the
payment succeeded, through billing.services.payment_fulfil(payment_id=…, provider_event_id=…):
the event id is stored unique in the same transaction as the credit, so a replayed webhook or a
double-clicked staff confirmation credits once. A Stripe provider (billing/providers/stripe.py,
the only module to import the SDK) implements the same class and verifies webhook signatures
before calling payment_fulfil.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True)
class CheckoutRequest:
    payment_id: str
    reference: str
    tenant_slug: str
    tenant_name: str
    amount: Decimal
    currency: str
    description: str
    customer_email: str
    success_url: str
    cancel_url: str


@dataclass(frozen=True)
class BankTransferInstructions:
    account_name: str
    bank_name: str
    account_number: str
    amount: Decimal
    currency: str
    reference: str
    note: str = ""


@dataclass(frozen=True)
class CheckoutResult:
    """Where the customer pays: a hosted checkout URL, or bank-transfer instructions."""

    provider_reference: str
    url: str = ""
    bank_transfer: BankTransferInstructions | None = None
    extra: dict = field(default_factory=dict)


class PaymentProviderError(Exception):
    """The provider refused or could not be reached; the payment is left cancelled."""


class PaymentProvider(ABC):
    code: str
    confirmed_by_staff: bool = False

    @abstractmethod
    def create_checkout(self, request: CheckoutRequest) -> CheckoutResult:
        """Start paying for one payment. Must be safe to call once per payment id."""
