"""The account-manager console. StaffMfaRequiredMiddleware guards every URL here (staff only, signed
in with a second factor); crm.permissions.console_view checks each page against the staff member's
role, and hides customers an account manager does not manage (404). Thin: forms in, crm services
out, reads from crm.console_selectors."""

import csv
from datetime import datetime, time, timedelta
from decimal import Decimal

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from billing import selectors as billing_selectors
from crm import console_selectors as console
from crm import services as crm_services
from crm.churn import NO_SPEND, SPEND_DROP
from crm.middleware import VIEW_AS_SESSION_KEY
from crm.models import (
    CreditAdjustment,
    CreditRequestStatus,
    CustomerAccount,
    NoteKind,
    UsageReview,
    ViewAsSession,
)
from crm.permissions import StaffCapability as C
from crm.permissions import console_view, forbidden, staff_capabilities, visible_tenants
from crm.selectors import bilingual, tier_change_reason, upsell_for
from provisioning.models import GpuModel
from tenants import selectors, services
from tenants.forms import QuotaForm, add_service_errors
from tenants.models import GpuQuota, Tier, TierCode

PAGE_SIZE = 50
AUDIT_PAGE_SIZE = 50
CHART_COLOURS = ["#0d6efd", "#198754", "#fd7e14", "#6f42c1", "#d63384", "#20c997", "#6c757d", "#ffc107"]


def _churn_label(code: str) -> str:
    return {NO_SPEND: _("No spend for two months"), SPEND_DROP: _("Spend fell below half its average")}.get(code, code)


def _back(request, default: str):
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect(default)


class _Echo:
    """A file-like object whose write returns the line, for streaming CSV."""

    def write(self, value):
        return value


def _csv_response(filename: str, header: list[str], rows) -> StreamingHttpResponse:
    writer = csv.writer(_Echo())

    def lines():
        yield "\ufeff"  # a BOM, so spreadsheet programs read the UTF-8 names right
        yield writer.writerow(header)
        for row in rows:
            yield writer.writerow(row)

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- Customer list -----------------------------------------------------------------------------------


SORT_CHOICES = [
    ("name", gettext_lazy("Name (A–Z)")),
    ("-name", gettext_lazy("Name (Z–A)")),
    ("-tier", gettext_lazy("Tier (highest first)")),
    ("tier", gettext_lazy("Tier (lowest first)")),
    ("-spend_mtd", gettext_lazy("Spend this month (highest first)")),
    ("spend_mtd", gettext_lazy("Spend this month (lowest first)")),
    ("-spend_12m", gettext_lazy("Spend 12 months (highest first)")),
    ("spend_12m", gettext_lazy("Spend 12 months (lowest first)")),
    ("-balance", gettext_lazy("Balance (highest first)")),
    ("balance", gettext_lazy("Balance (lowest first)")),
]


class CustomerFilterForm(forms.Form):
    q = forms.CharField(label=gettext_lazy("Search"), required=False, max_length=100)
    tier = forms.ChoiceField(
        label=gettext_lazy("Tier"), required=False, choices=[("", gettext_lazy("All tiers")), *TierCode.choices]
    )
    manager = forms.ChoiceField(label=gettext_lazy("Account manager"), required=False)
    churn = forms.ChoiceField(
        label=gettext_lazy("Churn risk"),
        required=False,
        choices=[("", gettext_lazy("Any")), ("yes", gettext_lazy("Flagged")), ("no", gettext_lazy("Not flagged"))],
    )
    sort = forms.ChoiceField(label=gettext_lazy("Sort"), required=False, choices=SORT_CHOICES)

    def __init__(self, *args, managers=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["manager"].choices = [
            ("", _("Anyone")),
            ("none", _("No account manager")),
            *[(str(m.pk), m.email) for m in managers],
        ]


@console_view(C.VIEW_CUSTOMERS)
def customers(request):
    form = CustomerFilterForm(request.GET or None, managers=crm_services.account_managers())
    if form.is_bound and not form.is_valid():
        return render(request, "console/customers.html", {"form": form, "page": None}, status=400)
    data = form.cleaned_data if form.is_bound else {}
    filters = {
        "query": data.get("q", ""),
        "tier": data.get("tier", ""),
        "manager": data.get("manager", ""),
        "churn": data.get("churn", ""),
        "sort": data.get("sort") or "name",
    }
    if request.GET.get("export") == "csv":
        return _customers_csv(console.customer_list(request.user, **filters))
    page = console.customer_page(request.user, number=request.GET.get("page"), per_page=PAGE_SIZE, **filters)
    for tenant in page:
        tenant.churn_label = _churn_label(tenant.churn_reason) if tenant.churn_risk else ""
    query = request.GET.copy()
    query.pop("page", None)
    query.pop("export", None)
    return render(
        request,
        "console/customers.html",
        {"form": form, "page": page, "filters": query.urlencode(), "sort": filters["sort"]},
    )


def _money(amount) -> str:
    """Yuan with two places, whatever the database hands back for a sum (SQLite: fewer places)."""
    return f"{Decimal(amount or 0):.2f}"


def _customers_csv(tenants) -> StreamingHttpResponse:
    header = [
        "slug",
        "name",
        "tier",
        "account_manager",
        "spend_mtd",
        "spend_12m",
        "cash_balance",
        "package_credit",
        "running_vms",
        "running_tasks",
        "members",
        "churn_risk",
        "churn_reason",
        "created_at",
    ]
    rows = (
        [
            t.slug,
            t.name,
            t.tier.code,
            t.manager_email or "",
            _money(t.spend_mtd),
            _money(t.spend_12m),
            _money(t.cash_balance),
            _money(t.package_credit),
            t.running_vms,
            t.running_tasks,
            t.member_count,
            "yes" if t.churn_risk else "no",
            t.churn_reason or "",
            t.created_at.isoformat(),
        ]
        for t in tenants.iterator(chunk_size=2000)
    )
    return _csv_response(f"customers-{timezone.localdate():%Y%m%d}.csv", header, rows)


# --- Customer 360 -----------------------------------------------------------------------------------


class _OwnIds(forms.Form):
    """Several forms share the 360 page: each gets ids of its own (e.g. credit_reason, tier_reason)."""

    id_prefix = ""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_id", f"{self.id_prefix}_%s")
        super().__init__(*args, **kwargs)


class NoteForm(_OwnIds):
    id_prefix = "note"
    kind = forms.ChoiceField(label=gettext_lazy("Kind"), choices=NoteKind.choices, initial=NoteKind.NOTE)
    body = forms.CharField(
        label=gettext_lazy("What was said or agreed"),
        max_length=crm_services.NOTE_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 3}),
    )


class TierForm(_OwnIds):
    id_prefix = "tier"
    tier = forms.ModelChoiceField(label=gettext_lazy("Tier"), queryset=Tier.objects.all(), to_field_name="code")
    reason = forms.CharField(label=gettext_lazy("Reason"), max_length=500)


class ManagerForm(_OwnIds):
    id_prefix = "manager"
    manager = forms.ChoiceField(label=gettext_lazy("Staff member"), required=False)

    def __init__(self, *args, managers=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.managers = {str(m.pk): m for m in managers}
        self.fields["manager"].choices = [("", _("Nobody"))] + [(pk, m.email) for pk, m in self.managers.items()]

    def chosen(self):
        return self.managers.get(self.cleaned_data["manager"])


class CreditForm(_OwnIds):
    id_prefix = "credit"
    amount = forms.DecimalField(
        label=gettext_lazy("Amount (¥; negative takes money)"),
        max_digits=12,
        decimal_places=2,
        widget=forms.TextInput(attrs={"inputmode": "decimal"}),
    )
    reason = forms.CharField(label=gettext_lazy("Reason"), max_length=1000, widget=forms.Textarea(attrs={"rows": 2}))

    def clean_amount(self):
        amount = self.cleaned_data["amount"]
        if amount == 0:
            raise ValidationError(_("Enter a non-zero amount."))
        return amount


class ViewAsForm(_OwnIds):
    id_prefix = "view_as"
    reason = forms.CharField(label=gettext_lazy("Why"), max_length=crm_services.VIEW_AS_REASON_MAX_CHARS)


class DecisionForm(forms.Form):
    note = forms.CharField(label=gettext_lazy("Note"), max_length=1000, required=False)


def _gpu_chart(usage: console.GpuUsage) -> dict:
    """Geometry of a stacked bar chart of GPU-hours per month (inline SVG, no script needed)."""
    height, bar, gap, left, bottom = 160, 28, 14, 44, 22
    top = max((usage.month_total(m) for m in usage.months), default=Decimal(0)) or Decimal(1)
    colours = {model: CHART_COLOURS[i % len(CHART_COLOURS)] for i, model in enumerate(usage.models)}
    bars = []
    for index, month in enumerate(usage.months):
        x = left + index * (bar + gap)
        y = height
        segments = []
        for model in usage.models:
            hours = usage.of(month, model)
            if not hours:
                continue
            h = float(hours / top) * (height - 10)
            y -= h
            segments.append(
                {"y": round(y, 1), "h": round(h, 1), "colour": colours[model], "model": model, "hours": hours}
            )
        bars.append({"x": x, "label": month.strftime("%y-%m"), "segments": segments, "total": usage.month_total(month)})
    return {
        "width": left + len(usage.months) * (bar + gap),
        "height": height + bottom,
        "baseline": height,
        "bar": bar,
        "bars": bars,
        "top": top,
        "label_y": height + 15,
        "legend": [{"model": m, "colour": c} for m, c in colours.items()],
    }


def _customer_page(request, tenant, *, status: int = 200, **forms_given):
    account = CustomerAccount.objects.filter(tenant=tenant).select_related("account_manager").first() or (
        CustomerAccount(tenant=tenant)  # made on the first change, not by reading the page
    )
    managers = crm_services.account_managers()
    usage = console.gpu_hours_by_month(tenant)
    upsell = upsell_for(tenant)
    if upsell:
        upsell["name"] = bilingual({"en": upsell.get("name_en", ""), "zh": upsell.get("name_zh", "")})
    tier_changes = console.tier_changes_of(tenant)
    for change in tier_changes:
        change.reason_text = tier_change_reason(change)
    context = {
        "tenant": tenant,
        "account": account,
        "churn_label": _churn_label(account.churn_reason) if account.churn_risk else "",
        "churn_text": bilingual((account.churn_detail or {}).get("reason")),
        "cap": staff_capabilities(request.user, tenant),
        "members": selectors.members_of(tenant),
        "vms": console.vms_of(tenant),
        "tasks": console.recent_tasks_of(tenant),
        "summary": billing_selectors.wallet_summary(tenant),
        "ledger": billing_selectors.ledger_of(tenant)[:20],
        "invoices": billing_selectors.invoices_of(tenant)[:12],
        "usage": usage,
        "chart": _gpu_chart(usage),
        "quota_lines": selectors.quota_usage(tenant),
        "tier_changes": tier_changes,
        "notes": console.notes_of(tenant),
        "credits": console.credits_of(tenant),
        "threshold": crm_services.approval_threshold(),
        "reviews": console.usage_reviews_of(tenant),
        "upsell": upsell,
        "audit": Paginator(console.audit_of(tenant).select_related("actor"), 25).get_page(
            request.GET.get("audit_page")
        ),
        "manager_title": {
            TierCode.DIAMOND: _("Dedicated account manager"),
            TierCode.GOLD: _("Service specialist"),
        }.get(tenant.tier.code, _("Account manager")),
        "note_form": forms_given.get("note_form") or NoteForm(),
        "tier_form": forms_given.get("tier_form") or TierForm(initial={"tier": tenant.tier.code}),
        "manager_form": forms_given.get("manager_form")
        or ManagerForm(
            managers=managers,
            initial={"manager": str(account.account_manager_id) if account.account_manager_id else ""},
        ),
        "credit_form": forms_given.get("credit_form") or CreditForm(),
        "view_as_form": forms_given.get("view_as_form") or ViewAsForm(),
        "view_as_minutes": settings.PORTAL_VIEW_AS_MINUTES,
    }
    return render(request, "console/customer.html", context, status=status)


@console_view(C.VIEW_CUSTOMERS, tenant_kwarg="slug")
def customer_detail(request, slug):
    return _customer_page(request, request.customer)


def _refused_or_invalid(request, tenant, form_name: str, form, exc: ValidationError):
    add_service_errors(form, exc)
    return _customer_page(request, tenant, status=400, **{form_name: form})


@console_view(C.VIEW_CUSTOMERS, write=C.ADD_NOTE, tenant_kwarg="slug")
@require_POST
def customer_note(request, slug):
    tenant = request.customer
    form = NoteForm(request.POST)
    if not form.is_valid():
        return _customer_page(request, tenant, status=400, note_form=form)
    try:
        crm_services.note_add(tenant=tenant, actor=request.user, **form.cleaned_data)
    except ValidationError as exc:
        return _refused_or_invalid(request, tenant, "note_form", form, exc)
    messages.success(request, _("Saved to the contact history."))
    return redirect(reverse("console_customer", args=[tenant.slug]) + "#notes")


@console_view(C.VIEW_CUSTOMERS, write=C.CHANGE_TIER, tenant_kwarg="slug")
@require_POST
def customer_tier(request, slug):
    tenant = request.customer
    if request.POST.get("action") == "unpin":
        crm_services.customer_tier_unpin(tenant=tenant, actor=request.user)
        messages.success(request, _("The tier is evaluated automatically again."))
        return redirect(reverse("console_customer", args=[tenant.slug]) + "#tier")
    form = TierForm(request.POST)
    if not form.is_valid():
        return _customer_page(request, tenant, status=400, tier_form=form)
    try:
        crm_services.customer_tier_override(
            tenant=tenant, actor=request.user, tier=form.cleaned_data["tier"], reason=form.cleaned_data["reason"]
        )
    except ValidationError as exc:
        return _refused_or_invalid(request, tenant, "tier_form", form, exc)
    messages.success(
        request, _("%(name)s is now %(tier)s, pinned.") % {"name": tenant.name, "tier": form.cleaned_data["tier"].name}
    )
    return redirect(reverse("console_customer", args=[tenant.slug]) + "#tier")


@console_view(C.VIEW_CUSTOMERS, write=C.ASSIGN_MANAGER, tenant_kwarg="slug")
@require_POST
def customer_manager(request, slug):
    tenant = request.customer
    form = ManagerForm(request.POST, managers=crm_services.account_managers())
    if not form.is_valid():
        return _customer_page(request, tenant, status=400, manager_form=form)
    try:
        crm_services.account_manager_assign(tenant=tenant, actor=request.user, manager=form.chosen())
    except ValidationError as exc:
        return _refused_or_invalid(request, tenant, "manager_form", form, exc)
    messages.success(request, _("Account manager saved."))
    return redirect(reverse("console_customer", args=[tenant.slug]) + "#manager")


@console_view(C.VIEW_CUSTOMERS, write=C.PROPOSE_CREDIT, tenant_kwarg="slug")
@require_POST
def customer_credit(request, slug):
    tenant = request.customer
    form = CreditForm(request.POST)
    if not form.is_valid():
        return _customer_page(request, tenant, status=400, credit_form=form)
    try:
        credit = crm_services.credit_propose(tenant=tenant, actor=request.user, **form.cleaned_data)
    except ValidationError as exc:
        return _refused_or_invalid(request, tenant, "credit_form", form, exc)
    if credit.status == CreditRequestStatus.PENDING:
        messages.info(
            request,
            _("¥%(amount)s is above ¥%(threshold)s: it waits for approval by finance or an admin.")
            % {"amount": credit.amount, "threshold": crm_services.approval_threshold()},
        )
    else:
        messages.success(request, _posted_message(credit))
    return redirect(reverse("console_customer", args=[tenant.slug]) + "#credits")


@console_view(C.VIEW_CUSTOMERS, write=C.VIEW_AS, tenant_kwarg="slug")
@require_POST
def customer_view_as(request, slug):
    tenant = request.customer
    form = ViewAsForm(request.POST)
    if not form.is_valid():
        return _customer_page(request, tenant, status=400, view_as_form=form)
    try:
        session = crm_services.view_as_start(tenant=tenant, actor=request.user, reason=form.cleaned_data["reason"])
    except ValidationError as exc:
        return _refused_or_invalid(request, tenant, "view_as_form", form, exc)
    request.session[VIEW_AS_SESSION_KEY] = str(session.pk)
    return redirect("dashboard")


@require_POST
def view_as_stop(request):
    """End the staff member's own view-as session (the banner's Stop button)."""
    session_id = request.session.pop(VIEW_AS_SESSION_KEY, None)
    view = ViewAsSession.objects.filter(pk=session_id, staff=request.user).select_related("tenant").first()
    if view is None:
        return redirect("console")
    crm_services.view_as_stop(session=view, actor=request.user)
    messages.success(request, _("You are no longer viewing as %(name)s.") % {"name": view.tenant.name})
    if visible_tenants(request.user).filter(pk=view.tenant_id).exists():
        return redirect("console_customer", slug=view.tenant.slug)
    return redirect("console")


@console_view(C.VIEW_CUSTOMERS, tenant_kwarg="slug")
def usage_review(request, slug, pk):
    review = get_object_or_404(UsageReview, pk=pk, tenant=request.customer)
    return render(
        request,
        "console/usage_review.html",
        {
            "tenant": request.customer,
            "review": review,
            "report": review.report,
            "cap": staff_capabilities(request.user, request.customer),
        },
    )


@console_view(C.VIEW_CUSTOMERS, write=C.SEND_USAGE_REVIEW, tenant_kwarg="slug")
@require_POST
def usage_review_send(request, slug, pk):
    review = get_object_or_404(UsageReview, pk=pk, tenant=request.customer)
    try:
        crm_services.customer_usage_review_send(review=review, actor=request.user)
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
    else:
        messages.success(request, _("Usage review sent to %(name)s.") % {"name": request.customer.name})
    return redirect("console_usage_review", slug=request.customer.slug, pk=review.pk)


@console_view(C.VIEW_CUSTOMERS, write=C.CHANGE_QUOTAS, tenant_kwarg="slug")
def tenant_quotas(request, slug):
    tenant = request.customer
    gpu_models = list(GpuModel.objects.all())
    limits = dict(GpuQuota.objects.filter(tenant=tenant).values_list("gpu_model__code", "limit"))
    initial = {f: getattr(tenant.quota, f) for f in services.QUOTA_FIELDS}
    initial |= {f"gpu_{m.code}": limits.get(m.code, 0) for m in gpu_models}
    form = QuotaForm(request.POST or None, initial=initial, gpu_models=gpu_models)
    if request.method == "POST" and form.is_valid():
        try:
            services.quota_update(tenant=tenant, actor=request.user, limits=form.limits(), gpus=form.gpus())
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            messages.success(request, _("Quotas of %(name)s saved.") % {"name": tenant.name})
            return redirect("console_tenant_quotas", slug=tenant.slug)
    return render(
        request,
        "console/tenant_quotas.html",
        {"tenant": tenant, "form": form, "quota_lines": selectors.quota_usage(tenant)},
    )


# --- Credits waiting for approval ----------------------------------------------------------------------


@console_view(C.VIEW_CUSTOMERS)
def credits(request):
    return render(
        request,
        "console/credits.html",
        {
            "pending": Paginator(console.credits_pending(request.user), PAGE_SIZE).get_page(request.GET.get("page")),
            "decided": console.credits_decided(request.user),
            "threshold": crm_services.approval_threshold(),
            "cap": staff_capabilities(request.user),
        },
    )


def _visible_credit(request, pk) -> CreditAdjustment:
    return get_object_or_404(
        CreditAdjustment.objects.filter(tenant__in=visible_tenants(request.user)).select_related("tenant"), pk=pk
    )


@console_view(C.VIEW_CUSTOMERS, write=C.APPROVE_CREDIT)
@require_POST
def credit_approve(request, pk):
    credit = _visible_credit(request, pk)
    form = DecisionForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    try:
        credit = crm_services.credit_approve(request=credit, approver=request.user, note=note)
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
    else:
        messages.success(request, _posted_message(credit))
    return _back(request, "console_credits")


@console_view(C.VIEW_CUSTOMERS, write=C.PROPOSE_CREDIT)
@require_POST
def credit_reject(request, pk):
    credit = _visible_credit(request, pk)
    form = DecisionForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    try:
        crm_services.credit_reject(request=credit, approver=request.user, note=note)
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
    except PermissionDenied:
        return forbidden(request)
    else:
        messages.success(request, _("Credit for %(name)s rejected; nothing was posted.") % {"name": credit.tenant.name})
    return _back(request, "console_credits")


# --- Pools --------------------------------------------------------------------------------------------


@console_view(C.VIEW_POOLS)
def pools(request):
    lines = console.pool_lines()
    return render(
        request,
        "console/pools.html",
        {
            "lines": lines,
            "low": [line for line in lines if line.low],
            "queues": console.queue_lines(),
            "warning_percent": settings.PORTAL_POOL_FREE_WARNING_PERCENT,
        },
    )


# --- Audit search -------------------------------------------------------------------------------------


class AuditSearchForm(forms.Form):
    actor = forms.CharField(label=gettext_lazy("Actor email"), required=False, max_length=254)
    tenant = forms.CharField(label=gettext_lazy("Customer (slug or name)"), required=False, max_length=100)
    action = forms.CharField(label=gettext_lazy("Action starts with"), required=False, max_length=64)
    since = forms.DateField(label=gettext_lazy("From"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(
        label=gettext_lazy("To (inclusive)"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["until"] < data["since"]:
            self.add_error("until", _("The end comes before the start."))
        return data


def _day_start(day) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


@console_view(C.VIEW_AUDIT)
def audit(request):
    form = AuditSearchForm(request.GET or None)
    if form.is_bound and not form.is_valid():
        return render(request, "console/audit.html", {"form": form, "page": None}, status=400)
    data = form.cleaned_data if form.is_bound else {}
    events = console.audit_search(
        request.user,
        actor=data.get("actor", ""),
        tenant=data.get("tenant", ""),
        action=data.get("action", ""),
        since=_day_start(data["since"]) if data.get("since") else None,
        until=_day_start(data["until"] + timedelta(days=1)) if data.get("until") else None,
    )
    if request.GET.get("export") == "csv":
        rows = (
            [
                e.created_at.isoformat(),
                e.actor_label,
                e.tenant.slug if e.tenant_id else "",
                e.action,
                e.target_type,
                e.target_id,
                e.target_repr,
                e.before,
                e.after,
                e.source_ip or "",
                e.via,
                e.request_id,
            ]
            for e in events.iterator(chunk_size=2000)
        )
        header = ["time", "actor", "tenant", "action", "target_type", "target_id", "target", "before", "after"]
        return _csv_response(
            f"audit-{timezone.localdate():%Y%m%d}.csv", [*header, "source_ip", "via", "request_id"], rows
        )
    query = request.GET.copy()
    query.pop("page", None)
    query.pop("export", None)
    page = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "console/audit.html", {"form": form, "page": page, "filters": query.urlencode()})


def _posted_message(credit) -> str:
    """What staff read once an adjustment has moved money: a credit or a debit, in plain words."""
    values = {"amount": abs(credit.amount), "name": credit.tenant.name}
    if credit.amount < 0:
        return _("¥%(amount)s taken from the wallet of %(name)s.") % values
    return _("¥%(amount)s credited to %(name)s.") % values
