import ipaddress
import time
import uuid

from django.conf import settings
from django.contrib import messages
from django.http import HttpResponseForbidden
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.log import log_response
from django.utils.translation import gettext as _

from portal import metrics
from portal.context import RequestContext, bind, reset
from portal.logging import LogContext, bind_log_context, reset_log_context


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
    """Gives every request an id (echoed in X-Request-ID), records its source IP, puts both in the log
    context, and times the answer for /metrics by route name (never the raw path: bounded labels)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        request.id = _request_id(request)
        via = (
            "api" if request.path.startswith("/api/") else "console" if request.path.startswith("/console/") else "web"
        )
        token = bind(RequestContext(request_id=request.id, source_ip=client_ip(request), via=via))
        log_token = bind_log_context(LogContext(request=request))
        try:
            response = self.get_response(request)
            # Django logs 4xx answers after the last middleware returns, where the request id is gone:
            # log them here, the way it would (it skips a response already logged).
            if response.status_code >= 400:
                log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
        finally:
            reset_log_context(log_token)
            reset(token)
        response["X-Request-ID"] = request.id
        match = getattr(request, "resolver_match", None)
        metrics.observe_request(
            method=request.method,
            route=match.view_name if match else None,
            status=response.status_code,
            seconds=time.perf_counter() - started,
        )
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
