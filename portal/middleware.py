import ipaddress
import uuid

from django.conf import settings
from django.contrib import messages
from django.http import HttpResponseForbidden
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.translation import gettext as _

from portal.context import RequestContext, bind, reset


def client_ip(request) -> str | None:
    """The client's address: REMOTE_ADDR, or the hop our trusted proxies saw."""
    remote = request.META.get("REMOTE_ADDR")
    if settings.TRUSTED_PROXY_COUNT:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        if len(hops) >= settings.TRUSTED_PROXY_COUNT:
            remote = hops[-settings.TRUSTED_PROXY_COUNT]
    try:
        return str(ipaddress.ip_address(remote)) if remote else None
    except ValueError:
        return None


def _request_id(request) -> str:
    incoming = request.headers.get("X-Request-ID", "")
    if incoming and len(incoming) <= 64 and incoming.replace("-", "").isalnum():
        return incoming
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Gives every request an id (echoed in X-Request-ID) and records its source IP."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.id = _request_id(request)
        via = (
            "api" if request.path.startswith("/api/") else "console" if request.path.startswith("/console/") else "web"
        )
        token = bind(RequestContext(request_id=request.id, source_ip=client_ip(request), via=via))
        try:
            response = self.get_response(request)
        finally:
            reset(token)
        response["X-Request-ID"] = request.id
        return response


STAFF_PREFIXES = ("/console/", "/admin/")


def session_used_mfa(request) -> bool:
    from allauth.account.authentication import get_authentication_records

    return any(record.get("method") == "mfa" for record in get_authentication_records(request, request.user))


class StaffMfaRequiredMiddleware:
    """The console and Django admin are for staff who logged in with a second factor."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith(STAFF_PREFIXES):
            refusal = self.refuse(request)
            if refusal is not None:
                return refusal
        return self.get_response(request)

    def refuse(self, request):
        from allauth.mfa.utils import is_mfa_enabled

        user = request.user
        if not user.is_authenticated:
            return redirect(f"{reverse('account_login')}?next={request.path}")
        if not user.is_staff:
            return HttpResponseForbidden(_("This area is for staff only."))
        if not settings.PORTAL_STAFF_MFA_REQUIRED:
            return None
        if not is_mfa_enabled(user):
            messages.warning(request, _("Staff must turn on two-factor authentication before using the console."))
            return redirect("mfa_activate_totp")
        if not session_used_mfa(request):
            messages.warning(request, _("Confirm with your authenticator code to open the console."))
            return redirect(f"{reverse('mfa_reauthenticate')}?next={request.path}")
        return None
