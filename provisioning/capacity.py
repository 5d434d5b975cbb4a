"""Cluster capacity as the portal accounts for it: nodes minus active placements.

The portal places every VM itself before the cluster sees it, so it never promises capacity it
does not have, can say how many of each plan could start right now, and can keep an order
waiting in line instead of letting it time out in the cluster.
"""

import math
from dataclasses import dataclass

from django.db.models import Count, Q, Sum
from django.utils import timezone

from provisioning.models import Node, Placement, Plan, Pool, Profile

# Memory the launcher pod needs besides hugepage-backed guest memory (QEMU, virt-launcher).
HUGEPAGE_VM_OVERHEAD_GIB = 2


@dataclass(frozen=True)
class Demand:
    profile: str
    gpu_model_id: int | None
    gpus: int
    cpus: int  # physical CPUs requested (after overcommit)
    memory_gib: int
    hugepage_size: str  # "", "2Mi" or "1Gi"
    hugepages_gib: int


def plan_demand(plan: Plan, *, extra_gpus: int = 0, extra_vcpus: int = 0, extra_memory_gib: int = 0) -> Demand:
    vcpus = plan.vcpus + extra_vcpus
    memory = plan.memory_gib + extra_memory_gib
    hugepages = memory if plan.hugepage_size else 0
    return Demand(
        profile=plan.profile,
        gpu_model_id=plan.gpu_model_id,
        gpus=plan.gpu_count + extra_gpus if plan.gpu_count else 0,
        cpus=math.ceil(vcpus / plan.cpu_overcommit),
        memory_gib=HUGEPAGE_VM_OVERHEAD_GIB if hugepages else memory,
        hugepage_size=plan.hugepage_size,
        hugepages_gib=hugepages,
    )


@dataclass
class NodeFree:
    node: Node
    gpus: int  # GPUs with no slice in use: what a VM or a whole-GPU task can take
    slices_used: dict[int, int]  # gpu index → slices in use
    cpus: int
    memory_gib: int
    hugepages_2mi_gib: int
    hugepages_1gi_gib: int
    has_training_vm: bool

    def whole_gpu_slots(self, count: int) -> list[list[int]]:
        """The first `count` GPUs with nothing on them, each holding all its slices."""
        free = [index for index in range(self.node.gpus) if not self.slices_used.get(index)][:count]
        return [[index, self.node.vgpu_slices_per_gpu] for index in free]

    def fits(self, demand: Demand) -> int:
        """How many VMs of this demand fit on the node now (0 when it is not a candidate)."""
        node = self.node
        if not node.schedulable or node.pool == Pool.EDGE:
            return 0  # edge nodes serve inference tasks, not rented VMs
        if demand.gpus and node.gpu_model_id != demand.gpu_model_id:
            return 0
        if (demand.profile == Profile.DATABASE) != node.dedicated:
            return 0  # database VMs only on dedicated nodes, and nothing else there
        limits = [self.cpus // demand.cpus if demand.cpus else math.inf]
        if demand.gpus:
            limits.append(self.gpus // demand.gpus)
        if demand.memory_gib:
            limits.append(self.memory_gib // demand.memory_gib)
        if demand.hugepages_gib:
            pool = self.hugepages_2mi_gib if demand.hugepage_size == "2Mi" else self.hugepages_1gi_gib
            limits.append(pool // demand.hugepages_gib)
        count = int(min(limits))
        if demand.profile == Profile.AI_TRAINING:
            # Two training VMs never share a node (the manifest's anti-affinity says the same).
            count = 0 if self.has_training_vm else min(count, 1)
        return max(count, 0)


def free_capacity(nodes) -> list[NodeFree]:
    """Free capacity of the given nodes (a queryset), in three queries whatever their number."""
    nodes = list(nodes)
    slices_used: dict[int, dict[int, int]] = {}
    active = Placement.objects.filter(node__in=nodes, released_at__isnull=True)
    for node_id, slots in active.values_list("node_id", "gpu_slots"):
        if not slots:
            continue
        per_gpu = slices_used.setdefault(node_id, {})
        for index, slices in slots:
            per_gpu[index] = per_gpu.get(index, 0) + slices
    used = {
        row["node_id"]: row
        for row in Placement.objects.filter(node__in=nodes, released_at__isnull=True)
        .values("node_id")
        .annotate(
            gpus=Sum("gpus"),
            cpus=Sum("cpus"),
            memory_gib=Sum("memory_gib"),
            hugepages_2mi=Sum("hugepages_gib", filter=Q(hugepage_size="2Mi")),
            hugepages_1gi=Sum("hugepages_gib", filter=Q(hugepage_size="1Gi")),
            training=Count("id", filter=Q(profile=Profile.AI_TRAINING)),
        )
    }
    free = []
    for node in nodes:
        u = used.get(node.pk, {})
        busy = slices_used.get(node.pk, {})
        free.append(
            NodeFree(
                node=node,
                gpus=sum(1 for index in range(node.gpus) if not busy.get(index)),
                slices_used=busy,
                cpus=node.cpus - (u.get("cpus") or 0),
                memory_gib=node.memory_gib - (u.get("memory_gib") or 0),
                hugepages_2mi_gib=node.hugepages_2mi_gib - (u.get("hugepages_2mi") or 0),
                hugepages_1gi_gib=node.hugepages_1gi_gib - (u.get("hugepages_1gi") or 0),
                has_training_vm=bool(u.get("training")),
            )
        )
    return free


def availability(plans) -> dict[int, int]:
    """How many VMs of each plan the pools can start right now: plan id → count.

    Orders already waiting in line for a shape (GPU model and profile) come first, so they are
    taken off what a new order of that shape could get.
    """
    from provisioning.models import VirtualMachine, VmState

    free = free_capacity(Node.objects.filter(schedulable=True))
    waiting = {
        (row["plan__gpu_model_id"], row["plan__profile"]): row["n"]
        for row in VirtualMachine.objects.filter(state=VmState.QUEUED)
        .values("plan__gpu_model_id", "plan__profile")
        .annotate(n=Count("id"))
    }
    return {
        plan.pk: max(
            sum(n.fits(plan_demand(plan)) for n in free) - waiting.get((plan.gpu_model_id, plan.profile), 0), 0
        )
        for plan in plans
    }


def place(*, demand: Demand, holder_type: str, holder_id: str) -> Placement | None:
    """Hold capacity for one VM on the best-fitting node, or None when nothing fits.

    Call inside a transaction: candidate nodes are locked (in a fixed order) so concurrent
    placements queue here and never both take the last GPUs of a node.
    """
    candidates = Node.objects.filter(schedulable=True).exclude(pool=Pool.EDGE).order_by("pk")
    if demand.gpus:
        candidates = candidates.filter(gpu_model_id=demand.gpu_model_id)
    candidates = candidates.filter(dedicated=demand.profile == Profile.DATABASE)
    locked = list(candidates.select_for_update())
    fitting = [n for n in free_capacity(locked) if n.fits(demand)]
    if not fitting:
        return None
    # Pack: the node with the least room left that still fits keeps bigger holes free elsewhere.
    best = min(fitting, key=lambda n: (n.gpus, n.cpus, n.node.name))
    return Placement.objects.create(
        node=best.node,
        holder_type=holder_type,
        holder_id=str(holder_id),
        profile=demand.profile,
        gpus=demand.gpus,
        gpu_slots=best.whole_gpu_slots(demand.gpus),
        cpus=demand.cpus,
        memory_gib=demand.memory_gib,
        hugepage_size=demand.hugepage_size,
        hugepages_gib=demand.hugepages_gib,
    )


def release_placement(*, holder_type: str, holder_id: str) -> int:
    return Placement.objects.filter(holder_type=holder_type, holder_id=str(holder_id), released_at__isnull=True).update(
        released_at=timezone.now()
    )
