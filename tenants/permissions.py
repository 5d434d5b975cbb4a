from rest_framework.permissions import SAFE_METHODS, BasePermission

from tenants.roles import Capability, role_can


class HasTenantRole(BasePermission):
    """The caller is a member of the active tenant and their role allows the view's capability.

    Views declare `read_capability` (GET/HEAD/OPTIONS) and `write_capability`
    (other methods); both default to seeing the tenant / managing it.
    """

    message = "Your role in this tenant does not allow this."

    def has_permission(self, request, view):
        if not request.user or not request.user.is_authenticated:
            return False
        membership = getattr(request._request, "membership", None)
        if not membership:
            return False
        if request.method in SAFE_METHODS:
            capability = getattr(view, "read_capability", Capability.VIEW_TENANT)
        else:
            capability = getattr(view, "write_capability", Capability.MANAGE_TENANT)
        return capability is None or role_can(membership.role, capability)
