"""The account-manager console. StaffMfaRequiredMiddleware guards every URL here:
staff only, signed in with a second factor."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _

from provisioning.models import GpuModel
from tenants import selectors, services
from tenants.forms import QuotaForm, add_service_errors
from tenants.models import GpuQuota, Tenant


def customers(request):
    tenants = Tenant.objects.select_related("tier").annotate(member_count=Count("memberships")).order_by("name")
    query = request.GET.get("q", "").strip()
    if query:
        tenants = tenants.filter(
            Q(name__icontains=query) | Q(slug__icontains=query) | Q(memberships__user__email__icontains=query)
        ).distinct()
    tier = request.GET.get("tier", "")
    if tier:
        tenants = tenants.filter(tier__code=tier)
    page = Paginator(tenants, 50).get_page(request.GET.get("page"))
    return render(request, "console/customers.html", {"page": page, "q": query, "tier": tier})


def tenant_quotas(request, slug):
    tenant = get_object_or_404(Tenant.objects.select_related("tier", "quota"), slug=slug)
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
        {
            "tenant": tenant,
            "form": form,
            "quota_lines": selectors.quota_usage(tenant),
        },
    )
