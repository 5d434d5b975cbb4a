"""Payment providers, chosen by settings.PORTAL_PAYMENT_PROVIDER from PORTAL_PAYMENT_PROVIDERS."""

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from billing.providers.base import PaymentProvider


def get_provider(code: str | None = None) -> PaymentProvider:
    code = code or settings.PORTAL_PAYMENT_PROVIDER
    path = settings.PORTAL_PAYMENT_PROVIDERS.get(code)
    if not path:
        installed = sorted(settings.PORTAL_PAYMENT_PROVIDERS)
        raise ImproperlyConfigured(
            f"Payment provider {code!r} is not installed (PORTAL_PAYMENT_PROVIDERS has {installed})."
        )
    return import_string(path)()
