from django.urls import path

from tenants import views

urlpatterns = [
    path("tenant/", views.tenant_overview, name="tenant_overview"),
    path("tenant/quota-panel/", views.tenant_quota_panel, name="tenant_quota_panel"),
    path("tenants/new/", views.tenant_create, name="tenant_create"),
    path("tenants/switch/", views.tenant_switch, name="tenant_switch"),
    path("team/", views.team, name="team"),
    path("team/leave/", views.team_leave, name="team_leave"),
    path("team/members/<int:pk>/role/", views.member_role, name="member_role"),
    path("team/members/<int:pk>/remove/", views.member_remove, name="member_remove"),
    path("team/invitations/<int:pk>/revoke/", views.invitation_revoke, name="invitation_revoke"),
    path("invitations/<str:key>/", views.invitation_accept, name="invitation_accept"),
    path("settings/", views.settings_profile, name="settings"),
    path("settings/ssh-keys/", views.ssh_keys, name="ssh_keys"),
    path("settings/ssh-keys/<int:pk>/delete/", views.ssh_key_delete, name="ssh_key_delete"),
    path("settings/tokens/", views.api_tokens, name="api_tokens"),
    path("settings/tokens/<int:pk>/revoke/", views.api_token_revoke, name="api_token_revoke"),
    path("settings/audit/", views.audit_log, name="audit_log"),
]
