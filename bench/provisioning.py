"""1,000 concurrent VM orders across 100 tenants on PostgreSQL with the local backend.

Prints how many orders ran, were queued or refused (and why), checks that no tenant quota and no
node's capacity was ever exceeded and that no order was lost, and the portal's own overhead per
order — from the order call to the manifests handed to the backend — as median and p99.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/portal_bench .venv/bin/python bench/provisioning.py

The database named in DATABASE_URL is dropped and created afresh.
"""

import os
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal_bench")
os.environ["CELERY_TASK_ALWAYS_EAGER"] = "1"
os.environ["PORTAL_LOCAL_PROVISION_SECONDS"] = "0"
os.environ["PORTAL_LOCAL_BOOT_SECONDS"] = "0"

TENANTS = 100
ORDERS = 1000
WORKERS = int(os.environ.get("BENCH_WORKERS", "16"))


def recreate_database() -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def inventory(tmp: Path) -> Path:
    """A cluster big enough that most orders fit: 60 A100 nodes, 40 T4 nodes, 4 database nodes."""
    lines = ["nodes:"]
    for n in range(60):
        lines.append(
            f"  - {{name: a100-{n}, pool: high_end, gpu: nvidia.com/GA100_A100_PCIE_80GB, gpus: 8, "
            "cpus: 128, memory_gib: 1024, hugepages_2mi_gib: 512}"
        )
    for n in range(40):
        lines.append(
            f"  - {{name: t4-{n}, pool: general, gpu: nvidia.com/TU104GL_Tesla_T4, gpus: 4, "
            "vgpu_slices_per_gpu: 8, cpus: 48, memory_gib: 256}"
        )
    for n in range(4):
        lines.append(
            f"  - {{name: db-{n}, pool: high_end, gpus: 0, cpus: 64, memory_gib: 512, "
            "hugepages_1gi_gib: 384, dedicated: true}"
        )
    path = tmp / "bench-inventory.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    os.environ["PORTAL_LOCAL_INVENTORY"] = str(inventory(tmp))
    import logging

    import django

    django.setup()
    logging.getLogger("celery").setLevel(logging.WARNING)
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        sys.exit("bench/provisioning.py needs PostgreSQL: set DATABASE_URL=postgres://…")
    recreate_database()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from django.core.exceptions import ValidationError
    from django.db import connection
    from django.db.models import Count, Sum

    from provisioning import services
    from provisioning.backends import get_backend
    from provisioning.models import Node, Placement, Plan, VirtualMachine, VmState
    from tenants import services as tenant_services
    from tenants.models import GpuQuota, QuotaReservation, TenantQuota, User

    services.inventory_sync()
    staff = User.objects.create_user(email="staff@bench.local", is_staff=True)
    key_text = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    memberships, keys = [], []
    for t in range(TENANTS):
        owner = User.objects.create_user(email=f"owner{t}@bench.local")
        tenant = tenant_services.tenant_create(name=f"Bench {t}", owner=owner)
        if t % 2 == 0:  # half the tenants get room for 8 VMs; the others keep Standard quotas
            tenant_services.quota_update(
                tenant=tenant,
                actor=staff,
                limits={"vms": 12, "vcpus": 256, "memory_gib": 2048, "hugepages_gib": 1024, "storage_gib": 20000},
                gpus={"A100": 16, "T4": 8},
            )
        membership = tenant.memberships.get()
        memberships.append(membership)
        keys.append(
            tenant_services.ssh_key_add(membership=membership, actor=owner, name="k", public_key=key_text + f" t{t}").pk
        )

    # Time from the order call to the manifests handed to the backend, per order.
    handed = {}
    backend = get_backend()
    real_apply = backend.apply_vm

    def timed_apply(spec):
        handed.setdefault(spec.ref, time.perf_counter())
        return real_apply(spec)

    backend.apply_vm = timed_apply
    plans = list(Plan.objects.filter(code__in=["a100-2x-training", "a100-1x-general", "t4-1x-general", "db-64g"]))
    outcomes, overhead = Counter(), []
    lock = threading.Lock()

    def one(i: int) -> None:
        t = i % TENANTS
        plan = plans[i % len(plans)]
        name = f"vm-{i}"
        started = time.perf_counter()
        try:
            vm = services.vm_order(
                membership=memberships[t],
                actor=memberships[t].user,
                plan=plan,
                name=name,
                billing_mode="monthly",
                ssh_key_ids=[keys[t]],
                wait_if_full=True,
            )
            result = "waiting in line" if vm.state == VmState.QUEUED else "accepted and handed to the cluster"
        except ValidationError as exc:
            result = "refused: " + next(iter(exc.message_dict)) if hasattr(exc, "error_dict") else "refused"
        finally:
            connection.close()
        with lock:
            outcomes[result] += 1
            ref = services.vm_ref(VirtualMachine(tenant=memberships[t].tenant, name=name))
            if ref in handed:
                overhead.append(handed[ref] - started)

    # Uncontended first: the portal's own cost of one order, then the same under 16-way contention.
    for i in range(ORDERS, ORDERS + 50):
        one(i)
    alone = sorted(overhead)
    overhead.clear()
    outcomes.clear()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(one, range(ORDERS)))
    wall = time.perf_counter() - began

    # Invariants: no quota exceeded, no node over capacity, every accepted order accounted for.
    over_quota = 0
    for quota in TenantQuota.objects.all():
        held = QuotaReservation.objects.filter(tenant_id=quota.tenant_id, released_at__isnull=True).aggregate(
            vms=Sum("vms"), vcpus=Sum("vcpus"), memory=Sum("memory_gib"), hugepages=Sum("hugepages_gib")
        )
        over_quota += (held["vms"] or 0) > quota.vms or (held["vcpus"] or 0) > quota.vcpus
        over_quota += (held["memory"] or 0) > quota.memory_gib or (held["hugepages"] or 0) > quota.hugepages_gib
    for gpu_quota in GpuQuota.objects.select_related("gpu_model"):
        used = (
            QuotaReservation.objects.filter(
                tenant_id=gpu_quota.tenant_id, released_at__isnull=True, gpu_model=gpu_quota.gpu_model
            ).aggregate(n=Sum("gpus"))["n"]
            or 0
        )
        over_quota += used > gpu_quota.limit
    over_capacity = 0
    for node in Node.objects.annotate(used_gpus=Sum("placements__gpus"), used_cpus=Sum("placements__cpus")):
        over_capacity += (node.used_gpus or 0) > node.gpus or (node.used_cpus or 0) > node.cpus
    training_per_node = (
        Placement.objects.filter(profile="ai_training", released_at__isnull=True)
        .values("node")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    accepted = sum(n for state, n in outcomes.items() if not state.startswith("refused"))
    lost = accepted + len(alone) - VirtualMachine.objects.count()
    running = VirtualMachine.objects.filter(state=VmState.PROVISIONING).count()

    overhead.sort()
    print(
        f"orders: {ORDERS} from {TENANTS} tenants, {WORKERS} concurrent workers, wall {wall:.1f} s "
        f"({ORDERS / wall:.0f} orders/s)"
    )
    for state, n in sorted(outcomes.items()):
        print(f"  {state}: {n}")
    print(f"handed to the backend: {len(overhead)} (now provisioning: {running})")
    for label, times in (("one at a time (50 orders)", alone), (f"{WORKERS} concurrent", overhead)):
        p99 = times[max(int(len(times) * 0.99) - 1, 0)]
        print(
            f"portal overhead, order → manifests handed to backend, {label}: "
            f"median {statistics.median(times) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        )
    print(
        f"quota limits exceeded: {over_quota}; nodes over capacity: {over_capacity}; "
        f"nodes with two training VMs: {training_per_node}; orders lost: {lost}"
    )
    if over_quota or over_capacity or training_per_node or lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
