from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render
from django.utils.translation import check_for_language
from django.views.i18n import set_language as django_set_language

from tenants import selectors


@login_required
def dashboard(request):
    membership = request.membership
    context = {}
    if membership:
        context["quota_lines"] = selectors.quota_usage(membership.tenant)
    return render(request, "portal/dashboard.html", context)


def healthz(request):
    """Liveness: the process answers and the database takes a query."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def set_language(request):
    """Django's language switch, also remembered on the signed-in user's profile."""
    response = django_set_language(request)
    language = request.POST.get("language")
    if request.method == "POST" and request.user.is_authenticated and check_for_language(language):
        get_user_model().objects.filter(pk=request.user.pk).update(language=language)
    return response
