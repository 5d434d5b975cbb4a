"""The KubeVirt backend through the real `kubernetes` client against an in-process fake API server."""

import copy

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration

from provisioning.backends import kubevirt
from provisioning.backends.base import BackendError, Phase, TenantSpec, VmRef, VmSpec
from provisioning.backends.kubevirt import KubevirtBackend
from tests.kube_fake import KubeFake, running_fake, status_body

NS = "tenant-acme"
REF = VmRef(namespace=NS, name="vm-7")
VM_PATH = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm-7"
RETRIES = 3


def _backend(url: str, **kwargs) -> KubevirtBackend:
    configuration = Configuration(host=url)
    configuration.retries = 0  # as in production: the backend, not urllib3, retries
    return KubevirtBackend(api_client=ApiClient(configuration), retries=RETRIES, retry_base_delay=0.001, **kwargs)


@pytest.fixture
def kube(settings):
    settings.KUBEVIRT_SSH_HOST = "ssh.gpu.test"
    with running_fake() as fake:
        backend = _backend(fake.url)
        yield fake, backend
        backend._api_client.close()


def tenant_manifests() -> list[dict]:
    meta = {"namespace": NS, "labels": {"app.kubernetes.io/managed-by": "gpu-portal"}}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": meta["labels"]}},
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "tenant-quota", **meta},
            "spec": {"hard": {"requests.cpu": "32", "requests.nvidia.com/GA100_A100_PCIE_40GB": "2"}},
        },
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "tenant-limits", **meta},
            "spec": {"limits": [{"type": "Container", "max": {"cpu": "64", "memory": "512Gi"}}]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", **meta},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "tenant-vms", **meta},
            "rules": [{"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tenant-vms", **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant-vms"},
            "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": NS}],
        },
    ]


def vm_manifests(run_strategy: str = "Always", vm_label: str = "order-42") -> list[dict]:
    labels = {"app.kubernetes.io/managed-by": "gpu-portal", "gpuportal.io/vm": vm_label}
    return [
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm-7", "namespace": NS, "labels": labels},
            "spec": {
                "runStrategy": run_strategy,
                "template": {
                    "metadata": {"labels": {"gpuportal.io/vm": vm_label}},
                    "spec": {
                        "domain": {
                            "cpu": {"cores": 8},
                            "memory": {"guest": "64Gi"},
                            "devices": {"gpus": [{"name": "gpu0", "deviceName": "nvidia.com/GA100_A100_PCIE_40GB"}]},
                        },
                        "volumes": [
                            {"name": "cloudinit", "cloudInitNoCloud": {"secretRef": {"name": "vm-7-cloudinit"}}}
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "vm-7-access", "namespace": NS, "labels": labels},
            "spec": {
                "type": "NodePort",
                "selector": {"gpuportal.io/vm": vm_label},
                "ports": [{"name": "ssh", "port": 22, "targetPort": 22}, {"name": "jupyter", "port": 8888}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "vm-7-cloudinit", "namespace": NS, "labels": labels},
            "stringData": {"userdata": "#cloud-config\n"},
        },
    ]


def vm_spec(**kwargs) -> VmSpec:
    return VmSpec(ref=REF, manifests=vm_manifests(**kwargs))


# --- tenants ----------------------------------------------------------------------------------------


def test_ensure_tenant_creates_every_kind_through_its_typed_api(kube):
    fake, backend = kube
    manifests = tenant_manifests()
    backend.ensure_tenant(TenantSpec(namespace=NS, manifests=[*manifests[1:], manifests[0]]))

    posts = [r.path for r in fake.requests if r.method == "POST"]
    assert posts == [
        "/api/v1/namespaces",  # first, although the builder listed it last
        f"/api/v1/namespaces/{NS}/resourcequotas",
        f"/api/v1/namespaces/{NS}/limitranges",
        f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies",
        f"/api/v1/namespaces/{NS}/serviceaccounts",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
    ]
    assert all(r.query.get("fieldManager") == "gpu-portal" for r in fake.requests)
    assert fake.get("NetworkPolicy", "default-deny", NS)["spec"]["podSelector"] == {}
    assert fake.get("Namespace", NS) is not None


def test_ensure_tenant_is_idempotent_create_then_patch(kube):
    fake, backend = kube
    backend.ensure_tenant(TenantSpec(namespace=NS, manifests=tenant_manifests()))
    fake.requests.clear()
    manifests = tenant_manifests()
    manifests[1]["spec"]["hard"]["requests.cpu"] = "64"

    backend.ensure_tenant(TenantSpec(namespace=NS, manifests=manifests))

    methods = [(r.method, r.path) for r in fake.requests]
    assert len(methods) == 14  # each object: POST answered 409 AlreadyExists, then one PATCH
    assert methods[0:2] == [("POST", "/api/v1/namespaces"), ("PATCH", f"/api/v1/namespaces/{NS}")]
    assert methods[2:4] == [
        ("POST", f"/api/v1/namespaces/{NS}/resourcequotas"),
        ("PATCH", f"/api/v1/namespaces/{NS}/resourcequotas/tenant-quota"),
    ]
    patches = [r for r in fake.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/strategic-merge-patch+json"}
    assert fake.get("ResourceQuota", "tenant-quota", NS)["spec"]["hard"]["requests.cpu"] == "64"


def test_an_invalid_typed_manifest_is_refused_before_it_is_sent(kube):
    fake, backend = kube
    manifests = tenant_manifests()
    manifests[1]["spec"]["hard"]["pods"] = 10  # the typed models want quantities as strings

    with pytest.raises(BackendError) as error:
        backend.ensure_tenant(TenantSpec(namespace=NS, manifests=manifests))

    assert "invalid ResourceQuota" in error.value.message
    assert "spec.hard.pods" in error.value.message
    assert not error.value.retryable
    assert not fake.requests_to("POST", "resourcequotas")


def test_an_unknown_kind_is_refused(kube):
    _, backend = kube
    with pytest.raises(BackendError, match="kind 'ConfigMap'"):
        backend.ensure_tenant(
            TenantSpec(namespace=NS, manifests=[{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}])
        )


# --- VMs: apply, actions, delete ------------------------------------------------------------------


def test_apply_vm_creates_companions_first_then_server_side_applies_the_vm(kube):
    fake, backend = kube
    spec = vm_spec()
    backend.apply_vm(spec)

    order = [(r.method, r.path) for r in fake.requests]
    assert order == [
        ("POST", f"/api/v1/namespaces/{NS}/services"),
        ("POST", f"/api/v1/namespaces/{NS}/secrets"),
        ("PATCH", VM_PATH),
    ]
    apply = fake.requests[-1]
    assert apply.content_type == "application/apply-patch+yaml"
    assert apply.query == {"fieldManager": "gpu-portal", "force": "true"}
    assert apply.body == spec.manifests[0]
    assert fake.get("VirtualMachine", "vm-7", NS)["spec"]["runStrategy"] == "Always"


def test_apply_vm_twice_patches_companions_and_reapplies(kube):
    fake, backend = kube
    backend.apply_vm(vm_spec())
    nodeport = fake.get("Service", "vm-7-access", NS)["spec"]["ports"][0]["nodePort"]
    fake.requests.clear()

    backend.apply_vm(vm_spec())

    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests] == [
        ("POST", "services"),
        ("PATCH", "vm-7-access"),
        ("POST", "secrets"),
        ("PATCH", "vm-7-cloudinit"),
        ("PATCH", "vm-7"),
    ]
    # The patch keeps the nodePort the cluster assigned: the customer's SSH port does not move.
    assert fake.get("Service", "vm-7-access", NS)["spec"]["ports"][0]["nodePort"] == nodeport


def test_start_stop_restart_use_the_kubevirt_subresources(kube):
    fake, backend = kube
    backend.apply_vm(vm_spec(run_strategy="Halted"))
    fake.requests.clear()

    backend.start_vm(REF)
    assert fake.get("VirtualMachine", "vm-7", NS)["spec"]["runStrategy"] == "Always"
    backend.restart_vm(REF)
    backend.stop_vm(REF)
    assert fake.get("VirtualMachine", "vm-7", NS)["spec"]["runStrategy"] == "Halted"

    base = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm-7"
    assert [(r.method, r.path) for r in fake.requests] == [
        ("PUT", f"{base}/start"),
        ("PUT", f"{base}/restart"),
        ("PUT", f"{base}/stop"),
    ]


def test_raw_subresource_calls_carry_the_credentials_too(settings):
    with running_fake() as fake:
        configuration = Configuration(host=fake.url, api_key={"BearerToken": "secret-token"})
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        backend = KubevirtBackend(api_client=ApiClient(configuration))
        backend.apply_vm(vm_spec(run_strategy="Halted"))
        backend.start_vm(REF)
        assert fake.requests_to("PUT", "/start$")
        assert {r.authorization for r in fake.requests} == {"Bearer secret-token"}


def test_without_a_client_the_backend_loads_the_configured_kubeconfig(settings, tmp_path):
    with running_fake() as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "gpu", "cluster": {"server": fake.url}}],
                    "users": [{"name": "portal", "user": {"token": "kubeconfig-token"}}],
                    "contexts": [
                        {"name": "other", "context": {"cluster": "gpu", "user": "nobody"}},
                        {"name": "portal", "context": {"cluster": "gpu", "user": "portal"}},
                    ],
                    "current-context": "other",
                }
            )
        )
        settings.KUBERNETES_KUBECONFIG = str(kubeconfig)
        settings.KUBERNETES_CONTEXT = "portal"
        settings.KUBERNETES_IN_CLUSTER = False

        KubevirtBackend().ping()

        assert fake.requests[-1].authorization == "Bearer kubeconfig-token"


def test_a_missing_kubeconfig_is_a_clear_error(settings, tmp_path):
    settings.KUBERNETES_KUBECONFIG = str(tmp_path / "absent")
    settings.KUBERNETES_IN_CLUSTER = False
    with pytest.raises(BackendError, match="cannot load its Kubernetes credentials"):
        KubevirtBackend()


def test_start_of_a_running_and_stop_of_a_stopped_vm_are_done(kube):
    fake, backend = kube
    backend.apply_vm(vm_spec(run_strategy="Always"))
    backend.start_vm(REF)  # 409 "already running": nothing to do
    backend.stop_vm(REF)
    backend.stop_vm(REF)  # 409 "not running"
    assert len(fake.requests_to("PUT", "/start$")) == 1  # a 409 here is an answer, not retried
    assert len(fake.requests_to("PUT", "/stop$")) == 2

    with pytest.raises(BackendError, match="cannot be restarted") as error:
        backend.restart_vm(REF)
    assert error.value.status == 409


def test_actions_on_a_missing_vm_say_so(kube):
    _, backend = kube
    with pytest.raises(BackendError, match="does not exist") as error:
        backend.start_vm(REF)
    assert error.value.status == 404


def test_delete_vm_removes_the_vm_and_everything_labelled_with_it(kube):
    fake, backend = kube
    backend.apply_vm(vm_spec(vm_label="order-42"))
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other", "namespace": NS}}
    other["metadata"]["labels"] = {"gpuportal.io/vm": "order-43"}
    fake.put(other)

    backend.delete_vm(REF)

    assert fake.get("VirtualMachine", "vm-7", NS) is None
    assert fake.get("Secret", "vm-7-cloudinit", NS) is None
    assert fake.get("Service", "vm-7-access", NS) is None
    assert fake.get("Secret", "other", NS) is not None
    (vm_delete,) = fake.requests_to("DELETE", "virtualmachines/vm-7$")
    assert vm_delete.query["propagationPolicy"] == "Foreground"
    (listing,) = fake.requests_to("GET", f"/namespaces/{NS}/secrets$")
    assert listing.query["labelSelector"] == "gpuportal.io/vm=order-42"  # read from the VM's label


def test_deleting_a_missing_vm_is_fine(kube):
    fake, backend = kube
    backend.delete_vm(REF)
    backend.delete_vm(REF)
    assert len(fake.requests_to("DELETE", "virtualmachines/vm-7$")) == 2
    (listing, *_) = fake.requests_to("GET", "/secrets$")
    assert listing.query["labelSelector"] == "gpuportal.io/vm=vm-7"  # by name convention


# --- errors and retries ------------------------------------------------------------------------------


def test_a_server_error_is_retried_until_it_succeeds(kube):
    fake, backend = kube
    fake.fail_next("POST", "/namespaces$", 500, times=2)
    backend.ensure_tenant(TenantSpec(namespace=NS, manifests=tenant_manifests()[:1]))
    assert len(fake.requests_to("POST", "/namespaces$")) == 3
    assert fake.get("Namespace", NS) is not None


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, status_body(429, "too many requests, please try again later")),
        (409, status_body(409, "the object has been modified; please apply your changes to the latest version")),
        (503, status_body(503, "etcdserver: leader changed")),
    ],
)
def test_conflicts_throttling_and_unavailability_are_retried(kube, status, body):
    fake, backend = kube
    fake.fail_next("PATCH", "virtualmachines/vm-7$", status, body, headers={"Retry-After": "1"})
    backend.apply_vm(vm_spec())
    assert len(fake.requests_to("PATCH", "virtualmachines/vm-7$")) == 2


def test_a_server_error_that_lasts_becomes_a_retryable_backend_error(kube):
    fake, backend = kube
    fake.fail_next("GET", "virtualmachines/vm-7$", 500, status_body(500, "etcd timeout"), times=100)

    with pytest.raises(BackendError) as error:
        backend.vm_status(REF)

    assert error.value.retryable
    assert error.value.status == 500
    assert error.value.message.startswith("The cluster API failed (HTTP 500): etcd timeout")
    assert len(fake.requests_to("GET", "virtualmachines/vm-7$")) == RETRIES + 1


def test_a_count_quota_refusal_is_explained_and_not_retried(kube):
    fake, backend = kube
    message = (
        'virtualmachines.kubevirt.io "vm-7" is forbidden: exceeded quota: tenant-quota, '
        "requested: count/virtualmachines.kubevirt.io=1, used: count/virtualmachines.kubevirt.io=4, "
        "limited: count/virtualmachines.kubevirt.io=4"
    )
    fake.fail_next("PATCH", "virtualmachines/vm-7$", 403, status_body(403, message, "Forbidden"))

    with pytest.raises(BackendError) as error:
        backend.apply_vm(vm_spec())

    assert error.value.message.startswith("The tenant's namespace quota is exhausted: ")
    assert "count/virtualmachines.kubevirt.io=4" in error.value.message
    assert error.value.status == 403
    assert not error.value.retryable
    assert len(fake.requests_to("PATCH", "virtualmachines/vm-7$")) == 1


def test_an_rbac_refusal_says_the_cluster_refused(kube):
    fake, backend = kube
    message = 'secrets is forbidden: User "system:serviceaccount:portal:portal" cannot create resource "secrets"'
    fake.fail_next("POST", "/secrets$", 403, status_body(403, message, "Forbidden"))
    with pytest.raises(BackendError) as error:
        backend.apply_vm(vm_spec())
    assert error.value.message.startswith(f"The cluster refused: {message}")


def test_an_invalid_vm_names_each_rejected_field(kube):
    fake, backend = kube
    causes = [
        {
            "type": "FieldValueInvalid",
            "field": "spec.template.spec.domain.devices.gpus[0].deviceName",
            "message": "GPU nvidia.com/GA100_A100_PCIE_40GB is not permitted in permittedHostDevices configuration",
        },
        {"type": "FieldValueRequired", "field": "spec.template.spec.domain.memory.guest", "message": "required"},
    ]
    body = status_body(422, "admission webhook denied the request", "Invalid", details={"causes": causes})
    fake.fail_next("PATCH", "virtualmachines/vm-7$", 422, body)

    with pytest.raises(BackendError) as error:
        backend.apply_vm(vm_spec())

    assert error.value.message.startswith(
        "The cluster rejected the VM definition: "
        "field spec.template.spec.domain.devices.gpus[0].deviceName: GPU nvidia.com/GA100_A100_PCIE_40GB is not "
        "permitted in permittedHostDevices configuration; field spec.template.spec.domain.memory.guest: required"
    )
    assert error.value.status == 422
    assert not error.value.retryable


def test_a_stalled_request_times_out_and_is_retried(settings):
    with running_fake() as fake:
        backend = _backend(fake.url, request_timeout=0.2)
        fake.set_status(NS, "vm-7", vm={"printableStatus": "Stopped"})
        fake.stall_next("GET", "virtualmachines/vm-7$", seconds=1)
        assert backend.vm_status(REF).phase == Phase.STOPPED
        assert len(fake.requests_to("GET", "virtualmachines/vm-7$")) == 2


def test_ping(kube):
    fake, backend = kube
    backend.ping()
    assert fake.requests[-1].path == "/version/"  # the client's path, trailing slash included

    fake.fail_next("GET", "^/version/$", 503)
    with pytest.raises(BackendError) as error:
        backend.ping()
    assert error.value.retryable
    assert len(fake.requests_to("GET", "^/version/$")) == 2  # a health check tries once


def test_ping_of_an_unreachable_cluster_is_a_retryable_error():
    fake = KubeFake().start()
    url = fake.url
    fake.stop()  # nothing listens on the port any more
    with pytest.raises(BackendError, match="could not be reached") as error:
        _backend(url).ping()
    assert error.value.retryable


# --- status ---------------------------------------------------------------------------------------------

QUOTA_MESSAGE = (
    'failed to create virtual machine pod: pods "virt-launcher-vm-7-x2k9p" is forbidden: exceeded quota: '
    "tenant-quota, requested: requests.nvidia.com/GA100_A100_PCIE_40GB=1, "
    "used: requests.nvidia.com/GA100_A100_PCIE_40GB=2, limited: requests.nvidia.com/GA100_A100_PCIE_40GB=2"
)


def _condition(type_: str, status: str, reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("vm_status", "vmi_status", "phase", "reason_part"),
    [
        ({"printableStatus": "Provisioning"}, None, Phase.PROVISIONING, "Preparing the VM's disks"),
        ({"printableStatus": "WaitingForVolumeBinding"}, None, Phase.PROVISIONING, "storage to be bound"),
        (
            {"printableStatus": "ErrorUnschedulable"},
            {
                "phase": "Scheduling",
                "conditions": [
                    _condition("PodScheduled", "False", "Unschedulable", "0/5 nodes are available: 5 Insufficient gpu.")
                ],
            },
            Phase.PROVISIONING,
            "enough free capacity: 0/5 nodes are available",
        ),
        ({"printableStatus": "ErrImagePull"}, None, Phase.PROVISIONING, "cannot be pulled yet"),
        ({"printableStatus": "ImagePullBackOff"}, None, Phase.PROVISIONING, "cannot be pulled yet"),
        ({"printableStatus": "CrashLoopBackOff"}, None, Phase.FAILED, "keeps crashing"),
        (
            {
                "printableStatus": "DataVolumeError",
                "conditions": [_condition("DataVolumesReady", "False", "Failed", "Unable to connect to registry")],
            },
            None,
            Phase.FAILED,
            "could not be prepared: Unable to connect to registry",
        ),
        ({"printableStatus": "ErrorPvcNotFound"}, None, Phase.FAILED, "volume does not exist"),
        ({"printableStatus": "Starting"}, {"phase": "Scheduled"}, Phase.STARTING, "starting"),
        (
            {"printableStatus": "Running"},
            {"phase": "Running", "nodeName": "a100-node-1", "conditions": [_condition("Ready", "False")]},
            Phase.STARTING,
            "GPUs are seen",
        ),
        ({"printableStatus": "Running"}, {"phase": "Running"}, Phase.STARTING, "booting"),
        ({"printableStatus": "Stopped"}, None, Phase.STOPPED, ""),
        ({"printableStatus": "Stopping"}, {"phase": "Running"}, Phase.STOPPING, ""),
        ({}, None, Phase.PROVISIONING, "Waiting for the cluster"),
        (
            {"printableStatus": "Starting"},
            {
                "phase": "Pending",
                "conditions": [_condition("Synchronized", "False", "FailedCreate", QUOTA_MESSAGE)],
            },
            Phase.FAILED,
            f"The tenant's namespace quota is exhausted: {QUOTA_MESSAGE}",
        ),
        (
            {"conditions": [_condition("Failure", "True", "FailedCreate", "LimitRange: maximum cpu is 64")]},
            None,
            Phase.FAILED,
            "could not create the VM: LimitRange",
        ),
    ],
)
def test_vm_status_maps_kubevirt_states(kube, vm_status, vmi_status, phase, reason_part):
    fake, backend = kube
    fake.set_status(NS, "vm-7", vm=vm_status, vmi=vmi_status)
    status = backend.vm_status(REF)
    assert status.phase == phase
    assert reason_part in status.reason


def test_a_ready_vm_is_running_with_its_access_ports(kube):
    fake, backend = kube
    backend.apply_vm(vm_spec())
    fake.set_status(
        NS,
        "vm-7",
        vm={"printableStatus": "Running", "ready": True},
        vmi={"phase": "Running", "nodeName": "a100-node-1", "conditions": [_condition("Ready", "True")]},
    )
    ports = {p["port"]: p["nodePort"] for p in fake.get("Service", "vm-7-access", NS)["spec"]["ports"]}

    status = backend.vm_status(REF)

    assert status.phase == Phase.RUNNING
    assert status.reason == ""
    assert status.node_name == "a100-node-1"
    assert status.ssh_host == "ssh.gpu.test"
    assert status.ssh_port == ports[22]
    assert status.jupyter_url == f"http://ssh.gpu.test:{ports[8888]}/"


def test_a_missing_vm_is_missing(kube):
    _, backend = kube
    status = backend.vm_status(REF)
    assert status.phase == Phase.MISSING
    assert status.ssh_port is None


# --- listing ----------------------------------------------------------------------------------------


def _node(name: str, allocatable: dict, labels: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
        "status": {"allocatable": allocatable, "conditions": [_condition("Ready", "True")]},
    }


def test_list_nodes_reads_capacity_pools_and_flags(kube):
    fake, backend = kube
    fake.put(
        _node(
            "a100-node-1",
            {
                "cpu": "127500m",
                "memory": "1056762Mi",
                "hugepages-2Mi": "512Gi",
                "hugepages-1Gi": "0",
                "nvidia.com/GA100_A100_PCIE_80GB": "8",
                "pods": "110",
            },
        )
    )
    fake.put(
        _node(
            "t4-node-1",
            {"cpu": "48", "memory": "274877906944", "nvidia.com/TU104GL_Tesla_T4": "4"},
            {"gpuportal.io/pool": "general", "kubernetes.io/hostname": "t4-node-1"},
            unschedulable=True,
        )
    )
    fake.put(
        _node(
            "db-node-1", {"cpu": "64", "memory": "512Gi", "hugepages-1Gi": "384Gi"}, {"gpuportal.io/dedicated": "true"}
        )
    )
    fake.put(_node("vgpu-node-1", {"cpu": "500m", "memory": "1073741824", "nvidia.com/GRID_T4-1Q": "16"}))
    not_ready = _node("broken-node", {"cpu": "8", "memory": "32Gi"})
    not_ready["status"]["conditions"] = [_condition("Ready", "Unknown")]
    fake.put(not_ready)

    nodes = {node.name: node for node in backend.list_nodes()}

    a100 = nodes["a100-node-1"]
    assert (a100.pool, a100.gpu_model_resource, a100.gpus) == ("high_end", "nvidia.com/GA100_A100_PCIE_80GB", 8)
    assert (a100.cpus, a100.memory_gib, a100.hugepages_2mi_gib, a100.hugepages_1gi_gib) == (
        127,
        1031,
        512,
        0,
    )  # 1056762Mi: just under 1032
    assert a100.schedulable and not a100.dedicated
    t4 = nodes["t4-node-1"]
    assert (t4.pool, t4.gpus, t4.memory_gib, t4.schedulable) == ("general", 4, 256, False)
    assert t4.labels["kubernetes.io/hostname"] == "t4-node-1"
    db = nodes["db-node-1"]
    assert (db.pool, db.gpu_model_resource, db.gpus, db.dedicated, db.hugepages_1gi_gib) == (
        "general",
        "",
        0,
        True,
        384,
    )
    vgpu = nodes["vgpu-node-1"]
    assert (vgpu.pool, vgpu.gpus, vgpu.cpus, vgpu.memory_gib) == ("general", 16, 0, 1)
    assert not nodes["broken-node"].schedulable


def test_list_vms_uses_the_label_selector_and_pages(kube, monkeypatch):
    fake, backend = kube
    monkeypatch.setattr(kubevirt, "LIST_PAGE_SIZE", 2)
    for namespace, name, managed in [("t1", "a", True), ("t2", "b", True), ("t2", "c", True), ("t3", "x", False)]:
        labels = {"app.kubernetes.io/managed-by": "gpu-portal"} if managed else {}
        vm = copy.deepcopy(vm_manifests()[0])
        vm["metadata"] = {"name": name, "namespace": namespace, "labels": labels}
        fake.put(vm)

    refs = backend.list_vms()

    assert refs == [VmRef("t1", "a"), VmRef("t2", "b"), VmRef("t2", "c")]
    listings = fake.requests_to("GET", "^/apis/kubevirt.io/v1/virtualmachines$")
    assert [r.query.get("continue") for r in listings] == [None, "2"]
    assert {r.query["labelSelector"] for r in listings} == {"app.kubernetes.io/managed-by=gpu-portal"}
