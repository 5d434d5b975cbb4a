"""Pages of the notification centre and the email preferences. Thin: selectors in, services out."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from notifications import selectors, services
from notifications.models import Notification

PAGE_SIZE = 20


def _page(request):
    return Paginator(selectors.notifications_of(request.user), PAGE_SIZE).get_page(request.GET.get("page"))


def _back(request):
    target = request.POST.get("next")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect("notifications")


@login_required
def notification_list(request):
    page = _page(request)
    context = {"page": page, "unread": selectors.unread_count(request.user)}
    if request.htmx and request.GET.get("fragment") == "list":
        return render(request, "notifications/_list.html", context)
    return render(request, "notifications/list.html", context)


@login_required
def notification_bell(request):
    """The navbar's bell, fetched again when a notification event arrives."""
    return render(request, "notifications/_bell.html", {"unread": selectors.unread_count(request.user)})


@login_required
@require_POST
def notification_read(request, pk):
    note = get_object_or_404(Notification, pk=pk, user=request.user)  # another user's: not found
    services.mark_read(user=request.user, ids=[note.pk])
    if request.htmx:
        note.refresh_from_db()
        context = {"note": note, "unread": selectors.unread_count(request.user), "oob_bell": True}
        return render(request, "notifications/_item_read.html", context)
    return _back(request)


@login_required
@require_POST
def notification_read_all(request):
    count = services.mark_read(user=request.user)
    if request.htmx:
        context = {"page": _page(request), "unread": 0, "oob_bell": True}
        return render(request, "notifications/_list.html", context)
    if count:
        messages.success(request, _("All notifications marked as read."))
    return _back(request)


@login_required
def notification_preferences(request):
    choices = selectors.email_choices(request.user)
    if request.method == "POST":
        services.set_email_preferences(
            user=request.user, choices={kind: request.POST.get(f"email_{kind}") == "on" for kind, *_rest in choices}
        )
        messages.success(request, _("Email preferences saved."))
        return redirect("notification_preferences")
    return render(request, "notifications/preferences.html", {"choices": choices})
