from django.urls import path

from billing import views, webhooks

urlpatterns = [
    path("", views.billing_home, name="billing"),
    path("top-up/", views.top_up, name="billing_top_up"),
    path("low-balance/", views.low_balance, name="billing_low_balance"),
    path("packages/<int:pk>/buy/", views.package_buy, name="billing_package_buy"),
    path("payments/<uuid:pk>/", views.payment_detail, name="billing_payment"),
    path("payments/<uuid:pk>/cancel/", views.payment_cancel, name="billing_payment_cancel"),
    path("subscriptions/<int:pk>/<slug:action>/", views.subscription_action, name="billing_subscription_action"),
    path("invoices/<int:pk>/", views.invoice_detail, name="billing_invoice"),
    path("invoices/<int:pk>/print/", views.invoice_print, name="billing_invoice_print"),
    path("invoices/<int:pk>/pdf/", views.invoice_pdf, name="billing_invoice_pdf"),
    path("stripe/webhook/", webhooks.stripe_webhook, name="billing_stripe_webhook"),
]
