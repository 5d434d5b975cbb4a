import json
from pathlib import Path

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.utils import html

from hosting import selectors
from hosting.models import MAX_RUNTIME_SECONDS, Framework, Task, TaskEvent

CURRENCY = "CNY"


class TaskSerializer(serializers.ModelSerializer):
    """A task as its tenant sees it. Environment values are never echoed back: they often hold secrets."""

    gpu_model = serializers.SlugRelatedField(
        slug_field="code", read_only=True, allow_null=True, help_text="GPU model code, or null for a CPU-only task."
    )
    state_label = serializers.CharField(
        source="get_state_display", read_only=True, help_text="The state in plain words, in the request's language."
    )
    env_names = serializers.SerializerMethodField(help_text="Names of the environment variables set (values hidden).")
    input_file = serializers.SerializerMethodField(help_text="File name of the uploaded input, or empty for none.")
    created_by = serializers.SlugRelatedField(
        slug_field="email", read_only=True, help_text="Email of the member who submitted it."
    )
    queue_position = serializers.SerializerMethodField(
        help_text="Estimated place in line while waiting (1 starts next); null otherwise."
    )

    class Meta:
        model = Task
        fields = [
            "id",
            "name",
            "framework",
            "image",
            "command",
            "env_names",
            "input_url",
            "input_file",
            "gpu_model",
            "gpus",
            "vgpu_slices",
            "vcpus",
            "memory_gib",
            "max_runtime_seconds",
            "max_retries",
            "priority",
            "preemptible",
            "state",
            "state_label",
            "progress",
            "queue_position",
            "waiting_reason",
            "attempts",
            "node_name",
            "exit_code",
            "failure_reason",
            "submitted_at",
            "started_at",
            "finished_at",
            "created_by",
            "last_seq",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Task id (UUID)."},
            "name": {"help_text": "Name given at submission."},
            "framework": {"help_text": "pytorch, tensorflow, jax or custom."},
            "image": {"help_text": "Container image the task runs in."},
            "command": {"help_text": "Shell command the task runs."},
            "input_url": {"help_text": "s3:// URL of the input data, or empty."},
            "gpus": {"help_text": "Whole GPUs asked for."},
            "vgpu_slices": {"help_text": "vGPU slices of one GPU asked for instead of whole GPUs."},
            "vcpus": {"help_text": "vCPUs asked for."},
            "memory_gib": {"help_text": "Memory asked for, GiB."},
            "max_runtime_seconds": {"help_text": "Time limit of each attempt, seconds (at most 72 h)."},
            "max_retries": {"help_text": "How many times a failed attempt is retried, 0–3."},
            "priority": {"help_text": "The task's own priority within the tenant, 0–9 (higher first)."},
            "preemptible": {"help_text": "True when a core (Diamond) task may preempt it; it is requeued, not lost."},
            "state": {"help_text": "queued, starting, running, retry_wait, cancelling, succeeded, failed, …"},
            "progress": {"help_text": "Percent done, as the task last reported with ##progress."},
            "waiting_reason": {"help_text": "Why a waiting task has not started yet, in plain words."},
            "attempts": {"help_text": "Attempts started so far."},
            "node_name": {"help_text": "Node of the current or last attempt."},
            "exit_code": {"help_text": "Exit code of the last attempt, or null."},
            "failure_reason": {"help_text": "Why it failed or timed out; empty otherwise."},
            "submitted_at": {"help_text": "When it was submitted."},
            "started_at": {"help_text": "When its first attempt started running, or null."},
            "finished_at": {"help_text": "When it reached a final state, or null."},
            "last_seq": {"help_text": "Sequence number of its latest event: resume the stream after it."},
        }

    def get_env_names(self, task) -> list[str]:
        return sorted(task.env)

    def get_input_file(self, task) -> str:
        return Path(task.input_file.name).name if task.input_file else ""

    def get_queue_position(self, task) -> int | None:
        positions = self.context.get("queue_positions")
        if positions is not None:
            return positions.get(task.pk)
        return selectors.queue_position(task)


class TaskRunUsageSerializer(serializers.Serializer):
    attempt = serializers.IntegerField(help_text="Attempt number, from 1.")
    node_name = serializers.CharField(help_text="Node the attempt ran on.")
    gpu_model = serializers.CharField(help_text="GPU model code, or empty for CPU only.")
    gpus = serializers.DecimalField(
        max_digits=6, decimal_places=4, help_text="GPUs held; a vGPU slice counts as its fraction."
    )
    vcpus = serializers.IntegerField(help_text="vCPUs held.")
    memory_gib = serializers.IntegerField(help_text="Memory held, GiB.")
    started_at = serializers.DateTimeField(help_text="When the attempt started running.")
    ended_at = serializers.DateTimeField(allow_null=True, help_text="When it ended, or null while it runs.")
    outcome = serializers.CharField(
        help_text="succeeded, failed, timed_out, cancelled, preempted, lost; empty while it runs."
    )
    seconds = serializers.IntegerField(help_text="Seconds run so far (or in all, once ended).")
    chargeable = serializers.BooleanField(help_text="False for time you did not get: a preemption or a lost node.")


class TaskUsageSerializer(serializers.Serializer):
    runs = TaskRunUsageSerializer(many=True, help_text="Each attempt, oldest first.")
    seconds = serializers.IntegerField(help_text="Seconds run by all attempts.")
    chargeable_seconds = serializers.IntegerField(help_text="Seconds of chargeable attempts.")
    gpu_hours = serializers.DecimalField(
        max_digits=14, decimal_places=4, help_text="Chargeable GPU-hours (GPUs held × hours run)."
    )
    cost = serializers.DecimalField(
        max_digits=14,
        decimal_places=2,
        allow_null=True,
        help_text="Cost so far as billing rates it, decimal string; null when billing gives no estimate.",
    )
    currency = serializers.SerializerMethodField(help_text="Always CNY.")

    def get_currency(self, usage) -> str:
        return CURRENCY


class TaskDetailSerializer(TaskSerializer):
    estimated_start = serializers.SerializerMethodField(
        help_text="While waiting: the time by which, at the latest, enough capacity frees up for it "
        "(an estimate: tasks that end early make it sooner); null when unknown or not waiting."
    )
    latest_metrics = serializers.SerializerMethodField(
        help_text="The latest value of each metric it reported with ##metric name=value."
    )
    usage = serializers.SerializerMethodField(help_text="Each attempt with what it held and how long, and totals.")

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "estimated_start", "latest_metrics", "usage"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.DATETIME)
    def get_estimated_start(self, task) -> str | None:
        start = selectors.estimated_start(task)
        return serializers.DateTimeField().to_representation(start) if start else None

    @extend_schema_field(serializers.DictField(child=serializers.FloatField()))
    def get_latest_metrics(self, task) -> dict:
        return selectors.latest_metrics(task)

    @extend_schema_field(TaskUsageSerializer)
    def get_usage(self, task) -> dict:
        return TaskUsageSerializer(selectors.task_usage(task)).data


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Environment variables, NAME → value. In a multipart upload, send it as a JSON object string.",
    }
)
class EnvField(serializers.DictField):
    """A JSON object, or (for multipart uploads, which have no objects) a string holding one."""

    child = serializers.CharField(allow_blank=True, trim_whitespace=False)

    def get_value(self, dictionary):
        if html.is_html_input(dictionary) and self.field_name in dictionary:
            return dictionary.get(self.field_name)
        return super().get_value(dictionary)

    def to_internal_value(self, data):
        if isinstance(data, str):
            try:
                data = json.loads(data) if data.strip() else {}
            except ValueError as exc:
                raise serializers.ValidationError("Send env as a JSON object of names to values.") from exc
        return super().to_internal_value(data)


class TaskCreateSerializer(serializers.Serializer):
    """Only shapes are checked here; the rules (ranges, quota, GPU models) are the service's, answered per field."""

    name = serializers.CharField(max_length=100, help_text="1–100 characters.")
    framework = serializers.ChoiceField(
        choices=Framework.choices, default=Framework.PYTORCH, help_text="pytorch, tensorflow, jax or custom."
    )
    image = serializers.CharField(
        required=False, allow_blank=True, help_text="Container image; empty for the framework's default."
    )
    command = serializers.CharField(help_text="Shell command to run, up to 10,000 characters.")
    env = EnvField(required=False, help_text="Environment variables, NAME → value (at most 100).")
    input_url = serializers.CharField(required=False, allow_blank=True, help_text="s3:// URL of the input data.")
    input_file = serializers.FileField(
        required=False, help_text="Input data uploaded with the task (multipart/form-data; size limited)."
    )
    gpu_model = serializers.CharField(
        required=False, allow_blank=True, help_text="GPU model code from GET /gpu-models/; empty for CPU only."
    )
    gpus = serializers.IntegerField(required=False, help_text="Whole GPUs, 0–8.")
    vgpu_slices = serializers.IntegerField(
        required=False, help_text="vGPU slices of one GPU instead of whole GPUs (general pool), 0–8."
    )
    vcpus = serializers.IntegerField(required=False, help_text="vCPUs, 1–64 (default 2).")
    memory_gib = serializers.IntegerField(required=False, help_text="Memory, GiB, 1–512 (default 8).")
    max_runtime_seconds = serializers.IntegerField(
        required=False, help_text=f"Time limit of each attempt, 60–{MAX_RUNTIME_SECONDS} seconds (default 3600)."
    )
    max_retries = serializers.IntegerField(required=False, help_text="Retries after a failed attempt, 0–3.")
    priority = serializers.IntegerField(required=False, help_text="Priority within your tenant, 0–9 (default 5).")
    preemptible = serializers.BooleanField(
        required=False, default=False, help_text="Let core (Diamond) tasks preempt it; it is requeued in its place."
    )


class TaskEventSerializer(serializers.ModelSerializer):
    data = serializers.JSONField(
        help_text='state: {"state", "message"}; progress: {"percent"}; metric: {"name", "value"}; '
        'log: {"stream", "text"}.'
    )

    class Meta:
        model = TaskEvent
        fields = ["seq", "at", "kind", "data"]
        read_only_fields = fields
        extra_kwargs = {
            "seq": {"help_text": "Sequence number, consecutive from 1 for each task."},
            "at": {"help_text": "When it happened."},
            "kind": {"help_text": "state, progress, metric or log."},
        }


class TaskEventPageSerializer(serializers.Serializer):
    events = TaskEventSerializer(many=True, help_text="Events after the `after` asked for, oldest first.")
    last_seq = serializers.IntegerField(help_text="The task's latest sequence number now.")
    more = serializers.BooleanField(help_text="True when more events follow: ask again with after=<last seq seen>.")


class ResultFileSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="Path of the file within the task's results.")
    size = serializers.IntegerField(help_text="Size in bytes.")
    url = serializers.SerializerMethodField(help_text="API URL that downloads it (members who use compute).")

    def get_url(self, result) -> str:
        url = reverse("api-task-result", kwargs={"pk": self.context["task"].pk, "path": result.path})
        return self.context["request"].build_absolute_uri(url)
