"""Shared fixtures. Tests run on whatever DATABASE_URL / REDIS_URL point at; CI sets both
and PORTAL_REQUIRE_SERVICES=1, which turns a missing service into a failure instead of skips."""

import os

import pytest
from django.conf import settings as django_settings
from django.utils import translation
from rest_framework.test import APIClient

from tenants.models import Role
from tests.factories import UserFactory, add_member, make_tenant

CHROMIUM = "/usr/bin/chromium"
REQUIRE_SERVICES = os.environ.get("PORTAL_REQUIRE_SERVICES") == "1"


def _database_vendor() -> str:
    engine = django_settings.DATABASES["default"]["ENGINE"]
    return "postgresql" if "postgresql" in engine else engine.rsplit(".", 1)[-1]


def _redis_reachable() -> bool:
    url = os.environ.get("REDIS_URL")
    if not url:
        return False
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def pytest_configure(config):
    config.portal_services = {
        "postgres": _database_vendor() == "postgresql",
        "redis": _redis_reachable(),
        "browser": os.path.exists(CHROMIUM),
    }
    if REQUIRE_SERVICES:
        missing = [name for name, ok in config.portal_services.items() if not ok]
        if missing:
            raise pytest.UsageError(
                f"PORTAL_REQUIRE_SERVICES=1 but these are missing: {', '.join(missing)} "
                f"(DATABASE_URL={os.environ.get('DATABASE_URL')!r}, REDIS_URL={os.environ.get('REDIS_URL')!r}, "
                f"chromium at {CHROMIUM})"
            )


SKIP_REASONS = {
    "postgres": "needs PostgreSQL: set DATABASE_URL=postgres://… (row locks and concurrent transactions)",
    "redis": "needs Redis: set REDIS_URL=redis://… (channel layer fan-out)",
    "browser": f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, available in config.portal_services.items():
            if item.get_closest_marker(marker) and not available:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASONS[marker]))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    services = ", ".join(f"{name}={'yes' if ok else 'no'}" for name, ok in config.portal_services.items())
    terminalreporter.write_line(f"services: {services}; database: {_database_vendor()}")


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path):
    translation.activate("en")  # a request in another language must not leak into the next test
    settings.ACCOUNT_RATE_LIMITS = False
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.PORTAL_BILLING_ENFORCE = False  # billing's own tests turn it on
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def tenant(db, user):
    return make_tenant(owner=user)


@pytest.fixture
def owner_membership(tenant, user):
    return tenant.memberships.get(user=user)


@pytest.fixture
def member_of(db):
    """member_of(tenant, role) → a new user with that role in the tenant."""

    def make(tenant, role=Role.MEMBER):
        return add_member(tenant, role).user

    return make


@pytest.fixture
def api():
    """api(user=None, token=None) → an APIClient logged in by session or by bearer token."""

    def make(user=None, token: str | None = None):
        client = APIClient()
        if token:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        elif user is not None:
            client.force_login(user)
        return client

    return make


@pytest.fixture(scope="session", autouse=True)
def _close_stray_connections(django_db_setup, django_db_blocker):
    """The live server's thread keeps its own PostgreSQL connection, which would block dropping the
    test database at the end; end such sessions once every test is done."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session", autouse=True)
def _celery_runs_inline():
    """Tasks run inline in tests, whatever REDIS_URL says; tests of the real worker start their own."""
    from portal.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True


@pytest.fixture(autouse=True)
def _fresh_channel_layers():
    """A Redis channel layer binds to the event loop that first used it: start each test without one."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()
