from django.urls import path

from portal import console_views

urlpatterns = [
    path("", console_views.customers, name="console"),
    path("tenants/<slug:slug>/quotas/", console_views.tenant_quotas, name="console_tenant_quotas"),
]
