from django.urls import path

from billing import console_views

urlpatterns = [
    path("", console_views.billing_console, name="console_billing"),
    path("payments/<uuid:pk>/confirm/", console_views.payment_confirm, name="console_payment_confirm"),
    path("payments/<uuid:pk>/cancel/", console_views.payment_cancel, name="console_payment_cancel"),
    path("tenants/<slug:slug>/", console_views.tenant_wallet, name="console_tenant_wallet"),
    path("price-book/", console_views.price_book, name="console_price_book"),
]
