"""Task hosting on the shared GPU pool: tasks, their runs (what billing meters) and their event stream."""

import uuid
from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

MAX_RUNTIME_SECONDS = 72 * 3600


class Framework(models.TextChoices):
    PYTORCH = "pytorch", "PyTorch"
    TENSORFLOW = "tensorflow", "TensorFlow"
    JAX = "jax", "JAX"
    CUSTOM = "custom", _("Custom image")


class TaskState(models.TextChoices):
    QUEUED = "queued", _("Queued")
    STARTING = "starting", _("Starting")
    RUNNING = "running", _("Running")
    RETRY_WAIT = "retry_wait", _("Waiting to retry")
    CANCELLING = "cancelling", _("Cancelling")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    TIMED_OUT = "timed_out", _("Timed out")
    CANCELLED = "cancelled", _("Cancelled")


FINISHED_TASK_STATES = [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CANCELLED]
ACTIVE_TASK_STATES = [TaskState.STARTING, TaskState.RUNNING, TaskState.CANCELLING]


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="tasks")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    name = models.CharField(max_length=100)
    framework = models.CharField(max_length=16, choices=Framework.choices)
    image = models.CharField(max_length=300, help_text=_("Container image for the cluster executor."))
    command = models.TextField()
    env = models.JSONField(default=dict, blank=True)
    input_url = models.CharField(max_length=1000, blank=True, help_text=_("s3:// URL of the input data."))
    input_file = models.FileField(upload_to="task-inputs/%Y/%m/", blank=True)
    gpu_model = models.ForeignKey(
        "provisioning.GpuModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    gpus = models.PositiveSmallIntegerField(default=0, help_text=_("Whole GPUs."))
    vgpu_slices = models.PositiveSmallIntegerField(
        default=0, help_text=_("vGPU slices on the general pool instead of whole GPUs.")
    )
    vcpus = models.PositiveSmallIntegerField(default=1)
    memory_gib = models.PositiveIntegerField(default=4)
    max_runtime_seconds = models.PositiveIntegerField(
        default=3600, validators=[MinValueValidator(60), MaxValueValidator(MAX_RUNTIME_SECONDS)]
    )
    max_retries = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(3)])
    priority = models.PositiveSmallIntegerField(
        default=5, validators=[MaxValueValidator(9)], help_text=_("The task's own priority within the tenant, 0–9.")
    )
    preemptible = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.QUEUED, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    submitted_at = models.DateTimeField(default=timezone.now)
    state_changed_at = models.DateTimeField(default=timezone.now)
    queued_since = models.DateTimeField(default=timezone.now, help_text=_("Kept across preemptions: its place."))
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    stop_requested = models.CharField(
        max_length=16, blank=True, help_text=_("cancel, preempt, timeout or credit: why the running attempt must stop.")
    )
    waiting_reason = models.CharField(max_length=300, blank=True, help_text=_("Why a queued task has not started."))
    exit_code = models.IntegerField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    node_name = models.CharField(max_length=253, blank=True)
    assigned_gpus = models.JSONField(default=list, blank=True)
    executor = models.CharField(max_length=16, blank=True)
    last_seq = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-submitted_at"]
        indexes = [
            models.Index(fields=["tenant", "state"], name="task_tenant_state"),
            models.Index(
                fields=["state", "queued_since"], name="task_queue", condition=Q(state__in=["queued", "retry_wait"])
            ),
        ]

    def __str__(self) -> str:
        return self.name


class RunOutcome(models.TextChoices):
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed (the task's exit code)")
    TIMED_OUT = "timed_out", _("Timed out")
    CANCELLED = "cancelled", _("Cancelled")
    PREEMPTED = "preempted", _("Preempted")
    LOST = "lost", _("Lost (the node or executor stopped reporting)")


class TaskRun(models.Model):
    """One attempt of a task on a node: what billing meters, per second, from started_at to ended_at.

    `chargeable` is False for time the customer did not get: a preempted attempt or a lost node.
    """

    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="runs")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="+")
    attempt = models.PositiveSmallIntegerField()
    node_name = models.CharField(max_length=253)
    gpu_model = models.ForeignKey(
        "provisioning.GpuModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    gpus = models.DecimalField(
        max_digits=6,
        decimal_places=4,
        default=Decimal("0"),
        help_text=_("GPUs held; a vGPU slice counts as its fraction."),
    )
    vcpus = models.PositiveSmallIntegerField()
    memory_gib = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=RunOutcome.choices, blank=True)
    chargeable = models.BooleanField(default=True)

    class Meta:
        ordering = ["task", "attempt"]
        constraints = [models.UniqueConstraint(fields=["task", "attempt"], name="task_run_unique_attempt")]

    def __str__(self) -> str:
        return f"{self.task_id} attempt {self.attempt}"


class EventKind(models.TextChoices):
    STATE = "state", _("State")
    PROGRESS = "progress", _("Progress")
    METRIC = "metric", _("Metric")
    LOG = "log", _("Log line")


class TaskEvent(models.Model):
    """The task's stream, kept: a browser that reconnects asks for everything after its last seq."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=16, choices=EventKind.choices)
    data = models.JSONField(default=dict)

    class Meta:
        ordering = ["task", "seq"]
        constraints = [models.UniqueConstraint(fields=["task", "seq"], name="task_event_unique_seq")]

    def __str__(self) -> str:
        return f"{self.task_id}#{self.seq} {self.kind}"
