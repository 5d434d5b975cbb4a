"""The cluster executor: its Job manifest (validated strictly), and whole attempts through the kubevirt
backend and the real `kubernetes` client against the fake API server, the test playing the Job
controller and the kubelet."""

import copy
import threading
import time
from collections.abc import Callable

import pytest
from kubernetes.client import ApiClient, Configuration

from hosting.executors.base import Outcome, TaskLaunch
from hosting.executors.cluster import ClusterExecutor, job_manifest, job_name
from provisioning.backends.base import JobPhase
from provisioning.backends.kubevirt import KubevirtBackend
from provisioning.validation import ManifestInvalid, validate_manifest
from tests.kube_fake import running_fake
from tests.test_executor_local import RecordingReporter

NS = "t-acme"
TASK_ID = "3f2a9c1e-5b7d-4e21-9a0c-1d2e3f405162"
JOB = "task-3f2a9c1e-2"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"
A100 = "nvidia.com/GA100_A100_PCIE_80GB"


def launch(**overrides) -> TaskLaunch:
    values = {
        "task_id": TASK_ID,
        "attempt": 2,
        "tenant_slug": "acme",
        "namespace": NS,
        "tier": "gold",
        "name": "fine-tune",
        "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
        "command": "python train.py --epochs 3",
        "env": {"EPOCHS": "3"},
        "gpu_model_resource": A100,
        "gpus": 2,
        "vgpu_slices": 0,
        "gpu_indices": [],
        "vcpus": 8,
        "memory_gib": 64,
        "max_runtime_seconds": 3600,
        "workdir": "/unused",
        "input_url": "s3://acme/data.tar",
    }
    values.update(overrides)
    return TaskLaunch(**values)


# --- the manifest --------------------------------------------------------------------------------------


def test_job_manifest_validates_strictly_and_carries_gpus_deadline_priority_and_labels():
    manifest = job_manifest(launch(), grace_seconds=20)
    validate_manifest(manifest)  # kubernetes-validate, strict: no unknown fields anywhere

    assert manifest["metadata"]["name"] == JOB == job_name(launch())
    assert manifest["metadata"]["namespace"] == NS
    labels = manifest["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "gpu-portal"
    assert labels["gpuportal.io/tenant"] == "acme"
    assert labels["gpuportal.io/task"] == TASK_ID
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["metadata"]["labels"] == labels
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["priorityClassName"] == "gpu-portal-gold"
    assert pod["terminationGracePeriodSeconds"] == 20
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["name"] == "task"
    assert container["command"] == ["/bin/sh", "-c", "python train.py --epochs 3"]
    wanted = {"cpu": "8", "memory": "64Gi", A100: "2"}
    assert container["resources"] == {"requests": wanted, "limits": wanted}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["EPOCHS"] == "3"
    assert env["PORTAL_TASK_ID"] == TASK_ID
    assert env["PORTAL_INPUT"] == "s3://acme/data.tar"
    assert env["PORTAL_OUTPUT_DIR"] in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_a_vgpu_task_asks_for_slices_and_a_cpu_task_for_no_gpu():
    vgpu = job_manifest(launch(gpus=0, vgpu_slices=3, gpu_model_resource="nvidia.com/GRID_T4-4Q", tier="standard"))
    validate_manifest(vgpu)
    limits = vgpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/GRID_T4-4Q"] == "3"
    assert vgpu["spec"]["template"]["spec"]["priorityClassName"] == "gpu-portal-standard"

    cpu = job_manifest(launch(gpus=0, gpu_model_resource="", vcpus=2, memory_gib=4))
    validate_manifest(cpu)
    pod = cpu["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert "tolerations" not in pod

    with pytest.raises(ValueError, match="resource name"):
        job_manifest(launch(gpu_model_resource=""))


def test_strict_validation_would_catch_a_misspelled_field():
    manifest = copy.deepcopy(job_manifest(launch()))
    manifest["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(ManifestInvalid):
        validate_manifest(manifest)


# --- attempts against the fake API server ----------------------------------------------------------------


@pytest.fixture
def kube():
    with running_fake() as fake:
        configuration = Configuration(host=fake.url)
        configuration.retries = 0
        backend = KubevirtBackend(api_client=ApiClient(configuration), retries=3, retry_base_delay=0.001)
        yield fake, backend
        backend._api_client.close()


def executor(backend, **overrides) -> ClusterExecutor:
    options = {
        "poll_seconds": 0.02,
        "grace_seconds": 1,
        "lost_after_seconds": 0.3,
        "cannot_start_seconds": 0.2,
        "start_timeout_seconds": 5,
    }
    options.update(overrides)
    return ClusterExecutor(backend, **options)


class Attempt:
    """executor.run in a thread, while the test plays the cluster."""

    def __init__(self, executor: ClusterExecutor, reporter: RecordingReporter, task: TaskLaunch | None = None):
        self.reporter = reporter
        self.result: list[Outcome] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(executor.run(task or launch(), reporter)), daemon=True
        )
        self.thread.start()

    def outcome(self, timeout: float = 5) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the executor did not finish"
        return self.result[0]


def wait_for(condition: Callable[[], object], timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def container(state: dict) -> dict:
    return {"name": "task", "image": "pytorch", "imageID": "", "ready": "running" in state, "restartCount": 0,
            "state": state}  # fmt: skip


def start_pod(fake) -> str:
    """The Job controller creates the pod, the scheduler places it, the kubelet starts its container."""
    wait_for(lambda: fake.get("Job", JOB, NS))
    pod = fake.add_job_pod(
        NS,
        JOB,
        {"phase": "Running", "containerStatuses": [container({"running": {}})]},
        node_name="gpu-node-1",
    )
    fake.set_job_status(NS, JOB, {"active": 1, "ready": 1})
    return pod


def end_pod(fake, pod: str, exit_code: int, *, reason: str = "", message: str = "") -> None:
    terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
    if message:
        terminated["message"] = message
    phase = "Succeeded" if exit_code == 0 else "Failed"
    fake.set_pod_status(NS, pod, {"phase": phase, "containerStatuses": [container({"terminated": terminated})]})
    condition = {"type": "Complete", "status": "True"} if exit_code == 0 else {
        "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"
    }  # fmt: skip
    fake.set_job_status(NS, JOB, {"conditions": [condition], "succeeded" if exit_code == 0 else "failed": 1})


def test_an_attempt_creates_its_job_streams_the_pod_log_and_succeeds(kube):
    fake, backend = kube
    reporter = RecordingReporter()
    attempt = Attempt(executor(backend), reporter)

    pod = start_pod(fake)
    wait_for(lambda: "started" in reporter.calls)
    fake.append_log(NS, pod, "##progress 10\n##metric loss=0.5\nloading\n##progress 2")
    wait_for(lambda: len(reporter.received) == 3)
    time.sleep(0.1)
    assert len(reporter.received) == 3  # "##progress 2" is not a line yet: more may follow
    fake.append_log(NS, pod, "5\n")
    wait_for(lambda: reporter.progress() == [10, 25])
    fake.append_log(NS, pod, "done, no newline")
    end_pod(fake, pod, 0)
    outcome = attempt.outcome()

    assert outcome == Outcome("succeeded", exit_code=0)
    assert reporter.metric("loss") == [0.5]
    assert reporter.logs("stdout") == ["loading", "done, no newline"]
    assert reporter.calls.count("started") == 1 and reporter.calls[-1] == "finished"
    (created,) = fake.requests_to("POST", f"/apis/batch/v1/namespaces/{NS}/jobs$")
    assert created.body["spec"]["activeDeadlineSeconds"] == 3600
    assert created.query.get("fieldManager") == "gpu-portal"
    logs = fake.requests_to("GET", f"/api/v1/namespaces/{NS}/pods/{pod}/log$")
    assert logs and all(request.query.get("container") == "task" for request in logs)


def test_a_task_that_ends_between_two_polls_is_reported_started_then_finished(kube):
    fake, backend = kube
    reporter = RecordingReporter()
    attempt = Attempt(executor(backend, poll_seconds=0.3), reporter)
    wait_for(lambda: fake.get("Job", JOB, NS))
    pod = fake.add_job_pod(NS, JOB, {"phase": "Pending"})
    fake.append_log(NS, pod, "##progress 100\n")
    end_pod(fake, pod, 0)

    assert attempt.outcome() == Outcome("succeeded", exit_code=0)
    assert reporter.calls == ["started", "lines", "finished"]
    assert reporter.progress() == [100]


def test_a_repeated_dispatch_finds_its_job_and_does_not_fail(kube):
    fake, backend = kube
    backend.create_job(job_manifest(launch()))
    backend.create_job(job_manifest(launch()))  # 409 AlreadyExists: the Job is left as it is

    assert len(fake.requests_to("POST", "/jobs$")) == 2
    assert backend.job_status(NS, JOB).phase == JobPhase.PENDING
    assert backend.job_status(NS, "task-00000000-1").phase == JobPhase.MISSING


@pytest.mark.parametrize(("action", "status"), [("cancel", "cancelled"), ("preempt", "preempted")])
def test_cancel_and_preempt_delete_the_job_with_the_grace_period(kube, action, status):
    fake, backend = kube
    reporter = RecordingReporter()
    attempt = Attempt(executor(backend), reporter)
    pod = start_pod(fake)
    fake.append_log(NS, pod, "##progress 30\n")
    wait_for(lambda: reporter.progress() == [30])
    reporter._actions.append(action)
    outcome = attempt.outcome()

    assert outcome.status == status
    (delete,) = fake.requests_to("DELETE", JOB_PATH)
    assert delete.query == {"gracePeriodSeconds": "1", "propagationPolicy": "Background"}
    assert fake.get("Job", JOB, NS) is None and fake.get("Pod", pod, NS) is None


def test_the_deadline_ends_the_attempt_as_timed_out(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend), RecordingReporter())
    pod = start_pod(fake)
    wait_for(lambda: fake.requests_to("GET", f"/pods/{pod}/log$"))
    # The Job controller: past activeDeadlineSeconds it fails the Job and deletes its running pod.
    fake.set_job_status(NS, JOB, {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]})
    fake.delete("Pod", pod, NS)

    outcome = attempt.outcome()
    assert outcome.status == "timed_out"
    assert "3600 seconds" in outcome.reason


@pytest.mark.parametrize(
    ("exit_code", "reason", "message", "expected"),
    [
        (3, "Error", "", "exited with code 3"),
        (1, "Error", "CUDA error: device-side assert", "exited with code 1: CUDA error: device-side assert"),
        (137, "OOMKilled", "", "killed: out of memory (OOMKilled, exit code 137)"),
    ],
)
def test_a_failing_task_fails_with_its_exit_code(kube, exit_code, reason, message, expected):
    fake, backend = kube
    reporter = RecordingReporter()
    attempt = Attempt(executor(backend), reporter)
    pod = start_pod(fake)
    fake.append_log(NS, pod, "Traceback (most recent call last):\nRuntimeError: boom\n")
    end_pod(fake, pod, exit_code, reason=reason, message=message)

    assert attempt.outcome() == Outcome("failed", exit_code=exit_code, reason=expected)
    assert reporter.logs("stdout")[-1] == "RuntimeError: boom"


def test_a_pod_that_vanishes_with_its_node_is_lost_and_its_job_removed(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend), RecordingReporter())
    pod = start_pod(fake)
    wait_for(lambda: fake.requests_to("GET", f"/pods/{pod}/log$"))
    fake.delete("Pod", pod, NS)  # the node is gone; the Job controller has not noticed yet

    outcome = attempt.outcome()
    assert outcome == Outcome("lost", reason="The task's pod disappeared from the cluster.")
    assert fake.requests_to("DELETE", JOB_PATH)


def test_a_pod_the_cluster_disrupts_is_lost_not_failed(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend), RecordingReporter())
    pod = start_pod(fake)
    fake.set_pod_status(
        NS,
        pod,
        {
            "phase": "Failed",
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                 "message": "Taint manager: deleting due to NoExecute taint"},
            ],
            "containerStatuses": [container({"terminated": {"exitCode": 143, "reason": "Error"}})],
        },
    )  # fmt: skip
    fake.set_job_status(
        NS, JOB, {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    )

    outcome = attempt.outcome()
    assert outcome.status == "lost"
    assert "DeletionByTaintManager" in outcome.reason and "NoExecute" in outcome.reason


def test_server_errors_are_retried_and_the_attempt_goes_on(kube):
    fake, backend = kube
    reporter = RecordingReporter()
    fake.fail_next("POST", "/jobs$", 500)
    attempt = Attempt(executor(backend), reporter)
    pod = start_pod(fake)
    fake.fail_next("GET", JOB_PATH + "$", 500, times=2)
    fake.fail_next("GET", f"/pods/{pod}/log$", 503, times=2)
    fake.append_log(NS, pod, "##progress 50\n")
    wait_for(lambda: reporter.progress() == [50])
    end_pod(fake, pod, 0)

    assert attempt.outcome().status == "succeeded"
    assert len(fake.requests_to("POST", "/jobs$")) == 2
    assert reporter.progress() == [50]  # retried reads repeat no line


def test_a_cluster_that_keeps_failing_loses_the_attempt(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend), RecordingReporter())
    start_pod(fake)
    fake.fail_next("GET", JOB_PATH + "$", 503, times=1000)

    outcome = attempt.outcome()
    assert outcome.status == "lost"
    assert "stopped answering" in outcome.reason and "503" in outcome.reason


def test_a_refused_job_fails_with_the_clusters_reason(kube):
    fake, backend = kube
    fake.fail_next(
        "POST",
        "/jobs$",
        403,
        {"kind": "Status", "code": 403, "message": "jobs is forbidden: exceeded quota: tenant-quota"},
    )
    outcome = executor(backend).run(launch(), reporter := RecordingReporter())

    assert outcome.status == "failed"
    assert "quota is exhausted" in outcome.reason
    assert reporter.calls == ["finished"]


def test_an_image_that_cannot_be_pulled_fails_the_attempt(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend), RecordingReporter())
    wait_for(lambda: fake.get("Job", JOB, NS))
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "pytorch/nope"'}}
    fake.add_job_pod(NS, JOB, {"phase": "Pending", "containerStatuses": [container(waiting)]}, node_name="gpu-node-1")

    outcome = attempt.outcome()
    assert outcome.status == "failed"
    assert outcome.reason == 'The task\'s image cannot be pulled: Back-off pulling image "pytorch/nope"'
    assert fake.get("Job", JOB, NS) is None


def test_a_task_the_cluster_cannot_place_is_given_back_as_lost(kube):
    fake, backend = kube
    attempt = Attempt(executor(backend, start_timeout_seconds=0.3), RecordingReporter())
    wait_for(lambda: fake.get("Job", JOB, NS))
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/GA100_A100_PCIE_80GB."}  # fmt: skip
    fake.add_job_pod(NS, JOB, {"phase": "Pending", "conditions": [unschedulable]})

    outcome = attempt.outcome()
    assert outcome.status == "lost"
    assert "did not start the task" in outcome.reason and "Insufficient" in outcome.reason
    assert fake.get("Job", JOB, NS) is None
