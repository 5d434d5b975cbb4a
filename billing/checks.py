"""Admission checks other modules call before starting work that costs money.

provisioning runs vm_order_can_pay through settings.PORTAL_ORDER_CHECKS; the task scheduler calls
task_can_pay through settings.PORTAL_TASK_PAYMENT_CHECK. With PORTAL_BILLING_ENFORCE off (the test
suite of other modules, demos) every check passes.
"""

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.translation import gettext as _

from billing.models import CreditGrant, Wallet
from billing.pricing import MissingPrice, PriceBook
from provisioning.models import BillingMode


def _wallet(tenant) -> Wallet:
    return Wallet.objects.filter(tenant=tenant).first() or Wallet(tenant=tenant)


def _package_credit(tenant) -> Decimal:
    grants = CreditGrant.objects.filter(tenant=tenant, remaining__gt=0, expires_at__gt=timezone.now())
    return sum(grants.values_list("remaining", flat=True), Decimal("0.00"))


def vm_order_can_pay(*, tenant, plan, billing_mode: str) -> None:
    """Monthly and yearly VMs: the wallet covers the first period. On-demand: the tenant has
    pay-as-you-go credit for at least one hour. Package credit pays for task hosting only."""
    if not settings.PORTAL_BILLING_ENFORCE:
        return
    wallet = _wallet(tenant)
    available = wallet.cash_balance + wallet.credit_limit
    try:
        price = PriceBook().plan_price(plan.code, timezone.now())
    except MissingPrice as exc:
        raise ValidationError({"plan": _("This plan has no price yet and cannot be ordered.")}) from exc
    if billing_mode in (BillingMode.MONTHLY, BillingMode.YEARLY):
        first = price.yearly if billing_mode == BillingMode.YEARLY else price.monthly
        if available < first:
            raise ValidationError(
                {
                    "billing_mode": _(
                        "The first period costs ¥%(price)s but your balance covers ¥%(available)s. "
                        "Top up on the Billing page, then order again."
                    )
                    % {"price": first, "available": max(available, Decimal("0.00"))}
                }
            )
    elif available < price.hourly:
        raise ValidationError(
            {
                "billing_mode": _(
                    "On-demand VMs are paid from your balance as they run (¥%(rate)s an hour) and it has no "
                    "credit left. Top up on the Billing page (compute packages pay for tasks only)."
                )
                % {"rate": price.hourly}
            }
        )


def task_can_pay(*, tenant) -> tuple[bool, str]:
    """Whether a task of the tenant may start: package credit, cash or credit limit left."""
    if not settings.PORTAL_BILLING_ENFORCE:
        return True, ""
    wallet = _wallet(tenant)
    if wallet.cash_balance + wallet.credit_limit > 0 or _package_credit(tenant) > 0:
        return True, ""
    return False, _("Your credit has run out: buy a compute package or top up to run tasks.")
