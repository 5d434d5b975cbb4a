"""Readiness: can this process serve requests now? Each dependency is checked for real, with its latency.

/healthz (liveness) checks nothing but the process itself, so a database outage does not get every
web process restarted; /readyz runs these checks, so a load balancer stops sending traffic to a
process that cannot reach what it needs:

* database: SELECT 1 on every configured database;
* redis: PING on REDIS_URL (cache and Channels layer) when it is set, and on the Celery broker when
  that is a different Redis (celery_broker);
* cluster: the cluster backend's ping() (local: its inventory file; kubevirt: GET /version).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connections

from provisioning.backends import get_backend

logger = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    latency_ms: float
    error: str = ""  # the exception's class: the details go to the log, not to whoever asks

    def as_json(self) -> dict:
        body = {"status": "ok" if self.ok else "error", "latency_ms": round(self.latency_ms, 2)}
        if self.error:
            body["error"] = self.error
        return body


def _timed(name: str, check: Callable[[], None]) -> CheckResult:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # any failure of a dependency makes the process not ready, never a 500
        logger.warning("Readiness check %s failed: %s", name, exc)
        return CheckResult(name, False, (time.perf_counter() - started) * 1000, type(exc).__name__)
    return CheckResult(name, True, (time.perf_counter() - started) * 1000)


def _database(alias: str) -> Callable[[], None]:
    def check() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    return check


def _redis(url: str) -> Callable[[], None]:
    def check() -> None:
        timeout = settings.PORTAL_HEALTH_TIMEOUT_SECONDS
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()

    return check


def _cluster() -> None:
    # Building the backend can fail too (kubevirt without credentials): that is a BackendError as well.
    get_backend().ping()


def redis_urls() -> dict[str, str]:
    """Check name → URL of each distinct Redis this process depends on."""
    urls: dict[str, str] = {}
    candidates = (("redis", settings.REDIS_URL), ("celery_broker", settings.CELERY_BROKER_URL))
    for name, url in candidates:
        if url and url.startswith(REDIS_SCHEMES) and url not in urls.values():
            urls[name] = url
    return urls


def readiness() -> list[CheckResult]:
    checks: list[tuple[str, Callable[[], None]]] = [
        ("database" if alias == "default" else f"database:{alias}", _database(alias)) for alias in connections
    ]
    checks += [(name, _redis(url)) for name, url in redis_urls().items()]
    checks.append(("cluster", _cluster))
    return [_timed(name, check) for name, check in checks]
