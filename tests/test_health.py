"""/healthz (liveness: the process alone) and /readyz (database, Redis, cluster: each checked for real,
503 naming whichever is down)."""

import socket

import pytest
import yaml
from django.db import connections

from provisioning.backends import reset_backend_cache
from tests.kube_fake import KubeFake, running_fake

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _fresh_backend():
    reset_backend_cache()
    yield
    reset_backend_cache()


@pytest.fixture
def no_redis(settings):
    settings.REDIS_URL = None
    settings.CELERY_BROKER_URL = "memory://"


def test_healthz_answers_without_touching_any_dependency(client, settings, django_assert_num_queries):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.PORTAL_LOCAL_INVENTORY = "/nonexistent/inventory.yaml"
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_when_every_dependency_answers(client, no_redis):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "cluster"}  # no Redis configured: none checked
    for check in body["checks"].values():
        assert check["status"] == "ok" and check["latency_ms"] >= 0


@pytest.mark.redis
def test_redis_is_checked_when_configured(client, settings):
    import os

    settings.REDIS_URL = settings.CELERY_BROKER_URL = os.environ["REDIS_URL"]
    body = client.get("/readyz").json()
    assert body["checks"]["redis"]["status"] == "ok"
    assert "celery_broker" not in body["checks"]  # the same Redis is checked once


def test_redis_on_a_closed_port_makes_it_unready_and_is_named(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.CELERY_BROKER_URL = "memory://"
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"]["status"] == "error"
    assert body["checks"]["redis"]["error"] == "ConnectionError"
    assert body["checks"]["database"]["status"] == "ok" and body["checks"]["cluster"]["status"] == "ok"


def test_a_celery_broker_on_another_redis_is_checked_on_its_own(client, settings):
    settings.REDIS_URL = None
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/1"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["celery_broker"]["status"] == "error"


@pytest.fixture
def database_down():
    """The database server goes away: the connection is closed and now points at a port nothing listens
    on. (A transaction test: nothing holds the connection open around the test.)"""
    connection = connections["default"]
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(closed_port()))
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_database_that_cannot_be_reached_makes_it_unready_and_is_named(client, no_redis, database_down):
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == {
        "status": "error",
        "latency_ms": checks["database"]["latency_ms"],
        "error": "OperationalError",
    }
    assert checks["cluster"]["status"] == "ok"
    assert client.get("/healthz").status_code == 200  # alive all the same: restarting would not help


def test_the_local_cluster_without_its_inventory_is_unready(client, settings, no_redis, tmp_path):
    settings.PORTAL_LOCAL_INVENTORY = tmp_path / "missing.yaml"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["cluster"] == {
        "status": "error",
        "latency_ms": response.json()["checks"]["cluster"]["latency_ms"],
        "error": "BackendError",
    }


def kubeconfig(path, server: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gpu", "cluster": {"server": server}}],
                "users": [{"name": "portal", "user": {"token": "readiness-token"}}],
                "contexts": [{"name": "portal", "context": {"cluster": "gpu", "user": "portal"}}],
                "current-context": "portal",
            }
        )
    )
    return str(path)


@pytest.fixture
def kubevirt(settings, tmp_path):
    settings.PORTAL_CLUSTER_BACKEND = "kubevirt"
    settings.KUBERNETES_IN_CLUSTER = False
    settings.KUBERNETES_CONTEXT = None
    settings.KUBERNETES_REQUEST_TIMEOUT = 2
    return settings


def test_kubevirt_readiness_asks_the_api_server_for_its_version(client, kubevirt, no_redis, tmp_path):
    with running_fake() as fake:
        kubevirt.KUBERNETES_KUBECONFIG = kubeconfig(tmp_path / "kubeconfig", fake.url)
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json()["checks"]["cluster"]["status"] == "ok"
        [request] = fake.requests_to("GET", "^/version/$")
        assert request.authorization == "Bearer readiness-token"


def test_kubevirt_readiness_fails_while_the_api_server_errors(client, kubevirt, no_redis, tmp_path):
    with running_fake() as fake:
        kubevirt.KUBERNETES_KUBECONFIG = kubeconfig(tmp_path / "kubeconfig", fake.url)
        fake.fail_next("GET", "^/version/$", 503)
        erroring = client.get("/readyz")
        assert erroring.status_code == 503 and erroring.json()["checks"]["cluster"]["status"] == "error"
        assert client.get("/readyz").status_code == 200  # one try per probe: the next one sees it back


def test_kubevirt_readiness_fails_when_the_api_server_cannot_be_reached(client, kubevirt, no_redis, tmp_path):
    fake = KubeFake().start()
    fake.stop()  # nothing listens there any more
    kubevirt.KUBERNETES_KUBECONFIG = kubeconfig(tmp_path / "kubeconfig", fake.url)
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["checks"]["cluster"] == {
        "status": "error",
        "latency_ms": down.json()["checks"]["cluster"]["latency_ms"],
        "error": "BackendError",
    }


def test_kubevirt_without_credentials_is_unready_not_a_500(client, kubevirt, no_redis, tmp_path):
    kubevirt.KUBERNETES_KUBECONFIG = str(tmp_path / "absent-kubeconfig")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["cluster"]["error"] == "BackendError"


def test_failures_say_what_failed_in_the_log_but_not_in_the_body(client, settings, caplog):
    port = closed_port()
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.CELERY_BROKER_URL = "memory://"
    response = client.get("/readyz")
    assert str(port) not in response.content.decode()
    assert any("redis" in r.getMessage() and str(port) in r.getMessage() for r in caplog.records)
