"""What each staff role may do in the console. One table, checked by every console view and every
crm service action.

- account manager: their own customers only (CustomerAccount.account_manager is them): notes,
  tier overrides, quotas, credit proposals, usage reviews, viewing as the customer;
- support: reads everything, changes nothing;
- finance: reads everything; credits (propose and approve), payments, wallets, invoices, price book;
- admin: everything. Superusers are admin.

A staff user without a StaffProfile has settings.PORTAL_STAFF_DEFAULT_ROLE.
"""

from enum import StrEnum
from functools import wraps

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404
from django.shortcuts import render
from django.utils.translation import gettext as _

from crm.models import CustomerAccount, StaffProfile, StaffRole
from tenants.models import Tenant


class StaffCapability(StrEnum):
    VIEW_CUSTOMERS = "view_customers"  # list, 360, export
    VIEW_POOLS = "view_pools"
    VIEW_AUDIT = "view_audit"  # audit search across tenants
    VIEW_BILLING = "view_billing"  # the billing console: payments of every tenant, price book
    ADD_NOTE = "add_note"
    CHANGE_TIER = "change_tier"
    CHANGE_QUOTAS = "change_quotas"
    ASSIGN_MANAGER = "assign_manager"
    PROPOSE_CREDIT = "propose_credit"
    APPROVE_CREDIT = "approve_credit"
    MANAGE_BILLING = "manage_billing"  # confirm payments, adjust wallets, one-off charges, price book
    SEND_USAGE_REVIEW = "send_usage_review"
    VIEW_AS = "view_as"


C = StaffCapability
_READ = {C.VIEW_CUSTOMERS, C.VIEW_POOLS, C.VIEW_AUDIT}

ROLE_CAPABILITIES: dict[str, set[StaffCapability]] = {
    StaffRole.ACCOUNT_MANAGER: _READ
    | {C.ADD_NOTE, C.CHANGE_TIER, C.CHANGE_QUOTAS, C.PROPOSE_CREDIT, C.SEND_USAGE_REVIEW, C.VIEW_AS},
    StaffRole.SUPPORT: _READ | {C.VIEW_BILLING},
    StaffRole.FINANCE: _READ | {C.VIEW_BILLING, C.PROPOSE_CREDIT, C.APPROVE_CREDIT, C.MANAGE_BILLING},
    StaffRole.ADMIN: set(StaffCapability),
}

# Roles whose reach is limited to the customers they manage.
OWN_CUSTOMERS_ONLY = {StaffRole.ACCOUNT_MANAGER}


def staff_role(user) -> str | None:
    """The console role of `user`, or None for anyone who is not active staff."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active or not user.is_staff:
        return None
    if user.is_superuser:
        return StaffRole.ADMIN
    try:
        return user.staff_profile.role
    except StaffProfile.DoesNotExist:
        return settings.PORTAL_STAFF_DEFAULT_ROLE or None


def _manages(user, tenant: Tenant) -> bool:
    return CustomerAccount.objects.filter(tenant=tenant, account_manager=user).exists()


def staff_can(user, capability: StaffCapability, tenant: Tenant | None = None) -> bool:
    """Whether `user` may use `capability`, on `tenant` when given (an account manager only on the
    customers they manage)."""
    role = staff_role(user)
    if role is None or capability not in ROLE_CAPABILITIES.get(role, set()):
        return False
    if tenant is not None and role in OWN_CUSTOMERS_ONLY:
        return _manages(user, tenant)
    return True


def require_staff(user, capability: StaffCapability, tenant: Tenant | None = None) -> None:
    """Raise PermissionDenied unless staff_can(user, capability, tenant)."""
    if not staff_can(user, capability, tenant):
        raise PermissionDenied(_("Your console role does not allow this."))


def visible_tenants(user) -> QuerySet[Tenant]:
    """The customers `user` may see in the console: all of them, or an account manager's own."""
    role = staff_role(user)
    if role is None or C.VIEW_CUSTOMERS not in ROLE_CAPABILITIES.get(role, set()):
        return Tenant.objects.none()
    if role in OWN_CUSTOMERS_ONLY:
        return Tenant.objects.filter(account__account_manager=user)
    return Tenant.objects.all()


def sees_all_customers(user) -> bool:
    role = staff_role(user)
    return role is not None and role not in OWN_CUSTOMERS_ONLY


def customer_or_404(user, slug: str) -> Tenant:
    """A customer the user may see; anyone else's customer does not exist (404, not 403)."""
    tenant = visible_tenants(user).select_related("tier").filter(slug=slug).first()
    if tenant is None:
        raise Http404
    return tenant


def staff_capabilities(user, tenant: Tenant | None = None) -> dict[str, bool]:
    """{capability: True} of what `user` may do (on `tenant`), for templates to show or hide actions."""
    role = staff_role(user)
    allowed = ROLE_CAPABILITIES.get(role, set()) if role else set()
    if tenant is not None and role in OWN_CUSTOMERS_ONLY and allowed and not _manages(user, tenant):
        allowed = set()
    return {cap.value: True for cap in allowed}


def forbidden(request, message: str | None = None):
    return render(
        request,
        "console/forbidden.html",
        {"message": message or _("Your console role does not allow this.")},
        status=403,
    )


def console_view(read: StaffCapability, write: StaffCapability | None = None, tenant_kwarg: str | None = None):
    """A console page: GET needs `read`, any other method `write` (none: GET only, so a read-only role
    never changes anything here). With `tenant_kwarg`, the URL names a customer: one the user may
    not see is a 404, and the capabilities are checked on that customer; the view finds it on
    request.customer."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            tenant = None
            if tenant_kwarg is not None:
                tenant = customer_or_404(request.user, kwargs[tenant_kwarg])
                request.customer = tenant
            request.staff_caps = staff_capabilities(request.user)
            needed = read if request.method in ("GET", "HEAD") else write
            if needed is None or not staff_can(request.user, needed, tenant):
                return forbidden(request)
            try:
                return view(request, *args, **kwargs)
            except PermissionDenied as exc:
                return forbidden(request, str(exc) or None)

        return wrapper

    return decorator
