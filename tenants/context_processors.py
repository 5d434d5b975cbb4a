from tenants.models import Membership
from tenants.roles import ROLE_CAPABILITIES


def active_tenant(request):
    membership = getattr(request, "membership", None)
    if membership is None or not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    if not membership:  # a lazy object wrapping None
        return {}
    return {
        "user_memberships": Membership.objects.filter(user=request.user)
        .select_related("tenant")
        .order_by("tenant__kind", "tenant__name"),
        "active_membership": membership,
        "active_tenant": membership.tenant,
        "can": {cap.value: True for cap in ROLE_CAPABILITIES.get(membership.role, set())},
    }
