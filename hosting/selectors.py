"""Reads for task hosting: a tenant's tasks, their place in line, when they may start, what they used,
and their kept event stream.

Every task read takes the tenant it reads from; list reads run a fixed number of queries whatever
the number of rows.
"""

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Max, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone
from django.utils.module_loading import import_string

from hosting.models import ACTIVE_TASK_STATES, EventKind, Task, TaskEvent, TaskRun, TaskState
from provisioning.models import Node, Placement, Pool
from tenants.models import Tenant

WAITING_STATES = [TaskState.QUEUED, TaskState.RETRY_WAIT]
CANCELLABLE_STATES = [TaskState.QUEUED, TaskState.RETRY_WAIT, TaskState.STARTING, TaskState.RUNNING]
TASK_HOLDER = "task"  # Placement.holder_type of tasks (hosting.services.HOLDER)


def tasks_of(tenant: Tenant) -> QuerySet[Task]:
    """Every task of the tenant, newest first."""
    return Task.objects.filter(tenant=tenant).select_related("gpu_model", "created_by", "tenant__tier")


def task_of(tenant: Tenant, pk) -> Task:
    """One task of the tenant. Raises Task.DoesNotExist for another tenant's task or a bad id."""
    try:
        return tasks_of(tenant).get(pk=pk)
    except (ValueError, TypeError) as exc:  # not a UUID
        raise Task.DoesNotExist from exc


# --- Place in line and estimated start ----------------------------------------------------------


def _line_key(rank: int, queued_since, pk) -> tuple:
    return (-rank, queued_since, str(pk))


def queue_position(task: Task) -> int | None:
    """1-based place of a waiting task among the tasks waiting for the same GPU model (or for CPUs only).

    An estimate: the scheduler orders by tier, then by how long each task has waited, as here, but
    also weighs compute packages, the task's own priority, fair share between tenants and whether it
    fits where capacity is free, so a task further back may start first. None unless it waits.
    """
    if task.state not in WAITING_STATES:
        return None
    rank = task.tenant.tier.rank
    ahead = (
        Task.objects.filter(state__in=WAITING_STATES, gpu_model_id=task.gpu_model_id)
        .exclude(pk=task.pk)
        .filter(
            Q(tenant__tier__rank__gt=rank)
            | Q(tenant__tier__rank=rank, queued_since__lt=task.queued_since)
            | Q(tenant__tier__rank=rank, queued_since=task.queued_since, pk__lt=task.pk)
        )
        .count()
    )
    return ahead + 1


def queue_positions(tasks) -> dict:
    """queue_position of each waiting task among `tasks`: task id → place (one query, or none)."""
    waiting = [t for t in tasks if t.state in WAITING_STATES]
    if not waiting:
        return {}
    lines: dict[int | None, list[tuple]] = {}
    for pk, gpu_model_id, rank, queued_since in Task.objects.filter(state__in=WAITING_STATES).values_list(
        "pk", "gpu_model_id", "tenant__tier__rank", "queued_since"
    ):
        lines.setdefault(gpu_model_id, []).append(_line_key(rank, queued_since, pk))
    index = {}
    for line in lines.values():
        line.sort()
        index.update({key[2]: place for place, key in enumerate(line, start=1)})
    return {t.pk: index[str(t.pk)] for t in waiting if str(t.pk) in index}


def _share(task: Task, *, cpu_pool: bool, slices_per_gpu: int) -> float:
    """What the task holds of the pool: GPUs (a slice is its fraction), or vCPUs in the CPU pool."""
    if cpu_pool:
        return float(task.vcpus)
    if task.gpus:
        return float(task.gpus)
    return task.vgpu_slices / slices_per_gpu


def estimated_start(task: Task, now: datetime | None = None) -> datetime | None:
    """The time by which, at the latest, enough of the task's pool will have freed up for it to start.

    Replays the pool: each running task of the same GPU model (or of CPUs, for a CPU-only task) frees
    its share by the time limit of its current attempt, and the tasks ahead in line (queue_position's
    order) each start as soon as their share is free and hold it for their full time limit. Tasks that
    finish early make it sooner. It cannot account for what the scheduler weighs besides capacity
    (quota, credit, fair share, preemption by a Diamond task), for where the free share lies (a task's
    GPUs must all be on one node), nor for tasks submitted later by higher tiers.

    None when the task does not wait, or when its share of the pool will never free up on its own
    (it asks for more than the pool has once VMs, which have no end time, take theirs).
    """
    if task.state not in WAITING_STATES:
        return None
    now = now or timezone.now()
    cpu_pool = task.gpu_model_id is None
    nodes = Node.objects.filter(schedulable=True, dedicated=False)
    if task.gpu_model_id is not None:
        nodes = nodes.filter(gpu_model_id=task.gpu_model_id)
        if task.vgpu_slices and not task.gpus:
            nodes = nodes.filter(pool=Pool.GENERAL)
    nodes = list(nodes)
    if not nodes:
        return None
    slices_per_gpu = max(n.vgpu_slices_per_gpu for n in nodes)
    capacity = float(sum(n.cpus for n in nodes)) if cpu_pool else float(sum(n.gpus for n in nodes))
    # VMs (and anything else but tasks) hold their share with no end we know of.
    per_node_slices = {n.pk: n.vgpu_slices_per_gpu for n in nodes}
    for node_id, slots, cpus in (
        Placement.objects.filter(node__in=nodes, released_at__isnull=True)
        .exclude(holder_type=TASK_HOLDER)
        .values_list("node_id", "gpu_slots", "cpus")
    ):
        if cpu_pool:
            capacity -= cpus
        else:
            capacity -= sum(slices / per_node_slices[node_id] for _index, slices in slots or [])

    grace = timedelta(seconds=settings.PORTAL_TASK_GRACE_SECONDS)
    attempt_started = TaskRun.objects.filter(task=OuterRef("pk"), attempt=OuterRef("attempts")).values("started_at")
    running = Task.objects.filter(state__in=ACTIVE_TASK_STATES).annotate(attempt_started=Subquery(attempt_started[:1]))
    if not cpu_pool:  # every task takes CPUs, but only tasks of its model take the GPUs a task waits for
        running = running.filter(gpu_model_id=task.gpu_model_id)
    frees: list[tuple[datetime, float]] = []
    free = capacity
    for other in running:
        share = _share(other, cpu_pool=cpu_pool, slices_per_gpu=slices_per_gpu)
        free -= share
        began = other.attempt_started or other.state_changed_at
        heapq.heappush(frees, (max(began + timedelta(seconds=other.max_runtime_seconds) + grace, now), share))

    rank = task.tenant.tier.rank
    mine = _line_key(rank, task.queued_since, task.pk)
    line = sorted(
        (
            (_line_key(t.tenant.tier.rank, t.queued_since, t.pk), t)
            for t in Task.objects.filter(state__in=WAITING_STATES, gpu_model_id=task.gpu_model_id)
            .exclude(pk=task.pk)
            .select_related("tenant__tier")
        ),
        key=lambda pair: pair[0],
    )
    ahead = [t for key, t in line if key < mine]
    clock = now

    def wait_for(need: float) -> bool:
        """Move the clock on until `need` is free; False when it never will be."""
        nonlocal clock, free
        if need > capacity:
            return False
        while free + 1e-9 < need:
            if not frees:
                return False
            at, share = heapq.heappop(frees)
            clock = max(clock, at)
            free += share
        return True

    for waiting in ahead:
        need = _share(waiting, cpu_pool=cpu_pool, slices_per_gpu=slices_per_gpu)
        if not wait_for(need):
            continue  # it can never start here, so it holds nobody up
        start = max(clock, waiting.next_attempt_at or clock)
        free -= need
        heapq.heappush(frees, (start + timedelta(seconds=waiting.max_runtime_seconds), need))
    if not wait_for(_share(task, cpu_pool=cpu_pool, slices_per_gpu=slices_per_gpu)):
        return None
    return max(clock, task.next_attempt_at or clock)


# --- Usage and cost ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunUsage:
    attempt: int
    node_name: str
    gpu_model: str  # GpuModel code, "" for CPU only
    gpus: Decimal  # a vGPU slice counts as its fraction
    vcpus: int
    memory_gib: int
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    seconds: int  # run so far, or in all once ended
    chargeable: bool


@dataclass(frozen=True)
class TaskUsage:
    runs: list[RunUsage]
    seconds: int
    chargeable_seconds: int
    gpu_hours: Decimal  # chargeable GPU-hours
    cost: Decimal | None  # from billing's estimator; None when there is none or it cannot say


def _cost(task: Task) -> Decimal | None:
    path = getattr(settings, "PORTAL_TASK_COST_ESTIMATOR", "")
    return import_string(path)(task) if path else None


def task_usage(task: Task, now: datetime | None = None) -> TaskUsage:
    """Each run (attempt) of the task with what it held and how long, the totals, and the cost so far.

    The cost comes from settings.PORTAL_TASK_COST_ESTIMATOR (billing's task_cost); prices are billing's
    to know, so without it there is no cost rather than a guess.
    """
    now = now or timezone.now()
    runs = []
    for run in TaskRun.objects.filter(task=task).select_related("gpu_model").order_by("attempt"):
        end = run.ended_at or now
        runs.append(
            RunUsage(
                attempt=run.attempt,
                node_name=run.node_name,
                gpu_model=run.gpu_model.code if run.gpu_model_id else "",
                gpus=run.gpus,
                vcpus=run.vcpus,
                memory_gib=run.memory_gib,
                started_at=run.started_at,
                ended_at=run.ended_at,
                outcome=run.outcome,
                seconds=max(int((end - run.started_at).total_seconds()), 0),
                chargeable=run.chargeable,
            )
        )
    chargeable = [r for r in runs if r.chargeable]
    gpu_seconds = sum((r.gpus * r.seconds for r in chargeable), Decimal(0))
    return TaskUsage(
        runs=runs,
        seconds=sum(r.seconds for r in runs),
        chargeable_seconds=sum(r.seconds for r in chargeable),
        gpu_hours=(gpu_seconds / 3600).quantize(Decimal("0.0001")),
        cost=_cost(task),
    )


# --- The event stream -----------------------------------------------------------------------------


def task_events(task: Task, *, after: int = 0, kinds=None, limit: int = 1000) -> list[TaskEvent]:
    """Kept events after sequence number `after`, oldest first, at most `limit`."""
    events = TaskEvent.objects.filter(task=task, seq__gt=after)
    if kinds:
        events = events.filter(kind__in=kinds)
    return list(events.order_by("seq")[:limit])


def full_log(task: Task) -> Iterator[str]:
    """The task's log, line by line in order, read in chunks so a long log streams without filling memory."""
    lines = (
        TaskEvent.objects.filter(task=task, kind=EventKind.LOG)
        .order_by("seq")
        .values_list("data", flat=True)
        .iterator(chunk_size=2000)
    )
    for data in lines:
        yield f"{data.get('text', '')}\n"


def log_tail(task: Task, *, upto: int, lines: int = 2000) -> list[TaskEvent]:
    """The last `lines` log events at or before sequence number `upto`, oldest first."""
    tail = TaskEvent.objects.filter(task=task, kind=EventKind.LOG, seq__lte=upto).order_by("-seq")[:lines]
    return list(reversed(tail))


def latest_metrics(task: Task, *, upto: int | None = None) -> dict[str, float]:
    """The latest value of each metric the task reported (two queries), by name in alphabetical order."""
    metrics = TaskEvent.objects.filter(task=task, kind=EventKind.METRIC)
    if upto is not None:
        metrics = metrics.filter(seq__lte=upto)
    latest = metrics.values("data__name").annotate(last=Max("seq")).values("last")
    rows = TaskEvent.objects.filter(task=task, seq__in=Subquery(latest)).values_list("data", flat=True)
    return dict(sorted((row["name"], row["value"]) for row in rows))


def metric_series(task: Task, *, upto: int, points: int = 2000) -> list[dict]:
    """The last `points` metric samples at or before `upto`, oldest first, for a chart."""
    samples = (
        TaskEvent.objects.filter(task=task, kind=EventKind.METRIC, seq__lte=upto)
        .order_by("-seq")
        .values_list("seq", "at", "data")[:points]
    )
    return [
        {"seq": seq, "at": at.isoformat(), "name": data["name"], "value": data["value"]}
        for seq, at, data in reversed(samples)
    ]


def state_message(task: Task) -> str:
    """The message of the task's latest state event (why it is where it is)."""
    data = (
        TaskEvent.objects.filter(task=task, kind=EventKind.STATE)
        .order_by("-seq")
        .values_list("data", flat=True)
        .first()
    )
    return (data or {}).get("message", "")
