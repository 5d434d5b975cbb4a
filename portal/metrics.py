"""Prometheus metrics of the portal, served at /metrics (and by a worker's own exporter).

Two kinds:

* Events counted where they happen, in whichever process: request latency (RequestContextMiddleware),
  Celery task latency and failures (portal.celery's signals), Stripe webhook failures, VMs that end
  Failed. When PROMETHEUS_MULTIPROC_DIR is set (production: several web processes, prefork workers),
  prometheus_client keeps these in files in that directory and a scrape adds up every process's
  files; without it they live in this process's memory (the embedded default, tests).
* State read from the database at scrape time by `DatabaseCollector`: queue depth and oldest wait
  per pool, pool capacity and utilisation, tasks and VMs by state. A fixed number of queries, however
  many rows, and never in the worker exporter (one source of truth, no duplicates).

This is the only module that imports prometheus_client. Host CPU, memory, disk and GPU figures come
from node_exporter and NVIDIA's DCGM exporter, not from here (docs/deployment.md).
"""

import functools
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# `<name>_created` series double every counter and histogram for little use; multiprocess mode has none.
disable_created_metrics()

# Queued work that names no GPU model (CPU-only, or any model will do) is not tied to one pool.
ANY_POOL = "any"
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
UNMATCHED_ROUTE = "<unmatched>"

REQUEST_LATENCY = Histogram(
    "portal_http_request_duration_seconds",
    "Time to answer an HTTP request, by method, route (URL pattern name) and status class.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CELERY_TASK_LATENCY = Histogram(
    "portal_celery_task_duration_seconds",
    "Time a Celery task ran, from task_prerun to task_postrun, by task name.",
    ["task"],
    # From a scheduler tick to a task attempt that runs for days (72 h at most).
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 259200),
)
CELERY_TASK_FAILURES = Counter(
    "portal_celery_task_failures",
    "Celery tasks that raised, by task name.",
    ["task"],
)
WEBHOOK_FAILURES = Counter(
    "portal_webhook_failures",
    "Payment webhooks not applied: rejected (bad signature or body, answered 4xx) or error (raised, answered 5xx).",
    ["provider", "reason"],
)
PROVISIONING_FAILURES = Counter(
    "portal_provisioning_failures",
    "VMs that ended Failed (the cluster refused or lost them, or they missed the provisioning deadline), by pool.",
    ["pool"],
)


def _pools() -> list[str]:
    from provisioning.models import Pool

    return [*Pool.values, ANY_POOL]


@functools.cache
def _initialise_counters() -> None:
    """Counters with labels appear only once touched; start the known ones at 0 so the first failure
    is an increase that increase() and rate() can see. Once per process, before its first exposition
    (the pools are model choices, so not at import)."""
    for reason in ("rejected", "error"):
        WEBHOOK_FAILURES.labels(provider="stripe", reason=reason)
    for pool in _pools():
        PROVISIONING_FAILURES.labels(pool=pool)


# --- recording --------------------------------------------------------------------------------------


def observe_request(*, method: str, route: str | None, status: int, seconds: float) -> None:
    REQUEST_LATENCY.labels(
        method=method if method in HTTP_METHODS else "other",
        route=route or UNMATCHED_ROUTE,
        status=f"{status // 100}xx",
    ).observe(seconds)


_task_started: dict[str, float] = {}


def task_started(task_id: str) -> None:
    _task_started[task_id] = time.perf_counter()


def task_finished(task_id: str, task_name: str, *, failed: bool) -> None:
    started = _task_started.pop(task_id, None)
    if started is not None:
        CELERY_TASK_LATENCY.labels(task=task_name).observe(time.perf_counter() - started)
    if failed:
        CELERY_TASK_FAILURES.labels(task=task_name).inc()


def provisioning_failed(*, gpu_model) -> None:
    PROVISIONING_FAILURES.labels(pool=gpu_model.pool if gpu_model is not None else ANY_POOL).inc()


def count_webhook_failures(provider: str) -> Callable:
    """Decorate a webhook view: a 4xx answer counts as rejected, an exception or 5xx as error."""

    def decorate(view):
        @functools.wraps(view)
        def counted(request, *args, **kwargs):
            try:
                response = view(request, *args, **kwargs)
            except Exception:
                WEBHOOK_FAILURES.labels(provider=provider, reason="error").inc()
                raise
            if response.status_code >= 500:
                WEBHOOK_FAILURES.labels(provider=provider, reason="error").inc()
            elif response.status_code >= 400:
                WEBHOOK_FAILURES.labels(provider=provider, reason="rejected").inc()
            return response

        return counted

    return decorate


# --- state from the database ------------------------------------------------------------------------


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


class DatabaseCollector(Collector):
    """Gauges computed from the database at each scrape, in QUERIES queries whatever the data."""

    QUERIES = 7

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = _gauge("portal_metrics_database_up", "1 when the database answered this scrape's queries.", [])
        try:
            families = [*self._queues(), *self._states(), *self._pools()]
        except DatabaseError:
            logger.exception("Metrics: the database could not be read")
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _queues(self) -> list[GaugeMetricFamily]:
        from hosting.models import Task, TaskState
        from provisioning.models import VirtualMachine, VmState

        depth = _gauge(
            "portal_queue_depth",
            "Work waiting for capacity: kind task (hosting) or vm (rental), by the pool of its GPU model.",
            ["kind", "pool"],
        )
        oldest = _gauge(
            "portal_queue_oldest_wait_seconds",
            "How long the longest-waiting queued item has waited, 0 when none waits.",
            ["kind", "pool"],
        )
        now = timezone.now()
        queued = {
            "task": Task.objects.filter(state=TaskState.QUEUED)
            .order_by()
            .values_list("gpu_model__pool")
            .annotate(n=Count("id"), since=Min("queued_since")),
            "vm": VirtualMachine.objects.filter(state=VmState.QUEUED)
            .order_by()
            .values_list("plan__gpu_model__pool")
            .annotate(n=Count("id"), since=Min("queued_at")),
        }
        for kind, rows in queued.items():
            by_pool = {pool or ANY_POOL: (n, since) for pool, n, since in rows}
            for pool in _pools():
                n, since = by_pool.get(pool, (0, None))
                depth.add_metric([kind, pool], n)
                oldest.add_metric([kind, pool], max((now - since).total_seconds(), 0) if since else 0)
        return [depth, oldest]

    def _states(self) -> list[GaugeMetricFamily]:
        from hosting.models import Task, TaskState
        from provisioning.models import VirtualMachine, VmState

        tasks = _gauge(
            "portal_tasks",
            "Hosted tasks by state: finished ones by outcome (succeeded, failed, timed_out, cancelled), "
            "and those queued, starting, running, waiting to retry or cancelling.",
            ["state"],
        )
        vms = _gauge("portal_vms", "Virtual machines by state.", ["state"])
        for family, model, states in ((tasks, Task, TaskState), (vms, VirtualMachine, VmState)):
            counts = dict(model.objects.order_by().values_list("state").annotate(n=Count("pk")))
            for state in states.values:
                family.add_metric([state], counts.get(state, 0))
        return [tasks, vms]

    def _pools(self) -> list[GaugeMetricFamily]:
        from provisioning.capacity import free_capacity
        from provisioning.models import Node

        gpus = _gauge("portal_pool_gpus", "GPUs on schedulable nodes, by pool and GPU model.", ["pool", "gpu_model"])
        gpus_in_use = _gauge(
            "portal_pool_gpus_in_use",
            "GPUs held by VMs and tasks, a vGPU slice counting as its fraction of a GPU.",
            ["pool", "gpu_model"],
        )
        utilisation = _gauge(
            "portal_pool_gpu_utilisation_ratio",
            "Share of the GPUs held (0–1), by pool and GPU model.",
            ["pool", "gpu_model"],
        )
        free_ratio = _gauge(
            "portal_pool_free_capacity_ratio",
            "Share of a pool's capacity not held (0–1), by resource: gpu (in slice-equivalents), cpu, memory "
            "(including hugepages).",
            ["pool", "resource"],
        )
        per_model: dict[tuple[str, str], list[float]] = {}
        per_pool: dict[tuple[str, str], list[float]] = {}
        for free in free_capacity(Node.objects.filter(schedulable=True).select_related("gpu_model")):
            node = free.node
            held_gpus = _gpus_held(free)
            if node.gpu_model is not None and node.gpus:
                totals = per_model.setdefault((node.pool, node.gpu_model.code), [0, 0])
                totals[0] += node.gpus
                totals[1] += held_gpus
            memory = node.memory_gib + node.hugepages_2mi_gib + node.hugepages_1gi_gib
            free_memory = free.memory_gib + free.hugepages_2mi_gib + free.hugepages_1gi_gib
            for resource, total, held in (
                ("gpu", node.gpus if node.gpu_model is not None else 0, held_gpus),
                ("cpu", node.cpus, node.cpus - free.cpus),
                ("memory", memory, memory - free_memory),
            ):
                totals = per_pool.setdefault((node.pool, resource), [0, 0])
                totals[0] += total
                totals[1] += held
        for (pool, model), (total, held) in sorted(per_model.items()):
            gpus.add_metric([pool, model], total)
            gpus_in_use.add_metric([pool, model], held)
            utilisation.add_metric([pool, model], held / total)
        for (pool, resource), (total, held) in sorted(per_pool.items()):
            if total:
                free_ratio.add_metric([pool, resource], max(total - held, 0) / total)
        return [gpus, gpus_in_use, utilisation, free_ratio]


def _gpus_held(free) -> float:
    slices = max(free.node.vgpu_slices_per_gpu, 1)
    return sum(min(used, slices) for used in free.slices_used.values()) / slices


# --- exposition --------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Forward(Collector):
    """Another registry's metrics, inside a registry built for one scrape."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def collect(self):
        return self.source.collect()


def _process_registry() -> CollectorRegistry:
    """What this process (or, in multiprocess mode, every process sharing the directory) counted."""
    _initialise_counters()
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir())
    else:
        registry.register(_Forward(REGISTRY))
    return registry


def exposition() -> tuple[bytes, str]:
    """The /metrics body and its content type: counted events plus the database's state."""
    registry = _process_registry()
    registry.register(DatabaseCollector())
    # The classic text format every Prometheus since 2.0 reads (our names need none of 1.0.0's escaping).
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def scrape_allowed(request) -> bool:
    """The bearer token (when one is configured), or an address in PORTAL_METRICS_ALLOWED_IPS."""
    from portal.middleware import client_ip

    token = settings.PORTAL_METRICS_TOKEN
    if token:
        presented = request.headers.get("Authorization", "")
        if presented.startswith("Bearer ") and _same(presented[len("Bearer ") :], token):
            return True
    address = client_ip(request)
    if not address:
        return False
    ip = ipaddress.ip_address(address)
    candidates = [ip, ip.ipv4_mapped] if ip.version == 6 and ip.ipv4_mapped else [ip]
    return any(
        candidate in network
        for network in map(ipaddress.ip_network, settings.PORTAL_METRICS_ALLOWED_IPS)
        for candidate in candidates
        if candidate.version == network.version
    )


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def start_worker_exporter(port: int, addr: str):
    """Serve this Celery worker's counted events (no database gauges) on addr:port, for Prometheus.
    With the prefork pool the events are counted in the child processes, so this needs
    PROMETHEUS_MULTIPROC_DIR: the exporter in the parent then reads every child's files."""
    server, thread = start_http_server(port, addr=addr, registry=_process_registry())
    logger.info("Worker metrics on http://%s:%s/metrics", addr, server.server_port)
    return server, thread
