from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from portal import views

api_v1 = [
    path("", include("tenants.api.urls")),
    path("", include("provisioning.api.urls")),
    path("", include("hosting.api.urls")),
    path("", include("billing.api.urls")),
    path("", include("notifications.api.urls")),
]

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("", include("provisioning.urls")),
    path("", include("hosting.urls")),
    path("billing/", include("billing.urls")),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("i18n/setlang/", views.set_language, name="set_language"),
    path("accounts/", include("allauth.urls")),
    path("", include("tenants.urls")),
    path("", include("notifications.urls")),
    path("console/billing/", include("billing.console_urls")),
    path("console/", include("portal.console_urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
]

if settings.DEBUG:
    from django.conf.urls.static import static

    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
