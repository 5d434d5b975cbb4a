"""View as the customer: while a staff member's session holds an active ViewAsSession, the
customer's pages render for that tenant, read-only.

- request.membership becomes a viewer's membership of the customer's tenant (not saved), so every
  page that reads the active tenant (tenants.views.tenant_page, the context processor, the other
  apps' pages) shows the customer's data with a viewer's rights: no secrets, no actions;
- any request other than GET or HEAD outside the console is refused with 403, before a view runs;
- the API (/api/) answers 403: it is not reachable through a view-as session;
- the console and the account pages (log out, MFA) keep working as the staff member themselves.

It ends when it expires (recorded then, on the next request) or when stopped from the banner.
"""

from django.http import HttpResponseForbidden, JsonResponse
from django.utils.translation import gettext as _

VIEW_AS_SESSION_KEY = "crm_view_as_session"
# Paths where the staff member acts as themselves: the console, Django admin, login/logout/MFA, assets.
OWN_PATHS = ("/console/", "/admin/", "/accounts/", "/static/", "/media/", "/healthz")
SAFE_METHODS = ("GET", "HEAD")


def active_view_as(request):
    """The request's running view-as session, ending it here if it has expired or is no longer allowed."""
    from crm import services
    from crm.models import ViewAsSession
    from crm.permissions import StaffCapability, staff_can

    session_id = request.session.get(VIEW_AS_SESSION_KEY)
    if not session_id or not request.user.is_authenticated:
        return None
    view = (
        ViewAsSession.objects.filter(pk=session_id, staff=request.user, ended_at__isnull=True)
        .select_related("tenant__tier", "staff")
        .first()
    )
    if view is not None and not view.is_active():
        services.view_as_stop(session=view, expired=True)
        view = None
    elif view is not None and not staff_can(request.user, StaffCapability.VIEW_AS, view.tenant):
        services.view_as_stop(session=view, actor=request.user)
        view = None
    if view is None:
        request.session.pop(VIEW_AS_SESSION_KEY, None)
    return view


class ViewAsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.view_as = None
        if VIEW_AS_SESSION_KEY not in request.session:
            return self.get_response(request)
        view = active_view_as(request)
        request.view_as = view
        if view is None or request.path.startswith(OWN_PATHS):
            return self.get_response(request)
        if request.path.startswith("/api/"):
            return JsonResponse({"detail": _("The API is not available while viewing as a customer.")}, status=403)
        if request.method not in SAFE_METHODS:
            return HttpResponseForbidden(_("Viewing as a customer is read-only: nothing was changed."))
        from tenants.models import Membership, Role

        membership = Membership(tenant=view.tenant, user=request.user, role=Role.VIEWER)
        request.membership = membership
        request.tenant = view.tenant
        return self.get_response(request)
