"""/metrics: who may scrape it, what it says about requests, queues, pools, tasks, VMs, Celery and
failures, in how many queries, and how processes add up in multiprocess mode."""

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.http import HttpResponse
from django.test import RequestFactory
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from hosting.models import Task, TaskState
from portal import metrics
from portal.metrics import DatabaseCollector
from provisioning import services as vm_services
from provisioning.models import GpuModel, LocalClusterVm, Node, Placement, Plan, VirtualMachine, VmState
from provisioning.tasks import revert_scale_ups
from tenants import services as tenant_services
from tests.factories import new_public_key

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent


def scrape(client, **extra) -> str:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return response.content.decode()


def samples(body: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(body: str, name: str, **labels) -> float | None:
    return samples(body).get((name, frozenset(labels.items())))


# --- access ------------------------------------------------------------------------------------------


def test_loopback_may_scrape_by_default_and_others_get_403(client):
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1").status_code == 200  # a dual-stack socket's view
    refused = client.get("/metrics", REMOTE_ADDR="203.0.113.5")
    assert refused.status_code == 403
    assert b"portal_" not in refused.content


def test_allowed_networks_come_from_settings(client, settings):
    settings.PORTAL_METRICS_ALLOWED_IPS = ["10.20.0.0/16"]
    assert client.get("/metrics", REMOTE_ADDR="10.20.3.4").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.21.0.1").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_a_bearer_token_opens_it_from_anywhere_and_nothing_else_does(client, settings):
    settings.PORTAL_METRICS_TOKEN = "prom-scrape-secret"
    settings.PORTAL_METRICS_ALLOWED_IPS = []
    outside = {"REMOTE_ADDR": "198.51.100.7"}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer prom-scrape-secret", **outside).status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer prom-scrape-secreT", **outside).status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="prom-scrape-secret", **outside).status_code == 403
    assert client.get("/metrics", **outside).status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403  # no network allowed at all


def test_without_a_token_configured_no_bearer_value_is_accepted(client, settings):
    settings.PORTAL_METRICS_TOKEN = None
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ", REMOTE_ADDR="198.51.100.7").status_code == 403


def test_behind_a_proxy_the_forwarded_client_counts_not_the_proxy(client, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    # nginx on the same host: REMOTE_ADDR is loopback, the client is outside.
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="127.0.0.1").status_code == 200


def test_only_get(client):
    assert client.post("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 405


# --- request latency -------------------------------------------------------------------------------------


def test_request_latency_is_labelled_by_route_name_never_by_path(client, user):
    count = "portal_http_request_duration_seconds_count"
    before = samples(scrape(client))
    client.get("/healthz")
    client.force_login(user)
    missing = uuid.uuid4()
    assert client.get(f"/tasks/{missing}/").status_code == 404
    assert client.get("/no/such/page/").status_code == 404
    body = scrape(client)
    after = samples(body)

    def delta(**labels) -> float:
        key = (count, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert delta(method="GET", route="healthz", status="2xx") == 1
    assert delta(method="GET", route="task_detail", status="4xx") == 1
    assert delta(method="GET", route="<unmatched>", status="4xx") == 1
    assert str(missing) not in body and "/no/such/page/" not in body
    assert value(
        body, "portal_http_request_duration_seconds_bucket", method="GET", route="healthz", status="2xx", le="+Inf"
    )


def test_an_unusual_method_does_not_make_a_new_label(client):
    before = value(
        scrape(client), "portal_http_request_duration_seconds_count", method="other", route="healthz", status="2xx"
    )
    client.generic("PURGE", "/healthz")
    after = value(
        scrape(client), "portal_http_request_duration_seconds_count", method="other", route="healthz", status="2xx"
    )
    assert after == (before or 0) + 1


# --- state from the database ----------------------------------------------------------------------------


@pytest.fixture
def estate(tenant, user):
    """Nodes with placements, and tasks and VMs in known states."""
    a100, a10 = GpuModel.objects.get(code="A100"), GpuModel.objects.get(code="A10")
    n1 = Node.objects.create(name="a100-1", pool="high_end", gpu_model=a100, gpus=8, cpus=100, memory_gib=1000)
    n2 = Node.objects.create(
        name="a10-1", pool="general", gpu_model=a10, gpus=4, vgpu_slices_per_gpu=4, cpus=50, memory_gib=200
    )
    n3 = Node.objects.create(
        name="db-1", pool="high_end", gpus=0, cpus=64, memory_gib=512, hugepages_1gi_gib=384, dedicated=True
    )
    Node.objects.create(
        name="a100-off", pool="high_end", gpu_model=a100, gpus=8, cpus=100, memory_gib=1000, schedulable=False
    )
    Placement.objects.create(
        node=n1, holder_type="vm", holder_id="v1", gpus=2, gpu_slots=[[0, 1], [1, 1]], cpus=16, memory_gib=64
    )
    Placement.objects.create(
        node=n1, holder_type="vm", holder_id="gone", gpus=6, gpu_slots=[[2, 1]], cpus=60, released_at=timezone.now()
    )
    Placement.objects.create(node=n2, holder_type="task", holder_id="t1", gpu_slots=[[0, 2]], cpus=4, memory_gib=16)
    Placement.objects.create(
        node=n2, holder_type="task", holder_id="t2", gpu_slots=[[0, 1], [1, 4]], cpus=2, memory_gib=8
    )
    Placement.objects.create(
        node=n3, holder_type="vm", holder_id="db", cpus=4, memory_gib=2, hugepage_size="1Gi", hugepages_gib=64
    )

    now = timezone.now()

    def task(state, gpu_model=None, waited=0):
        return Task.objects.create(
            tenant=tenant,
            created_by=user,
            name=f"t-{state}",
            framework="pytorch",
            image="img",
            command="true",
            gpu_model=gpu_model,
            state=state,
            queued_since=now - timedelta(seconds=waited),
        )

    task(TaskState.QUEUED, a10, waited=600)
    task(TaskState.QUEUED, a10, waited=60)
    task(TaskState.QUEUED, None, waited=30)
    task(TaskState.RUNNING, a100)
    task(TaskState.SUCCEEDED)
    task(TaskState.SUCCEEDED)
    task(TaskState.FAILED)

    def vm(name, state, plan, waited=None):
        return VirtualMachine.objects.create(
            tenant=tenant,
            created_by=user,
            plan=Plan.objects.get(code=plan),
            name=name,
            billing_mode="monthly",
            state=state,
            queued_at=now - timedelta(seconds=waited) if waited is not None else None,
        )

    vm("wait-a100", VmState.QUEUED, "a100-2x-training", waited=1200)
    vm("wait-db", VmState.QUEUED, "db-64g", waited=100)
    vm("up", VmState.RUNNING, "a10-1x-general")
    vm("broken", VmState.FAILED, "t4-1x-general")
    return n1


def test_queues_are_measured_per_kind_and_pool(client, estate):
    body = scrape(client)
    depth = {labels: v for (name, labels), v in samples(body).items() if name == "portal_queue_depth"}
    assert depth == {
        frozenset({"kind": kind, "pool": pool}.items()): n
        for kind, pool, n in [
            ("task", "general", 2),
            ("task", "any", 1),
            ("task", "high_end", 0),
            ("task", "edge", 0),
            ("vm", "high_end", 1),
            ("vm", "any", 1),
            ("vm", "general", 0),
            ("vm", "edge", 0),
        ]
    }
    wait = "portal_queue_oldest_wait_seconds"
    assert 600 <= value(body, wait, kind="task", pool="general") < 660
    assert 30 <= value(body, wait, kind="task", pool="any") < 90
    assert 1200 <= value(body, wait, kind="vm", pool="high_end") < 1260
    assert 100 <= value(body, wait, kind="vm", pool="any") < 160
    assert value(body, wait, kind="task", pool="edge") == 0


def test_pool_capacity_and_utilisation_count_schedulable_nodes_and_active_placements(client, estate):
    body = scrape(client)
    assert value(body, "portal_pool_gpus", pool="high_end", gpu_model="A100") == 8  # the unschedulable node is not
    assert value(body, "portal_pool_gpus_in_use", pool="high_end", gpu_model="A100") == 2  # the released one is not
    assert value(body, "portal_pool_gpu_utilisation_ratio", pool="high_end", gpu_model="A100") == 0.25
    # A10 slices, 4 per GPU: GPU 0 holds 2 + 1, GPU 1 holds all 4 → 1.75 GPUs.
    assert value(body, "portal_pool_gpus_in_use", pool="general", gpu_model="A10") == 1.75
    assert value(body, "portal_pool_gpu_utilisation_ratio", pool="general", gpu_model="A10") == 1.75 / 4
    free = "portal_pool_free_capacity_ratio"
    assert value(body, free, pool="high_end", resource="gpu") == 0.75
    assert value(body, free, pool="high_end", resource="cpu") == pytest.approx((164 - 20) / 164)
    # memory includes hugepages: 1000 + 512 + 384 GiB, of which 64 + 2 + 64 are held.
    assert value(body, free, pool="high_end", resource="memory") == pytest.approx((1896 - 130) / 1896)
    assert value(body, free, pool="general", resource="gpu") == pytest.approx(0.5625)
    assert value(body, free, pool="general", resource="cpu") == pytest.approx(0.88)
    assert not [key for key in samples(body) if key[0] == free and ("pool", "edge") in key[1]]  # no edge nodes here


def test_tasks_and_vms_are_counted_by_state(client, estate):
    body = scrape(client)
    assert {s: value(body, "portal_tasks", state=s) for s in TaskState.values} == {
        "queued": 3,
        "starting": 0,
        "running": 1,
        "retry_wait": 0,
        "cancelling": 0,
        "succeeded": 2,
        "failed": 1,
        "timed_out": 0,
        "cancelled": 0,
    }
    assert value(body, "portal_vms", state="queued") == 2
    assert value(body, "portal_vms", state="running") == 1
    assert value(body, "portal_vms", state="failed") == 1
    assert value(body, "portal_vms", state="released") == 0
    assert value(body, "portal_metrics_database_up") == 1


def test_the_collector_takes_the_same_few_queries_however_much_data(estate, tenant, user, django_assert_num_queries):
    with django_assert_num_queries(DatabaseCollector.QUERIES):
        first = list(DatabaseCollector().collect())
    a10 = GpuModel.objects.get(code="A10")
    for n in range(20):
        node = Node.objects.create(name=f"more-{n}", pool="edge", gpu_model=a10, gpus=2, cpus=8, memory_gib=32)
        Placement.objects.create(node=node, holder_type="task", holder_id=f"x{n}", gpus=1, gpu_slots=[[0, 1]], cpus=1)
        Task.objects.create(tenant=tenant, created_by=user, name="x", framework="pytorch", image="i", command="c")
    with django_assert_num_queries(DatabaseCollector.QUERIES):
        second = list(DatabaseCollector().collect())
    assert len(second[-1].samples) > len(first[-1].samples)  # the edge pool now has free-capacity series


@pytest.mark.postgres
def test_a_database_that_cannot_answer_is_reported_not_raised(client):
    with transaction.atomic():
        with connection.cursor() as cursor, pytest.raises(Exception, match="division by zero"):
            cursor.execute("SELECT 1 / 0")
        # The transaction is aborted now: every query the collector makes is refused by PostgreSQL.
        families = {family.name: family for family in DatabaseCollector().collect()}
        transaction.set_rollback(True)
    assert list(families) == ["portal_metrics_database_up"]
    assert families["portal_metrics_database_up"].samples[0].value == 0


# --- counted failures ---------------------------------------------------------------------------------------


def test_a_rejected_stripe_webhook_is_counted(client, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_portal"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_portal_test"
    labels = {"provider": "stripe", "reason": "rejected"}
    before = value(scrape(client), "portal_webhook_failures_total", **labels)
    response = client.post(
        "/billing/stripe/webhook/", data="{}", content_type="application/json", HTTP_STRIPE_SIGNATURE="t=1,v1=00"
    )
    assert response.status_code == 400
    assert value(scrape(client), "portal_webhook_failures_total", **labels) == before + 1


def test_a_webhook_view_that_raises_or_answers_5xx_counts_as_error_and_a_200_counts_nothing(client):
    request = RequestFactory().post("/hook")

    @metrics.count_webhook_failures("stripe")
    def raising(request):
        raise RuntimeError("the database went away")

    @metrics.count_webhook_failures("stripe")
    def answering(request, status):
        return HttpResponse(status=status)

    error = {"provider": "stripe", "reason": "error"}
    rejected = {"provider": "stripe", "reason": "rejected"}
    before = samples(scrape(client))
    with pytest.raises(RuntimeError):
        raising(request)
    answering(request, 503)
    answering(request, 200)
    answering(request, 409)
    after = samples(scrape(client))

    def delta(labels) -> float:
        key = ("portal_webhook_failures_total", frozenset(labels.items()))
        return after[key] - before[key]

    assert (delta(error), delta(rejected)) == (2, 1)


def test_a_vm_that_fails_is_counted_once_per_failure_in_its_pool(
    client, settings, owner_membership, user, django_capture_on_commit_callbacks
):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 60
    vm_services.inventory_sync()
    key = tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="k", public_key=new_public_key())
    labels = {"pool": "high_end"}
    before = value(scrape(client), "portal_provisioning_failures_total", **labels)
    with django_capture_on_commit_callbacks(execute=True):
        vm = vm_services.vm_order(
            membership=owner_membership,
            actor=user,
            plan=Plan.objects.get(code="a100-1x-general"),
            name="box",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    LocalClusterVm.objects.update(failure="GPU fell off the bus (Xid 79)")
    with django_capture_on_commit_callbacks(execute=True):
        vm_services.reconcile()
    with django_capture_on_commit_callbacks(execute=True):
        vm_services.reconcile()  # already Failed: not counted again
    vm.refresh_from_db()
    assert vm.state == VmState.FAILED
    body = scrape(client)
    assert value(body, "portal_provisioning_failures_total", **labels) == before + 1


def test_celery_tasks_are_timed_and_failures_counted(client):
    name = revert_scale_ups.name
    before = samples(scrape(client))
    revert_scale_ups.apply()
    with pytest.raises(TypeError):
        revert_scale_ups.apply(args=[1])  # a bad call: the task raises
    after = samples(scrape(client))

    def delta(sample_name) -> float:
        key = (sample_name, frozenset({"task": name}.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("portal_celery_task_duration_seconds_count") == 2
    assert delta("portal_celery_task_failures_total") == 1
    assert delta("portal_celery_task_duration_seconds_sum") > 0


# --- several processes ----------------------------------------------------------------------------------------

CHILD = """
import django
django.setup()
from portal import metrics
metrics.WEBHOOK_FAILURES.labels(provider="stripe", reason="rejected").inc({n})
metrics.observe_request(method="GET", route="dashboard", status=200, seconds=0.2)
"""


def test_multiprocess_mode_adds_up_what_every_process_counted(client, tmp_path, monkeypatch):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "portal.settings"}
    for n in (3, 2):  # two processes that have exited, as web processes and prefork children do
        subprocess.run([sys.executable, "-c", CHILD.format(n=n)], cwd=ROOT, env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("*.db"))) >= 2
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body = scrape(client)
    assert value(body, "portal_webhook_failures_total", provider="stripe", reason="rejected") == 5
    assert value(body, "portal_http_request_duration_seconds_count", method="GET", route="dashboard", status="2xx") == 2
    assert value(body, "portal_metrics_database_up") == 1  # the database's gauges come with them
    assert "python_gc_objects_collected_total" not in body  # this process's own registry is not read
