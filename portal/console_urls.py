from django.urls import path

from portal import console_views

urlpatterns = [
    path("", console_views.customers, name="console"),
    path("customers/<slug:slug>/", console_views.customer_detail, name="console_customer"),
    path("customers/<slug:slug>/notes/", console_views.customer_note, name="console_customer_note"),
    path("customers/<slug:slug>/tier/", console_views.customer_tier, name="console_customer_tier"),
    path("customers/<slug:slug>/manager/", console_views.customer_manager, name="console_customer_manager"),
    path("customers/<slug:slug>/credits/", console_views.customer_credit, name="console_customer_credit"),
    path("customers/<slug:slug>/view-as/", console_views.customer_view_as, name="console_customer_view_as"),
    path("customers/<slug:slug>/reviews/<int:pk>/", console_views.usage_review, name="console_usage_review"),
    path(
        "customers/<slug:slug>/reviews/<int:pk>/send/",
        console_views.usage_review_send,
        name="console_usage_review_send",
    ),
    path("tenants/<slug:slug>/quotas/", console_views.tenant_quotas, name="console_tenant_quotas"),
    path("view-as/stop/", console_views.view_as_stop, name="console_view_as_stop"),
    path("credits/", console_views.credits, name="console_credits"),
    path("credits/<uuid:pk>/approve/", console_views.credit_approve, name="console_credit_approve"),
    path("credits/<uuid:pk>/reject/", console_views.credit_reject, name="console_credit_reject"),
    path("pools/", console_views.pools, name="console_pools"),
    path("audit/", console_views.audit, name="console_audit"),
]
