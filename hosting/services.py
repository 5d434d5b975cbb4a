"""Writes for task hosting: submit, schedule, dispatch, report, cancel, preempt, retry, reap.

The policy (who runs next and where) is hosting.scheduling, pure; this module loads the world
into it, applies its decisions under locks, and keeps every transition audited, kept as an event
and pushed live. Nothing is dispatched twice: a pass holds an advisory lock, a task moves
QUEUED → STARTING only inside the pass, and only one executor can move STARTING → RUNNING.
"""

import logging
import re
import shutil
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, connections, transaction
from django.db.models import F, Sum
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from hosting import scheduling, storage
from hosting.executors.base import Line, Outcome, TaskLaunch
from hosting.lifecycle import announce_run_finished
from hosting.models import (
    ACTIVE_TASK_STATES,
    MAX_RUNTIME_SECONDS,
    EventKind,
    Framework,
    Task,
    TaskEvent,
    TaskRun,
    TaskState,
)
from provisioning import capacity, manifests
from provisioning.models import GpuModel, Node, Placement, Pool
from tenants.audit import audit_record
from tenants.models import GpuQuota, Membership, QuotaReservation, Tenant, TenantQuota
from tenants.roles import Capability
from tenants.services import QuotaExceeded, ResourceDemand, quota_release, quota_reserve, require

logger = logging.getLogger(__name__)

HOLDER = "task"
DEFAULT_IMAGES = {
    Framework.PYTORCH: "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
    Framework.TENSORFLOW: "tensorflow/tensorflow:2.18.0-gpu",
    Framework.JAX: "ghcr.io/nvidia/jax:jax",
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV = {"CUDA_VISIBLE_DEVICES", "PATH", "HOME"}


def task_group(task_id) -> str:
    return f"task.{task_id}"


# --- Submission ---------------------------------------------------------------------------------


def _validate_submission(tenant: Tenant, data: dict) -> dict:
    errors: dict[str, str] = {}
    name = (data.get("name") or "").strip()
    if not name or len(name) > 100:
        errors["name"] = _("Name the task (1 to 100 characters).")
    framework = data.get("framework") or Framework.PYTORCH
    if framework not in Framework.values:
        errors["framework"] = _("Choose PyTorch, TensorFlow, JAX or a custom image.")
    image = (data.get("image") or "").strip() or DEFAULT_IMAGES.get(framework, "")
    if not image:
        errors["image"] = _("A custom task needs a container image.")
    elif len(image) > 300 or any(c.isspace() for c in image):
        errors["image"] = _("Give an image reference such as registry.example.com/team/train:1.0.")
    command = (data.get("command") or "").strip()
    if not command or len(command) > 10000:
        errors["command"] = _("Give the command to run (up to 10,000 characters).")
    env = data.get("env") or {}
    if not isinstance(env, dict) or len(env) > 100:
        errors["env"] = _("Environment variables are a mapping of at most 100 names to values.")
    else:
        for key, value in env.items():
            if not isinstance(key, str) or not ENV_NAME.match(key) or key in RESERVED_ENV or key.startswith("PORTAL_"):
                errors["env"] = _("%(name)s is not a name you can set.") % {"name": str(key)[:40]}
                break
            if not isinstance(value, str) or len(value) > 4096:
                errors["env"] = _("The value of %(name)s must be text of at most 4,096 characters.") % {"name": key}
                break
    input_url = (data.get("input_url") or "").strip()
    if input_url and not input_url.startswith("s3://"):
        errors["input_url"] = _("Input data comes as an s3:// URL or an upload.")
    input_file = data.get("input_file")
    if input_file is not None and input_file.size > settings.PORTAL_TASK_UPLOAD_MAX_BYTES:
        errors["input_file"] = _("Uploads are limited to %(mib)s MiB; use an s3:// URL for more.") % {
            "mib": settings.PORTAL_TASK_UPLOAD_MAX_BYTES // 2**20
        }
    if input_url and input_file is not None:
        errors["input_url"] = _("Give an upload or an s3:// URL, not both.")

    def number(key, low, high, default):
        value = data.get(key, default)
        if value in (None, ""):
            value = default
        try:
            value = int(value)
        except (TypeError, ValueError):
            errors[key] = _("Enter a whole number.")
            return default
        if not low <= value <= high:
            errors[key] = _("Choose between %(low)s and %(high)s.") % {"low": low, "high": high}
        return value

    gpus = number("gpus", 0, 8, 0)
    slices = number("vgpu_slices", 0, 8, 0)
    vcpus = number("vcpus", 1, 64, 2)
    memory = number("memory_gib", 1, 512, 8)
    runtime = number("max_runtime_seconds", 60, MAX_RUNTIME_SECONDS, 3600)
    retries = number("max_retries", 0, 3, 0)
    priority = number("priority", 0, 9, 5)
    gpu_model = None
    code = data.get("gpu_model") or ""
    if gpus and slices:
        errors["vgpu_slices"] = _("Ask for whole GPUs or vGPU slices, not both.")
    if gpus or slices:
        gpu_model = GpuModel.objects.filter(code=code).first()
        if gpu_model is None:
            errors["gpu_model"] = _("Choose a GPU model.")
        elif slices:
            max_slices = (
                Node.objects.filter(gpu_model=gpu_model, pool=Pool.GENERAL, schedulable=True)
                .order_by("-vgpu_slices_per_gpu")
                .values_list("vgpu_slices_per_gpu", flat=True)
                .first()
            ) or 1
            if max_slices <= 1:
                errors["vgpu_slices"] = _("%(model)s is not offered in vGPU slices; ask for whole GPUs.") % {
                    "model": gpu_model.code
                }
            elif slices >= max_slices:
                errors["vgpu_slices"] = _("A %(model)s GPU has %(n)s slices; ask for fewer, or for a whole GPU.") % {
                    "model": gpu_model.code,
                    "n": max_slices,
                }
    elif code:
        errors["gpus"] = _("Say how many GPUs (or vGPU slices) of %(model)s.") % {"model": code}
    if not errors and gpu_model is not None:
        limit = GpuQuota.objects.filter(tenant=tenant, gpu_model=gpu_model).values_list("limit", flat=True).first()
        if (limit or 0) < max(gpus, 1):
            errors["gpus"] = _("Your quota allows %(limit)s %(model)s GPUs; this task can never start.") % {
                "limit": limit or 0,
                "model": gpu_model.code,
            }
    if not errors:
        quota = TenantQuota.objects.get(tenant=tenant)
        if vcpus > quota.vcpus or memory > quota.memory_gib:
            errors["vcpus" if vcpus > quota.vcpus else "memory_gib"] = _(
                "This is more than your whole quota; the task could never start."
            )
    if errors:
        raise ValidationError(errors)
    return {
        "name": name,
        "framework": framework,
        "image": image,
        "command": command,
        "env": dict(env),
        "input_url": input_url,
        "gpu_model": gpu_model,
        "gpus": gpus,
        "vgpu_slices": slices,
        "vcpus": vcpus,
        "memory_gib": memory,
        "max_runtime_seconds": runtime,
        "max_retries": retries,
        "priority": priority,
        "preemptible": bool(data.get("preemptible")),
    }


def task_submit(*, membership: Membership, actor, **data) -> Task:
    """Queue a task. It starts when a scheduling pass admits it (quota, payment, capacity)."""
    require(membership, Capability.USE_COMPUTE)
    tenant = membership.tenant
    fields = _validate_submission(tenant, data)
    input_file = data.get("input_file")
    with transaction.atomic():
        task = Task(tenant=tenant, created_by=actor, **fields)
        if input_file is not None:
            task.input_file.save(Path(input_file.name).name, input_file, save=False)
        task.save(force_insert=True)
        _event(task, EventKind.STATE, {"state": TaskState.QUEUED, "message": _("Queued.")})
        audit_record(
            actor=actor,
            tenant=tenant,
            action="task.submitted",
            target=task,
            after={
                "gpu_model": fields["gpu_model"].code if fields["gpu_model"] else None,
                "gpus": fields["gpus"],
                "vgpu_slices": fields["vgpu_slices"],
                "priority": fields["priority"],
                "preemptible": fields["preemptible"],
            },
        )
        _schedule_soon()
    return task


# --- Events -------------------------------------------------------------------------------------


def _event(task: Task, kind: str, data: dict) -> None:
    _events(task, [(kind, data)])


def _events(task: Task, items: list[tuple[str, dict]]) -> None:
    """Keep events with consecutive sequence numbers, then push them to the task's subscribers after commit."""
    if not items:
        return
    with transaction.atomic():
        Task.objects.filter(pk=task.pk).update(last_seq=F("last_seq") + len(items))
        last = Task.objects.filter(pk=task.pk).values_list("last_seq", flat=True).get()
        first = last - len(items) + 1
        now = timezone.now()
        rows = [
            TaskEvent(task_id=task.pk, seq=first + i, at=now, kind=kind, data=data)
            for i, (kind, data) in enumerate(items)
        ]
        TaskEvent.objects.bulk_create(rows)
        task.last_seq = last
        payload = [{"seq": r.seq, "at": now.isoformat(), "kind": r.kind, "data": r.data} for r in rows]
        transaction.on_commit(lambda: _push(task.pk, payload))


def _push(task_id, events: list[dict]) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(task_group(task_id), {"type": "task.events", "events": events})
    except Exception:  # the events are kept: a subscriber that missed them asks again by sequence
        logger.exception("Pushing events of task %s failed", task_id)


def _state(task: Task, state: str, message: str = "", *, actor=None, **fields) -> None:
    previous = task.state
    task.state = state
    task.state_changed_at = timezone.now()
    for key, value in fields.items():
        setattr(task, key, value)
    task.save(update_fields=["state", "state_changed_at", *fields])
    _event(task, EventKind.STATE, {"state": state, "message": message})
    audit_record(
        actor=actor,
        tenant=task.tenant,
        action=f"task.{state}",
        target=task,
        before={"state": previous},
        after={"state": state, "message": message} if message else {"state": state},
    )
    from portal.events import emit_dashboard_event

    emit_dashboard_event(
        task.tenant_id,
        "task.state",
        {
            "id": str(task.pk),
            "name": task.name,
            "state": state,
            "state_label": str(TaskState(state).label),
            "progress": task.progress,
            "message": message,
        },
    )


# --- Scheduling ---------------------------------------------------------------------------------


def _schedule_soon() -> None:
    from hosting.tasks import schedule_tasks

    transaction.on_commit(lambda: schedule_tasks.delay())


def _try_pass_lock() -> bool:
    """One scheduling pass at a time across workers and beat ticks (PostgreSQL advisory lock)."""
    if connection.vendor != "postgresql":
        return True  # SQLite serialises writers itself; the embedded default has one process
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [settings.PORTAL_SCHEDULER_LOCK_ID])
        return cursor.fetchone()[0]


def _package_holders(tenant_ids: set[int]) -> set[int]:
    path = settings.PORTAL_PACKAGE_HOLDERS
    return set(import_string(path)(tenant_ids)) if path else set()


def _payers(tenants: dict[int, Tenant]) -> dict[int, str]:
    """tenant id → "" when it can pay, else the reason it cannot."""
    path = settings.PORTAL_TASK_PAYMENT_CHECK
    if not path:
        return dict.fromkeys(tenants, "")
    check = import_string(path)
    out = {}
    for tenant_id, tenant in tenants.items():
        ok, reason = check(tenant=tenant)
        out[tenant_id] = "" if ok else reason
    return out


def _node_states(nodes: list[Node]) -> list[scheduling.NodeState]:
    states = []
    for free in capacity.free_capacity(nodes):
        node = free.node
        spg = node.vgpu_slices_per_gpu if node.pool == Pool.GENERAL else 1
        states.append(
            scheduling.NodeState(
                name=node.name,
                pool=node.pool,
                gpu_model=node.gpu_model.code if node.gpu_model_id else None,
                gpus=[
                    scheduling.GpuSlot(index=i, slices_total=spg, slices_used=min(free.slices_used.get(i, 0), spg))
                    for i in range(node.gpus)
                ],
                cpus_free=free.cpus,
                memory_free_gib=free.memory_gib,
                schedulable=node.schedulable and not node.dedicated,
            )
        )
    return states


def schedule_pass() -> scheduling.PassResult | None:
    """Admit and place queued tasks, and start preemptions for core tasks. Returns None when another pass runs."""
    now = timezone.now()
    with transaction.atomic():
        if not _try_pass_lock():
            return None
        Task.objects.filter(state=TaskState.RETRY_WAIT, next_attempt_at__lte=now).update(state=TaskState.QUEUED)
        queued = list(
            Task.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("tenant__tier", "gpu_model")
            .filter(state=TaskState.QUEUED)
            .order_by("queued_since")
        )
        if not queued:
            return scheduling.PassResult()
        tenants = {t.tenant_id: t.tenant for t in queued}
        running = list(Task.objects.select_related("tenant__tier", "gpu_model").filter(state__in=ACTIVE_TASK_STATES))
        holders = _package_holders(set(tenants))
        payers = _payers(tenants)
        limits = _limits(tenants)
        usage: dict[int, scheduling.TenantUsage] = {}
        for task in running:
            u = usage.get(task.tenant_id, scheduling.TenantUsage())
            usage[task.tenant_id] = scheduling.TenantUsage(
                gpus=u.gpus + task.gpus + (task.vgpu_slices / 8 if task.vgpu_slices else 0),
                vcpus=u.vcpus + task.vcpus,
                memory_gib=u.memory_gib + task.memory_gib,
            )
        nodes = list(Node.objects.select_related("gpu_model").filter(schedulable=True))
        node_states = _node_states(nodes)
        placements = {
            p.holder_id: p
            for p in Placement.objects.filter(
                holder_type=HOLDER, released_at__isnull=True, holder_id__in=[str(t.pk) for t in running]
            )
        }
        queue = [
            scheduling.QueuedTask(
                id=str(t.pk),
                tenant_id=t.tenant_id,
                tier_rank=t.tenant.tier.rank,
                holds_package=t.tenant_id in holders,
                priority=t.priority,
                waited_seconds=(now - t.queued_since).total_seconds(),
                gpu_model=t.gpu_model.code if t.gpu_model_id else None,
                gpus=t.gpus,
                vgpu_slices=t.vgpu_slices,
                vcpus=t.vcpus,
                memory_gib=t.memory_gib,
                submitted_order=int(t.submitted_at.timestamp() * 1000),
            )
            for t in queued
        ]
        running_view = [
            scheduling.RunningTask(
                id=str(t.pk),
                tenant_id=t.tenant_id,
                tier_rank=t.tenant.tier.rank,
                preemptible=t.preemptible and t.state == TaskState.RUNNING,
                node=t.node_name,
                gpu_model=t.gpu_model.code if t.gpu_model_id else None,
                gpu_indices=tuple(tuple(slot) for slot in placements[str(t.pk)].gpu_slots)
                if str(t.pk) in placements
                else (),
                vcpus=t.vcpus,
                memory_gib=t.memory_gib,
                started_at=t.started_at.timestamp() if t.started_at else now.timestamp(),
                stopping=bool(t.stop_requested),
            )
            for t in running
        ]
        totals = scheduling.TenantUsage(
            gpus=float(sum(n.gpus for n in nodes)),
            vcpus=sum(n.cpus for n in nodes),
            memory_gib=sum(n.memory_gib for n in nodes),
        )
        result = scheduling.plan_pass(
            queue,
            node_states,
            running_view,
            usage,
            limits,
            {tid for tid, reason in payers.items() if not reason},
            ageing_seconds=settings.PORTAL_SCHEDULER_AGEING_SECONDS,
            reserve_after_seconds=settings.PORTAL_SCHEDULER_RESERVE_AFTER_SECONDS,
            cluster_totals=totals,
        )
        by_id = {str(t.pk): t for t in queued}
        nodes_by_name = {n.name: n for n in nodes}
        for assignment in result.assignments:
            task = by_id[assignment.task_id]
            try:
                _admit(task, nodes_by_name[assignment.node], assignment)
            except QuotaExceeded as exc:
                # The pass counts a vGPU slice as its fraction of a GPU; the quota holds whole GPUs.
                result.waiting[assignment.task_id] = exc.messages[0]
        for preemption in result.preemptions:
            _request_stop(
                Task.objects.select_related("tenant").get(pk=preemption.victim_id),
                "preempt",
                _("Preempted for a core (Diamond) task; it will be requeued in its place."),
            )
        for task_id, reason in result.waiting.items():
            reason = payers.get(by_id[task_id].tenant_id) or reason
            if by_id[task_id].waiting_reason != reason[:300]:
                Task.objects.filter(pk=task_id).update(waiting_reason=reason[:300])
    return result


def _limits(tenants: dict[int, Tenant]) -> dict[int, scheduling.Limits]:
    quotas = {q.tenant_id: q for q in TenantQuota.objects.filter(tenant_id__in=tenants)}
    held = QuotaReservation.objects.filter(tenant_id__in=tenants, released_at__isnull=True)
    tasks_used = dict(held.values("tenant_id").annotate(n=Sum("tasks")).values_list("tenant_id", "n"))
    gpus_used: dict[tuple[int, str], int] = {
        (row["tenant_id"], row["gpu_model__code"]): row["n"]
        for row in held.filter(gpus__gt=0).values("tenant_id", "gpu_model__code").annotate(n=Sum("gpus"))
    }
    gpu_limits: dict[int, dict[str, int]] = {}
    for tenant_id, code, limit in GpuQuota.objects.filter(tenant_id__in=tenants).values_list(
        "tenant_id", "gpu_model__code", "limit"
    ):
        gpu_limits.setdefault(tenant_id, {})[code] = limit - gpus_used.get((tenant_id, code), 0)
    return {
        tenant_id: scheduling.Limits(
            tasks_free=quotas[tenant_id].concurrent_tasks - (tasks_used.get(tenant_id) or 0),
            gpus_free=gpu_limits.get(tenant_id, {}),
        )
        for tenant_id in tenants
    }


@transaction.atomic
def _admit(task: Task, node: Node, assignment: scheduling.Assignment) -> None:
    """Hold quota and the node's capacity for the task and hand it to an executor after commit."""
    quota_gpus = task.gpus or (1 if task.vgpu_slices else 0)  # a slice holds one GPU of the quota
    quota_reserve(
        tenant=task.tenant,
        holder_type=HOLDER,
        holder_id=str(task.pk),
        demand=ResourceDemand(
            gpu_model=task.gpu_model.code if task.gpu_model_id else None,
            gpus=quota_gpus,
            vcpus=task.vcpus,
            memory_gib=task.memory_gib,
            tasks=1,
        ),
    )
    Placement.objects.create(
        node=node,
        holder_type=HOLDER,
        holder_id=str(task.pk),
        profile="task",
        gpus=task.gpus,
        gpu_slots=[list(slot) for slot in assignment.gpu_indices],
        cpus=task.vcpus,
        memory_gib=task.memory_gib,
    )
    task.attempts += 1
    _state(
        task,
        TaskState.STARTING,
        _("Starting on %(node)s.") % {"node": node.name},
        node_name=node.name,
        assigned_gpus=[index for index, _slices in assignment.gpu_indices],
        attempts=task.attempts,
        waiting_reason="",
        stop_requested="",
        cancel_requested_at=None,
        executor="",
    )
    task_id, attempt = str(task.pk), task.attempts
    transaction.on_commit(lambda: dispatch(task_id, attempt))


def _release(task: Task) -> None:
    quota_release(holder_type=HOLDER, holder_id=str(task.pk))
    capacity.release_placement(holder_type=HOLDER, holder_id=str(task.pk))


# --- Dispatch and the executor's reports ------------------------------------------------------------


def _executor():
    if settings.PORTAL_TASK_EXECUTOR == "cluster":
        from hosting.executors.cluster import ClusterExecutor
        from provisioning.backends import get_backend

        return ClusterExecutor(get_backend())
    from hosting.executors.local import LocalExecutor

    return LocalExecutor(grace_seconds=settings.PORTAL_TASK_GRACE_SECONDS)


def _execute_on_thread(task_id: str, attempt: int) -> None:
    try:
        execute(task_id, attempt)
    finally:
        connections.close_all()  # this thread's own connections: nobody else would close them


def dispatch(task_id: str, attempt: int) -> None:
    """Start the attempt: a Celery worker runs it; the embedded default runs it on a thread."""
    from hosting.tasks import execute_task
    from portal.celery import app

    if app.conf.task_always_eager and not settings.PORTAL_TASK_EXECUTE_INLINE:
        threading.Thread(
            target=_execute_on_thread, args=(task_id, attempt), name=f"task-{task_id[:8]}", daemon=True
        ).start()
    else:
        execute_task.delay(task_id, attempt)


def _launch(task: Task) -> TaskLaunch:
    workdir = storage.attempt_workdir(task)
    input_path = None
    if task.input_file:
        input_path = workdir / "input" / Path(task.input_file.name).name
        input_path.parent.mkdir(parents=True, exist_ok=True)
        with task.input_file.open("rb") as source, input_path.open("wb") as target:
            shutil.copyfileobj(source, target)
    gpu_resource = task.gpu_model.resource_name if task.gpu_model_id else ""
    return TaskLaunch(
        task_id=str(task.pk),
        attempt=task.attempts,
        tenant_slug=task.tenant.slug,
        namespace=manifests.tenant_namespace(task.tenant.slug),
        tier=task.tenant.tier.code,
        name=task.name,
        image=task.image,
        command=task.command,
        env=dict(task.env),
        gpu_model_resource=gpu_resource,
        gpus=task.gpus,
        vgpu_slices=task.vgpu_slices,
        gpu_indices=list(task.assigned_gpus),
        vcpus=task.vcpus,
        memory_gib=task.memory_gib,
        max_runtime_seconds=task.max_runtime_seconds,
        workdir=workdir,
        input_path=input_path,
        input_url=task.input_url,
        labels=manifests.labels(task.tenant.slug),
    )


def execute(task_id: str, attempt: int) -> None:
    """Run one attempt to its end. Only the first caller for an attempt runs it."""
    with transaction.atomic():
        task = (
            Task.objects.select_for_update(of=("self",))
            .select_related("tenant__tier", "gpu_model")
            .filter(pk=task_id, attempts=attempt, state__in=[TaskState.STARTING, TaskState.CANCELLING], executor="")
            .first()
        )
        if task is None:
            return  # claimed by another delivery of this message, finished, or stale
        # Claim the attempt under the row lock: a redelivered message finds it taken.
        task.executor = settings.PORTAL_TASK_EXECUTOR
        task.save(update_fields=["executor"])
        if task.stop_requested:  # stopped while starting: it never ran, so nothing is charged
            _end(task, Outcome(status="cancelled", reason=_("Cancelled before it started.")), run=None)
            return
        launch = _launch(task)
        Task.objects.filter(pk=task.pk).update(last_heartbeat_at=timezone.now())
    outcome = _executor().run(launch, Reporter(task_id, attempt))
    logger.info("Task %s attempt %s ended: %s", task_id, attempt, outcome)


class Reporter:
    """What an executor reports through, for one attempt. Writes are short transactions."""

    def __init__(self, task_id: str, attempt: int):
        self.task_id = task_id
        self.attempt = attempt
        self._progress_sent = -1

    def _task(self, lock: bool = False) -> Task | None:
        query = Task.objects.select_related("tenant", "gpu_model").filter(pk=self.task_id, attempts=self.attempt)
        if lock:
            query = query.select_for_update(of=("self",))
        return query.first()

    def started(self) -> None:
        with transaction.atomic():
            task = self._task(lock=True)
            if task is None or task.state != TaskState.STARTING:
                return
            now = timezone.now()
            TaskRun.objects.create(
                task=task,
                tenant_id=task.tenant_id,
                attempt=task.attempts,
                node_name=task.node_name,
                gpu_model=task.gpu_model,
                gpus=_gpu_share(task),
                vcpus=task.vcpus,
                memory_gib=task.memory_gib,
                started_at=now,
            )
            _state(
                task,
                TaskState.RUNNING,
                _("Running on %(node)s.") % {"node": task.node_name},
                started_at=task.started_at or now,
                last_heartbeat_at=now,
            )

    def lines(self, lines: list[Line]) -> None:
        items: list[tuple[str, dict]] = []
        progress = None
        for line in lines:
            if line.kind == "progress":
                progress = line.progress
                items.append((EventKind.PROGRESS, {"percent": line.progress}))
            elif line.kind == "metric":
                items.append((EventKind.METRIC, {"name": line.metric[0], "value": line.metric[1]}))
            else:
                items.append((EventKind.LOG, {"stream": line.stream, "text": line.text}))
        with transaction.atomic():
            task = self._task()
            if task is None:
                return
            _events(task, items)
            if progress is not None:
                Task.objects.filter(pk=task.pk).update(progress=progress)

    def metrics(self, values: dict[str, float]) -> None:
        with transaction.atomic():
            task = self._task()
            if task is not None:
                _events(task, [(EventKind.METRIC, {"name": k, "value": v}) for k, v in values.items()])

    def heartbeat(self) -> str | None:
        Task.objects.filter(pk=self.task_id, attempts=self.attempt).update(last_heartbeat_at=timezone.now())
        stop = Task.objects.filter(pk=self.task_id).values_list("stop_requested", "attempts").first()
        if stop is None or stop[1] != self.attempt:
            return "cancel"  # the portal moved on (reaped as lost): stop this attempt
        if not stop[0]:
            return None
        # The executor only stops gracefully; why (cancel, time limit, credit) is settled in _end.
        return "preempt" if stop[0] == "preempt" else "cancel"

    def finished(self, outcome: Outcome) -> None:
        with transaction.atomic():
            task = self._task(lock=True)
            if task is None or task.state not in ACTIVE_TASK_STATES:
                return  # reaped already
            run = TaskRun.objects.filter(task=task, attempt=task.attempts).first()
            _end(task, outcome, run=run)


def _gpu_share(task: Task) -> Decimal:
    if task.gpus:
        return Decimal(task.gpus)
    if task.vgpu_slices:
        spg = Node.objects.filter(name=task.node_name).values_list("vgpu_slices_per_gpu", flat=True).first() or 1
        return (Decimal(task.vgpu_slices) / Decimal(spg)).quantize(Decimal("0.0001"))
    return Decimal(0)


def _end(task: Task, outcome: Outcome, *, run: TaskRun | None) -> None:
    """The attempt is over: settle the run, give back what it held, and decide what comes next."""
    now = timezone.now()
    status = outcome.status
    if status == "cancelled" and task.stop_requested in ("preempt",):
        status = "preempted"
    if status == "cancelled" and task.stop_requested == "timeout":
        status = "timed_out"
    chargeable = status not in ("preempted", "lost")
    if run is not None:
        run.ended_at = now
        run.outcome = status
        run.chargeable = chargeable
        run.save(update_fields=["ended_at", "outcome", "chargeable"])
        announce_run_finished(run)
    _release(task)
    retryable = status in ("failed", "lost") and task.attempts <= task.max_retries
    common = {"exit_code": outcome.exit_code, "stop_requested": "", "assigned_gpus": []}
    if status == "succeeded":
        _state(task, TaskState.SUCCEEDED, _("Finished."), finished_at=now, progress=100, **common)
    elif status == "preempted":
        # Back in line at its old place (queued_since is kept), and the lost time is not charged.
        _state(task, TaskState.QUEUED, _("Preempted; waiting to run again."), **common)
    elif retryable:
        delay = settings.PORTAL_TASK_RETRY_BASE_SECONDS * 2 ** (task.attempts - 1)
        _state(
            task,
            TaskState.RETRY_WAIT,
            _("%(reason)s; retrying in %(seconds)s s (attempt %(next)s of %(total)s).")
            % {
                "reason": outcome.reason or status,
                "seconds": delay,
                "next": task.attempts + 1,
                "total": task.max_retries + 1,
            },
            next_attempt_at=now + timedelta(seconds=delay),
            **common,
        )
    elif status == "timed_out":
        hours = task.max_runtime_seconds / 3600
        _state(
            task,
            TaskState.TIMED_OUT,
            _("Stopped at its time limit of %(hours).2f h.") % {"hours": hours},
            finished_at=now,
            failure_reason=_("Time limit reached."),
            **common,
        )
    elif status == "cancelled":
        reason = _("Stopped: credit exhausted.") if task.stop_requested == "credit" else _("Cancelled.")
        _state(task, TaskState.CANCELLED, reason, finished_at=now, **common)
    else:
        _state(
            task,
            TaskState.FAILED,
            outcome.reason or _("Failed."),
            finished_at=now,
            failure_reason=outcome.reason or _("Failed."),
            **common,
        )
    _notify_outcome(task, status)
    storage.publish_results(task)  # S3 storage uploads the output folder once this commits
    _schedule_soon()


def _notify_outcome(task: Task, status: str) -> None:
    """Tell the submitter how the attempt ended (the tenant's owners and admins if they left it).
    A retry on the way is not news yet; a cancellation was asked for by someone who knows."""
    from notifications.models import NotificationKind
    from notifications.services import MANAGER_ROLES, notify, tenant_people

    kinds = {
        TaskState.SUCCEEDED: NotificationKind.TASK_FINISHED,
        TaskState.FAILED: NotificationKind.TASK_FAILED,
        TaskState.TIMED_OUT: NotificationKind.TASK_TIMED_OUT,
    }
    kind = NotificationKind.TASK_PREEMPTED if status == "preempted" else kinds.get(task.state)
    if kind is None:
        return
    users = tenant_people(task.tenant, also=[task.created_by]) or tenant_people(task.tenant, roles=MANAGER_ROLES)
    notify(
        kind=kind,
        tenant=task.tenant,
        users=users,
        params={"task": task.name, "reason": task.failure_reason},
        url=reverse("task_detail", args=[task.pk]),
        dedupe_key=f"task:{task.pk}:{task.attempts}:{kind}",
    )


# --- Cancel, preempt, credit, reap ---------------------------------------------------------------


def _request_stop(task: Task, why: str, message: str, *, actor=None) -> None:
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(stop_requested=why, cancel_requested_at=now)
    task.stop_requested = why
    if why == "cancel" or why == "credit":
        _state(task, TaskState.CANCELLING, message, actor=actor)
    else:
        _event(task, EventKind.STATE, {"state": task.state, "message": message})
        audit_record(
            actor=actor,
            tenant=task.tenant,
            action=f"task.stop_requested.{why}",
            target=task,
            after={"message": message},
        )


@transaction.atomic
def task_cancel(*, membership: Membership, actor, task: Task) -> Task:
    require(membership, Capability.USE_COMPUTE)
    task = (
        Task.objects.select_for_update(of=("self",))
        .select_related("tenant")
        .get(pk=task.pk, tenant_id=membership.tenant_id)
    )
    if task.state in (TaskState.QUEUED, TaskState.RETRY_WAIT):
        _state(task, TaskState.CANCELLED, _("Cancelled before it started."), actor=actor, finished_at=timezone.now())
    elif task.state in (TaskState.STARTING, TaskState.RUNNING):
        _request_stop(
            task,
            "cancel",
            _("Stopping: SIGTERM now, killed after %(grace)s s if it does not exit.")
            % {"grace": settings.PORTAL_TASK_GRACE_SECONDS},
            actor=actor,
        )
    else:
        raise ValidationError(
            _("A task that is %(state)s cannot be cancelled.") % {"state": TaskState(task.state).label.lower()}
        )
    return task


def tasks_stop_for_credit(*, tenant: Tenant, reason: str) -> int:
    """Billing calls this when pay-as-you-go credit runs out: running tasks stop gracefully."""
    stopped = 0
    with transaction.atomic():
        for task in (
            Task.objects.select_for_update(of=("self",))
            .select_related("tenant")
            .filter(tenant=tenant, state__in=[TaskState.STARTING, TaskState.RUNNING])
        ):
            _request_stop(task, "credit", reason)
            stopped += 1
    return stopped


def tasks_reap() -> dict:
    """Zombies and stuck starts: a running task whose executor stopped reporting is lost (retried if it
    may be, never charged for the lost attempt); a start that no executor picked up goes back in line."""
    now = timezone.now()
    counts = {"lost": 0, "requeued": 0}
    deadline = now - timedelta(seconds=settings.PORTAL_TASK_HEARTBEAT_DEADLINE_SECONDS)
    for task_id in Task.objects.filter(
        state__in=[TaskState.RUNNING, TaskState.CANCELLING], last_heartbeat_at__lt=deadline
    ).values_list("pk", flat=True):
        with transaction.atomic():
            task = (
                Task.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("tenant", "gpu_model")
                .filter(pk=task_id, last_heartbeat_at__lt=deadline)
                .first()
            )
            if task is None:
                continue
            run = TaskRun.objects.filter(task=task, attempt=task.attempts).first()
            _end(task, Outcome(status="lost", reason=_("The executor stopped reporting")), run=run)
            counts["lost"] += 1
    stuck = now - timedelta(seconds=settings.PORTAL_TASK_START_DEADLINE_SECONDS)
    for task_id in Task.objects.filter(state=TaskState.STARTING, state_changed_at__lt=stuck).values_list(
        "pk", flat=True
    ):
        with transaction.atomic():
            task = (
                Task.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("tenant")
                .filter(pk=task_id, state=TaskState.STARTING)
                .first()
            )
            if task is None:
                continue
            _release(task)
            _state(task, TaskState.QUEUED, _("No executor picked it up; back in line."))
            counts["requeued"] += 1
    return counts
