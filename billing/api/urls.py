from django.urls import path
from rest_framework.routers import SimpleRouter

from billing.api import views

router = SimpleRouter()
router.register("packages", views.PackageViewSet, basename="package")
router.register("payments", views.PaymentViewSet, basename="payment")
router.register("invoices", views.InvoiceViewSet, basename="invoice")
router.register("subscriptions", views.SubscriptionViewSet, basename="subscription")
router.register("ledger", views.LedgerViewSet, basename="ledger")

urlpatterns = [
    path("price-book/", views.PriceBookView.as_view(), name="api-price-book"),
    path("wallet/", views.WalletView.as_view(), name="api-wallet"),
    path("wallet/top-up/", views.TopUpView.as_view(), name="api-wallet-top-up"),
    path("usage/", views.UsageStatementView.as_view(), name="api-usage"),
    path("usage/records/", views.UsageRecordsView.as_view(), name="api-usage-records"),
    *router.urls,
]
