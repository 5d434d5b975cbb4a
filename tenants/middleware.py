from django.utils import translation
from django.utils.functional import SimpleLazyObject

ACTIVE_TENANT_SESSION_KEY = "active_tenant_id"


def resolve_membership(request):
    """The signed-in user's membership in the active tenant (session), else their first one."""
    from tenants.models import Membership

    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    memberships = Membership.objects.filter(user=user).select_related("tenant__tier")
    wanted = request.session.get(ACTIVE_TENANT_SESSION_KEY)
    membership = memberships.filter(tenant_id=wanted).first() if wanted else None
    if membership is None:
        membership = memberships.order_by("tenant__kind", "created_at").first()
        if membership is not None:
            request.session[ACTIVE_TENANT_SESSION_KEY] = membership.tenant_id
    return membership


class ActiveTenantMiddleware:
    """Attaches request.membership and request.tenant for the signed-in user, lazily."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.membership = SimpleLazyObject(lambda: resolve_membership(request))
        request.tenant = SimpleLazyObject(lambda: request.membership.tenant if request.membership else None)
        return self.get_response(request)


class UserLanguageMiddleware:
    """A signed-in user's saved language wins over the browser's Accept-Language."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and user.language:
            translation.activate(user.language)
            request.LANGUAGE_CODE = user.language
        return self.get_response(request)
