"""The one interface every cluster backend implements. Plain dataclasses in, plain dataclasses out:
backends never see ORM objects, so they can be tested and swapped on their own."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class BackendError(Exception):
    """A cluster operation failed. `message` is for the customer; `retryable` says whether trying later may help."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class TenantSpec:
    """A tenant's namespace and the isolation objects (Namespace, ResourceQuota, LimitRange,
    NetworkPolicies, ServiceAccount, Role, RoleBinding) to create or update in it."""

    namespace: str
    manifests: list[dict]


@dataclass(frozen=True)
class VmRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class VmSpec:
    """Everything to create one VM: the VirtualMachine, its Service, Secrets (cloud-init), in order."""

    ref: VmRef
    manifests: list[dict]
    node_name: str = ""  # where the portal placed it (the local backend honours it; Kubernetes schedules itself)
    jupyter_token: str = ""


class Phase(StrEnum):
    MISSING = "missing"  # the cluster has no such VM
    PROVISIONING = "provisioning"  # disks importing, pod scheduling
    STARTING = "starting"  # booting, not yet ready
    RUNNING = "running"  # ready: guest agent up and GPUs seen in the guest
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class VmStatus:
    phase: Phase
    reason: str = ""  # plain words for the customer when something is wrong or slow
    node_name: str = ""
    ssh_host: str = ""
    ssh_port: int | None = None
    jupyter_url: str = ""
    gpu_utilisation_percent: float | None = None  # latest sample, when the backend can see it


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    pool: str
    gpu_model_resource: str  # Kubernetes resource name of its GPUs, "" for CPU-only
    gpus: int
    cpus: int
    memory_gib: int
    hugepages_2mi_gib: int = 0
    hugepages_1gi_gib: int = 0
    dedicated: bool = False
    schedulable: bool = True
    vgpu_slices_per_gpu: int = 1
    labels: dict = field(default_factory=dict)


class ClusterBackend(Protocol):
    name: str

    def ping(self) -> None:
        """Raise BackendError when the cluster cannot be reached."""

    def list_nodes(self) -> list[NodeCapacity]:
        """The nodes work can be placed on, with their capacity."""

    def ensure_tenant(self, spec: TenantSpec) -> None:
        """Create or update the tenant's namespace and isolation objects. Idempotent."""

    def apply_vm(self, spec: VmSpec) -> None:
        """Create or update the VM and its companions, running. Idempotent."""

    def start_vm(self, ref: VmRef) -> None: ...

    def stop_vm(self, ref: VmRef) -> None: ...

    def restart_vm(self, ref: VmRef) -> None: ...

    def delete_vm(self, ref: VmRef) -> None:
        """Delete the VM and everything labelled with it. Deleting a missing VM is not an error."""

    def vm_status(self, ref: VmRef) -> VmStatus: ...

    def list_vms(self) -> list[VmRef]:
        """Every VM the portal created (by label), for the reconciler to find leftovers."""


# The container of a task's Job whose log and exit code are the task's.
TASK_CONTAINER = "task"


class JobPhase(StrEnum):
    PENDING = "pending"  # created, its pod not running yet (scheduling, pulling the image)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSING = "missing"  # the cluster has no such Job


@dataclass(frozen=True)
class JobStatus:
    """A task's batch/v1 Job as the cluster executor needs it: where it runs and how it ended."""

    phase: JobPhase
    pod_name: str = ""  # the pod whose log holds the task's output, "" while there is none
    node_name: str = ""
    exit_code: int | None = None  # the task container's, once it has terminated
    reason: str = ""  # plain words: why it waits, how it failed
    deadline_exceeded: bool = False  # failed because it ran past activeDeadlineSeconds
    disrupted: bool = False  # the cluster lost or removed the pod (node lost, eviction): not the task's doing
    cannot_start: bool = False  # pending on something that needs a change to clear (an image that cannot be pulled)


class JobBackend(Protocol):
    """What the cluster executor needs to run task attempts as Jobs (the kubevirt backend has it)."""

    def create_job(self, job_manifest: dict) -> None:
        """Create the Job; one that already exists under that name is left as it is (idempotent)."""

    def job_status(self, namespace: str, name: str) -> JobStatus: ...

    def read_job_log(
        self, namespace: str, pod_name: str, since_line: int, *, include_partial: bool = False
    ) -> list[str]:
        """The pod's complete log lines after the first `since_line`; the last line too when
        include_partial and it has no newline yet. A pod that is gone, or not started, has none."""

    def delete_job(self, namespace: str, name: str, grace_seconds: int) -> None:
        """Delete the Job and (in the background) its pods. Deleting a missing Job is not an error."""
