"""The cluster executor: one attempt of a task as a batch/v1 Job in the tenant's namespace.

The Job is built by a pure function (`job_manifest`), created through the kubevirt backend (the only
module that speaks to Kubernetes), and then polled: its status for how it is doing, its pod's log for
what the task printed (the same `##progress` / `##metric` protocol as everywhere). Retries are the
portal's, not Kubernetes': backoffLimit 0, and every ending is mapped to one Outcome.
"""

import logging
import re
import time

from django.conf import settings

from hosting.executors.base import Outcome, Reporter, TaskLaunch, parse_line
from provisioning.backends.base import TASK_CONTAINER, BackendError, JobBackend, JobPhase, JobStatus
from provisioning.manifests import GPU_TOLERATION, labels

logger = logging.getLogger(__name__)

# A finished Job (and its pod, with the log) stays this long for a late reader, then Kubernetes removes it.
JOB_TTL_SECONDS = 24 * 3600
WORKDIR = "/workspace"
OUTPUT_DIR = f"{WORKDIR}/output"  # an emptyDir: it exists and is writable whatever the image
# PyTorch's DataLoader workers share tensors through /dev/shm, which is 64 MiB in a container by default.
SHM_MAX_GIB = 16

_STOP_OUTCOMES = {"cancel": "cancelled", "preempt": "preempted"}
_STOP_REASONS = {"cancel": "Cancelled on request.", "preempt": "Preempted to make room for higher-priority work."}


def job_name(launch: TaskLaunch) -> str:
    """`task-<first 8 of the task id>-<attempt>`: deterministic, so a repeated dispatch finds its Job."""
    short_id = re.sub(r"[^a-z0-9]", "", launch.task_id.lower())[:8]
    return f"task-{short_id}-{launch.attempt}"


def job_manifest(launch: TaskLaunch, *, grace_seconds: int = 30) -> dict:
    """The attempt's Job. Requests equal limits (a Guaranteed pod: the customer pays for what it gets)."""
    gpu_count = launch.gpus or launch.vgpu_slices
    if gpu_count and not launch.gpu_model_resource:
        raise ValueError("A task with GPUs or vGPU slices needs the GPU's Kubernetes resource name.")
    object_labels = {
        **launch.labels,
        **labels(launch.tenant_slug),
        f"{settings.PORTAL_LABEL_PREFIX}/task": launch.task_id,
        f"{settings.PORTAL_LABEL_PREFIX}/attempt": str(launch.attempt),
    }
    resources = {"cpu": str(launch.vcpus), "memory": f"{launch.memory_gib}Gi"}
    if gpu_count:
        # A vGPU slice is its own extended resource (nvidia.com/GRID_T4-4Q …): count slices, not GPUs.
        resources[launch.gpu_model_resource] = str(gpu_count)
    env = [{"name": key, "value": str(value)} for key, value in sorted(launch.env.items())]
    env += [
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # progress lines reach the log as they are printed
        {"name": "PORTAL_TASK_ID", "value": launch.task_id},
        {"name": "PORTAL_OUTPUT_DIR", "value": OUTPUT_DIR},
    ]
    if launch.input_url:
        env.append({"name": "PORTAL_INPUT", "value": launch.input_url})
    pod_spec: dict = {
        "restartPolicy": "Never",
        "priorityClassName": f"gpu-portal-{launch.tier}",
        # Pods of a deleted Job get this grace from the garbage collector (see KubevirtBackend.delete_job).
        "terminationGracePeriodSeconds": int(grace_seconds),
        "automountServiceAccountToken": False,  # a task has no business with the cluster's API
        "enableServiceLinks": False,
        "containers": [
            {
                "name": TASK_CONTAINER,
                "image": launch.image,
                "command": ["/bin/sh", "-c", launch.command],
                "workingDir": WORKDIR,
                "env": env,
                "resources": {"requests": dict(resources), "limits": dict(resources)},
                "volumeMounts": [
                    {"name": "output", "mountPath": OUTPUT_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a mount point in the container
                ],
            }
        ],
        "volumes": [
            {"name": "output", "emptyDir": {}},
            # Memory-backed: counts against the container's memory limit, so it is capped below it.
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(1, min(SHM_MAX_GIB, launch.memory_gib // 2))}Gi"},
            },
        ],
    }
    if gpu_count:
        pod_spec["tolerations"] = [dict(GPU_TOLERATION)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(launch), "namespace": launch.namespace, "labels": object_labels},
        "spec": {
            "backoffLimit": 0,  # the portal decides about retries (max_retries, preemption)
            "activeDeadlineSeconds": launch.max_runtime_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": dict(object_labels)}, "spec": pod_spec},
        },
    }


class ClusterExecutor:
    """Runs an attempt as a Job and follows it until it ends. `run` blocks; the caller picks the thread.

    It calls reporter.started() once the pod runs, reporter.lines() with what the task printed,
    reporter.heartbeat() every poll (cancel/preempt → the Job is deleted with the grace period), and
    reporter.finished(outcome) once, before returning the outcome.
    """

    name = "cluster"

    def __init__(
        self,
        backend: JobBackend,
        poll_seconds: float = 2,
        *,
        grace_seconds: int = 30,
        start_timeout_seconds: float = 900,
        cannot_start_seconds: float = 120,
        lost_after_seconds: float = 60,
    ):
        """start_timeout_seconds: a pod not running by then is given up (lost: the portal tries again
        later). cannot_start_seconds: how long an image that cannot be pulled may keep failing before
        the attempt fails (registries have hiccups). lost_after_seconds: how long the pod may be gone,
        or the cluster's API unanswering, before the attempt counts as lost."""
        self.backend = backend
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self.cannot_start_seconds = cannot_start_seconds
        self.lost_after_seconds = lost_after_seconds

    def run(self, launch: TaskLaunch, reporter: Reporter) -> Outcome:
        outcome = _JobRun(self, launch, reporter).follow()
        reporter.finished(outcome)
        return outcome


class _JobRun:
    """One attempt's Job being followed: what has been seen of it so far."""

    def __init__(self, executor: ClusterExecutor, launch: TaskLaunch, reporter: Reporter):
        self.executor = executor
        self.backend = executor.backend
        self.launch = launch
        self.reporter = reporter
        self.manifest = job_manifest(launch, grace_seconds=executor.grace_seconds)
        self.namespace = launch.namespace
        self.name = self.manifest["metadata"]["name"]
        self.pod_name = ""
        self.lines_seen = 0
        self.started = False
        self.stop: str | None = None  # "cancel" | "preempt" once asked
        self.stop_at = 0.0
        self.created_at = 0.0
        self.trouble_since: float | None = None  # the API failing, or the pod gone, since
        self.cannot_start_since: float | None = None

    def follow(self) -> Outcome:
        try:
            self.backend.create_job(self.manifest)
        except BackendError as error:
            # Unreachable or overloaded: nothing ran, try again later. Refused (quota, invalid): say why.
            status = "lost" if error.retryable else "failed"
            return Outcome(status, reason=f"The cluster did not accept the task: {error.message}")
        self.created_at = time.monotonic()
        while True:
            try:
                status = self.backend.job_status(self.namespace, self.name)
                self._note_start(status)
                self._read_log(status)
            except BackendError as error:
                outcome = self._api_trouble(error)
            else:
                outcome = self._judge(status)
            if outcome is not None:
                return outcome
            self._heartbeat()
            time.sleep(self.executor.poll_seconds)

    def _note_start(self, status: JobStatus) -> None:
        # A task quicker than a poll is first seen ended: its exit code says it ran all the same.
        ran = status.phase == JobPhase.RUNNING or (status.pod_name and status.exit_code is not None)
        if ran and not self.started:
            self.started = True
            self.reporter.started()

    def _read_log(self, status: JobStatus) -> None:
        self.pod_name = status.pod_name or self.pod_name
        if not self.pod_name:
            return
        # Once the Job has ended, nothing more will be written: the unfinished last line counts too.
        ended = status.phase in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.MISSING)
        new = self.backend.read_job_log(self.namespace, self.pod_name, self.lines_seen, include_partial=ended)
        if new:
            self.lines_seen += len(new)
            self.reporter.lines([parse_line(line) for line in new])

    def _judge(self, status: JobStatus) -> Outcome | None:
        """The outcome once the Job has one; None while it is still on its way."""
        now = time.monotonic()
        if status.phase != JobPhase.PENDING or status.pod_name:
            self.trouble_since = None
        if status.phase == JobPhase.SUCCEEDED:
            return Outcome("succeeded", exit_code=status.exit_code if status.exit_code is not None else 0)
        if status.phase == JobPhase.FAILED:
            return self._failed(status)
        if status.phase == JobPhase.MISSING:
            if self.stop:
                return Outcome(_STOP_OUTCOMES[self.stop], reason=_STOP_REASONS[self.stop])
            return Outcome("lost", reason="The task's Job disappeared from the cluster.")
        if self.stop:
            # Deleted: waiting for the Job to be gone. One held back (a finalizer) is the reconciler's.
            if now - self.stop_at > self.executor.grace_seconds + self.executor.lost_after_seconds:
                return Outcome(_STOP_OUTCOMES[self.stop], reason=_STOP_REASONS[self.stop])
            return None
        if status.phase == JobPhase.RUNNING:
            # The Job controller enforces activeDeadlineSeconds; this only catches a controller that does not.
            overdue = self.launch.max_runtime_seconds + self.executor.grace_seconds + self.executor.lost_after_seconds
            if now - self.created_at > overdue:
                return self._give_up("timed_out", "The task ran past its time limit and the cluster did not stop it.")
            return None
        return self._pending(status, now)

    def _failed(self, status: JobStatus) -> Outcome:
        if status.deadline_exceeded:
            if not self.started and not self.pod_name:
                return Outcome("lost", reason="The cluster did not start the task before its time limit.")
            limit = self.launch.max_runtime_seconds
            return Outcome(
                "timed_out", exit_code=status.exit_code, reason=f"Stopped at its time limit of {limit} seconds."
            )
        if status.disrupted:
            return Outcome("lost", exit_code=status.exit_code, reason=status.reason)
        return Outcome("failed", exit_code=status.exit_code, reason=status.reason or "The task failed.")

    def _pending(self, status: JobStatus, now: float) -> Outcome | None:
        if self.pod_name and not status.pod_name:
            # It had a pod, and the pod is gone while the Job has no verdict yet: a node that vanished
            # with it, most likely. The Job controller usually fails the Job soon; if not, it is lost.
            self.trouble_since = self.trouble_since or now
            if now - self.trouble_since > self.executor.lost_after_seconds:
                return self._give_up("lost", "The task's pod disappeared from the cluster.")
            return None
        if status.cannot_start:
            self.cannot_start_since = self.cannot_start_since or now
            if now - self.cannot_start_since > self.executor.cannot_start_seconds:
                return self._give_up("failed", status.reason)
        else:
            self.cannot_start_since = None
        if not self.started and now - self.created_at > self.executor.start_timeout_seconds:
            waited = round(self.executor.start_timeout_seconds)
            return self._give_up("lost", f"The cluster did not start the task within {waited} seconds: {status.reason}")
        return None

    def _api_trouble(self, error: BackendError) -> Outcome | None:
        """The backend already retried; a cluster that keeps failing for lost_after_seconds loses the attempt."""
        now = time.monotonic()
        self.trouble_since = self.trouble_since or now
        logger.warning("Task %s: following Job %s/%s failed: %s", self.launch.task_id, self.namespace, self.name, error)
        if now - self.trouble_since > self.executor.lost_after_seconds:
            return self._give_up("lost", f"The cluster stopped answering about the task: {error.message}")
        return None

    def _give_up(self, status: str, reason: str) -> Outcome:
        """End the attempt on the portal's side: delete its Job so it stops holding (or waiting for) GPUs."""
        try:
            self.backend.delete_job(self.namespace, self.name, self.executor.grace_seconds)
        except BackendError as error:  # the reconciler removes leftovers by label
            logger.warning(
                "Task %s: could not delete Job %s/%s: %s", self.launch.task_id, self.namespace, self.name, error
            )
        return Outcome(status, reason=reason)

    def _heartbeat(self) -> None:
        action = self.reporter.heartbeat()
        if self.stop or action not in _STOP_OUTCOMES:
            return
        try:
            self.backend.delete_job(self.namespace, self.name, self.executor.grace_seconds)
        except BackendError as error:
            logger.warning(
                "Task %s: deleting Job %s/%s failed, trying again: %s",
                self.launch.task_id,
                self.namespace,
                self.name,
                error,
            )
            return  # the next heartbeat asks again
        self.stop, self.stop_at = action, time.monotonic()
