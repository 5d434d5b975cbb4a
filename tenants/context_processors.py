from tenants.roles import ROLE_CAPABILITIES


def active_tenant(request):
    membership = getattr(request, "membership", None)
    if membership is None or not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    if not membership:  # a lazy object wrapping None
        return {}
    return {
        "active_membership": membership,
        "active_tenant": membership.tenant,
        "can": {cap.value: True for cap in ROLE_CAPABILITIES.get(membership.role, set())},
    }
