"""Manifests: every plan × profile validates strictly, profiles have exactly DESIGN.md section 5's shape,
labels tie objects to tenant/VM/order, cloud-init is safe to extend, and the render command works."""

import copy
import dataclasses
import io
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from provisioning import manifests, validation
from provisioning.manifests import TenantShape, VmShape
from provisioning.models import BillingMode, GpuModel, Plan, Profile, ScaleUp, ScaleUpState, VirtualMachine
from provisioning.validation import ManifestInvalid
from tenants.models import SshKey

pytestmark = pytest.mark.django_db

SEEDED_PLANS = {"a100-2x-training", "a100-1x-general", "h100-2x-training", "a10-1x-general", "t4-1x-general", "db-64g"}
PROFILES = [Profile.AI_TRAINING, Profile.DATABASE, Profile.GENERAL]
TOKEN = "tok-" + "a" * 40
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0ZXN0a2V5Zm9ydGhlcG9ydGFsdGVzdHN1aXRl alice@laptop"
SKIP_NO_SCHEMA = (
    "../shared/kubevirt/swagger.json is absent: KubeVirt objects cannot be validated "
    "(set PORTAL_KUBEVIRT_SCHEMA to the KubeVirt OpenAPI document)"
)


def vm_shape_for(plan: Plan, *, profile: str | None = None, tenant_slug: str = "acme-ai", **changes) -> VmShape:
    shape = VmShape(
        tenant_slug=tenant_slug,
        namespace=manifests.tenant_namespace(tenant_slug),
        vm_id="6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f",
        order_id="0e1d2c3b-4a59-4867-a5b4-c3d2e1f0a9b8",
        name="train-01",
        plan=manifests.plan_shape(plan, profile=profile),
        ssh_public_keys=[SSH_KEY],
        ssh_user="ubuntu",
        cloud_init_extra="",
        jupyter_token=TOKEN,
    )
    return dataclasses.replace(shape, **changes)


def render(code: str, profile: str | None = None, **changes) -> dict[str, dict]:
    """The VM's objects by kind."""
    objects = manifests.vm_manifests(vm_shape_for(Plan.objects.get(code=code), profile=profile, **changes))
    return {obj["kind"]: obj for obj in objects}


def vmi_spec(vm: dict) -> dict:
    return vm["spec"]["template"]["spec"]


def user_data(secret: dict) -> dict:
    text = secret["stringData"]["userdata"]
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def validate_all(objects: list[dict]) -> None:
    """Core objects always; KubeVirt objects when the schema is there (skip, clearly, when not)."""
    kubevirt = [obj for obj in objects if validation.uses_kubevirt_schema(obj)]
    for obj in objects:
        if obj not in kubevirt:
            validation.validate_manifest(obj)
    if kubevirt and not validation.schema_available():
        pytest.skip(SKIP_NO_SCHEMA)
    for obj in kubevirt:
        validation.validate_manifest(obj)


def require_schema() -> None:
    if not validation.schema_available():
        pytest.skip(SKIP_NO_SCHEMA)


# --- Strict validation of everything the portal applies ------------------------------------------


def test_the_seeded_plans_are_all_covered():
    assert set(Plan.objects.values_list("code", flat=True)) >= SEEDED_PLANS


@pytest.mark.parametrize("profile", PROFILES)
def test_every_plan_with_every_profile_validates_strictly(tenant, profile):
    tenant_objects = manifests.tenant_manifests(manifests.tenant_shape(tenant))
    objects = list(tenant_objects)
    for plan in Plan.objects.select_related("gpu_model"):  # future plans are covered too
        plain = vm_shape_for(plan, profile=profile)
        scaled = dataclasses.replace(
            plain,
            name=f"{plan.code[:30]}-big",
            extra_gpus=1 if plan.gpu_count else 0,
            extra_vcpus=4,
            extra_memory_gib=16,
            cloud_init_extra="packages: [htop]\nruncmd: [[echo, hello]]\ntimezone: Asia/Shanghai\n",
        )
        objects += manifests.vm_manifests(plain, storage_class="ceph-rbd") + manifests.vm_manifests(scaled)
    assert {obj["kind"] for obj in objects} >= {"Namespace", "ResourceQuota", "Secret", "VirtualMachine", "Service"}
    validate_all(objects)


def test_validator_refuses_a_misspelled_kubevirt_field():
    require_schema()
    vm = render("a100-2x-training")["VirtualMachine"]
    validation.validate_manifest(vm)
    cpu = vmi_spec(vm)["domain"]["cpu"]
    cpu["dedicatedCPUPlacement"] = cpu.pop("dedicatedCpuPlacement")
    with pytest.raises(ManifestInvalid) as exc:
        validation.validate_manifest(vm)
    assert exc.value.kind == "VirtualMachine" and exc.value.name == "train-01"
    assert any("dedicatedCPUPlacement" in error and "domain.cpu" in error for error in exc.value.errors)


def test_validator_refuses_wrong_types_and_unknown_fields_deep_in_kubevirt_objects():
    require_schema()
    vm = render("db-64g")["VirtualMachine"]
    vmi_spec(vm)["domain"]["devices"]["interfaces"][0]["queues"] = 4  # there is no per-NIC queue count
    vmi_spec(vm)["domain"]["cpu"]["cores"] = "four"
    vm["metadata"]["lables"] = {}
    with pytest.raises(ManifestInvalid) as exc:
        validation.validate_manifest(vm)
    text = "\n".join(exc.value.errors)
    assert "'queues' was unexpected" in text and "'four' is not of type 'integer'" in text and "lables" in text


def test_validator_refuses_an_unknown_core_field():
    service = render("t4-1x-general")["Service"]
    validation.validate_manifest(service)
    service["spec"]["selectr"] = service["spec"].pop("selector")
    with pytest.raises(ManifestInvalid) as exc:
        validation.validate_manifest(service)
    assert exc.value.kind == "Service" and "selectr" in str(exc.value)


def test_validator_refuses_what_the_api_server_would_in_names_and_labels():
    secret = render("t4-1x-general")["Secret"]
    bad = copy.deepcopy(secret)
    bad["metadata"]["labels"]["gpuportal.io/vm"] = "not a label value!"
    bad["metadata"]["name"] = "Train_01"
    with pytest.raises(ManifestInvalid) as exc:
        validation.validate_manifest(bad)
    assert len(exc.value.errors) == 2
    service = render("t4-1x-general")["Service"]
    service["metadata"]["name"] = "1-access"  # Service names must start with a letter
    with pytest.raises(ManifestInvalid, match="DNS-1035"):
        validation.validate_manifest(service)


def test_validator_handles_cdi_data_volumes_and_unknown_kinds():
    require_schema()
    template = render("db-64g")["VirtualMachine"]["spec"]["dataVolumeTemplates"][1]
    data_volume = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", **template}
    data_volume["metadata"]["namespace"] = "t-acme-ai"
    validation.validate_manifest(data_volume)
    data_volume["spec"]["storage"]["storageClass"] = "ceph"  # it is storageClassName
    with pytest.raises(ManifestInvalid, match="storageClass"):
        validation.validate_manifest(data_volume)
    with pytest.raises(ManifestInvalid, match="not a kind the KubeVirt schema describes"):
        validation.validate_manifest({"apiVersion": "kubevirt.io/v1", "kind": "Nonsense", "metadata": {"name": "x"}})


def test_the_shared_examples_validate_so_the_validator_is_not_too_strict():
    examples = Path(settings.PORTAL_KUBEVIRT_SCHEMA).parent / "examples"
    if not examples.is_dir():
        pytest.skip(f"{examples} is absent")
    objects = [doc for path in sorted(examples.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert objects
    validate_all(objects)


def test_a_missing_schema_is_reported_not_passed(settings, tmp_path):
    settings.PORTAL_KUBEVIRT_SCHEMA = tmp_path / "missing.json"
    assert not validation.schema_available()
    with pytest.raises(validation.SchemaUnavailable, match="missing"):
        validation.validate_manifest(render("t4-1x-general")["VirtualMachine"])
    validation.validate_manifest(render("t4-1x-general")["Service"])  # core kinds do not need it


def test_builders_do_not_touch_the_database(tenant, django_assert_num_queries):
    tenant_shape = manifests.tenant_shape(tenant)
    vm = vm_shape_for(Plan.objects.select_related("gpu_model").get(code="a100-2x-training"))
    with django_assert_num_queries(0):
        manifests.tenant_manifests(tenant_shape)
        manifests.vm_manifests(vm)


# --- Profiles (DESIGN.md section 5) ---------------------------------------------------------------


def test_ai_training_shape():
    vm = render("a100-2x-training")["VirtualMachine"]
    spec = vmi_spec(vm)
    domain = spec["domain"]
    assert domain["cpu"] == {
        "sockets": 1,
        "cores": 8,
        "threads": 2,
        "model": "host-passthrough",
        "dedicatedCpuPlacement": True,
        "isolateEmulatorThread": True,
        "numa": {"guestMappingPassthrough": {}},
    }
    assert domain["memory"] == {"guest": "128Gi", "hugepages": {"pageSize": "2Mi"}}
    assert domain["resources"]["requests"] == domain["resources"]["limits"] == {"cpu": "16", "memory": "128Gi"}
    devices = domain["devices"]
    assert devices["gpus"] == [
        {"name": "gpu0", "deviceName": "nvidia.com/GA100_A100_PCIE_80GB"},
        {"name": "gpu1", "deviceName": "nvidia.com/GA100_A100_PCIE_80GB"},
    ]
    data_disks = [disk for disk in devices["disks"] if disk["name"] != "cloudinitdisk"]
    assert data_disks == [{"name": "rootdisk", "disk": {"bus": "virtio"}, "dedicatedIOThread": True}]
    assert devices["autoattachMemBalloon"] is False
    assert "networkInterfaceMultiqueue" not in devices
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["evictionStrategy"] == "None"
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == {"matchLabels": {"gpuportal.io/profile": "ai_training"}}
    assert term["namespaceSelector"] == {}  # other tenants' training VMs count too
    assert vm["spec"]["template"]["metadata"]["labels"]["gpuportal.io/profile"] == "ai_training"
    assert vm["spec"]["runStrategy"] == "Always"


def test_database_shape():
    vm = render("db-64g")["VirtualMachine"]
    spec = vmi_spec(vm)
    domain = spec["domain"]
    assert domain["cpu"] == {
        "sockets": 1,
        "cores": 4,
        "threads": 1,
        "model": "host-model",
        "dedicatedCpuPlacement": True,
    }
    assert domain["memory"] == {"guest": "64Gi", "hugepages": {"pageSize": "1Gi"}}
    assert domain["resources"]["requests"] == domain["resources"]["limits"] == {"cpu": "4", "memory": "64Gi"}
    devices = domain["devices"]
    assert [disk["name"] for disk in devices["disks"]] == ["rootdisk", "datadisk", "logdisk", "cloudinitdisk"]
    assert all(disk["disk"] == {"bus": "virtio"} for disk in devices["disks"])
    templates = {t["metadata"]["name"]: t["spec"] for t in vm["spec"]["dataVolumeTemplates"]}
    assert templates["train-01-data"] == {
        "storage": {"resources": {"requests": {"storage": "500Gi"}}},
        "source": {"blank": {}},
    }
    assert templates["train-01-log"]["storage"]["resources"]["requests"]["storage"] == "100Gi"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["datadisk"]["dataVolume"] == {"name": "train-01-data"}
    assert volumes["logdisk"]["dataVolume"] == {"name": "train-01-log"}
    # A 4-queue NIC: multiqueue gives one queue per vCPU, and the topology has four.
    assert devices["networkInterfaceMultiqueue"] is True and devices["interfaces"][0]["model"] == "virtio"
    cpu = domain["cpu"]
    assert cpu["sockets"] * cpu["cores"] * cpu["threads"] == 4
    assert devices["autoattachMemBalloon"] is False
    assert "gpus" not in devices
    assert spec["nodeSelector"] == {"gpuportal.io/dedicated": "database"}
    assert spec["tolerations"] == [
        {"key": "gpuportal.io/dedicated", "operator": "Equal", "value": "database", "effect": "NoSchedule"}
    ]
    assert "affinity" not in spec
    assert spec["readinessProbe"]["guestAgentPing"] == {}


@pytest.mark.parametrize("code", ["a100-1x-general", "a10-1x-general", "t4-1x-general"])
def test_general_shape(code):
    plan = Plan.objects.get(code=code)
    spec = vmi_spec(render(code)["VirtualMachine"])
    domain = spec["domain"]
    assert "dedicatedCpuPlacement" not in domain["cpu"] and "model" not in domain["cpu"]
    assert domain["devices"]["autoattachMemBalloon"] is True
    requests, limits = domain["resources"]["requests"], domain["resources"]["limits"]
    assert limits["cpu"] == str(plan.vcpus)
    request = (
        Decimal(requests["cpu"].removesuffix("m")) / 1000 if requests["cpu"].endswith("m") else Decimal(requests["cpu"])
    )
    assert request < plan.vcpus and plan.vcpus / request <= Decimal("1.5")  # overcommit within 1:1.5
    assert requests["memory"] == limits["memory"] == domain["memory"]["guest"] == f"{plan.memory_gib}Gi"
    assert "hugepages" not in domain["memory"]
    assert len(domain["devices"]["gpus"]) == plan.gpu_count
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "affinity" not in spec


def test_general_cpu_request_is_limit_over_overcommit():
    plan = Plan.objects.select_related("gpu_model").get(code="a100-1x-general")  # 16 vCPUs at 1:1.5
    resources = vmi_spec(manifests.virtual_machine(vm_shape_for(plan)))["domain"]["resources"]
    assert resources["requests"]["cpu"] == "10667m" and resources["limits"]["cpu"] == "16"
    no_overcommit = dataclasses.replace(manifests.plan_shape(plan), cpu_overcommit=Decimal("1.00"))
    shape = dataclasses.replace(vm_shape_for(plan), plan=no_overcommit)
    assert vmi_spec(manifests.virtual_machine(shape))["domain"]["resources"]["requests"]["cpu"] == "16"
    too_much = dataclasses.replace(shape, plan=dataclasses.replace(no_overcommit, cpu_overcommit=Decimal("2")))
    with pytest.raises(ValueError, match=r"between 1 and 1\.5"):
        manifests.virtual_machine(too_much)


def test_a_plan_rendered_with_another_profile_takes_that_profiles_shape():
    domain = vmi_spec(render("a100-2x-training", profile=Profile.DATABASE)["VirtualMachine"])["domain"]
    # Database guests get no SMT siblings; the vCPU count (and so the quota) stays the plan's.
    assert (domain["cpu"]["cores"], domain["cpu"]["threads"]) == (16, 1)
    assert domain["memory"]["hugepages"] == {"pageSize": "1Gi"}
    assert [d["name"] for d in domain["devices"]["disks"]] == ["rootdisk", "datadisk", "logdisk", "cloudinitdisk"]
    general = vmi_spec(render("db-64g", profile=Profile.GENERAL)["VirtualMachine"])
    assert general["domain"]["devices"]["autoattachMemBalloon"] is True
    assert "gpuportal.io/dedicated" not in general.get("nodeSelector", {})


def test_readiness_needs_every_gpu_seen_by_the_guest():
    probe = vmi_spec(render("h100-2x-training", extra_gpus=1)["VirtualMachine"])["readinessProbe"]
    (command,) = [" ".join(probe["exec"]["command"])]
    assert "nvidia-smi -L" in command and command.endswith("-eq 3")
    assert "guestAgentPing" not in probe


def test_scale_ups_add_gpus_cpus_and_memory_and_reverted_ones_do_not(tenant, user):
    plan = Plan.objects.get(code="a100-2x-training")
    vm = VirtualMachine.objects.create(
        tenant=tenant,
        created_by=user,
        plan=plan,
        name="train-01",
        billing_mode=BillingMode.MONTHLY,
        ssh_public_keys=[SSH_KEY],
        cloud_init_extra="packages: [htop]",
    )
    now = timezone.now()
    common = {"vm": vm, "created_by": user, "days": 7, "starts_at": now, "ends_at": now + timedelta(days=7)}
    ScaleUp.objects.create(extra_gpus=1, extra_vcpus=4, extra_memory_gib=32, **common)
    ScaleUp.objects.create(extra_gpus=0, extra_vcpus=2, extra_memory_gib=0, **common)
    ScaleUp.objects.create(extra_gpus=5, extra_vcpus=50, extra_memory_gib=500, state=ScaleUpState.REVERTED, **common)

    shape = manifests.vm_shape(vm, jupyter_token=TOKEN)
    assert (shape.extra_gpus, shape.extra_vcpus, shape.extra_memory_gib) == (1, 6, 32)
    assert shape.namespace == manifests.tenant_namespace(tenant.slug) and shape.name == "train-01"
    assert shape.vm_id == str(vm.id) and shape.order_id == str(vm.order_id)
    domain = vmi_spec(manifests.virtual_machine(shape))["domain"]
    assert len(domain["devices"]["gpus"]) == 3
    assert (domain["cpu"]["sockets"], domain["cpu"]["cores"], domain["cpu"]["threads"]) == (1, 11, 2)
    assert domain["resources"]["requests"] == domain["resources"]["limits"] == {"cpu": "22", "memory": "160Gi"}
    assert domain["memory"]["guest"] == "160Gi"


def test_extra_vcpus_that_do_not_divide_into_cores_still_give_the_exact_count():
    cpu = vmi_spec(render("a100-2x-training", extra_vcpus=3)["VirtualMachine"])["domain"]["cpu"]
    assert cpu["sockets"] * cpu["cores"] * cpu["threads"] == 19


def test_gpus_on_a_plan_without_a_gpu_model_are_refused():
    with pytest.raises(ValueError, match="no GPU model"):
        render("db-64g", extra_gpus=1)


@pytest.mark.parametrize("name", ["Train", "1abc", "a" * 41, "bad_name", "-x", ""])
def test_vm_names_that_would_make_invalid_objects_are_refused(name):
    with pytest.raises(ValueError, match="VM name"):
        render("t4-1x-general", name=name)


def test_storage_class_and_image_source():
    vm = manifests.virtual_machine(vm_shape_for(Plan.objects.get(code="db-64g")), storage_class="ceph-rbd")
    for template in vm["spec"]["dataVolumeTemplates"]:
        assert template["spec"]["storage"]["storageClassName"] == "ceph-rbd"
    root = vm["spec"]["dataVolumeTemplates"][0]["spec"]
    assert root["source"]["registry"]["url"] == "docker://quay.io/containerdisks/ubuntu:24.04"
    assert root["storage"]["resources"]["requests"]["storage"] == "100Gi"
    without = render("db-64g")["VirtualMachine"]["spec"]["dataVolumeTemplates"][0]["spec"]["storage"]
    assert "storageClassName" not in without


# --- Labels, namespace, tenant objects -----------------------------------------------------------


def test_every_object_is_tied_to_its_tenant_vm_and_order(tenant):
    tenant_objects = manifests.tenant_manifests(manifests.tenant_shape(tenant))
    for obj in tenant_objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpu-portal"
        assert obj["metadata"]["labels"]["gpuportal.io/tenant"] == tenant.slug
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == manifests.tenant_namespace(tenant.slug)
    shape = vm_shape_for(Plan.objects.get(code="db-64g"), tenant_slug=tenant.slug)
    objects = manifests.vm_manifests(shape)
    assert [obj["kind"] for obj in objects] == ["Secret", "VirtualMachine", "Service"]
    vm = objects[1]
    label_sets = [obj["metadata"]["labels"] for obj in objects]
    label_sets += [vm["spec"]["template"]["metadata"]["labels"]]
    label_sets += [template["metadata"]["labels"] for template in vm["spec"]["dataVolumeTemplates"]]
    for object_labels in label_sets:
        assert object_labels["app.kubernetes.io/managed-by"] == "gpu-portal"
        assert object_labels["gpuportal.io/tenant"] == tenant.slug
        assert object_labels["gpuportal.io/vm"] == shape.vm_id
        assert object_labels["gpuportal.io/order"] == shape.order_id
    assert vm["metadata"]["labels"]["gpuportal.io/profile"] == "database"
    service = objects[2]
    template_labels = vm["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {22, 8888}
    assert service["spec"]["type"] == "NodePort" and service["metadata"]["name"] == "train-01-access"


@pytest.mark.parametrize(
    "slug",
    ["acme-ai", "Acme_AI", "acme_ai", "a" * 50, "x-" + "b" * 48, "9lives", "ünïcode", "___"],
)
def test_tenant_namespace_is_always_a_dns_label(slug):
    namespace = manifests.tenant_namespace(slug)
    assert namespace.startswith("t-") and len(namespace) <= 63
    assert validation._DNS1123_LABEL.match(namespace)


def test_tenant_namespaces_of_different_slugs_differ():
    assert manifests.tenant_namespace("acme-ai") == "t-acme-ai"
    assert len({manifests.tenant_namespace(slug) for slug in ["acme-ai", "acme_ai", "Acme-AI", "acme--ai"]}) == 4


def test_resource_quota_mirrors_the_tenant_quota_with_a_key_per_gpu_model(tenant):
    quota = tenant.quota
    quota.vms, quota.vcpus, quota.memory_gib, quota.hugepages_gib, quota.storage_gib = 3, 48, 256, 128, 2000
    quota.save()
    shape = manifests.tenant_shape(tenant)
    (resource_quota,) = [obj for obj in manifests.tenant_manifests(shape) if obj["kind"] == "ResourceQuota"]
    hard = resource_quota["spec"]["hard"]
    for gpu_quota in tenant.gpu_quotas.select_related("gpu_model"):
        assert hard[f"requests.{gpu_quota.gpu_model.resource_name}"] == str(gpu_quota.limit)
    assert {f"requests.{model.resource_name}" for model in GpuModel.objects.all()} <= hard.keys()
    overhead = 3 * manifests.LAUNCHER_CPU_OVERHEAD, 3 * manifests.LAUNCHER_MEMORY_OVERHEAD_GIB
    assert hard["requests.cpu"] == hard["limits.cpu"] == str(48 + overhead[0])
    assert hard["requests.memory"] == hard["limits.memory"] == f"{256 + overhead[1]}Gi"
    assert hard["requests.hugepages-2Mi"] == hard["requests.hugepages-1Gi"] == "128Gi"
    assert hard["requests.storage"] == "2000Gi"
    assert hard["services.nodeports"] == "6"  # ssh + jupyter per VM
    assert hard["count/virtualmachines.kubevirt.io"] == hard["count/virtualmachineinstances.kubevirt.io"] == "3"
    assert hard["persistentvolumeclaims"] == hard["count/datavolumes.cdi.kubevirt.io"] == "9"


def test_limit_range_sets_maximums_only():
    shape = TenantShape(
        slug="acme", namespace="t-acme", vcpus=8, memory_gib=64, hugepages_gib=0, vms=1, storage_gib=500
    )
    (limit_range,) = [obj for obj in manifests.tenant_manifests(shape) if obj["kind"] == "LimitRange"]
    for limit in limit_range["spec"]["limits"]:
        assert set(limit) == {"type", "max"}  # never default/defaultRequest: they would be injected into pods


def test_network_policies_isolate_the_tenant():
    shape = TenantShape(
        slug="acme", namespace="t-acme", vcpus=8, memory_gib=64, hugepages_gib=0, vms=1, storage_gib=500
    )
    policies = {
        obj["metadata"]["name"]: obj["spec"]
        for obj in manifests.tenant_manifests(shape)
        if obj["kind"] == "NetworkPolicy"
    }
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert policies["allow-same-namespace"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    assert policies["allow-same-namespace"]["egress"] == [{"to": [{"podSelector": {}}]}]
    (dns,) = policies["allow-dns"]["egress"]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert {(port["protocol"], port["port"]) for port in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    (virt_api,) = policies["allow-virt-api-ssh"]["ingress"]
    assert virt_api["from"][0]["podSelector"] == {"matchLabels": {"kubevirt.io": "virt-api"}}
    assert virt_api["ports"] == [{"protocol": "TCP", "port": 22}]
    (access,) = policies["allow-vm-access"]["ingress"]
    assert "from" not in access and {port["port"] for port in access["ports"]} == {22, 8888}
    assert policies["allow-vm-access"]["policyTypes"] == ["Ingress"]
    internet = policies["allow-internet-egress"]["egress"][0]["to"][0]["ipBlock"]
    assert internet["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in internet["except"]


def test_tenant_role_is_exactly_the_vm_operator_role():
    shape = TenantShape(
        slug="acme", namespace="t-acme", vcpus=8, memory_gib=64, hugepages_gib=0, vms=1, storage_gib=500
    )
    objects = {obj["kind"]: obj for obj in manifests.tenant_manifests(shape)}
    rules = {
        (rule["apiGroups"][0], resource): tuple(rule["verbs"])
        for rule in objects["Role"]["rules"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("kubevirt.io", "virtualmachines"): ("get", "list", "watch", "create", "update", "patch", "delete"),
        ("kubevirt.io", "virtualmachineinstances"): ("get", "list", "watch"),
        ("subresources.kubevirt.io", "virtualmachines/start"): ("update",),
        ("subresources.kubevirt.io", "virtualmachines/stop"): ("update",),
        ("subresources.kubevirt.io", "virtualmachines/restart"): ("update",),
        ("subresources.kubevirt.io", "virtualmachineinstances/console"): ("get",),
        ("subresources.kubevirt.io", "virtualmachineinstances/vnc"): ("get",),
        ("subresources.kubevirt.io", "virtualmachineinstances/portforward"): ("get",),
        ("subresources.kubevirt.io", "virtualmachines/portforward"): ("get",),
    }
    binding = objects["RoleBinding"]
    assert binding["roleRef"]["name"] == objects["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": objects["ServiceAccount"]["metadata"]["name"], "namespace": "t-acme"}
    ]


# --- cloud-init -----------------------------------------------------------------------------------


def test_cloud_init_secret_has_the_user_keys_agent_and_jupyter_with_its_token():
    objects = render("a100-2x-training")
    secret = objects["Secret"]
    assert secret["type"] == "Opaque" and secret["metadata"]["name"] == "train-01-cloudinit"
    config = user_data(secret)
    (login,) = config["users"]
    assert login["name"] == "ubuntu" and login["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert login["ssh_authorized_keys"] == [SSH_KEY]
    assert {"qemu-guest-agent", "python3-pip"} <= set(config["packages"])
    (unit,) = [f for f in config["write_files"] if f["path"] == manifests.JUPYTER_UNIT_PATH]
    assert f"--IdentityProvider.token={TOKEN}" in unit["content"]
    assert "--ip=0.0.0.0" in unit["content"] and "--port=8888" in unit["content"] and "User=ubuntu" in unit["content"]
    commands = [" ".join(command) for command in config["runcmd"]]
    assert f"systemctl enable --now {manifests.JUPYTER_UNIT}" in commands
    assert "systemctl start qemu-guest-agent.service" in commands
    volumes = {volume["name"]: volume for volume in vmi_spec(objects["VirtualMachine"])["volumes"]}
    assert volumes["cloudinitdisk"]["cloudInitNoCloud"] == {"secretRef": {"name": "train-01-cloudinit"}}
    disks = [disk["name"] for disk in vmi_spec(objects["VirtualMachine"])["domain"]["devices"]["disks"]]
    assert "cloudinitdisk" in disks


def test_customer_cloud_init_is_merged_after_the_portals():
    extra = (
        "packages: [htop, nvtop]\n"
        "runcmd:\n  - [touch, /tmp/customer]\n"
        "write_files:\n  - {path: /etc/motd, content: hi}\n"
        "timezone: Asia/Shanghai\n"
    )
    config = user_data(render("t4-1x-general", cloud_init_extra=extra)["Secret"])
    assert config["packages"][:2] == ["qemu-guest-agent", "python3-pip"] and config["packages"][-2:] == [
        "htop",
        "nvtop",
    ]
    assert config["runcmd"][-1] == ["touch", "/tmp/customer"]
    assert config["runcmd"][0] == ["systemctl", "start", "qemu-guest-agent.service"]
    assert [f["path"] for f in config["write_files"]] == [manifests.JUPYTER_UNIT_PATH, "/etc/motd"]
    assert config["timezone"] == "Asia/Shanghai"
    assert config["users"][0]["name"] == "ubuntu"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("users: [{name: eve}]", "may not set 'users'"),
        ("user: {name: eve}", "may not set 'user'"),
        (f"write_files: [{{path: {manifests.JUPYTER_UNIT_PATH}, content: x}}]", "Jupyter"),
        (f"write_files: [{{path: {manifests.JUPYTER_UNIT_PATH}.d/override.conf, content: x}}]", "Jupyter"),
        ("write_files: [{path: /etc//systemd/./system/gpuportal-jupyter.service, content: x}]", "Jupyter"),
        ("package_update: false", "may not change 'package_update'"),
        ("packages: htop", "must be a list"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("just a string", "must be a YAML mapping"),
        ("packages: [unclosed", "not valid YAML"),
    ],
)
def test_unsafe_or_malformed_cloud_init_extras_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        manifests.validate_cloud_init_extra(extra)
    with pytest.raises(ValueError, match=message):
        render("t4-1x-general", cloud_init_extra=extra)


@pytest.mark.parametrize("extra", ["", "   \n", "# only a comment\n"])
def test_empty_cloud_init_extras_change_nothing(extra):
    manifests.validate_cloud_init_extra(extra)
    assert render("t4-1x-general", cloud_init_extra=extra)["Secret"] == render("t4-1x-general")["Secret"]


def test_user_data_over_the_inline_limit_travels_in_the_secret():
    big = "\n".join(f"  - [echo, step-{index:04d}-{'x' * 40}]" for index in range(60))
    objects = render("a10-1x-general", cloud_init_extra=f"runcmd:\n{big}\n")
    text = objects["Secret"]["stringData"]["userdata"]
    assert len(text.encode()) > 2048  # KubeVirt's limit for inline userData
    cloud_init = next(v for v in vmi_spec(objects["VirtualMachine"])["volumes"] if v["name"] == "cloudinitdisk")
    assert cloud_init["cloudInitNoCloud"] == {"secretRef": {"name": objects["Secret"]["metadata"]["name"]}}
    assert user_data(objects["Secret"])["runcmd"][-1] == ["echo", f"step-0059-{'x' * 40}"]
    validate_all(list(objects.values()))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"jupyter_token": ""}, "Jupyter token"),
        ({"jupyter_token": "short"}, "Jupyter token"),
        ({"jupyter_token": "a" * 20 + "\nExecStartPre=/bin/evil"}, "Jupyter token"),
        ({"ssh_user": "root\nUser=eve"}, "SSH user"),
        ({"ssh_public_keys": ["ssh-ed25519 AAAA\nssh-rsa BBBB"]}, "single line"),
    ],
)
def test_values_that_could_break_out_of_the_guest_config_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        render("t4-1x-general", **changes)


# --- render_manifests -----------------------------------------------------------------------------


def run_render(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("render_manifests", *args, stdout=out, stderr=err)
    return out.getvalue()


def test_render_command_prints_the_tenant_then_the_vm_objects(tenant):
    output = run_render("--tenant", tenant.slug, "--plan", "a100-2x-training")
    documents = list(yaml.safe_load_all(output))
    kinds = [doc["kind"] for doc in documents]
    assert kinds[0] == "Namespace" and kinds[-3:] == ["Secret", "VirtualMachine", "Service"]
    assert {"ResourceQuota", "LimitRange", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"} <= set(kinds)
    vm = documents[-2]
    assert vm["metadata"]["name"] == "example-vm"
    assert vm["metadata"]["namespace"] == manifests.tenant_namespace(tenant.slug)
    assert "the tenant has none yet" in output
    assert "# validated against" not in output


def test_render_command_uses_the_profile_name_and_a_tenant_key_and_validates(tenant, user):
    SshKey.objects.create(
        tenant=tenant,
        owner=user,
        name="laptop",
        public_key=SSH_KEY,
        key_type="ssh-ed25519",
        bits=256,
        fingerprint="SHA256:x",
    )
    output = run_render(
        "--tenant", tenant.slug, "--plan", "t4-1x-general", "--profile", "database", "--name", "db-1", "--validate"
    )
    documents = list(yaml.safe_load_all(output))
    vm = next(doc for doc in documents if doc["kind"] == "VirtualMachine")
    assert vm["metadata"]["name"] == "db-1"
    assert vm["metadata"]["labels"]["gpuportal.io/profile"] == "database"
    secret = next(doc for doc in documents if doc["kind"] == "Secret")
    assert user_data(secret)["users"][0]["ssh_authorized_keys"] == [SSH_KEY]
    assert "# validated against Kubernetes" in output
    if validation.schema_available():
        assert f"# validated against {validation.schema_path()}" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "no-such-tenant", "--plan", "db-64g"], "No tenant with slug 'no-such-tenant'"),
        (["--tenant", "{tenant}", "--plan", "no-such-plan"], "No plan with code 'no-such-plan'"),
        (["--tenant", "{tenant}", "--plan", "db-64g", "--name", "Not_A_Name"], "VM name"),
    ],
)
def test_render_command_fails_clearly(tenant, args, message):
    args = [arg.format(tenant=tenant.slug) for arg in args]
    with pytest.raises(CommandError, match=message) as exc:
        run_render(*args)
    assert exc.value.returncode == 1


def test_render_command_fails_on_an_invalid_manifest(tenant, monkeypatch):
    real = manifests.vm_manifests

    def broken(shape, storage_class=""):
        objects = real(shape, storage_class)
        objects[-1]["spec"]["selectr"] = objects[-1]["spec"].pop("selector")
        return objects

    monkeypatch.setattr(manifests, "vm_manifests", broken)
    with pytest.raises(CommandError, match=r"Invalid manifest: Service 'example-vm-access'.*selectr"):
        run_render("--tenant", tenant.slug, "--plan", "db-64g", "--validate")
