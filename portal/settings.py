"""Settings for the GPU compute portal, read from the environment.

Every integration is switched on by its variable; without any variable the
portal runs as the embedded default: SQLite, the local cluster backend, the
offline payment provider, in-memory channel layer, Celery tasks run inline.
"""

import ipaddress
import os
from decimal import Decimal
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value in (None, "") else value


def env_bool(name: str, default: bool) -> bool:
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in (env(name, default) or "").split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    value = env(name)
    return default if value is None else int(value)


DEBUG = env_bool("DEBUG", True)
_DEV_SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"
SECRET_KEY = env("SECRET_KEY", _DEV_SECRET_KEY)
if not DEBUG and SECRET_KEY == _DEV_SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# Number of reverse proxies in front of the portal whose X-Forwarded-For we trust
# for the audit log's source IP. 0 means REMOTE_ADDR is the client.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "django_htmx",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "tenants",
    "provisioning",
    "hosting",
    "billing",
    "crm",
    "notifications",
    "portal.apps.PortalConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "portal.middleware.RequestContextMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "tenants.middleware.UserLanguageMiddleware",
    "tenants.middleware.ActiveTenantMiddleware",
    "portal.middleware.StaffMfaRequiredMiddleware",
    "crm.middleware.ViewAsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
                "tenants.context_processors.active_tenant",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Writers wait for each other instead of failing at once with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "tenants.User"

REDIS_URL = env("REDIS_URL")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    # redis-py 8 reads with a 5 s socket timeout by default, which a consumer's 5 s blocking
    # receive (BZPOPMIN) reaches when idle: give reads room beyond the blocking time. Its async pool
    # also fails at once past 100 connections, which lost group_discard calls when many sockets
    # closed together (bench/live.py); and a server process's shared inbox holds more than the
    # default 100 messages before group_send drops any.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "max_connections": 1000}],
                "capacity": 1000,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: Redis as broker in production; without it tasks run inline (one process).
CELERY_BROKER_URL = env("CELERY_BROKER_URL", REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", REDIS_URL)
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
# Periodic work (reconcilers, expiries). `celery beat` runs it in production; portal.beat runs the
# same schedule inside the web process for the embedded default.
CELERY_BEAT_SCHEDULE = {
    "reconcile-vms": {"task": "provisioning.tasks.reconcile_vms", "schedule": 5.0},
    "revert-scale-ups": {"task": "provisioning.tasks.revert_scale_ups", "schedule": 60.0},
    "sync-inventory": {"task": "provisioning.tasks.sync_inventory", "schedule": 300.0},
    "schedule-tasks": {"task": "hosting.tasks.schedule_tasks", "schedule": 2.0},
    "reap-tasks": {"task": "hosting.tasks.reap_tasks", "schedule": 15.0},
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]

# django-allauth: email is the login; verification is mandatory.
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_ADAPTER = "tenants.adapters.AccountAdapter"
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[GPU Portal] "
if env_bool("DISABLE_RATE_LIMITS", False):
    ACCOUNT_RATE_LIMITS = False
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = "GPU Portal"
LOGIN_REDIRECT_URL = "dashboard"
LOGIN_URL = "account_login"

# Email: console by default, SMTP when EMAIL_HOST is set.
EMAIL_HOST = env("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587)
    EMAIL_HOST_USER = env("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
else:
    EMAIL_BACKEND = env("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "GPU Portal <noreply@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env("TIME_ZONE", "Asia/Shanghai")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Third-party assets are served straight from node_modules (installed by npm from
# package-lock.json), so nothing vendored lives in the repository.
NODE_MODULES = BASE_DIR / "node_modules"
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/bootstrap", NODE_MODULES / "bootstrap" / "dist"),
    ("vendor/htmx", NODE_MODULES / "htmx.org" / "dist"),
    ("vendor/chartjs", NODE_MODULES / "chart.js" / "dist"),
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
MEDIA_ROOT = Path(env("MEDIA_ROOT", str(BASE_DIR / "media")))
MEDIA_URL = "media/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tenants.permissions.HasTenantRole"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.api.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "GPU Compute Portal API",
    "DESCRIPTION": (
        "Rent GPU virtual machines, buy compute packages and run GPU tasks. "
        "Authenticate with `Authorization: Bearer <token>` (create tokens under Settings → API tokens) "
        "or with the browser session. Every object belongs to the token's tenant; another tenant's "
        "object answers 404."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RoleEnum": "tenants.models.Role",
        "TaskStateEnum": "hosting.models.TaskState",
    },
}

SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if TRUSTED_PROXY_COUNT else None
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    # Load balancers and Prometheus reach these on the internal network, over plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# Product settings.
PORTAL_BASE_URL = env("PORTAL_BASE_URL", "http://localhost:8000")
PORTAL_INVITATION_DAYS = env_int("PORTAL_INVITATION_DAYS", 7)
PORTAL_TOKEN_TOUCH_SECONDS = 60  # last-used time of an API token is written at most once a minute
PORTAL_STAFF_MFA_REQUIRED = env_bool("PORTAL_STAFF_MFA_REQUIRED", True)
# Console (crm): staff credits above this (CNY, either sign) wait for a second finance/admin approval.
PORTAL_CREDIT_APPROVAL_THRESHOLD = Decimal(env("PORTAL_CREDIT_APPROVAL_THRESHOLD", "1000.00"))
# How long a read-only "view as the customer" session lasts.
PORTAL_VIEW_AS_MINUTES = env_int("PORTAL_VIEW_AS_MINUTES", 30)
# The console's pools page warns when a pool's free capacity drops below this percent.
PORTAL_POOL_FREE_WARNING_PERCENT = env_int("PORTAL_POOL_FREE_WARNING_PERCENT", 20)
# Console role of staff users without a StaffProfile (made before console roles existed):
# account_manager, support, finance or admin; empty for none. Read-only by default, so a forgotten
# is_staff flag never hands out credits or payments; superusers are admin whatever this says.
PORTAL_STAFF_DEFAULT_ROLE = env("PORTAL_STAFF_DEFAULT_ROLE", "support")

# Cluster backends (provisioning.backends): "local" (embedded default) or "kubevirt".
PORTAL_CLUSTER_BACKEND = env("PORTAL_CLUSTER_BACKEND", "local")
# local: nodes and GPUs from this file; VMs advance through provisioning and boot in these times.
PORTAL_LOCAL_INVENTORY = Path(env("PORTAL_LOCAL_INVENTORY", str(BASE_DIR / "provisioning" / "inventory.yaml")))
PORTAL_LOCAL_PROVISION_SECONDS = float(env("PORTAL_LOCAL_PROVISION_SECONDS", "4"))
PORTAL_LOCAL_BOOT_SECONDS = float(env("PORTAL_LOCAL_BOOT_SECONDS", "4"))
PORTAL_LOCAL_SSH_HOST = env("PORTAL_LOCAL_SSH_HOST", "127.0.0.1")
# kubevirt: a kubeconfig file (and context), or in-cluster service-account credentials.
KUBERNETES_KUBECONFIG = env("KUBERNETES_KUBECONFIG")
KUBERNETES_CONTEXT = env("KUBERNETES_CONTEXT")
KUBERNETES_IN_CLUSTER = env_bool("KUBERNETES_IN_CLUSTER", False)
KUBERNETES_REQUEST_TIMEOUT = float(env("KUBERNETES_REQUEST_TIMEOUT", "15"))
KUBERNETES_RETRIES = env_int("KUBERNETES_RETRIES", 4)
KUBEVIRT_STORAGE_CLASS = env("KUBEVIRT_STORAGE_CLASS", "")
PORTAL_KUBEVIRT_SCHEMA = Path(env("PORTAL_KUBEVIRT_SCHEMA", str(BASE_DIR.parent / "shared/kubevirt/swagger.json")))
# Public address customers SSH to: a gateway in front of the nodes' NodePorts.
KUBEVIRT_SSH_HOST = env("KUBEVIRT_SSH_HOST", "gpu.example.com")
PORTAL_LABEL_PREFIX = "gpuportal.io"
# A VM not Running this long after its order is marked Failed (and never charged).
PORTAL_PROVISION_DEADLINE_SECONDS = env_int("PORTAL_PROVISION_DEADLINE_SECONDS", 20 * 60)
PORTAL_IDLE_WARNING_MINUTES = env_int("PORTAL_IDLE_WARNING_MINUTES", 15)
# Key for secrets stored encrypted (Jupyter tokens): a Fernet key; derived from SECRET_KEY when unset.
PORTAL_FIELD_ENCRYPTION_KEY = env("PORTAL_FIELD_ENCRYPTION_KEY")
# Extra checks an order must pass before it is accepted (the billing module registers its own).
PORTAL_ORDER_CHECKS: list[str] = []
# Task hosting.
PORTAL_TASK_EXECUTOR = env("PORTAL_TASK_EXECUTOR", "local")  # "local" subprocesses, or "cluster" (batch/v1 Jobs)
# In the embedded default an attempt runs on a thread of the web process; tests run it inline.
PORTAL_TASK_EXECUTE_INLINE = env_bool("PORTAL_TASK_EXECUTE_INLINE", False)
# Tenants' own storage for task inputs and results. Attempts run in a local working directory under
# PORTAL_TASK_STORAGE_ROOT (MEDIA_ROOT/tenants when unset). Results are kept there ("local"), or uploaded
# when an attempt ends to an S3-compatible bucket under tenants/<tenant id>/tasks/<task id>/output/ ("s3").
PORTAL_TASK_STORAGE_ROOT = env("PORTAL_TASK_STORAGE_ROOT")
PORTAL_TASK_STORAGE = env("PORTAL_TASK_STORAGE", "local")  # "local" | "s3"
PORTAL_S3_ENDPOINT_URL = env("PORTAL_S3_ENDPOINT_URL", "")  # empty: AWS S3 itself
PORTAL_S3_BUCKET = env("PORTAL_S3_BUCKET", "")
PORTAL_S3_ACCESS_KEY_ID = env("PORTAL_S3_ACCESS_KEY_ID", "")  # both empty: boto3's own credential chain
PORTAL_S3_SECRET_ACCESS_KEY = env("PORTAL_S3_SECRET_ACCESS_KEY", "")
PORTAL_S3_REGION = env("PORTAL_S3_REGION", "")
if PORTAL_TASK_STORAGE not in ("local", "s3"):
    raise ImproperlyConfigured('PORTAL_TASK_STORAGE must be "local" or "s3".')
if PORTAL_TASK_STORAGE == "s3" and not PORTAL_S3_BUCKET:
    raise ImproperlyConfigured('PORTAL_TASK_STORAGE is "s3" but PORTAL_S3_BUCKET is not set.')
# Every this many seconds each server process reads, in one query, how far the tasks its sockets watch
# have got, and a socket that has been quiet that long and is behind (the channel layer dropped its
# task's last events) catches up from the kept events.
PORTAL_TASK_SOCKET_RESYNC_SECONDS = float(env("PORTAL_TASK_SOCKET_RESYNC_SECONDS", "2"))
PORTAL_TASK_UPLOAD_MAX_BYTES = env_int("PORTAL_TASK_UPLOAD_MAX_BYTES", 50 * 2**20)
PORTAL_TASK_GRACE_SECONDS = env_int("PORTAL_TASK_GRACE_SECONDS", 30)
PORTAL_TASK_RETRY_BASE_SECONDS = env_int("PORTAL_TASK_RETRY_BASE_SECONDS", 30)
PORTAL_TASK_HEARTBEAT_DEADLINE_SECONDS = env_int("PORTAL_TASK_HEARTBEAT_DEADLINE_SECONDS", 120)
PORTAL_TASK_START_DEADLINE_SECONDS = env_int("PORTAL_TASK_START_DEADLINE_SECONDS", 300)
PORTAL_SCHEDULER_AGEING_SECONDS = env_int("PORTAL_SCHEDULER_AGEING_SECONDS", 600)
# A task waiting this long reserves its GPU model: later, smaller tasks stop backfilling past it.
PORTAL_SCHEDULER_RESERVE_AFTER_SECONDS = env_int("PORTAL_SCHEDULER_RESERVE_AFTER_SECONDS", 7200)
PORTAL_SCHEDULER_LOCK_ID = 7_341_001  # pg advisory lock: one scheduling pass at a time
# Hooks the billing module fills: who holds an active compute package, and who can pay for a task.
PORTAL_PACKAGE_HOLDERS = env("PORTAL_PACKAGE_HOLDERS", "")
PORTAL_TASK_PAYMENT_CHECK = env("PORTAL_TASK_PAYMENT_CHECK", "")
PORTAL_TASK_COST_ESTIMATOR = env("PORTAL_TASK_COST_ESTIMATOR", "billing.selectors.task_cost")

# Beat ticks inside the web process when there is no separate Celery beat (make run).
PORTAL_EMBEDDED_BEAT = env_bool("PORTAL_EMBEDDED_BEAT", False)

# Billing.
# Off: order and task admission checks pass and running work is never stopped for credit (the test
# suites of other modules turn it off); charges are still metered, rated and posted.
PORTAL_BILLING_ENFORCE = env_bool("PORTAL_BILLING_ENFORCE", True)
PORTAL_ORDER_CHECKS = [*PORTAL_ORDER_CHECKS, "billing.checks.vm_order_can_pay"]
PORTAL_TASK_PAYMENT_CHECK = env("PORTAL_TASK_PAYMENT_CHECK", "billing.checks.task_can_pay")
PORTAL_PACKAGE_HOLDERS = env("PORTAL_PACKAGE_HOLDERS", "billing.selectors.tenants_holding_packages")
# Called as f(tenant=, reason=) when a tenant's credit runs out; empty to leave tasks running.
PORTAL_TASK_STOPPER = env("PORTAL_TASK_STOPPER", "hosting.services.tasks_stop_for_credit")
# Usage that arrives this many days after a month ends still goes on that month's invoice.
PORTAL_INVOICE_GRACE_DAYS = env_int("PORTAL_INVOICE_GRACE_DAYS", 2)
# How far back the sweepers look for unmetered task runs, VM hours, storage days and scale-up days.
PORTAL_BILLING_SWEEP_DAYS = env_int("PORTAL_BILLING_SWEEP_DAYS", 35)
# Payment providers: "offline" (bank transfer confirmed by staff) unless a Stripe key is set.
PORTAL_PAYMENT_PROVIDERS = {
    "offline": "billing.providers.offline.OfflineProvider",
    "stripe": "billing.providers.stripe.StripeProvider",
}
PORTAL_PAYMENT_PROVIDER = env("PORTAL_PAYMENT_PROVIDER", "stripe" if env("STRIPE_SECRET_KEY") else "offline")
# Stripe Checkout (billing/providers/stripe.py) and its webhook at /billing/stripe/webhook/.
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY")
# The endpoint's signing secret (whsec_…): without it no webhook verifies and nothing is credited.
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET")
# How old a webhook's signed timestamp may be before it is refused as a replay (Stripe's default).
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env_int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300)
STRIPE_API_BASE = env("STRIPE_API_BASE", "https://api.stripe.com")
# Offered at checkout: "card", plus "alipay" and "wechat_pay" where the Stripe account has them.
STRIPE_PAYMENT_METHODS = env_list("STRIPE_PAYMENT_METHODS", "card")
# Retries of a failed API call reuse the payment's idempotency key, so they never make a second session.
STRIPE_MAX_NETWORK_RETRIES = env_int("STRIPE_MAX_NETWORK_RETRIES", 2)
STRIPE_TIMEOUT_SECONDS = env_int("STRIPE_TIMEOUT_SECONDS", 20)
if PORTAL_PAYMENT_PROVIDER == "stripe" and not (STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET):
    raise ImproperlyConfigured(
        "The stripe payment provider needs STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET "
        "(payments are credited only by verified webhooks)."
    )
PORTAL_BANK_ACCOUNT_NAME = env("PORTAL_BANK_ACCOUNT_NAME", "GPU Portal Ltd.")
PORTAL_BANK_NAME = env("PORTAL_BANK_NAME", "Industrial and Commercial Bank of China, Shanghai Branch")
PORTAL_BANK_ACCOUNT_NUMBER = env("PORTAL_BANK_ACCOUNT_NUMBER", "6222 0000 0000 0000 000")
PORTAL_TOP_UP_MIN = Decimal(env("PORTAL_TOP_UP_MIN", "100"))
PORTAL_TOP_UP_MAX = Decimal(env("PORTAL_TOP_UP_MAX", "1000000"))
# A TrueType font with Chinese glyphs for invoice PDFs (Debian: fonts-wqy-zenhei).
PORTAL_INVOICE_FONT = env("PORTAL_INVOICE_FONT", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"].update(
    {
        "PaymentStatusEnum": "billing.models.PaymentStatus",
        "InvoiceStatusEnum": "billing.models.InvoiceStatus",
        "SubscriptionStatusEnum": "billing.models.SubscriptionStatus",
        "LedgerKindEnum": "billing.models.LedgerKind",
        "PaymentKindEnum": "billing.models.PaymentKind",
    }
)
CELERY_BEAT_SCHEDULE.update(
    {
        "billing-meter-usage": {"task": "billing.tasks.meter_usage", "schedule": 300.0},
        "billing-meter-storage": {"task": "billing.tasks.meter_storage", "schedule": 3600.0},
        "billing-rate-usage": {"task": "billing.tasks.rate_all_usage", "schedule": 60.0},
        "billing-renew-subscriptions": {"task": "billing.tasks.renew_subscriptions", "schedule": 300.0},
        "billing-expire-credit": {"task": "billing.tasks.expire_credit", "schedule": 3600.0},
        "billing-finalise-invoices": {"task": "billing.tasks.finalise_invoices", "schedule": 3600.0},
    }
)

# Notifications: package credit about to expire, once a day (each grant is announced once).
CELERY_BEAT_SCHEDULE["notify-packages-expiring"] = {
    "task": "notifications.tasks.notify_packages_expiring",
    "schedule": 86400.0,
}
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"]["NotificationKindEnum"] = "notifications.models.NotificationKind"

# Operations (docs/deployment.md). /metrics answers a request that carries
# `Authorization: Bearer <PORTAL_METRICS_TOKEN>` (when set) or comes from an address in
# PORTAL_METRICS_ALLOWED_IPS (comma-separated CIDRs; "none" for no address); anything else gets 403.
# The address is the client's as RequestContextMiddleware sees it (TRUSTED_PROXY_COUNT).
PORTAL_METRICS_TOKEN = env("PORTAL_METRICS_TOKEN")
PORTAL_METRICS_ALLOWED_IPS = (
    []
    if (env("PORTAL_METRICS_ALLOWED_IPS") or "").strip().lower() == "none"
    else env_list("PORTAL_METRICS_ALLOWED_IPS", "127.0.0.1/32,::1/128")
)
for _network in PORTAL_METRICS_ALLOWED_IPS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"PORTAL_METRICS_ALLOWED_IPS: {_exc}") from None
# A Celery worker serves its own counters (task latency and failures, provisioning failures) here when
# set; with the prefork pool that needs PROMETHEUS_MULTIPROC_DIR (read by prometheus_client itself).
PORTAL_WORKER_METRICS_PORT = env_int("PORTAL_WORKER_METRICS_PORT", 0)
PORTAL_WORKER_METRICS_ADDR = env("PORTAL_WORKER_METRICS_ADDR", "127.0.0.1")
# How long /readyz waits for Redis before calling it down (the cluster check uses KUBERNETES_REQUEST_TIMEOUT).
PORTAL_HEALTH_TIMEOUT_SECONDS = float(env("PORTAL_HEALTH_TIMEOUT_SECONDS", "2"))
# "text" (make run) or "json": one JSON object per line, with request id, tenant and user (production).
PORTAL_LOG_FORMAT = env("PORTAL_LOG_FORMAT", "text")
if PORTAL_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured('PORTAL_LOG_FORMAT must be "text" or "json".')

# Customer automation (crm): tiers nightly (and after each payment), churn, upsell and usage reviews
# daily. Each run is idempotent, so a restart that runs one early does no harm.
CELERY_BEAT_SCHEDULE.update(
    {
        "crm-evaluate-tiers": {"task": "crm.tasks.tiers_evaluate_nightly", "schedule": 86400.0},
        "crm-churn-scan": {"task": "crm.tasks.churn_scan_daily", "schedule": 86400.0},
        "crm-upsell": {"task": "crm.tasks.upsell_compute_daily", "schedule": 86400.0},
        "crm-usage-reviews": {"task": "crm.tasks.usage_reviews_daily", "schedule": 86400.0},
    }
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "portal.logging.ContextFilter"}},
    "formatters": {
        "text": {"()": "portal.logging.TextFormatter"},
        "json": {"()": "portal.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["context"], "formatter": PORTAL_LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}},
}
