from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from tenants.services import api_token_authenticate


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer gpk_…` (or `Token gpk_…`). The token fixes the tenant."""

    keywords = ("bearer", "token")

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1").split()
        if not header or header[0].lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header: use 'Bearer <token>'.")
        token = api_token_authenticate(header[1])
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API token.")
        membership = token.tenant.memberships.filter(user=token.user).select_related("tenant__tier").first()
        if membership is None:
            raise exceptions.AuthenticationFailed("The token's user is no longer a member of its tenant.")
        # The token, not the browser session, decides the tenant.
        request._request.membership = membership
        request._request.tenant = membership.tenant
        return token.user, token

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.ApiTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from Settings → API tokens, e.g. `gpk_1a2b3c4d_…`.",
        }
