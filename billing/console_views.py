"""Staff pages under /console/billing/ (StaffMfaRequiredMiddleware guards them): confirm bank
transfers, adjust wallets and credit limits, enter one-off charges, publish prices.

An adjustment or refund goes through crm's maker-checker (crm.services.credit_propose), like a
credit from the customer 360 page: above the approval threshold, either way, it waits for a second
member of finance or admin staff."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from billing import selectors, services
from billing.forms import AdjustmentForm, CreditLimitForm, OneOffChargeForm, PriceVersionForm
from billing.models import Payment, PaymentStatus
from billing.providers import get_provider
from billing.providers.offline import staff_confirmation_event_id
from crm import console_selectors
from crm import services as crm_services
from crm.models import CreditRequestStatus
from crm.permissions import StaffCapability, console_view
from tenants.forms import add_service_errors
from tenants.models import Tenant


@console_view(StaffCapability.VIEW_BILLING)
def billing_console(request):
    pending = Payment.objects.filter(status=PaymentStatus.PENDING).select_related("tenant", "offer", "created_by")
    query = request.GET.get("q", "").strip()
    if query:
        pending = pending.filter(reference__icontains=query) | pending.filter(tenant__slug__icontains=query)
    recent = Payment.objects.exclude(status=PaymentStatus.PENDING).select_related("tenant").order_by("-created_at")
    return render(
        request,
        "billing/console/home.html",
        {
            "pending": Paginator(pending.order_by("created_at"), 50).get_page(request.GET.get("page")),
            "recent": recent[:20],
            "q": query,
            "price_book": selectors.price_book_in_force(),
        },
    )


@console_view(StaffCapability.VIEW_BILLING, write=StaffCapability.MANAGE_BILLING)
@require_POST
def payment_confirm(request, pk):
    payment = get_object_or_404(Payment, pk=pk)
    if not get_provider(payment.provider).confirmed_by_staff:
        messages.error(request, _("This payment is confirmed by its provider, not by staff."))
        return redirect("console_billing")
    payment = services.payment_fulfil(
        payment_id=payment.pk, provider_event_id=staff_confirmation_event_id(payment.pk), actor=request.user
    )
    messages.success(
        request,
        _("Payment %(reference)s of %(tenant)s confirmed: ¥%(amount)s credited.")
        % {"reference": payment.reference, "tenant": payment.tenant.name, "amount": payment.amount},
    )
    return redirect("console_billing")


@console_view(StaffCapability.VIEW_BILLING, write=StaffCapability.MANAGE_BILLING)
@require_POST
def payment_cancel(request, pk):
    payment = get_object_or_404(Payment, pk=pk)
    try:
        services.payment_cancel(payment=payment, actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
    else:
        messages.success(request, _("Payment %(reference)s cancelled.") % {"reference": payment.reference})
    return redirect("console_billing")


@console_view(StaffCapability.VIEW_CUSTOMERS, write=StaffCapability.MANAGE_BILLING, tenant_kwarg="slug")
def tenant_wallet(request, slug):
    tenant = get_object_or_404(Tenant, slug=slug)
    forms = {
        "adjust": AdjustmentForm(prefix="adjust"),
        "limit": CreditLimitForm(prefix="limit", initial={"credit_limit": selectors.wallet_of(tenant).credit_limit}),
        "charge": OneOffChargeForm(prefix="charge"),
    }
    if request.method == "POST":
        which = request.POST.get("form")
        if which in forms:
            form = {"adjust": AdjustmentForm, "limit": CreditLimitForm, "charge": OneOffChargeForm}[which](
                request.POST, prefix=which
            )
            forms[which] = form
            if form.is_valid():
                data = form.cleaned_data
                try:
                    if which == "adjust":
                        credit = crm_services.credit_propose(tenant=tenant, actor=request.user, **data)
                    elif which == "limit":
                        services.wallet_set_credit_limit(tenant=tenant, actor=request.user, **data)
                    else:
                        services.wallet_charge(tenant=tenant, actor=request.user, strict=False, **data)
                except ValidationError as exc:
                    add_service_errors(form, exc)
                else:
                    if which != "adjust":
                        messages.success(request, _("Saved."))
                    elif credit.status == CreditRequestStatus.PENDING:
                        messages.info(
                            request,
                            _(
                                "¥%(amount)s is above ¥%(threshold)s: nothing is posted until another member of "
                                "finance or admin staff approves it under Credit approvals."
                            )
                            % {"amount": credit.amount, "threshold": crm_services.approval_threshold()},
                        )
                    else:
                        messages.success(
                            request,
                            _("¥%(amount)s posted to the wallet of %(name)s.")
                            % {"amount": credit.amount, "name": tenant.name},
                        )
                    return redirect("console_tenant_wallet", slug=tenant.slug)
    return render(
        request,
        "billing/console/tenant.html",
        {
            "tenant": tenant,
            "summary": selectors.wallet_summary(tenant),
            "ledger": selectors.ledger_of(tenant)[:50],
            "invoices": selectors.invoices_of(tenant)[:12],
            "pending_credits": console_selectors.credits_pending(request.user).filter(tenant=tenant),
            "threshold": crm_services.approval_threshold(),
            **{f"{name}_form": form for name, form in forms.items()},
        },
    )


@console_view(StaffCapability.VIEW_BILLING, write=StaffCapability.MANAGE_BILLING)
def price_book(request):
    form = PriceVersionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            version = services.price_book_version_create(
                actor=request.user,
                effective_from=form.cleaned_data["effective_from"],
                prices=form.cleaned_data["prices"],
                note=form.cleaned_data["note"],
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            messages.success(
                request,
                _("Prices published; they take effect %(when)s.")
                % {"when": f"{version.effective_from:%Y-%m-%d %H:%M}"},
            )
            return redirect("console_price_book")
    return render(
        request, "billing/console/price_book.html", {"versions": selectors.price_book_versions()[:20], "form": form}
    )
