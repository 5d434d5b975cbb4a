"""Kubernetes objects for tenants and VMs, built by pure functions (DESIGN.md sections 5 and 6).

The builders take frozen dataclasses (`PlanShape`, `TenantShape`, `VmShape`) and return plain dicts
ready to apply, so they can be rendered for review (`manage.py render_manifests`), validated against
the schemas (`provisioning.validation`) and tested without a cluster. Only the three adapters at the
bottom (`tenant_shape`, `plan_shape`, `vm_shape`) read the ORM.

Facts about KubeVirt these builders rely on are collected in ../shared/kubevirt/NOTES.md.
"""

import hashlib
import posixpath
import re
from copy import deepcopy
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

import yaml
from django.conf import settings
from django.db.models import Sum

from provisioning.models import Plan, Profile, ScaleUpState, VirtualMachine, VmState

MANAGED_BY = "gpu-portal"

# KubeVirt charges each VM's launcher pod more than the guest gets: QEMU and virt-launcher memory,
# page tables, 1 GiB more when VFIO devices (passthrough GPUs) are attached, and one or two pinned
# CPUs for an isolated emulator thread (two when the AlignCPUs gate rounds to full cores). The
# namespace's ResourceQuota and LimitRange allow this much per VM on top of the portal's own quota,
# which counts guest resources only; otherwise a VM the portal admitted would fail in the cluster.
LAUNCHER_MEMORY_OVERHEAD_GIB = 2
LAUNCHER_CPU_OVERHEAD = 2
DISKS_PER_VM = 3  # root, data and log: the most any profile attaches

# A database VM is defined by its separate data and log disks; a plan that has none (a non-database
# plan rendered with the database profile) gets these sizes.
DEFAULT_DATA_DISK_GIB = 100
DEFAULT_LOG_DISK_GIB = 20

SSH_PORT = 22
JUPYTER_PORT = 8888
JUPYTER_UNIT = "gpuportal-jupyter.service"
JUPYTER_UNIT_PATH = f"/etc/systemd/system/{JUPYTER_UNIT}"
JUPYTER_VENV = "/opt/jupyter"

# VM names as the portal accepts them: DNS-1035 labels of at most 40 characters, so every object
# name derived from them ("-root", "-cloudinit", "-access") is valid for its kind.
_VM_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_UNIX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Tokens end up in a systemd ExecStart line: no spaces, quotes, `%` specifiers or `$` expansions.
_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")


# --- Inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanShape:
    code: str
    profile: str
    gpu_resource: str  # Kubernetes extended resource of the GPUs, "" for none
    gpu_count: int
    sockets: int
    cores: int
    threads: int
    memory_gib: int
    hugepage_size: str  # "", "2Mi" or "1Gi"
    disk_gib: int
    data_disk_gib: int
    log_disk_gib: int
    cpu_overcommit: Decimal
    image: str

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class TenantShape:
    slug: str
    namespace: str
    vcpus: int
    memory_gib: int
    hugepages_gib: int
    vms: int
    storage_gib: int
    gpus: dict[str, int] = field(default_factory=dict)  # GPU resource name → limit


@dataclass(frozen=True)
class VmShape:
    tenant_slug: str
    namespace: str
    vm_id: str
    order_id: str
    name: str
    plan: PlanShape
    ssh_public_keys: list[str]
    ssh_user: str
    cloud_init_extra: str
    jupyter_token: str
    # Elastic scale-up, on top of the plan.
    extra_gpus: int = 0
    extra_vcpus: int = 0
    extra_memory_gib: int = 0
    # A stopped VM is re-applied Halted, so updating it (new token, scale-up) never starts it.
    running: bool = True


# --- Names and labels ---------------------------------------------------------------------------


def _label_key(name: str) -> str:
    return f"{settings.PORTAL_LABEL_PREFIX}/{name}"


def tenant_namespace(slug: str) -> str:
    """ "t-" + the slug, as a DNS-1123 label. Slugs may hold capitals and underscores, which a namespace
    may not; when the slug had to be changed, a short hash of the original keeps two tenants from
    ever sharing a namespace."""
    if not slug:
        raise ValueError("A tenant slug is required.")
    cleaned = re.sub(r"[^a-z0-9-]+", "-", slug.lower()).strip("-")
    if cleaned == slug and len(slug) <= 61:
        return f"t-{slug}"
    digest = hashlib.sha256(slug.encode()).hexdigest()[:8]
    stem = cleaned[: 63 - len("t-") - len("-") - len(digest)].rstrip("-")
    return f"t-{stem}-{digest}" if stem else f"t-{digest}"


def _label_value(value: str, what: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ValueError(f"{what} {value!r} cannot be a Kubernetes label value (at most 63 of A-Z a-z 0-9 - _ .).")
    return value


def labels(tenant_slug: str, *, vm_id: str = "", order_id: str = "", profile: str = "") -> dict[str, str]:
    """The labels that tie an object to its tenant (and VM, order, profile): deletion, the reconciler
    and the NetworkPolicies find objects by them."""
    result = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        _label_key("tenant"): _label_value(tenant_slug, "Tenant slug"),
    }
    if vm_id:
        result[_label_key("vm")] = _label_value(vm_id, "VM id")
    if order_id:
        result[_label_key("order")] = _label_value(order_id, "Order id")
    if profile:
        result[_label_key("profile")] = _label_value(profile, "Profile")
    return result


def vm_resource_name(vm: VirtualMachine) -> str:
    """The VirtualMachine's Kubernetes name: the customer's own name for it (a DNS-1123 label)."""
    return vm.name


def root_volume_name(vm_name: str) -> str:
    return f"{vm_name}-root"


def cloud_init_secret_name(vm_name: str) -> str:
    return f"{vm_name}-cloudinit"


def service_name(vm_name: str) -> str:
    """The NodePort Service exposing the VM's SSH and Jupyter ports (a DNS-1035 label, as VM names
    start with a letter)."""
    return f"{vm_name}-access"


def _meta(name: str, namespace: str | None, object_labels: dict[str, str]) -> dict:
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(object_labels)
    return meta


def _gi(amount: int) -> str:
    return f"{amount}Gi"


# --- Tenant -------------------------------------------------------------------------------------

TENANT_SERVICE_ACCOUNT = "portal-operator"
TENANT_ROLE = "vm-operator"

# Everything outside the cluster. Private, carrier-grade NAT and link-local ranges stay denied, so a
# tenant's VMs reach neither other tenants' pods and VMs nor node and cloud metadata addresses.
_INTERNET_EGRESS = [
    {
        "ipBlock": {
            "cidr": "0.0.0.0/0",
            "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"],
        }
    },
    {"ipBlock": {"cidr": "::/0", "except": ["fc00::/7", "fe80::/10"]}},
]


def tenant_manifests(t: TenantShape) -> list[dict]:
    """The tenant's namespace and its isolation objects, in apply order (namespace first)."""
    ns = t.namespace
    common = labels(t.slug)
    launcher_pods = {"matchLabels": {"kubevirt.io": "virt-launcher"}}
    tcp = [{"protocol": "TCP", "port": port} for port in (SSH_PORT, JUPYTER_PORT)]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, None, common)},
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": _meta("tenant-quota", ns, common),
            "spec": {"hard": _quota_hard(t)},
        },
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": _meta("tenant-limits", ns, common),
            # `max` only: `default` limits would be injected into KubeVirt's launcher and CDI's importer
            # pods and can make them invalid (NOTES.md).
            "spec": {
                "limits": [
                    {
                        "type": "Container",
                        "max": {
                            "cpu": str(t.vcpus + LAUNCHER_CPU_OVERHEAD),
                            "memory": _gi(t.memory_gib + LAUNCHER_MEMORY_OVERHEAD_GIB),
                        },
                    },
                    {"type": "PersistentVolumeClaim", "max": {"storage": _gi(t.storage_gib)}},
                ]
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("default-deny", ns, common),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        _network_policy(
            ns,
            common,
            "allow-same-namespace",
            {},
            ingress=[{"from": [{"podSelector": {}}]}],
            egress=[{"to": [{"podSelector": {}}]}],
        ),
        _network_policy(
            ns,
            common,
            "allow-dns",
            {},
            egress=[
                {
                    "to": [
                        {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        ),
        # cloud-init installs packages and Jupyter, and customers download models and data sets.
        _network_policy(ns, common, "allow-internet-egress", {}, egress=[{"to": _INTERNET_EGRESS}]),
        # `virtctl ssh` and port-forward go through virt-api, which dials the VM's pod IP.
        _network_policy(
            ns,
            common,
            "allow-virt-api-ssh",
            launcher_pods,
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubevirt"}},
                            "podSelector": {"matchLabels": {"kubevirt.io": "virt-api"}},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": SSH_PORT}],
                }
            ],
        ),
        # Customers reach SSH and Jupyter through each VM's NodePort Service. Traffic to a NodePort
        # arrives from the client's address, or from whichever node forwarded it (SNAT under the
        # default externalTrafficPolicy), so no fixed peer describes it: the two ports are open to
        # every source and guarded by SSH keys and the Jupyter token. Other ports stay closed.
        _network_policy(ns, common, "allow-vm-access", launcher_pods, ingress=[{"ports": tcp}]),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(TENANT_SERVICE_ACCOUNT, ns, common)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(TENANT_ROLE, ns, common),
            "rules": [
                {
                    "apiGroups": ["kubevirt.io"],
                    "resources": ["virtualmachines"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                },
                {
                    "apiGroups": ["kubevirt.io"],
                    "resources": ["virtualmachineinstances"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["subresources.kubevirt.io"],
                    "resources": ["virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart"],
                    "verbs": ["update"],
                },
                {
                    "apiGroups": ["subresources.kubevirt.io"],
                    "resources": [
                        "virtualmachineinstances/console",
                        "virtualmachineinstances/vnc",
                        "virtualmachineinstances/portforward",
                        "virtualmachines/portforward",
                    ],
                    "verbs": ["get"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(f"{TENANT_SERVICE_ACCOUNT}-{TENANT_ROLE}", ns, common),
            "subjects": [{"kind": "ServiceAccount", "name": TENANT_SERVICE_ACCOUNT, "namespace": ns}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TENANT_ROLE},
        },
    ]


def _quota_hard(t: TenantShape) -> dict[str, str]:
    cpu = str(t.vcpus + t.vms * LAUNCHER_CPU_OVERHEAD)
    memory = _gi(t.memory_gib + t.vms * LAUNCHER_MEMORY_OVERHEAD_GIB)
    hard = {
        "requests.cpu": cpu,
        "limits.cpu": cpu,
        "requests.memory": memory,
        "limits.memory": memory,
        # The portal's quota is one hugepage total of either size; its own check keeps the sum.
        "requests.hugepages-2Mi": _gi(t.hugepages_gib),
        "requests.hugepages-1Gi": _gi(t.hugepages_gib),
    }
    # Extended resources can only be limited through `requests.` (NOTES.md).
    for resource_name, limit in sorted(t.gpus.items()):
        hard[f"requests.{resource_name}"] = str(limit)
    hard.update(
        {
            "requests.storage": _gi(t.storage_gib),
            "persistentvolumeclaims": str(t.vms * DISKS_PER_VM),
            "services.nodeports": str(t.vms * 2),  # ssh and jupyter per VM
            "count/virtualmachines.kubevirt.io": str(t.vms),
            "count/virtualmachineinstances.kubevirt.io": str(t.vms),
            "count/datavolumes.cdi.kubevirt.io": str(t.vms * DISKS_PER_VM),
        }
    )
    return hard


def _network_policy(
    namespace: str, object_labels: dict, name: str, pod_selector: dict, *, ingress: list = (), egress: list = ()
) -> dict:
    """An allow-list NetworkPolicy for the directions it has rules for. Policies add up: `default-deny`
    (both directions, no rules) isolates every pod, and each of these opens one path."""
    spec: dict = {"podSelector": pod_selector, "policyTypes": []}
    if ingress:
        spec["policyTypes"].append("Ingress")
        spec["ingress"] = list(ingress)
    if egress:
        spec["policyTypes"].append("Egress")
        spec["egress"] = list(egress)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name, namespace, object_labels),
        "spec": spec,
    }


# --- VM -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileRules:
    """How a workload profile shapes the VirtualMachine (DESIGN.md section 5)."""

    cpu_model: str  # "" leaves the cluster's default model, which keeps VMs migratable
    dedicated_cpus: bool  # pinned vCPUs; KubeVirt then needs requests = limits (a Guaranteed pod)
    isolate_emulator_thread: bool
    numa_passthrough: bool
    hugepage_size: str | None  # None: as the plan says
    memory_balloon: bool
    one_thread_per_core: bool
    dedicated_io_threads: bool
    nic_multiqueue: bool
    data_and_log_disks: bool
    node_exclusive: bool  # never two such VMs on one node


PROFILE_RULES = {
    Profile.AI_TRAINING: ProfileRules(
        cpu_model="host-passthrough",
        dedicated_cpus=True,
        isolate_emulator_thread=True,
        numa_passthrough=True,
        hugepage_size="2Mi",
        memory_balloon=False,
        one_thread_per_core=False,
        dedicated_io_threads=True,
        nic_multiqueue=False,
        data_and_log_disks=False,
        node_exclusive=True,
    ),
    Profile.DATABASE: ProfileRules(
        cpu_model="host-model",
        dedicated_cpus=True,
        isolate_emulator_thread=False,
        numa_passthrough=False,
        hugepage_size="1Gi",
        memory_balloon=False,
        one_thread_per_core=True,
        dedicated_io_threads=False,
        # KubeVirt has no per-interface queue count: with this set, each virtio NIC gets one queue
        # per vCPU, so the 4-vCPU database plan has a 4-queue NIC.
        nic_multiqueue=True,
        data_and_log_disks=True,
        node_exclusive=False,
    ),
    Profile.GENERAL: ProfileRules(
        cpu_model="",
        dedicated_cpus=False,
        isolate_emulator_thread=False,
        numa_passthrough=False,
        hugepage_size=None,
        memory_balloon=True,
        one_thread_per_core=False,
        dedicated_io_threads=False,
        nic_multiqueue=False,
        data_and_log_disks=False,
        node_exclusive=False,
    ),
}

GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def vm_manifests(v: VmShape, storage_class: str = "") -> list[dict]:
    """The cloud-init Secret, the VirtualMachine and its NodePort Service, in apply order."""
    if not _VM_NAME.match(v.name):
        raise ValueError(f"VM name {v.name!r} must be 1-40 of a-z 0-9 -, starting with a letter.")
    if v.plan.profile not in PROFILE_RULES:
        raise ValueError(f"Unknown workload profile {v.plan.profile!r}.")
    vm_labels = labels(v.tenant_slug, vm_id=v.vm_id, order_id=v.order_id)
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(cloud_init_secret_name(v.name), v.namespace, vm_labels),
            "type": "Opaque",
            # Always a Secret: the user data carries the Jupyter token, and KubeVirt refuses inline
            # userData over 2048 bytes, which customers' extra cloud-config easily exceeds.
            "stringData": {"userdata": cloud_init_user_data(v)},
        },
        virtual_machine(v, storage_class),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(service_name(v.name), v.namespace, vm_labels),
            "spec": {
                "type": "NodePort",
                # The launcher pod carries the VM template's labels; the VM id alone is unique.
                "selector": {_label_key("vm"): v.vm_id},
                "ports": [
                    {"name": "ssh", "protocol": "TCP", "port": SSH_PORT, "targetPort": SSH_PORT},
                    {"name": "jupyter", "protocol": "TCP", "port": JUPYTER_PORT, "targetPort": JUPYTER_PORT},
                ],
            },
        },
    ]


def virtual_machine(v: VmShape, storage_class: str = "") -> dict:
    plan = v.plan
    rules = PROFILE_RULES[plan.profile]
    gpus = _gpu_count(v)
    sockets, cores, threads = _topology(v, rules)
    vcpus = sockets * cores * threads
    memory = _gi(plan.memory_gib + v.extra_memory_gib)
    hugepage_size = rules.hugepage_size if rules.hugepage_size is not None else plan.hugepage_size
    vm_labels = labels(v.tenant_slug, vm_id=v.vm_id, order_id=v.order_id, profile=plan.profile)

    cpu: dict = {"sockets": sockets, "cores": cores, "threads": threads}
    if rules.cpu_model:
        cpu["model"] = rules.cpu_model
    if rules.dedicated_cpus:
        cpu["dedicatedCpuPlacement"] = True
    if rules.isolate_emulator_thread:
        cpu["isolateEmulatorThread"] = True
    if rules.numa_passthrough:  # needs dedicated CPUs and hugepages, which this profile has
        cpu["numa"] = {"guestMappingPassthrough": {}}

    memory_spec: dict = {"guest": memory}
    if hugepage_size:
        memory_spec["hugepages"] = {"pageSize": hugepage_size}

    # These are the VMI's resources, not the launcher pod's: requests.memory is the guest memory, and
    # KubeVirt renders the pod with hugepages-<size> = guest memory and memory = its overhead when
    # hugepages back the guest. With dedicated CPUs it requires requests = limits, an integer CPU
    # count equal to the topology's vCPUs, and equal memory requests and limits.
    if rules.dedicated_cpus:
        resources = {"requests": {"cpu": str(vcpus), "memory": memory}, "limits": {"cpu": str(vcpus), "memory": memory}}
    else:
        resources = {
            "requests": {"cpu": _cpu_request(vcpus, plan.cpu_overcommit), "memory": memory},
            "limits": {"cpu": str(vcpus), "memory": memory},
        }

    disks, volumes, data_volumes = _storage(v, rules, storage_class)
    devices: dict = {
        "autoattachMemBalloon": rules.memory_balloon,
        "disks": disks,
        "interfaces": [{"name": "default", "masquerade": {}, "model": "virtio"}],
    }
    if rules.nic_multiqueue:
        devices["networkInterfaceMultiqueue"] = True
    if gpus:
        devices["gpus"] = [{"name": f"gpu{index}", "deviceName": plan.gpu_resource} for index in range(gpus)]

    template_spec: dict = {
        "domain": {"cpu": cpu, "memory": memory_spec, "resources": resources, "devices": devices},
        "networks": [{"name": "default", "pod": {}}],
        "volumes": volumes,
    }
    template_spec.update(_placement(plan.profile, rules, gpus))
    template_spec["readinessProbe"] = _readiness_probe(gpus)

    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": _meta(v.name, v.namespace, vm_labels),
        "spec": {
            "runStrategy": "Always" if v.running else "Halted",
            "dataVolumeTemplates": data_volumes,
            "template": {"metadata": {"labels": dict(vm_labels)}, "spec": template_spec},
        },
    }


def _gpu_count(v: VmShape) -> int:
    count = v.plan.gpu_count + v.extra_gpus
    if count and not v.plan.gpu_resource:
        raise ValueError(f"Plan {v.plan.code} has no GPU model, so the VM cannot have GPUs.")
    return count


def _topology(v: VmShape, rules: ProfileRules) -> tuple[int, int, int]:
    """Sockets, cores and threads: the plan's, grown by scale-up vCPUs.

    Extra vCPUs become extra cores where they divide evenly over sockets × threads; otherwise the
    guest gets one socket of single-thread cores, so the vCPU count is always exactly what was
    bought (and what the quota counted)."""
    plan = v.plan
    sockets, cores, threads = plan.sockets, plan.cores, plan.threads
    if rules.one_thread_per_core:  # a database guest never sees SMT siblings
        cores, threads = cores * threads, 1
    if v.extra_vcpus:
        per_core = sockets * threads
        if v.extra_vcpus % per_core == 0:
            cores += v.extra_vcpus // per_core
        else:
            sockets, cores, threads = 1, sockets * cores * threads + v.extra_vcpus, 1
    return sockets, cores, threads


def _cpu_request(vcpus: int, overcommit: Decimal) -> str:
    """The CPU request of a general VM: limit ÷ overcommit, rounded up to a millicore."""
    if not Decimal(1) <= overcommit <= Decimal("1.5"):
        raise ValueError(f"CPU overcommit must be between 1 and 1.5, not {overcommit}.")
    millicores = int((Decimal(vcpus) * 1000 / overcommit).to_integral_value(rounding=ROUND_CEILING))
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def _storage(v: VmShape, rules: ProfileRules, storage_class: str) -> tuple[list, list, list]:
    """Disks, volumes and dataVolumeTemplates: root (from the plan's image), data and log disks (blank)
    when the plan or profile has them, and the cloud-init disk."""
    plan = v.plan
    vm_labels = labels(v.tenant_slug, vm_id=v.vm_id, order_id=v.order_id)
    data_gib = plan.data_disk_gib or (DEFAULT_DATA_DISK_GIB if rules.data_and_log_disks else 0)
    log_gib = plan.log_disk_gib or (DEFAULT_LOG_DISK_GIB if rules.data_and_log_disks else 0)
    wanted = [("rootdisk", root_volume_name(v.name), plan.disk_gib, _image_source(plan.image))]
    if data_gib:
        wanted.append(("datadisk", f"{v.name}-data", data_gib, {"blank": {}}))
    if log_gib:
        wanted.append(("logdisk", f"{v.name}-log", log_gib, {"blank": {}}))

    disks, volumes, data_volumes = [], [], []
    for disk_name, dv_name, size_gib, source in wanted:
        disk: dict = {"name": disk_name, "disk": {"bus": "virtio"}}
        if rules.dedicated_io_threads:
            disk["dedicatedIOThread"] = True
        disks.append(disk)
        volumes.append({"name": disk_name, "dataVolume": {"name": dv_name}})
        # `storage` rather than `pvc`: CDI fills in access and volume modes from the StorageProfile.
        storage: dict = {"resources": {"requests": {"storage": _gi(size_gib)}}}
        if storage_class:
            storage["storageClassName"] = storage_class
        data_volumes.append(
            {"metadata": _meta(dv_name, None, vm_labels), "spec": {"storage": storage, "source": source}}
        )
    disks.append({"name": "cloudinitdisk", "disk": {"bus": "virtio"}})
    volumes.append(
        {"name": "cloudinitdisk", "cloudInitNoCloud": {"secretRef": {"name": cloud_init_secret_name(v.name)}}}
    )
    return disks, volumes, data_volumes


def _image_source(image: str) -> dict:
    if image.startswith(("http://", "https://")):
        return {"http": {"url": image}}
    url = image if "://" in image else f"docker://{image}"
    # The node pulls the image through its container runtime: no scratch PVC, which would count a
    # second time against the namespace's storage and PVC quota while the disk imports.
    return {"registry": {"url": url, "pullMethod": "node"}}


def _placement(profile: str, rules: ProfileRules, gpus: int) -> dict:
    node_selector: dict[str, str] = {}
    tolerations: list[dict] = []
    placement: dict = {}
    if gpus:
        node_selector.update(GPU_NODE_SELECTOR)
        tolerations.append(dict(GPU_TOLERATION))
        # Passthrough GPUs cannot live-migrate: a drain must stop the VM, not try and fail to move it.
        placement["evictionStrategy"] = "None"
    if profile == Profile.DATABASE:
        dedicated = _label_key("dedicated")
        node_selector[dedicated] = "database"
        tolerations.append({"key": dedicated, "operator": "Equal", "value": "database", "effect": "NoSchedule"})
    if rules.node_exclusive:
        placement["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {_label_key("profile"): profile}},
                        # Every namespace: two tenants' training VMs must not share a node either.
                        "namespaceSelector": {},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    if node_selector:
        placement["nodeSelector"] = node_selector
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


def _readiness_probe(gpus: int) -> dict:
    """Ready means the guest agent answers and, for GPU VMs, the guest sees every GPU it was given.

    The exec probe runs through the qemu-guest-agent, so a VM whose GPU failed to attach (or whose
    driver did not load) stays not Ready and the portal reports it instead of billing it."""
    if not gpus:
        return {"guestAgentPing": {}, "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5}
    check = f'test "$(nvidia-smi -L | grep -c "^GPU ")" -eq {gpus}'
    return {
        "exec": {"command": ["sh", "-c", check]},
        # The first boot may install the driver before nvidia-smi exists.
        "initialDelaySeconds": 120,
        "periodSeconds": 20,
        "timeoutSeconds": 15,
        "failureThreshold": 3,
    }


# --- cloud-init ---------------------------------------------------------------------------------

# Keys the customer's extra cloud-config may not set: the login user and its keys are the portal's.
RESERVED_CLOUD_INIT_KEYS = frozenset({"users", "user"})


def cloud_init_user_data(v: VmShape) -> str:
    """The #cloud-config user data: the login user, the guest agent, a Jupyter server with the VM's
    token, then the customer's extra cloud-config merged in."""
    if not _UNIX_USER.match(v.ssh_user):
        raise ValueError(f"SSH user {v.ssh_user!r} is not a valid login name.")
    if not _TOKEN.match(v.jupyter_token):
        raise ValueError("The Jupyter token must be 16-256 characters of A-Z a-z 0-9 . _ ~ -.")
    keys = [key.strip() for key in v.ssh_public_keys if key.strip()]
    if any("\n" in key or "\r" in key for key in keys):
        raise ValueError("An SSH public key must be a single line.")
    document = _portal_cloud_config(
        ssh_user=v.ssh_user,
        ssh_keys=keys,
        jupyter_token=v.jupyter_token,
        has_gpus=bool(v.plan.gpu_count + v.extra_gpus),
    )
    document = merge_cloud_init_extra(document, v.cloud_init_extra)
    return "#cloud-config\n" + to_yaml(document)


def validate_cloud_init_extra(extra: str) -> None:
    """Raise ValueError (with a message for the customer) when the extra cloud-config would be refused
    at provisioning time; for checking an order before it is accepted."""
    placeholder = _portal_cloud_config(ssh_user="ubuntu", ssh_keys=[], jupyter_token="x" * 32, has_gpus=True)
    merge_cloud_init_extra(placeholder, extra)


def _portal_cloud_config(*, ssh_user: str, ssh_keys: list[str], jupyter_token: str, has_gpus: bool) -> dict:
    packages = ["qemu-guest-agent", "python3-pip", "python3-venv"]
    runcmd: list = [
        # The agent's unit is static on Ubuntu (udev starts it once the virtio port exists): start it
        # first, because readiness goes through it.
        ["systemctl", "start", "qemu-guest-agent.service"],
        ["python3", "-m", "venv", JUPYTER_VENV],
        [f"{JUPYTER_VENV}/bin/pip", "install", "--quiet", "jupyterlab"],
        # The customer's notebooks install packages into the environment they run in.
        ["chown", "-R", f"{ssh_user}:{ssh_user}", JUPYTER_VENV],
    ]
    if has_gpus:
        # Images without the NVIDIA driver get the recommended one; the readiness probe needs nvidia-smi.
        packages.append("ubuntu-drivers-common")
        runcmd.append(
            ["sh", "-c", "command -v nvidia-smi >/dev/null 2>&1 || { ubuntu-drivers install && modprobe nvidia; }"]
        )
    runcmd += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", JUPYTER_UNIT]]
    return {
        "users": [
            {
                "name": ssh_user,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": ssh_keys,
            }
        ],
        "package_update": True,
        "packages": packages,
        "write_files": [
            {"path": JUPYTER_UNIT_PATH, "permissions": "0644", "content": _jupyter_unit(ssh_user, jupyter_token)}
        ],
        "runcmd": runcmd,
    }


def _jupyter_unit(ssh_user: str, jupyter_token: str) -> str:
    return (
        "[Unit]\n"
        "Description=Jupyter server of the GPU portal\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        f"User={ssh_user}\n"
        f"WorkingDirectory=/home/{ssh_user}\n"
        f"ExecStart={JUPYTER_VENV}/bin/jupyter lab --no-browser --ip=0.0.0.0 --port={JUPYTER_PORT} "
        f"--IdentityProvider.token={jupyter_token}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def merge_cloud_init_extra(document: dict, extra: str) -> dict:
    """The portal's cloud-config with the customer's extra keys merged in (a new dict).

    Lists the portal also sets (packages, runcmd, write_files …) are appended to; new keys are added.
    Raises ValueError when the extra is not a YAML mapping, sets a reserved key, writes over the
    Jupyter unit, or changes a non-list key the portal sets."""
    merged = deepcopy(document)
    if not extra or not extra.strip():
        return merged
    try:
        parsed = yaml.safe_load(extra)
    except yaml.YAMLError as exc:
        raise ValueError(f"The extra cloud-init is not valid YAML: {exc}") from exc
    if parsed is None:
        return merged
    if not isinstance(parsed, dict):
        raise ValueError(
            f"The extra cloud-init must be a YAML mapping of cloud-config keys, not a {type(parsed).__name__}."
        )
    for key, value in parsed.items():
        if not isinstance(key, str):
            raise ValueError(f"The extra cloud-init has a key that is not a string: {key!r}.")
        if key in RESERVED_CLOUD_INIT_KEYS:
            raise ValueError(
                f"The extra cloud-init may not set '{key}': the portal creates the login user and its SSH keys."
            )
        if key == "write_files":
            _refuse_jupyter_overrides(value)
        if key not in merged:
            merged[key] = deepcopy(value)
        elif isinstance(merged[key], list):
            if not isinstance(value, list):
                raise ValueError(f"'{key}' in the extra cloud-init must be a list; it is added to the portal's.")
            merged[key] = merged[key] + deepcopy(value)
        else:
            raise ValueError(f"The extra cloud-init may not change '{key}', which the portal sets.")
    return merged


def _refuse_jupyter_overrides(write_files) -> None:
    if not isinstance(write_files, list):
        return  # the list check in the caller reports it
    for entry in write_files:
        path = entry.get("path", "") if isinstance(entry, dict) else ""
        # Also refuses drop-ins (<unit>.d/…) and spellings such as /etc//systemd/./system/<unit>.
        if isinstance(path, str) and posixpath.normpath("/" + path.lstrip("/")).startswith(JUPYTER_UNIT_PATH):
            raise ValueError(f"The extra cloud-init may not write {path}: the portal manages the Jupyter service.")


# --- YAML ---------------------------------------------------------------------------------------


class _ReadableDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (cloud-config, systemd units) as literal blocks, so rendered
    manifests read the way the guest will see them."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ReadableDumper.add_representer(str, _represent_str)


def to_yaml(data) -> str:
    """One YAML document, keys in the order the builders wrote them."""
    return yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, default_flow_style=False, width=4096)


def to_yaml_documents(objects: list[dict]) -> str:
    """Several objects as a multi-document YAML stream (what `kubectl apply -f -` reads)."""
    return yaml.dump_all(objects, Dumper=_ReadableDumper, sort_keys=False, default_flow_style=False, width=4096)


# --- Adapters from the ORM (the only functions here that query the database) ---------------------


def tenant_shape(tenant) -> TenantShape:
    quota = tenant.quota
    gpus = {row.gpu_model.resource_name: row.limit for row in tenant.gpu_quotas.select_related("gpu_model")}
    return TenantShape(
        slug=tenant.slug,
        namespace=tenant_namespace(tenant.slug),
        vcpus=quota.vcpus,
        memory_gib=quota.memory_gib,
        hugepages_gib=quota.hugepages_gib,
        vms=quota.vms,
        storage_gib=quota.storage_gib,
        gpus=gpus,
    )


def plan_shape(plan: Plan, profile: str | None = None) -> PlanShape:
    """The plan as the builders need it; `profile` renders it with another workload profile."""
    return PlanShape(
        code=plan.code,
        profile=profile or plan.profile,
        gpu_resource=plan.gpu_model.resource_name if plan.gpu_model_id else "",
        gpu_count=plan.gpu_count,
        sockets=plan.sockets,
        cores=plan.cores,
        threads=plan.threads,
        memory_gib=plan.memory_gib,
        hugepage_size=plan.hugepage_size,
        disk_gib=plan.disk_gib,
        data_disk_gib=plan.data_disk_gib,
        log_disk_gib=plan.log_disk_gib,
        cpu_overcommit=plan.cpu_overcommit,
        image=plan.image,
    )


def vm_shape(vm: VirtualMachine, jupyter_token: str) -> VmShape:
    """The VM as ordered plus its active scale-ups."""
    extras = vm.scale_ups.filter(state=ScaleUpState.ACTIVE).aggregate(
        gpus=Sum("extra_gpus"), vcpus=Sum("extra_vcpus"), memory=Sum("extra_memory_gib")
    )
    return VmShape(
        tenant_slug=vm.tenant.slug,
        namespace=tenant_namespace(vm.tenant.slug),
        vm_id=str(vm.id),
        order_id=str(vm.order_id),
        name=vm_resource_name(vm),
        plan=plan_shape(vm.plan),
        ssh_public_keys=list(vm.ssh_public_keys),
        ssh_user=vm.ssh_user,
        cloud_init_extra=vm.cloud_init_extra,
        jupyter_token=jupyter_token,
        extra_gpus=extras["gpus"] or 0,
        extra_vcpus=extras["vcpus"] or 0,
        extra_memory_gib=extras["memory"] or 0,
        running=vm.state not in (VmState.STOPPING, VmState.STOPPED),
    )
