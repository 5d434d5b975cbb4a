"""The KubeVirt backend: VMs as kubevirt.io/v1 VirtualMachines, tenants as namespaces with quotas and policies.

This is the only module that imports the `kubernetes` client: every SDK call, and every quirk of its
37.x generator, stays here. All calls go through `_call`, which adds the request timeout, retries what
retrying can fix (409 conflicts, 429, 5xx, timeouts) with exponential backoff and jitter, and turns
what it cannot fix into a BackendError in plain words for the customer.
"""

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import urllib3
from django.conf import settings
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from pydantic import ValidationError

from provisioning.backends.base import (
    TASK_CONTAINER,
    BackendError,
    JobPhase,
    JobStatus,
    NodeCapacity,
    Phase,
    TenantSpec,
    VmRef,
    VmSpec,
    VmStatus,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIELD_MANAGER = "gpu-portal"
MANAGED_BY_SELECTOR = "app.kubernetes.io/managed-by=gpu-portal"
KUBEVIRT_GROUP = "kubevirt.io"
KUBEVIRT_VERSION = "v1"
VM_ACTION_PATH = "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/{action}"
APPLY_PATCH = "application/apply-patch+yaml"
# Strategic merge keeps what the server filled in (a Service's clusterIP and nodePorts, so a customer's
# SSH port survives a re-apply) and merges lists by their keys; custom resources don't support it.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
LIST_PAGE_SIZE = 500
SSH_PORT = 22
JUPYTER_PORT = 8888


def access_service_name(vm_name: str) -> str:
    """The NodePort Service that exposes a VM's SSH (22) and Jupyter (8888) ports."""
    return f"{vm_name}-access"


@dataclass(frozen=True)
class _TypedKind:
    """Where the client keeps a core kind: its API class and the snake_case name in its method names."""

    api: type
    resource: str
    namespaced: bool = True

    def method_name(self, verb: str) -> str:
        return f"{verb}_{'namespaced_' if self.namespaced else ''}{self.resource}"


_TYPED_KINDS = {
    "Namespace": _TypedKind(client.CoreV1Api, "namespace", namespaced=False),
    "ResourceQuota": _TypedKind(client.CoreV1Api, "resource_quota"),
    "LimitRange": _TypedKind(client.CoreV1Api, "limit_range"),
    "ServiceAccount": _TypedKind(client.CoreV1Api, "service_account"),
    "Secret": _TypedKind(client.CoreV1Api, "secret"),
    "Service": _TypedKind(client.CoreV1Api, "service"),
    "NetworkPolicy": _TypedKind(client.NetworkingV1Api, "network_policy"),
    "Role": _TypedKind(client.RbacAuthorizationV1Api, "role"),
    "RoleBinding": _TypedKind(client.RbacAuthorizationV1Api, "role_binding"),
}
_CUSTOM_PLURALS = {"VirtualMachine": "virtualmachines"}

# printableStatus values that will not resolve on their own: a crash loop needs a changed VM, a failed
# disk import or a missing PVC needs a new disk. The order is failed and the customer told why.
_FAILED_STATUSES = {
    "CrashLoopBackOff": "The VM keeps crashing while starting",
    "DataVolumeError": "The VM's disk could not be prepared",
    "ErrorPvcNotFound": "The VM's disk volume does not exist",
}
# printableStatus values the cluster keeps retrying and that often clear (capacity frees up, a registry
# recovers, WaitForFirstConsumer storage binds once scheduled). They stay PROVISIONING with the reason;
# the portal's provisioning deadline turns a wait that lasts into a failure.
_WAITING_STATUSES = {
    "Provisioning": "Preparing the VM's disks",
    "WaitingForVolumeBinding": "Waiting for the VM's storage to be bound",
    "ErrorUnschedulable": "Waiting for a node with enough free capacity",
    "ErrImagePull": "The VM's disk image cannot be pulled yet; the cluster keeps retrying",
    "ImagePullBackOff": "The VM's disk image cannot be pulled yet; the cluster keeps retrying",
}
# Conditions whose message explains a wait or a failure (Ready's message only says "not ready").
_EXPLAINING_CONDITIONS = ("Failure", "Synchronized", "PodScheduled", "DataVolumesReady")

# The Job controller labels its pods with the Job's uid (Kubernetes 1.27+; `controller-uid` before):
# unlike the Job's name, it never matches the pods of an earlier Job of the same name.
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
# A pod waiting with one of these reasons will not start until someone changes the image or the Job.
_CANNOT_START_REASONS = {
    "ErrImagePull": "The task's image cannot be pulled",
    "ImagePullBackOff": "The task's image cannot be pulled",
    "InvalidImageName": "The task's image name is invalid",
    "CreateContainerConfigError": "The task's container cannot be configured",
    "CreateContainerError": "The task's container cannot be created",
}
# Pod reasons for a pod the cluster took away (node lost or shut down, eviction, a device plugin that
# could not hand out the GPU): the attempt was lost, the task did not fail.
_DISRUPTED_POD_REASONS = {
    "NodeLost": "The node running the task stopped reporting",
    "Evicted": "The node evicted the task",
    "Shutdown": "The node running the task shut down",
    "NodeShutdown": "The node running the task shut down",
    "Terminated": "The node running the task shut down",
    "UnexpectedAdmissionError": "The node could not hand the task its devices",
}


class _Answered(Exception):
    """The API answered with a status the caller handles itself (404 on a read, 409 on a create …)."""

    def __init__(self, status: int, body: dict):
        super().__init__(status, body)
        self.status = status
        self.body = body

    @property
    def message(self) -> str:
        return str(self.body.get("message") or "")


class KubevirtBackend:
    name = "kubevirt"

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        *,
        retries: int | None = None,
        retry_base_delay: float = 0.2,
        request_timeout: float | None = None,
    ):
        """`api_client` is built from settings when not given (tests pass one aimed at a fake server).
        `retries` (default KUBERNETES_RETRIES) is how many times a retryable failure is tried again,
        waiting about retry_base_delay × 2^n (± 50 % jitter) before try n+1."""
        self._api_client = api_client or _api_client_from_settings()
        self._retries = settings.KUBERNETES_RETRIES if retries is None else retries
        self._retry_base_delay = retry_base_delay
        self._timeout = settings.KUBERNETES_REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self._typed_apis = {kind.api: kind.api(self._api_client) for kind in _TYPED_KINDS.values()}
        self._core = self._typed_apis[client.CoreV1Api]
        self._custom = client.CustomObjectsApi(self._api_client)
        self._batch = client.BatchV1Api(self._api_client)
        self._version = client.VersionApi(self._api_client)

    # --- cluster-wide -----------------------------------------------------------

    def ping(self) -> None:
        # One try: a health check reports how the cluster is now; its caller asks again later.
        self._call("read the cluster version", self._version.get_code, attempts=1)

    def list_nodes(self) -> list[NodeCapacity]:
        def page(token: str | None):
            result = self._call("list nodes", partial(self._core.list_node, limit=LIST_PAGE_SIZE, _continue=token))
            return result.items or [], result.metadata.var_continue if result.metadata else None

        return [_node_capacity(node) for node in _paginate(page)]

    def list_vms(self) -> list[VmRef]:
        def page(token: str | None):
            result = self._call(
                "list the portal's VirtualMachines",
                partial(
                    self._custom.list_cluster_custom_object,
                    KUBEVIRT_GROUP,
                    KUBEVIRT_VERSION,
                    "virtualmachines",
                    label_selector=MANAGED_BY_SELECTOR,
                    limit=LIST_PAGE_SIZE,
                    _continue=token,
                ),
            )
            return result.get("items") or [], (result.get("metadata") or {}).get("continue")

        return [VmRef(namespace=vm["metadata"]["namespace"], name=vm["metadata"]["name"]) for vm in _paginate(page)]

    # --- tenants ------------------------------------------------------------------

    def ensure_tenant(self, spec: TenantSpec) -> None:
        # The Namespace goes first whatever the builder's order: everything else lives in it.
        for obj in sorted(spec.manifests, key=lambda obj: obj.get("kind") != "Namespace"):
            self._create_or_patch(obj, spec.namespace)

    # --- VMs ----------------------------------------------------------------------

    def apply_vm(self, spec: VmSpec) -> None:
        # Companions before the VirtualMachine, so the VM never boots ahead of its cloud-init Secret.
        companions = [obj for obj in spec.manifests if obj.get("kind") not in _CUSTOM_PLURALS]
        custom = [obj for obj in spec.manifests if obj.get("kind") in _CUSTOM_PLURALS]
        for obj in companions:
            self._create_or_patch(obj, spec.ref.namespace)
        for obj in custom:
            self._server_side_apply(obj, spec.ref.namespace)

    def start_vm(self, ref: VmRef) -> None:
        self._vm_action(ref, "start")

    def stop_vm(self, ref: VmRef) -> None:
        self._vm_action(ref, "stop")

    def restart_vm(self, ref: VmRef) -> None:
        self._vm_action(ref, "restart")

    def delete_vm(self, ref: VmRef) -> None:
        vm = self._read_kubevirt(ref, "virtualmachines")
        # Companions carry the VM's label; its value is read from the VM itself when it still exists.
        vm_label = ((vm or {}).get("metadata", {}).get("labels") or {}).get(_vm_label_key()) or ref.name
        # Foreground: the VM stays visible (Terminating) until its VMI and DataVolumes are gone.
        self._delete(
            f"delete VirtualMachine {ref.namespace}/{ref.name}",
            partial(
                self._custom.delete_namespaced_custom_object,
                KUBEVIRT_GROUP,
                KUBEVIRT_VERSION,
                ref.namespace,
                "virtualmachines",
                ref.name,
                propagation_policy="Foreground",
            ),
        )
        selector = f"{_vm_label_key()}={vm_label}"
        for kind, by_convention in (("Secret", ()), ("Service", (access_service_name(ref.name),))):
            typed = _TYPED_KINDS[kind]
            api = self._typed_apis[typed.api]
            listed = self._call(
                f"list {kind}s of VM {ref.namespace}/{ref.name}",
                partial(getattr(api, typed.method_name("list")), ref.namespace, label_selector=selector),
            )
            names = {item.metadata.name for item in listed.items or []} | set(by_convention)
            for name in sorted(names):
                self._delete(
                    f"delete {kind} {ref.namespace}/{name}",
                    partial(getattr(api, typed.method_name("delete")), name, ref.namespace),
                )

    def vm_status(self, ref: VmRef) -> VmStatus:
        vm = self._read_kubevirt(ref, "virtualmachines")
        if vm is None:
            return VmStatus(phase=Phase.MISSING, reason="The VM does not exist in the cluster.")
        vmi = self._read_kubevirt(ref, "virtualmachineinstances")
        phase, reason = _vm_phase(vm, vmi)
        ssh_host = settings.KUBEVIRT_SSH_HOST
        node_ports = self._access_node_ports(ref)
        jupyter_port = node_ports.get(JUPYTER_PORT)
        return VmStatus(
            phase=phase,
            reason=reason,
            node_name=((vmi or {}).get("status") or {}).get("nodeName") or "",
            ssh_host=ssh_host,
            ssh_port=node_ports.get(SSH_PORT),
            jupyter_url=f"http://{ssh_host}:{jupyter_port}/" if jupyter_port else "",
        )

    # --- task Jobs ------------------------------------------------------------------

    def create_job(self, job_manifest: dict) -> None:
        """Create the task's batch/v1 Job. One already there (a dispatch repeated after a crash) is left
        as it is: a running Job must not be changed under the task, and its name pins the attempt."""
        metadata = job_manifest["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        with contextlib.suppress(_Answered):
            self._call(
                f"create Job {namespace}/{name}",
                partial(self._batch.create_namespaced_job, namespace, body=job_manifest, field_manager=FIELD_MANAGER),
                answers={409},
                subject="Job",
            )

    def job_status(self, namespace: str, name: str) -> JobStatus:
        try:
            job = self._call(
                f"read Job {namespace}/{name}",
                partial(self._batch.read_namespaced_job, name, namespace),
                answers={404},
            )
        except _Answered:
            return JobStatus(phase=JobPhase.MISSING, reason="The task's Job does not exist in the cluster.")
        uid = job.metadata.uid if job.metadata else None
        pods = (
            self._call(
                f"list the pods of Job {namespace}/{name}",
                partial(self._core.list_namespaced_pod, namespace, label_selector=f"{JOB_UID_LABEL}={uid}"),
            ).items
            if uid
            else None
        )
        return _job_status(job, _latest(pods or []))

    def read_job_log(
        self, namespace: str, pod_name: str, since_line: int, *, include_partial: bool = False
    ) -> list[str]:
        """The task container's log lines after the first `since_line`. The API has no offset, so the whole
        log is read and cut here; the last line is held back until it ends in a newline (or the task has
        ended: include_partial), so a line read half-written is never reported as two."""
        try:
            text = self._call(
                f"read the log of pod {namespace}/{pod_name}",
                partial(self._core.read_namespaced_pod_log, pod_name, namespace, container=TASK_CONTAINER),
                answers={400, 404},  # 400: the container has not started yet; 404: the pod is gone
            )
        except _Answered:
            return []
        lines = (text or "").split("\n")
        complete, partial_line = lines[:-1], lines[-1]
        if include_partial and partial_line:
            complete.append(partial_line)
        return complete[since_line:]

    def delete_job(self, namespace: str, name: str, grace_seconds: int) -> None:
        """Background propagation: the Job goes at once and the garbage collector deletes its pod, which
        gets its own terminationGracePeriodSeconds (the grace here applies to the Job object only), so
        job_manifest sets that to the executor's grace."""
        self._delete(
            f"delete Job {namespace}/{name}",
            partial(
                self._batch.delete_namespaced_job,
                name,
                namespace,
                grace_period_seconds=int(grace_seconds),
                propagation_policy="Background",
            ),
        )

    # --- building blocks ----------------------------------------------------------

    def _create_or_patch(self, obj: dict, default_namespace: str) -> None:
        kind = obj.get("kind", "")
        typed = _TYPED_KINDS.get(kind)
        if typed is None:
            raise BackendError(f"The portal cannot create objects of kind {kind!r} in the cluster.")
        name = obj["metadata"]["name"]
        api = self._typed_apis[typed.api]
        if typed.namespaced:
            namespace = obj["metadata"].get("namespace") or default_namespace
            body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
            scope: tuple[str, ...] = (namespace,)
            label = f"{kind} {namespace}/{name}"
        else:
            body, scope, label = obj, (), f"{kind} {name}"
        try:
            self._call(
                f"create {label}",
                partial(getattr(api, typed.method_name("create")), *scope, body=body, field_manager=FIELD_MANAGER),
                answers={409},
                subject=kind,
            )
        except _Answered:
            # A 409 on create only means the name is taken: bring the existing object up to date.
            self._call(
                f"update {label}",
                partial(
                    getattr(api, typed.method_name("patch")),
                    name,
                    *scope,
                    body=body,
                    field_manager=FIELD_MANAGER,
                    _content_type=STRATEGIC_MERGE_PATCH,
                ),
                subject=kind,
            )

    def _server_side_apply(self, obj: dict, default_namespace: str) -> None:
        """Create or update a custom resource in one idempotent call; the API server merges by field owner.
        force=True takes back fields another manager changed: the portal's manifest is the desired state."""
        kind = obj["kind"]
        group, version = obj["apiVersion"].split("/")
        name = obj["metadata"]["name"]
        namespace = obj["metadata"].get("namespace") or default_namespace
        body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
        self._call(
            f"apply {kind} {namespace}/{name}",
            partial(
                self._custom.patch_namespaced_custom_object,
                group,
                version,
                namespace,
                _CUSTOM_PLURALS[kind],
                name,
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_PATCH,
            ),
            subject="VM" if kind == "VirtualMachine" else kind,
        )

    def _vm_action(self, ref: VmRef, action: str) -> None:
        """PUT to KubeVirt's start/stop/restart subresource: CustomObjectsApi has no method for it."""
        request = self._api_client.param_serialize(
            method="PUT",
            resource_path=VM_ACTION_PATH,
            path_params={"namespace": ref.namespace, "name": ref.name, "action": action},
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body={},
            auth_settings=["BearerToken"],  # without it a raw call goes out with no credentials
        )
        try:
            self._call(f"{action} VM {ref.namespace}/{ref.name}", partial(self._send, *request), answers={404, 409})
        except _Answered as answer:
            if answer.status == 404:
                raise BackendError(
                    f"The VM {ref.namespace}/{ref.name} does not exist in the cluster.", status=404
                ) from None
            # 409 means the VM is already in the asked-for state (starting a running VM, stopping a
            # stopped one): done. A restart needs a running VM, so there it is a real refusal.
            if action == "restart":
                raise BackendError(f"The VM cannot be restarted now: {answer.message}", status=409) from None
            logger.info("%s of VM %s/%s: already done (%s)", action, ref.namespace, ref.name, answer.message)

    def _send(self, method, url, header_params, body, post_params, *, _request_timeout) -> None:
        # call_api returns error responses instead of raising; raise the way generated methods do.
        response = self._api_client.call_api(
            method, url, header_params=header_params, body=body, post_params=post_params,
            _request_timeout=_request_timeout,
        )  # fmt: skip
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)

    def _delete(self, what: str, call: Callable[..., object]) -> None:
        with contextlib.suppress(_Answered):  # already gone: deleting is idempotent
            self._call(what, call, answers={404})

    def _read_kubevirt(self, ref: VmRef, plural: str) -> dict | None:
        try:
            return self._call(
                f"read {plural} {ref.namespace}/{ref.name}",
                partial(
                    self._custom.get_namespaced_custom_object,
                    KUBEVIRT_GROUP,
                    KUBEVIRT_VERSION,
                    ref.namespace,
                    plural,
                    ref.name,
                ),
                answers={404},
            )
        except _Answered:
            return None

    def _access_node_ports(self, ref: VmRef) -> dict[int, int]:
        """Service port (and target port) → the nodePort customers connect to."""
        name = access_service_name(ref.name)
        try:
            service = self._call(
                f"read Service {ref.namespace}/{name}",
                partial(self._core.read_namespaced_service, name, ref.namespace),
                answers={404},
            )
        except _Answered:
            return {}
        ports: dict[int, int] = {}
        for port in (service.spec.ports if service.spec else None) or []:
            if not port.node_port:
                continue
            for number in (port.port, port.target_port):
                if isinstance(number, int) or (isinstance(number, str) and number.isdigit()):
                    ports.setdefault(int(number), port.node_port)
        return ports

    # --- the one place SDK calls are made -----------------------------------------

    def _call(
        self,
        what: str,
        call: Callable[..., T],
        *,
        answers: Collection[int] = (),
        subject: str = "",
        attempts: int | None = None,
    ) -> T:
        """Run `call` with the request timeout. Statuses in `answers` come back as _Answered for the
        caller to handle; 409/429/5xx and network failures are retried; everything else, and what
        is still failing after the last try, becomes a BackendError."""
        attempts = self._retries + 1 if attempts is None else attempts
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                return call(_request_timeout=self._timeout)
            except ApiException as exc:
                status, body = exc.status or 0, _status_body(exc)
                if status in answers:
                    raise _Answered(status, body) from None
                if last or not _retryable(status):
                    raise _api_error(what, subject, status, body) from exc
                delay = self._backoff(attempt, _retry_after(exc))
                logger.warning("Kubernetes: %s got HTTP %s, retrying in %.2fs", what, status, delay)
            except urllib3.exceptions.HTTPError as exc:
                if last:
                    raise BackendError(
                        f"The cluster API could not be reached: {exc} (while trying to {what})", retryable=True
                    ) from exc
                delay = self._backoff(attempt, None)
                logger.warning("Kubernetes: %s failed (%s), retrying in %.2fs", what, exc, delay)
            except ValidationError as exc:
                # 37.x validates with pydantic both ways: a typed request body before sending (titled
                # after the API method, "CoreV1Api.create_namespace") and every response model on receipt.
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                if "." in exc.title:
                    raise BackendError(
                        f"The portal built an invalid {subject or 'request'}: {problems} (while trying to {what})"
                    ) from exc
                raise BackendError(
                    f"The cluster's answer could not be read: {problems} (while trying to {what})"
                ) from exc
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = self._retry_base_delay * 2**attempt * (0.5 + random.random())  # noqa: S311 - jitter, not security
        if retry_after is not None:
            # Honour the server's Retry-After, but never beyond our own longest wait: a worker must not hang.
            delay = max(delay, min(retry_after, self._retry_base_delay * 2**self._retries))
        return delay


# --- configuration ------------------------------------------------------------------------------


def _api_client_from_settings() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        if settings.KUBERNETES_IN_CLUSTER:
            config.load_incluster_config(client_configuration=configuration)
        else:
            # No file configured: the client's default (KUBECONFIG or ~/.kube/config).
            config.load_kube_config(
                config_file=settings.KUBERNETES_KUBECONFIG or None,
                context=settings.KUBERNETES_CONTEXT or None,
                client_configuration=configuration,
                persist_config=False,
            )
    except (config.ConfigException, OSError) as exc:
        raise BackendError(f"The portal cannot load its Kubernetes credentials: {exc}") from exc
    # _call owns retrying, with backoff; urllib3's own immediate retries would multiply its attempts.
    configuration.retries = 0
    return client.ApiClient(configuration)


# --- errors ---------------------------------------------------------------------------------------


def _status_body(exc: ApiException) -> dict:
    """The Status object of an error response. 37.x keeps ApiException.body as a str (or None)."""
    raw = exc.body
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"message": raw}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    body.setdefault("message", exc.reason or "")
    return body


def _retryable(status: int) -> bool:
    # 409 here is an optimistic-lock conflict (AlreadyExists on create is an answer, not an error).
    return status in (409, 429) or 500 <= status <= 599


def _retry_after(exc: ApiException) -> float | None:
    value = (exc.headers or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _api_error(what: str, subject: str, status: int, body: dict) -> BackendError:
    message = str(body.get("message") or "no details given")
    context = f" (while trying to {what})"
    if status == 403:
        if "exceeded quota" in message:
            return BackendError(f"The tenant's namespace quota is exhausted: {message}{context}", status=403)
        return BackendError(f"The cluster refused: {message}{context}", status=403)
    if status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        problems = [f"field {c.get('field') or '(object)'}: {c.get('message') or c.get('reason')}" for c in causes]
        return BackendError(
            f"The cluster rejected the {subject or 'object'} definition: {'; '.join(problems) or message}{context}",
            status=422,
        )
    if status == 401:
        return BackendError(f"The cluster did not accept the portal's credentials: {message}{context}", status=401)
    if status == 404:
        return BackendError(f"The cluster has no such object: {message}{context}", status=404)
    if status == 409:
        return BackendError(f"The cluster kept reporting a conflict: {message}{context}", status=409, retryable=True)
    if status == 0:
        # The client's own failures (TLS handshake, certificates) come as status 0.
        return BackendError(f"The cluster API could not be reached: {message}{context}", retryable=True)
    if status == 429 or status >= 500:
        return BackendError(
            f"The cluster API failed (HTTP {status}): {message}{context}", status=status, retryable=True
        )
    return BackendError(f"The cluster rejected the request (HTTP {status}): {message}{context}", status=status)


# --- reading the cluster's state --------------------------------------------------------------------


def _paginate(page: Callable[[str | None], tuple[list[Any], str | None]]) -> Iterator[Any]:
    token = None
    while True:
        items, token = page(token)
        yield from items
        if not token:
            return


def _vm_label_key() -> str:
    return f"{settings.PORTAL_LABEL_PREFIX}/vm"


def _conditions(obj: dict | None) -> list[dict]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def _creation_failure(conditions: list[dict]) -> str | None:
    """The message of a failed pod/VMI creation: a compute quota (or a LimitRange, an admission webhook)
    refusing the launcher pod does not fail any API call; KubeVirt only reports it in a condition."""
    for condition in conditions:
        if condition.get("reason") != "FailedCreate":
            continue
        if (condition.get("type") == "Synchronized" and condition.get("status") == "False") or (
            condition.get("type") == "Failure" and condition.get("status") == "True"
        ):
            return str(condition.get("message") or "no details given")
    return None


def _explanation(conditions: list[dict]) -> str:
    for condition in conditions:
        if condition.get("type") not in _EXPLAINING_CONDITIONS or not condition.get("message"):
            continue
        failing = condition.get("status") == ("True" if condition.get("type") == "Failure" else "False")
        if failing:
            return str(condition["message"])
    return ""


def _with_detail(reason: str, detail: str) -> str:
    return f"{reason}: {detail}" if detail else f"{reason}."


def _vm_phase(vm: dict, vmi: dict | None) -> tuple[Phase, str]:
    if vm.get("metadata", {}).get("deletionTimestamp"):
        return Phase.STOPPING, "The VM is being deleted."
    conditions = _conditions(vm) + _conditions(vmi)
    failure = _creation_failure(conditions)
    if failure is not None:
        if "exceeded quota" in failure:
            return Phase.FAILED, f"The tenant's namespace quota is exhausted: {failure}"
        return Phase.FAILED, f"The cluster could not create the VM: {failure}"
    printable = (vm.get("status") or {}).get("printableStatus") or ""
    detail = _explanation(conditions)
    if printable in _FAILED_STATUSES:
        return Phase.FAILED, _with_detail(_FAILED_STATUSES[printable], detail)
    if printable in _WAITING_STATUSES:
        return Phase.PROVISIONING, _with_detail(_WAITING_STATUSES[printable], detail)
    if printable == "Stopped":
        return Phase.STOPPED, ""
    if printable in ("Stopping", "Terminating"):
        return Phase.STOPPING, ""
    if printable == "Paused":
        # The guest is frozen: it does no work and cannot be reached, so for the customer it is stopped.
        return Phase.STOPPED, "The VM is paused."
    if vmi is not None:
        return _vmi_phase(vm, vmi, detail)
    if printable in ("Starting", "Running"):
        return Phase.STARTING, "The VM is starting."
    if (vm.get("spec") or {}).get("runStrategy") == "Halted":
        return Phase.STOPPED, ""
    return Phase.PROVISIONING, "Waiting for the cluster to start the VM."


def _vmi_phase(vm: dict, vmi: dict, detail: str) -> tuple[Phase, str]:
    phase = (vmi.get("status") or {}).get("phase") or "Pending"
    if phase == "Running":
        # Ready is driven by the VM's readiness probe, which checks the GPUs inside the guest:
        # only then is the VM reachable, running, and billable.
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in _conditions(vmi))
        if ready:
            return Phase.RUNNING, ""
        return Phase.STARTING, "The guest is booting; it is ready once its GPUs are seen inside it."
    if phase in ("Pending", "Scheduling"):
        return Phase.PROVISIONING, _with_detail("Waiting for a node to run the VM", detail)
    if phase == "Scheduled":
        return Phase.STARTING, "The VM is starting."
    if phase == "Succeeded":
        return Phase.STOPPED, "The guest shut itself down."
    if phase == "Failed":
        if (vm.get("spec") or {}).get("runStrategy") in ("Always", "RerunOnFailure"):
            return Phase.STARTING, _with_detail("The VM stopped with an error and is being restarted", detail)
        return Phase.FAILED, _with_detail("The VM stopped with an error", detail)
    # Unknown: the node stopped reporting. Not ready, and may come back: no final verdict yet.
    return Phase.STARTING, "The cluster has lost contact with the VM's node; waiting for it to come back."


def _latest(pods: list[client.V1Pod]) -> client.V1Pod | None:
    """The Job's newest pod (with backoffLimit 0 there is one; a replacement, if any, is newer)."""
    if not pods:
        return None

    def created(pod: client.V1Pod) -> tuple[float, str]:
        stamp = pod.metadata.creation_timestamp
        return (stamp.timestamp() if stamp else 0.0, pod.metadata.name or "")

    return max(pods, key=created)


def _true_condition(conditions, *types: str):
    return next((c for c in conditions or [] if c.type in types and c.status == "True"), None)


def _job_status(job: client.V1Job, pod: client.V1Pod | None) -> JobStatus:
    status = job.status or client.V1JobStatus()
    pod_name = pod.metadata.name if pod else ""
    node_name = (pod.spec.node_name if pod and pod.spec else None) or ""
    terminated = _terminated_state(pod)
    exit_code = terminated.exit_code if terminated else None
    where = {"pod_name": pod_name, "node_name": node_name}
    # SuccessCriteriaMet and FailureTarget (Kubernetes 1.31+) come before Complete and Failed, which
    # wait for the pods to finish terminating: the outcome is already decided.
    if _true_condition(status.conditions, "Complete", "SuccessCriteriaMet"):
        return JobStatus(phase=JobPhase.SUCCEEDED, exit_code=0 if exit_code is None else exit_code, **where)
    failed = _true_condition(status.conditions, "Failed", "FailureTarget")
    if failed is not None:
        if failed.reason == "DeadlineExceeded":
            return JobStatus(
                phase=JobPhase.FAILED,
                exit_code=exit_code,
                reason="The task ran past its time limit.",
                deadline_exceeded=True,
                **where,
            )
        disruption = _disruption(pod)
        if disruption or terminated is None:
            # No container verdict: the pod vanished with its node, or was removed before it ended.
            reason = disruption or f"The task's pod was lost ({failed.reason or 'no reason given'})."
            return JobStatus(phase=JobPhase.FAILED, exit_code=exit_code, reason=reason, disrupted=True, **where)
        return JobStatus(phase=JobPhase.FAILED, exit_code=exit_code, reason=_termination_reason(terminated), **where)
    if pod is None:
        return JobStatus(phase=JobPhase.PENDING, reason="Waiting for the cluster to create the task's pod.")
    phase = (pod.status.phase if pod.status else None) or "Pending"
    if phase == "Pending":
        return _pending(pod, where)
    if phase == "Running":
        return JobStatus(phase=JobPhase.RUNNING, **where)
    if phase == "Succeeded":
        return JobStatus(phase=JobPhase.SUCCEEDED, exit_code=0 if exit_code is None else exit_code, **where)
    disruption = _disruption(pod)
    if phase == "Failed" and not disruption and terminated is not None:
        return JobStatus(phase=JobPhase.FAILED, exit_code=exit_code, reason=_termination_reason(terminated), **where)
    # Unknown (the node stopped reporting), or failed with no verdict of the task's own.
    return JobStatus(
        phase=JobPhase.FAILED,
        exit_code=exit_code,
        reason=disruption or "The cluster lost contact with the task's node.",
        disrupted=True,
        **where,
    )


def _task_container_status(pod: client.V1Pod | None):
    statuses = (pod.status.container_statuses if pod and pod.status else None) or []
    return next((s for s in statuses if s.name == TASK_CONTAINER), statuses[0] if statuses else None)


def _terminated_state(pod: client.V1Pod | None):
    container = _task_container_status(pod)
    return container.state.terminated if container and container.state else None


def _disruption(pod: client.V1Pod | None) -> str:
    """Why the cluster took the pod away, or "" when it did not."""
    if pod is None or pod.status is None:
        return ""
    target = _true_condition(pod.status.conditions, "DisruptionTarget")
    if target is not None:
        return _with_detail(
            f"The cluster stopped the task's pod ({target.reason or 'disruption'})", target.message or ""
        )
    reason = pod.status.reason or ""
    if reason in _DISRUPTED_POD_REASONS:
        return _with_detail(_DISRUPTED_POD_REASONS[reason], pod.status.message or "")
    return ""


def _termination_reason(terminated) -> str:
    code = terminated.exit_code
    if terminated.reason == "OOMKilled":
        return f"killed: out of memory (OOMKilled, exit code {code})"
    detail = (terminated.message or "").strip()
    return f"exited with code {code}" + (f": {detail[:500]}" if detail else "")


def _pending(pod: client.V1Pod, where: dict) -> JobStatus:
    container = _task_container_status(pod)
    waiting = container.state.waiting if container and container.state else None
    if waiting is not None and waiting.reason in _CANNOT_START_REASONS:
        return JobStatus(
            phase=JobPhase.PENDING,
            reason=_with_detail(_CANNOT_START_REASONS[waiting.reason], waiting.message or ""),
            cannot_start=True,
            **where,
        )
    scheduled = next(
        (c for c in (pod.status.conditions if pod.status else None) or [] if c.type == "PodScheduled"), None
    )
    if scheduled is not None and scheduled.status == "False":
        reason = _with_detail("Waiting for a node with free capacity", scheduled.message or "")
        return JobStatus(phase=JobPhase.PENDING, reason=reason, **where)
    if waiting is not None and waiting.reason:
        return JobStatus(phase=JobPhase.PENDING, reason=f"Starting ({waiting.reason}).", **where)
    return JobStatus(phase=JobPhase.PENDING, reason="Starting.", **where)


def _node_capacity(node: client.V1Node) -> NodeCapacity:
    labels = dict(node.metadata.labels or {}) if node.metadata else {}
    status = node.status
    allocatable = dict((status.allocatable if status else None) or {})
    gpus = {
        resource: int(_quantity(value))
        for resource, value in allocatable.items()
        if resource.startswith("nvidia.com/") and _quantity(value) > 0
    }
    # A node exposes one GPU model; if it shows several, the most plentiful one is what it offers.
    gpu_resource = max(gpus, key=lambda resource: gpus[resource], default="")
    default_pool = "high_end" if gpu_resource and _is_passthrough(gpu_resource) else "general"
    ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions if status else None) or [])
    gib = Decimal(2**30)
    return NodeCapacity(
        name=node.metadata.name,
        pool=labels.get(f"{settings.PORTAL_LABEL_PREFIX}/pool") or default_pool,
        gpu_model_resource=gpu_resource,
        gpus=gpus.get(gpu_resource, 0),
        cpus=int(_quantity(allocatable.get("cpu"))),
        memory_gib=int(_quantity(allocatable.get("memory")) / gib),
        hugepages_2mi_gib=int(_quantity(allocatable.get("hugepages-2Mi")) / gib),
        hugepages_1gi_gib=int(_quantity(allocatable.get("hugepages-1Gi")) / gib),
        dedicated=labels.get(f"{settings.PORTAL_LABEL_PREFIX}/dedicated", "").lower() in ("true", "1", "yes"),
        # A NotReady node takes no new work either, whatever its cordon flag says.
        schedulable=not (node.spec and node.spec.unschedulable) and ready,
        labels=labels,
    )


def _is_passthrough(resource: str) -> bool:
    """Whole PCI GPUs (nvidia.com/GA100_A100_PCIE_40GB), not the container plugin's nvidia.com/gpu nor
    mediated vGPU profiles, which are named after a GRID type or end in a profile like -1Q/-4C."""
    model = resource.removeprefix("nvidia.com/")
    if model == "gpu" or model.startswith("GRID_"):
        return False
    profile = model.rsplit("-", 1)[-1] if "-" in model else ""
    return not (profile[:-1].isdigit() and profile[-1:].isalpha())


def _quantity(value: str | None) -> Decimal:
    if not value:
        return Decimal(0)
    try:
        return Decimal(parse_quantity(value))
    except ValueError:
        logger.warning("Kubernetes: unparseable quantity %r counted as 0", value)
        return Decimal(0)
