"""The portal's own services driving the kubevirt backend: real manifests, the real `kubernetes`
client, a local API server. What the customer sees when the cluster answers each way."""

import pytest
from kubernetes.client import ApiClient, Configuration

from provisioning import services
from provisioning.backends import kubevirt
from provisioning.models import LifecycleEvent, Plan, VmState
from tenants import services as tenant_services
from tests.kube_fake import running_fake, status_body

pytestmark = pytest.mark.django_db


def condition(kind, status, reason="", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


@pytest.fixture
def cluster(settings, monkeypatch):
    settings.KUBEVIRT_SSH_HOST = "ssh.gpu.test"
    services.inventory_sync()  # the portal's node table, from the local inventory file
    with running_fake() as fake:
        configuration = Configuration(host=fake.url)
        configuration.retries = 0
        backend = kubevirt.KubevirtBackend(api_client=ApiClient(configuration), retries=2, retry_base_delay=0.001)
        monkeypatch.setattr(services, "get_backend", lambda: backend)
        yield fake
        backend._api_client.close()


@pytest.fixture
def ordered(cluster, owner_membership, user, django_capture_on_commit_callbacks):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    key = tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="k", public_key=public)
    with django_capture_on_commit_callbacks(execute=True):
        vm = services.vm_order(
            membership=owner_membership,
            actor=user,
            plan=Plan.objects.get(code="a100-2x-training"),
            name="trainer",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    vm.refresh_from_db()
    return vm


def test_order_creates_the_tenant_objects_and_the_vm_in_the_cluster(ordered, cluster, tenant):
    namespace = services.vm_ref(ordered).namespace
    assert ordered.state == VmState.PROVISIONING
    kinds = {(r.body or {}).get("kind") for r in cluster.requests if r.method == "POST"}
    assert {
        "Namespace",
        "ResourceQuota",
        "LimitRange",
        "NetworkPolicy",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
    } <= kinds
    applied = cluster.requests_to("PATCH", f"/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/trainer")
    assert applied and applied[-1].content_type.startswith("application/apply-patch+yaml")
    vm_object = cluster.get("VirtualMachine", "trainer", namespace)
    assert vm_object["spec"]["template"]["spec"]["domain"]["cpu"]["model"] == "host-passthrough"
    assert vm_object["metadata"]["labels"]["gpuportal.io/order"] == str(ordered.order_id)


def test_ready_vm_is_running_billable_and_reachable(ordered, cluster, django_capture_on_commit_callbacks):
    namespace = services.vm_ref(ordered).namespace
    cluster.set_status(
        namespace,
        "trainer",
        vm={"printableStatus": "Running", "ready": True},
        vmi={"phase": "Running", "nodeName": "gpu-7", "conditions": [condition("Ready", "True")]},
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile()
    ordered.refresh_from_db()
    ssh_port = {p["port"]: p["nodePort"] for p in cluster.get("Service", "trainer-access", namespace)["spec"]["ports"]}
    assert ordered.state == VmState.RUNNING
    assert services.ssh_command(ordered) == f"ssh -p {ssh_port[22]} ubuntu@ssh.gpu.test"
    assert LifecycleEvent.objects.filter(vm=ordered, kind="started").count() == 1


def test_running_but_gpu_not_seen_is_not_handed_over_or_billed(ordered, cluster, django_capture_on_commit_callbacks):
    namespace = services.vm_ref(ordered).namespace
    cluster.set_status(
        namespace,
        "trainer",
        vm={"printableStatus": "Running"},
        vmi={"phase": "Running", "conditions": [condition("Ready", "False", "", "nvidia-smi failed")]},
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile()
    ordered.refresh_from_db()
    assert ordered.state == VmState.STARTING
    assert not LifecycleEvent.objects.filter(vm=ordered).exists()


def test_silent_quota_failure_is_explained_to_the_customer(ordered, cluster, django_capture_on_commit_callbacks):
    """Exceeding a compute quota gives no API error: the VMI only says Synchronized=False / FailedCreate."""
    namespace = services.vm_ref(ordered).namespace
    message = (
        'pods "virt-launcher-trainer-x" is forbidden: exceeded quota: tenant-quota, requested: '
        "requests.nvidia.com/GA100_A100_PCIE_80GB=2, used: requests.nvidia.com/GA100_A100_PCIE_80GB=2, "
        "limited: requests.nvidia.com/GA100_A100_PCIE_80GB=2"
    )
    cluster.set_status(
        namespace,
        "trainer",
        vm={"printableStatus": "Starting"},
        vmi={"phase": "Pending", "conditions": [condition("Synchronized", "False", "FailedCreate", message)]},
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile()
    ordered.refresh_from_db()
    assert ordered.state == VmState.FAILED
    assert "namespace quota is exhausted" in ordered.failure_reason
    assert not LifecycleEvent.objects.filter(vm=ordered).exists()  # never charged
    assert cluster.requests_to("DELETE", f"/namespaces/{namespace}/virtualmachines/trainer")  # cleaned up


def test_invalid_definition_fails_the_order_with_the_fields(
    cluster, owner_membership, user, django_capture_on_commit_callbacks
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    key = tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="k", public_key=public)
    cluster.fail_next(
        "PATCH",
        r"/virtualmachines/bad$",
        422,
        status_body(
            422,
            "admission webhook denied the request",
            "Invalid",
            details={
                "causes": [
                    {
                        "field": "spec.template.spec.domain.devices.gpus[0].deviceName",
                        "message": "GPU resource is not permitted",
                    }
                ]
            },
        ),
        times=5,
    )
    with django_capture_on_commit_callbacks(execute=True):
        vm = services.vm_order(
            membership=owner_membership,
            actor=user,
            plan=Plan.objects.get(code="t4-1x-general"),
            name="bad",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    vm.refresh_from_db()
    assert vm.state == VmState.FAILED
    assert "gpus[0].deviceName" in vm.failure_reason and "not permitted" in vm.failure_reason


def test_cluster_500_is_retried_by_the_reconciler_until_it_works(
    cluster, owner_membership, user, django_capture_on_commit_callbacks
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    key = tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="k", public_key=public)
    cluster.fail_next("POST", r"/api/v1/namespaces$", 500, status_body(500, "etcd timeout"), times=3)
    with django_capture_on_commit_callbacks(execute=True):
        vm = services.vm_order(
            membership=owner_membership,
            actor=user,
            plan=Plan.objects.get(code="t4-1x-general"),
            name="later",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    vm.refresh_from_db()
    assert vm.state == VmState.REQUESTED  # not failed: the cluster may recover
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile()
    vm.refresh_from_db()
    assert vm.state == VmState.PROVISIONING
