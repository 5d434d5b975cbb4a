"""The local backend: a cluster on this machine for the embedded default, demos and tests.

Nodes come from an inventory file. A VM's life advances with time the way a cluster's does
(disks import, the guest boots, it becomes ready), so the portal's reconciler, deadlines and
billing hooks are exercised exactly as against KubeVirt. When `jupyter_server` is installed
(the optional extra), each running VM gets a real Jupyter server with its secret token.
It is not a security boundary: production uses the kubevirt backend.
"""

import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import yaml
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from provisioning.backends.base import BackendError, NodeCapacity, Phase, TenantSpec, VmRef, VmSpec, VmStatus
from provisioning.models import LocalClusterVm

logger = logging.getLogger(__name__)

SSH_PORT_BASE = 22000
JUPYTER_PORT_BASE = 28000


def jupyter_available() -> bool:
    try:
        import jupyter_server  # noqa: F401
    except ImportError:
        return False
    return True


class LocalBackend:
    name = "local"

    def __init__(self, inventory: Path | None = None):
        self._inventory = inventory

    @property
    def inventory(self) -> Path:
        # Read the setting on each use: the backend instance is cached for the process.
        return Path(self._inventory or settings.PORTAL_LOCAL_INVENTORY)

    # --- cluster-wide -----------------------------------------------------------

    def ping(self) -> None:
        if not self.inventory.exists():
            raise BackendError(f"The local inventory file {self.inventory} is missing.")

    def list_nodes(self) -> list[NodeCapacity]:
        try:
            data = yaml.safe_load(self.inventory.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise BackendError(f"Cannot read the local inventory {self.inventory}: {exc}") from exc
        return [
            NodeCapacity(
                name=node["name"],
                pool=node["pool"],
                gpu_model_resource=node.get("gpu", ""),
                gpus=int(node.get("gpus", 0)),
                cpus=int(node["cpus"]),
                memory_gib=int(node["memory_gib"]),
                hugepages_2mi_gib=int(node.get("hugepages_2mi_gib", 0)),
                hugepages_1gi_gib=int(node.get("hugepages_1gi_gib", 0)),
                dedicated=bool(node.get("dedicated", False)),
                schedulable=bool(node.get("schedulable", True)),
                vgpu_slices_per_gpu=int(node.get("vgpu_slices_per_gpu", 1)),
                labels=dict(node.get("labels", {})),
            )
            for node in data.get("nodes", [])
        ]

    def ensure_tenant(self, spec: TenantSpec) -> None:
        # A namespace is implicit here; the objects are still built and validated by the caller.
        if not spec.namespace:
            raise BackendError("A tenant needs a namespace.")

    # --- VMs ----------------------------------------------------------------------

    def apply_vm(self, spec: VmSpec) -> None:
        vm_label = _vm_label(spec.manifests)
        with transaction.atomic():
            existing = (
                LocalClusterVm.objects.select_for_update()
                .filter(namespace=spec.ref.namespace, name=spec.ref.name)
                .first()
            )
            if existing is not None:
                existing.manifests = spec.manifests
                existing.jupyter_token = spec.jupyter_token
                existing.save(update_fields=["manifests", "jupyter_token"])
                return
            try:
                with transaction.atomic():
                    LocalClusterVm.objects.create(
                        namespace=spec.ref.namespace,
                        name=spec.ref.name,
                        vm_label=vm_label,
                        manifests=spec.manifests,
                        node_name=spec.node_name,
                        ssh_port=self._free_port(SSH_PORT_BASE, "ssh_port"),
                        jupyter_token=spec.jupyter_token,
                    )
            except IntegrityError:  # created by a racing worker: same outcome
                return
        self._start_jupyter(self._get(spec.ref))

    def start_vm(self, ref: VmRef) -> None:
        vm = self._get(ref)
        if not vm.running:
            vm.running = True
            vm.phase_since = timezone.now()
            vm.save(update_fields=["running", "phase_since"])
            self._start_jupyter(vm)

    def stop_vm(self, ref: VmRef) -> None:
        vm = self._get(ref)
        if vm.running:
            vm.running = False
            vm.phase_since = timezone.now()
            vm.save(update_fields=["running", "phase_since"])
            self._stop_jupyter(vm)

    def restart_vm(self, ref: VmRef) -> None:
        vm = self._get(ref)
        self._stop_jupyter(vm)
        vm.running = True
        vm.phase_since = timezone.now()
        vm.save(update_fields=["running", "phase_since"])
        self._start_jupyter(vm)

    def delete_vm(self, ref: VmRef) -> None:
        vm = LocalClusterVm.objects.filter(namespace=ref.namespace, name=ref.name).first()
        if vm is not None:
            self._stop_jupyter(vm)
            vm.delete()

    def vm_status(self, ref: VmRef) -> VmStatus:
        vm = LocalClusterVm.objects.filter(namespace=ref.namespace, name=ref.name).first()
        if vm is None:
            return VmStatus(phase=Phase.MISSING, reason="The VM does not exist in the cluster.")
        now = timezone.now()
        elapsed = (now - vm.phase_since).total_seconds()
        provision = settings.PORTAL_LOCAL_PROVISION_SECONDS
        boot = settings.PORTAL_LOCAL_BOOT_SECONDS
        common = {"node_name": vm.node_name, "ssh_host": settings.PORTAL_LOCAL_SSH_HOST, "ssh_port": vm.ssh_port}
        if vm.failure:
            return VmStatus(phase=Phase.FAILED, reason=vm.failure, **common)
        if not vm.running:
            phase = Phase.STOPPING if elapsed < boot / 2 else Phase.STOPPED
            return VmStatus(phase=phase, **common)
        if not vm.provisioned:
            if elapsed < provision:
                return VmStatus(phase=Phase.PROVISIONING, reason="Importing the disk image.", **common)
            # Disks are ready: from now on a (re)start only boots.
            LocalClusterVm.objects.filter(pk=vm.pk).update(
                provisioned=True, phase_since=vm.phase_since + timedelta(seconds=provision)
            )
            elapsed -= provision
        if elapsed < boot:
            return VmStatus(phase=Phase.STARTING, reason="The guest is booting.", **common)
        jupyter_url = f"http://{settings.PORTAL_LOCAL_SSH_HOST}:{vm.jupyter_port}/" if vm.jupyter_port else ""
        return VmStatus(
            phase=Phase.RUNNING,
            gpu_utilisation_percent=vm.gpu_utilisation_percent,
            jupyter_url=jupyter_url,
            **common,
        )

    def list_vms(self) -> list[VmRef]:
        return [VmRef(namespace=ns, name=name) for ns, name in LocalClusterVm.objects.values_list("namespace", "name")]

    # --- helpers --------------------------------------------------------------------

    def _get(self, ref: VmRef) -> LocalClusterVm:
        vm = LocalClusterVm.objects.filter(namespace=ref.namespace, name=ref.name).first()
        if vm is None:
            raise BackendError(f"The VM {ref.namespace}/{ref.name} does not exist in the cluster.", status=404)
        return vm

    @staticmethod
    def _free_port(base: int, field: str) -> int:
        used = set(LocalClusterVm.objects.exclude(**{f"{field}__isnull": True}).values_list(field, flat=True))
        port = base
        while port in used:
            port += 1
        return port

    def _start_jupyter(self, vm: LocalClusterVm) -> None:
        """A real Jupyter server for the VM when jupyter_server is installed; otherwise no Jupyter URL."""
        if not vm.jupyter_token or not jupyter_available():
            return
        ref = VmRef(namespace=vm.namespace, name=vm.name)
        token = vm.jupyter_token
        port = self._free_port(JUPYTER_PORT_BASE, "jupyter_port")
        workdir = Path(settings.MEDIA_ROOT) / "local-vms" / ref.namespace / ref.name
        workdir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.root_dir={workdir}",
                f"--IdentityProvider.token={token}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        LocalClusterVm.objects.filter(pk=vm.pk).update(jupyter_port=port, jupyter_pid=process.pid)
        vm.jupyter_port, vm.jupyter_pid = port, process.pid

    @staticmethod
    def _stop_jupyter(vm: LocalClusterVm) -> None:
        if vm.jupyter_pid:
            try:
                os.killpg(vm.jupyter_pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                logger.info("Jupyter server of %s was already gone", vm)
            LocalClusterVm.objects.filter(pk=vm.pk).update(jupyter_pid=None, jupyter_port=None)
            vm.jupyter_pid = vm.jupyter_port = None


def _vm_label(manifests: list[dict]) -> str:
    for obj in manifests:
        label = obj.get("metadata", {}).get("labels", {}).get(f"{settings.PORTAL_LABEL_PREFIX}/vm")
        if label:
            return label
    return ""
