"""Billing pages: wallet, packages, subscriptions, invoices, statements. Thin: forms in, services out."""

from datetime import timedelta

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from billing import selectors, services
from billing.forms import LowBalanceForm, PackageBuyForm, StatementForm, TopUpForm
from billing.models import Invoice, PackageOffer, Payment, PaymentStatus
from billing.pdf import invoice_pdf_bytes
from provisioning.selectors import plans_with_availability
from tenants.roles import Capability, role_can
from tenants.views import run_action, tenant_page


def _to_payment(payment: Payment):
    """To the provider's checkout, or to our page with the bank-transfer details."""
    if payment.checkout_url:
        return redirect(payment.checkout_url)
    return redirect("billing_payment", pk=payment.pk)


@tenant_page(Capability.VIEW_BILLING)
def billing_home(request):
    tenant = request.membership.tenant
    today = selectors.today_of(tenant)
    wallet = selectors.wallet_of(tenant)
    return render(
        request,
        "billing/home.html",
        {
            "summary": selectors.wallet_summary(tenant),
            "can_manage": role_can(request.membership.role, Capability.MANAGE_BILLING),
            "price_book": selectors.price_book_in_force(),
            "plans": plans_with_availability(),
            "invoices": selectors.invoices_of(tenant)[:24],
            "subscriptions": selectors.subscriptions_of(tenant).exclude(status="ended")[:50],
            "payments": selectors.payments_of(tenant).filter(status=PaymentStatus.PENDING)[:20],
            "ledger": selectors.ledger_of(tenant)[:20],
            "low_balance_form": LowBalanceForm(initial={"low_balance_threshold": wallet.low_balance_threshold}),
            "top_up_form": TopUpForm(),
            "statement_form": StatementForm(initial={"start": today.replace(day=1), "end": today + timedelta(days=1)}),
        },
    )


@tenant_page(Capability.MANAGE_BILLING)
@require_POST
def top_up(request):
    form = TopUpForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Enter an amount in yuan, e.g. 1000."))
        return redirect("billing")
    try:
        payment = services.top_up_create(
            membership=request.membership, actor=request.user, amount=form.cleaned_data["amount"]
        )
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
        return redirect("billing")
    return _to_payment(payment)


@tenant_page(Capability.MANAGE_BILLING)
@require_POST
def package_buy(request, pk):
    offer = get_object_or_404(PackageOffer, pk=pk)
    form = PackageBuyForm(request.POST)
    months = form.cleaned_data.get("validity_months") if form.is_valid() else None
    try:
        payment = services.package_purchase(
            membership=request.membership, actor=request.user, offer=offer, validity_months=months
        )
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
        return redirect("billing")
    return _to_payment(payment)


@tenant_page(Capability.MANAGE_BILLING)
@require_POST
def low_balance(request):
    form = LowBalanceForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Enter an amount of zero or more, or leave it empty."))
        return redirect("billing")
    run_action(
        request,
        lambda: services.wallet_set_low_balance_threshold(
            membership=request.membership, actor=request.user, threshold=form.cleaned_data["low_balance_threshold"]
        ),
        _("Low-balance warning saved."),
    )
    return redirect("billing")


@tenant_page(Capability.VIEW_BILLING)
def payment_detail(request, pk):
    try:
        payment = selectors.payment_of(request.membership.tenant, pk)
    except Payment.DoesNotExist as exc:
        raise Http404 from exc
    return render(request, "billing/payment.html", {"payment": payment})


@tenant_page(Capability.MANAGE_BILLING)
@require_POST
def payment_cancel(request, pk):
    try:
        payment = selectors.payment_of(request.membership.tenant, pk)
    except Payment.DoesNotExist as exc:
        raise Http404 from exc
    run_action(
        request,
        lambda: services.payment_cancel(payment=payment, actor=request.user, membership=request.membership),
        _("Payment %(reference)s cancelled.") % {"reference": payment.reference},
    )
    return redirect("billing")


@tenant_page(Capability.MANAGE_BILLING)
@require_POST
def subscription_action(request, pk, action):
    subscription = get_object_or_404(selectors.subscriptions_of(request.membership.tenant), pk=pk)
    if action not in ("cancel", "resume"):
        raise Http404
    cancel = action == "cancel"
    run_action(
        request,
        lambda: services.subscription_cancel(
            membership=request.membership, actor=request.user, subscription=subscription, cancel=cancel
        ),
        _("The subscription ends at the end of its paid period.") if cancel else _("The subscription will renew."),
    )
    return redirect("billing")


def _invoice(request, pk) -> Invoice:
    try:
        return selectors.invoice_of(request.membership.tenant, pk)
    except Invoice.DoesNotExist as exc:
        raise Http404 from exc


def _invoice_context(invoice: Invoice) -> dict:
    return {"invoice": invoice, "lines": list(invoice.lines.all()), "paid": selectors.invoice_payments(invoice)}


@tenant_page(Capability.VIEW_BILLING)
def invoice_detail(request, pk):
    return render(request, "billing/invoice.html", _invoice_context(_invoice(request, pk)))


@tenant_page(Capability.VIEW_BILLING)
def invoice_print(request, pk):
    return render(request, "billing/invoice_print.html", _invoice_context(_invoice(request, pk)))


@tenant_page(Capability.VIEW_BILLING)
def invoice_pdf(request, pk):
    invoice = _invoice(request, pk)
    response = HttpResponse(invoice_pdf_bytes(invoice), content_type="application/pdf")
    name = invoice.number or f"draft-{invoice.period_start:%Y-%m}"
    response["Content-Disposition"] = f'inline; filename="{name}.pdf"'
    return response
