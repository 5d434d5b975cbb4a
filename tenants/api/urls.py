from django.urls import path
from rest_framework.routers import SimpleRouter

from tenants.api import views

router = SimpleRouter()
router.register("members", views.MemberViewSet, basename="member")
router.register("invitations", views.InvitationViewSet, basename="invitation")
router.register("ssh-keys", views.SshKeyViewSet, basename="ssh-key")
router.register("tokens", views.ApiTokenViewSet, basename="api-token")

urlpatterns = [path("tenant/", views.TenantView.as_view(), name="api-tenant"), *router.urls]
