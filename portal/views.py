from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseForbidden, JsonResponse
from django.shortcuts import render
from django.utils.translation import check_for_language
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET
from django.views.i18n import set_language as django_set_language

from billing.selectors import wallet_summary
from portal import health
from portal import metrics as portal_metrics
from portal import selectors as dashboard_selectors
from tenants import selectors
from tenants.roles import Capability, role_can


@login_required
def dashboard(request):
    membership = request.membership
    context = {}
    if membership:
        tenant = membership.tenant
        can_bill = role_can(membership.role, Capability.VIEW_BILLING)
        can_compute = role_can(membership.role, Capability.VIEW_COMPUTE)
        if can_compute:
            context.update(dashboard_selectors.live_work(tenant))
            if request.htmx and request.GET.get("fragment") == "work":
                return render(request, "portal/_dashboard_work.html", context)
        context["quota_lines"] = selectors.quota_usage(tenant)
        context.update(dashboard_selectors.tier_outlook(tenant))
        spend = dashboard_selectors.spend_per_day(tenant) if can_bill else []
        gpu = dashboard_selectors.gpu_hours_by_model(tenant) if can_bill or can_compute else []
        charts = dashboard_selectors.chart_data(spend, gpu)
        charts["text"] = {"spend": _("Spend (CNY)"), "task": _("Task hosting"), "vm": _("On-demand VMs")}
        context.update(
            {
                "can_bill": can_bill,
                "can_compute": can_compute,
                "wallet": wallet_summary(tenant) if can_bill else None,
                "spend": spend,
                "spend_total": sum((d.amount for d in spend), Decimal("0.00")),
                "gpu_hours": gpu,
                "charts": charts,
            }
        )
    return render(request, "portal/dashboard.html", context)


def healthz(request):
    """Liveness: the process answers. Nothing else: a database outage must not get every web process
    restarted; /readyz is where dependencies are checked."""
    return JsonResponse({"status": "ok"})


def readyz(request):
    """Readiness: each dependency's status and latency; 503 when any is down (portal.health)."""
    results = health.readiness()
    ready = all(result.ok for result in results)
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": {result.name: result.as_json() for result in results}},
        status=200 if ready else 503,
    )


@require_GET
def metrics(request):
    """Prometheus scrape endpoint, for the bearer token or the allowed networks only (portal.metrics)."""
    if not portal_metrics.scrape_allowed(request):
        return HttpResponseForbidden(_("Metrics are only served to the monitoring system."))
    body, content_type = portal_metrics.exposition()
    return HttpResponse(body, content_type=content_type)


def set_language(request):
    """Django's language switch, also remembered on the signed-in user's profile."""
    response = django_set_language(request)
    language = request.POST.get("language")
    if request.method == "POST" and request.user.is_authenticated and check_for_language(language):
        get_user_model().objects.filter(pk=request.user.pk).update(language=language)
    return response
