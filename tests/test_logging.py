"""Structured logs: JSON lines with request id, tenant and user; the request id follows a request into the
Celery tasks it enqueues — inline, through the publish headers, and through a real worker."""

import contextvars
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from celery.signals import before_task_publish
from django.http import HttpResponse
from django.test import RequestFactory

from portal.context import current
from portal.logging import ContextFilter, JsonFormatter, current_log_context
from portal.middleware import RequestContextMiddleware
from provisioning.tasks import revert_scale_ups
from tenants import services as tenant_services
from tests.test_settings import manage

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def json_lines():
    """Every record, through the production filter and JSON formatter, as parsed lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


def test_a_json_line_has_every_field_and_the_traceback():
    formatter = JsonFormatter()
    try:
        raise ValueError("壊れた")
    except ValueError:
        record = logging.getLogger("portal.test").makeRecord(
            "portal.test", logging.ERROR, __file__, 1, "任务 %s 失败", ("t-1",), sys.exc_info()
        )
    ContextFilter().filter(record)
    line = formatter.format(record)
    assert "\n" not in line  # one record, one line, whatever the traceback
    entry = json.loads(line)
    assert entry["message"] == "任务 t-1 失败" and entry["level"] == "ERROR" and entry["logger"] == "portal.test"
    assert entry["timestamp"].endswith("+00:00") and "T" in entry["timestamp"]
    assert (entry["request_id"], entry["tenant"], entry["user_id"]) == (None, None, None)
    assert entry["exception"].startswith("Traceback") and "ValueError: 壊れた" in entry["exception"]


@pytest.mark.django_db
def test_a_request_logs_its_id_and_a_rejected_webhook_says_so(client, settings, json_lines):
    settings.STRIPE_WEBHOOK_SECRET = "whsec_test"
    response = client.post(
        "/billing/stripe/webhook/",
        data="{}",
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE="t=1,v1=00",
        HTTP_X_REQUEST_ID="req-json-1",
    )
    assert response.status_code == 400
    lines = json_lines()
    rejected = [line for line in lines if line["logger"] == "billing.stripe"]
    answered = [line for line in lines if line["logger"] == "django.request"]
    assert rejected and rejected[0]["message"].startswith("Stripe webhook rejected")
    assert answered and answered[0]["message"] == "Bad Request: /billing/stripe/webhook/"
    assert {line["request_id"] for line in rejected + answered} == {"req-json-1"}


@pytest.mark.django_db
def test_an_api_request_logs_its_tenant_and_user(client, tenant, owner_membership, user, json_lines):
    secret = tenant_services.api_token_create(membership=owner_membership, actor=user, name="ci").secret
    response = client.get(f"/api/v1/vms/{uuid.uuid4()}/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 404
    [line] = [line for line in json_lines() if line["logger"] == "django.request"]
    assert line["message"].startswith("Not Found: /api/v1/vms/")
    assert (line["tenant"], line["user_id"]) == (tenant.slug, user.pk)


@pytest.mark.django_db
def test_an_anonymous_request_is_logged_without_looking_the_user_up(client, json_lines, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert client.get("/no/such/page/", HTTP_X_REQUEST_ID="anon-1").status_code == 404
    [line] = [line for line in json_lines() if line["logger"] == "django.request"]
    assert (line["request_id"], line["tenant"], line["user_id"]) == ("anon-1", None, None)


def _through_middleware(view, request_id: str):
    request = RequestFactory().get("/somewhere/", HTTP_X_REQUEST_ID=request_id)
    return RequestContextMiddleware(view)(request)


@pytest.mark.django_db
def test_a_task_run_inline_logs_with_the_request_id_and_leaves_the_request_its_id(json_lines):
    seen = {}

    def view(request):
        revert_scale_ups.apply_async()  # eager in tests and in the embedded default
        seen["after_task"] = current().request_id
        logging.getLogger("portal.test").info("view done")
        return HttpResponse("ok")

    _through_middleware(view, "inline-1")
    lines = json_lines()
    [task_line] = [line for line in lines if line["logger"] == "celery.app.trace"]
    assert "succeeded" in task_line["message"] and task_line["request_id"] == "inline-1"
    [view_line] = [line for line in lines if line["message"] == "view done"]
    assert view_line["request_id"] == "inline-1" and seen["after_task"] == "inline-1"
    assert current().request_id == ""  # nothing left bound after the request


def test_publishing_puts_the_request_id_tenant_and_user_in_the_headers():
    headers: dict = {}
    tenant = type("T", (), {"slug": "acme"})()
    user = type("U", (), {"pk": 42, "is_authenticated": True})()

    def view(request):
        request.tenant, request.user = tenant, user
        before_task_publish.send(sender="provisioning.tasks.sync_vm", headers=headers, body=((), {}, {}))
        return HttpResponse("ok")

    _through_middleware(view, "pub-1")
    assert headers == {"portal_request_id": "pub-1", "portal_tenant": "acme", "portal_user_id": 42}

    outside: dict = {"id": "x"}
    before_task_publish.send(sender="provisioning.tasks.sync_vm", headers=outside, body=((), {}, {}))
    assert outside == {"id": "x"}  # beat or a worker publishing: nothing to carry


@pytest.mark.django_db
def test_a_task_restores_the_id_from_its_headers_and_clears_it_after(json_lines):
    def run_like_a_worker():  # a fresh context, as in a worker process: nothing bound beforehand
        revert_scale_ups.apply(headers={"portal_request_id": "hdr-1", "portal_tenant": "acme", "portal_user_id": 7})
        return current().request_id, current_log_context().subject()

    after = contextvars.Context().run(run_like_a_worker)
    [line] = [line for line in json_lines() if line["logger"] == "celery.app.trace"]
    assert (line["request_id"], line["tenant"], line["user_id"]) == ("hdr-1", "acme", 7)
    assert after == ("", (None, None))


def _manage_shell(code: str, **env):
    clean = {k: v for k, v in os.environ.items() if k != "PORTAL_LOG_FORMAT"}
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_portal_log_format_json_makes_every_console_line_json():
    code = "import logging; logging.getLogger('portal.probe').warning('disk %s is slow', 'vdb')"
    result = _manage_shell(code, PORTAL_LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    [entry] = [json.loads(line) for line in result.stderr.splitlines() if "portal.probe" in line]
    assert entry["message"] == "disk vdb is slow" and entry["level"] == "WARNING" and entry["request_id"] is None

    text = _manage_shell(code)
    assert "WARNING portal.probe [-] disk vdb is slow" in text.stderr

    wrong = manage("check", env={"PORTAL_LOG_FORMAT": "xml"})
    assert wrong.returncode != 0 and 'PORTAL_LOG_FORMAT must be "text" or "json"' in wrong.stderr


# --- a real worker ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def worker(settings, tmp_path):
    """A Celery worker process (Redis broker, a queue of its own) logging JSON and serving its metrics."""
    from portal.celery import app

    queue = f"test-ops-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "PORTAL_LOG_FORMAT": "json",
        "PORTAL_WORKER_METRICS_PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
    }
    command = [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool", "solo", "-Q", queue]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    previous = (app.conf.task_always_eager, app.conf.task_default_queue)
    app.conf.task_always_eager = False
    app.conf.task_default_queue = queue
    try:
        yield process, log, f"http://127.0.0.1:{port}/metrics"
    finally:
        app.conf.task_always_eager, app.conf.task_default_queue = previous
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _json_records(log: Path) -> list[dict]:
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


@pytest.mark.redis
def test_a_real_worker_logs_json_with_the_publishing_requests_id_and_serves_its_metrics(worker):
    from portal.celery import app

    process, log, metrics_url = worker
    _wait_for(lambda: _get(metrics_url), what="the worker's metrics endpoint")
    request_id = f"e2e-{uuid.uuid4().hex[:12]}"

    def view(request):
        # A bad call (send_task does not check arguments): it fails in the worker, before any query.
        app.send_task(revert_scale_ups.name, args=[1])
        return HttpResponse("ok")

    _through_middleware(view, request_id)
    app.send_task(revert_scale_ups.name, args=[2])  # published outside any request

    def failures():
        return [r for r in _json_records(log) if r["logger"] == "celery.app.trace" and r["level"] == "ERROR"]

    first, second = _wait_for(lambda: len(failures()) >= 2 and failures(), what="both tasks to fail in the worker")
    assert process.poll() is None, log.read_text()
    assert first["request_id"] == request_id and "TypeError" in first["exception"]
    assert second["request_id"] is None  # the worker did not keep the first task's id
    body = _get(metrics_url)
    assert 'portal_celery_task_failures_total{task="provisioning.tasks.revert_scale_ups"} 2.0' in body
    assert 'portal_celery_task_duration_seconds_count{task="provisioning.tasks.revert_scale_ups"} 2.0' in body
    assert "portal_queue_depth" not in body  # database gauges come from the web's /metrics only


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""
