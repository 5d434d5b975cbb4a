"""The scheduling policy, as pure functions over plain dataclasses (no database):
who runs next, where, and whom a core task may preempt.

hosting.services loads the queue and the nodes into these dataclasses, calls `plan_pass`, and
applies the decisions under locks; bench/scheduler.py calls the same functions on simulated
pools, so what is measured is what runs.

The public surface:

* `effective_priority`, `dominant_share`, `order_key`, `ordered`: the queue order.
* `NodeIndex`, `place`: where one task goes (best fit, packing GPUs and vGPU slices by model).
* `plan_pass`: one scheduling pass — admission (quota, payment, capacity), placement, backfill
  with a starvation guard, and preemption for Diamond tasks. It does not touch its inputs.
* `apply`, `release`: keep a list of `NodeState` in step with assignments and finished tasks
  (the simulator uses them; the service reloads nodes from the database instead).

Queue order (the key of `order_key`, most significant first):

1. tier, Diamond > Gold > Standard;
2. holders of an active compute package ahead of those without;
   (then the starvation guard's pick, if any: see `starving_heads` and `plan_pass` step 6;)
3. effective priority, high first: the task's own priority (0–9) plus one step per
   `ageing_seconds` it has waited, capped at `AGED_PRIORITY_CAP` (10);
4. the tenant's dominant share (DRF over GPUs, vCPUs and memory), low first, counting what it runs
   now *and what this pass has already given it*, so two equal tenants alternate within a pass;
5. waited longest first, then submission order, then task id (a total, deterministic order).

Why ageing is confined to the (tier, package) class: tiers and packages are what customers pay
for, so an old Standard task must not overtake a fresh Diamond one, and an old task without a
package must not overtake a package holder; those two keys sit *above* the effective priority, so
ageing cannot cross them whatever the cap. Within a class, ageing lifts a task across priorities:
after `AGED_PRIORITY_CAP - priority` steps it ranks above every fresh task (whose priority is at
most 9). The cap is one above the highest priority rather than unbounded so that, among tasks that
have all aged to the top, DRF still decides between tenants (an unbounded age would turn the top of
the queue into plain FIFO and let one tenant's backlog of old tasks crowd out the others). No task
starves within its class: once aged to the cap it is outranked only by other capped tasks; among
those a tenant's DRF share can only fall while it gets nothing (its running tasks end within the
72-hour limit), and equal shares fall back to waited-longest-first. Across classes, higher tiers
and package holders come first by design; the backfill reservation below keeps a lower class from
being starved by its own peers, not by the classes that paid to go first.
"""

import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from math import comb

DIAMOND = 3
GOLD = 2
STANDARD = 1
MAX_PRIORITY = 9
AGED_PRIORITY_CAP = MAX_PRIORITY + 1
GENERAL_POOL = "general"

DEFAULT_AGEING_SECONDS = 600.0
# A task that has waited this long and still does not fit stops backfilling of its GPU model.
DEFAULT_RESERVE_AFTER_SECONDS = 2 * 3600.0
# Most tasks one pass asks to stop; the next pass goes on (victims stop gracefully, one wave at a time).
DEFAULT_MAX_PREEMPTIONS = 64
# How ordered() projects a vGPU slice into DRF before it knows the GPU (the conservative 1:4 end).
PROJECTED_SLICES_PER_GPU = 4

_COMBINATION_BUDGET = 2048  # victim sets tried on one node before falling back to greedy-then-prune
_UNFIT_MEMO_SIZE = 64  # remembered unplaceable shapes per (kind, model)
_EPS = 1e-9

REASON_CANNOT_PAY = "cannot pay: no balance or package credit left"
REASON_QUOTA_TASKS = "quota: concurrent tasks"
REASON_QUOTA_VCPUS = "quota: vCPUs"
REASON_QUOTA_MEMORY = "quota: memory"
REASON_NO_CAPACITY = "no capacity"
REASON_PASS_LIMIT = "not considered: this pass's assignment limit was reached"


@dataclass(frozen=True)
class QueuedTask:
    id: str
    tenant_id: int
    tier_rank: int  # 3 Diamond, 2 Gold, 1 Standard
    holds_package: bool  # an active compute package with credit left
    priority: int  # the task's own priority within its tenant, 0–9
    waited_seconds: float  # since it first queued (kept across preemption)
    gpu_model: str | None  # GpuModel code; None for CPU-only tasks
    gpus: int  # whole GPUs
    vgpu_slices: int  # or slices of one GPU on the general pool
    vcpus: int
    memory_gib: int
    submitted_order: int = 0  # tie-breaker: earlier submission first


@dataclass
class GpuSlot:
    index: int
    slices_total: int  # vgpu slices this GPU offers (1 = passthrough only)
    slices_used: int = 0

    @property
    def whole_free(self) -> bool:
        return self.slices_used == 0


@dataclass
class NodeState:
    name: str
    pool: str
    gpu_model: str | None
    gpus: list[GpuSlot]
    cpus_free: int
    memory_free_gib: int
    schedulable: bool = True


@dataclass(frozen=True)
class RunningTask:
    id: str
    tenant_id: int
    tier_rank: int
    preemptible: bool
    node: str
    gpu_model: str | None
    gpu_indices: tuple[tuple[int, int], ...]  # (gpu index, slices held)
    vcpus: int
    memory_gib: int
    started_at: float = 0.0  # any clock, larger = more recent: preemption spares the longest-running
    stopping: bool = False  # already asked to stop (preempted or cancelled): its resources are on their way


@dataclass(frozen=True)
class Assignment:
    task_id: str
    node: str
    gpu_indices: tuple[tuple[int, int], ...]  # (gpu index, slices); a whole GPU holds all its slices


@dataclass(frozen=True)
class Preemption:
    victim_id: str
    for_task_id: str


@dataclass
class PassResult:
    assignments: list[Assignment] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    # Tasks that could not start, with why (for the customer's "estimated start" and queue page).
    waiting: dict[str, str] = field(default_factory=dict)
    # Where each Diamond task that preempts will go once its victims have stopped (not started yet;
    # a later pass places it, normally there, since it is first in the queue).
    pending: list[Assignment] = field(default_factory=list)
    # Capacity reserved this pass against backfill: "A100" (or "CPU") → the task it is held for.
    reservations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant runs now, for dominant-resource fair share."""

    gpus: float = 0.0
    vcpus: int = 0
    memory_gib: int = 0


@dataclass(frozen=True)
class Limits:
    """A tenant's room for tasks: concurrent tasks and GPUs per model still free in its quota.

    A model missing from `gpus_free` has no room (0). A vGPU slice counts as its fraction of the GPU
    it lands on. `vcpus_free` / `memory_free_gib` of None mean "not limited here".
    """

    tasks_free: int
    gpus_free: dict[str, int]  # GpuModel code → GPUs free
    vcpus_free: int | None = None
    memory_free_gib: int | None = None


# --------------------------------------------------------------------------------------------
# Order


def effective_priority(task: QueuedTask, ageing_seconds: float) -> int:
    """The task's priority plus one per `ageing_seconds` waited, capped at AGED_PRIORITY_CAP.

    `ageing_seconds` <= 0 turns ageing off. See the module docstring for why the cap is 10 and why
    ageing never crosses tiers or package status.
    """
    if ageing_seconds <= 0 or task.priority >= AGED_PRIORITY_CAP:
        return task.priority
    steps = int(max(task.waited_seconds, 0.0) // ageing_seconds)
    return min(task.priority + steps, AGED_PRIORITY_CAP)


def _dominant(gpus: float, vcpus: float, memory: float, totals: TenantUsage) -> float:
    share = 0.0
    if totals.gpus > 0:
        share = gpus / totals.gpus
    if totals.vcpus > 0:
        share = max(share, vcpus / totals.vcpus)
    if totals.memory_gib > 0:
        share = max(share, memory / totals.memory_gib)
    return share


def dominant_share(usage: TenantUsage, cluster_totals: TenantUsage) -> float:
    """max(gpus / total gpus, vcpus / total vcpus, memory / total memory); a zero total is ignored."""
    return _dominant(usage.gpus, usage.vcpus, usage.memory_gib, cluster_totals)


def order_key(
    task: QueuedTask, *, usage_share: float, now_ageing_seconds_per_step: float, promoted: bool = False
) -> tuple:
    """Sort key (ascending = runs first) for a task whose tenant's dominant share is `usage_share`.

    `now_ageing_seconds_per_step` is the ageing step in seconds; `promoted` marks the task the
    starvation guard has put first in its class (see `starving_heads`). Sorting by this key with
    fixed shares gives the order `ordered` starts from; `ordered` and `plan_pass` additionally
    raise a tenant's share as it is given tasks.
    """
    return (
        -task.tier_rank,
        -int(task.holds_package),
        -int(promoted),
        -effective_priority(task, now_ageing_seconds_per_step),
        usage_share,
        -task.waited_seconds,
        task.submitted_order,
        task.id,
    )


def capacity_label(task: QueuedTask) -> str:
    """What a task competes for, for the starvation guard: its GPU model, or "CPU"."""
    if task.gpus > 0 or task.vgpu_slices > 0:
        return task.gpu_model or "any GPU"
    return "CPU"


def starving_heads(tasks: Iterable[QueuedTask], reserve_after_seconds: float | None) -> set[str]:
    """The starvation guard's picks: for each (tier, package, capacity label), the task that has
    waited longest, if it has waited at least `reserve_after_seconds`. O(n).

    These go first within their (tier, package) class, ahead of priority and DRF, and if one does
    not fit, `plan_pass` reserves its capacity label for it. Only the single oldest per label is
    promoted, and it stays the oldest until it runs, so the reservation does not wander from task
    to task between passes; everything else keeps the priority/DRF order.
    """
    if reserve_after_seconds is None:
        return set()
    oldest: dict[tuple, QueuedTask] = {}
    for task in tasks:
        if reserve_after_seconds is not None and task.waited_seconds >= reserve_after_seconds:
            key = (task.tier_rank, task.holds_package, capacity_label(task))
            cur = oldest.get(key)
            if cur is None or _within_tenant(task) < _within_tenant(cur):
                oldest[key] = task
    return {task.id for task in oldest.values()}


def _within_tenant(task: QueuedTask) -> tuple:
    return (-task.waited_seconds, task.submitted_order, task.id)


class _FairQueue:
    """The queue in scheduling order, with DRF shares that move while it is consumed.

    Tasks are grouped by (band, tenant), band = (tier, package, promoted, effective priority);
    each group is sorted once (waited longest first). One heap holds the head of every group, keyed
    by (band, tenant's share when pushed, head's age, submission, id). Shares only grow during a
    pass, so a popped entry whose share is stale is pushed back with the current share (lazy
    update); otherwise its head is the next task. Cost: O(n log n) to build, O(log g) per pop plus
    one re-push per group of a tenant each time that tenant is charged.
    """

    def __init__(
        self,
        tasks: Iterable[QueuedTask],
        usage: Mapping[int, TenantUsage],
        totals: TenantUsage,
        ageing: float,
        promoted: frozenset[str] | set[str] = frozenset(),
    ):
        self._totals = totals
        self._used: dict[int, list[float]] = {}
        self._share: dict[int, float] = {}
        groups: dict[tuple, list[QueuedTask]] = {}
        for task in tasks:
            band = (
                -task.tier_rank,
                -int(task.holds_package),
                -int(task.id in promoted),
                -effective_priority(task, ageing),
            )
            key = (band, task.tenant_id)
            members = groups.get(key)
            if members is None:
                groups[key] = [task]
            else:
                members.append(task)
        self._tasks: list[list[QueuedTask]] = []
        self._pos: list[int] = []
        self._tenant: list[int] = []
        heap = []
        for (band, tenant), members in groups.items():
            if tenant not in self._share:
                now = usage.get(tenant) or TenantUsage()
                self._used[tenant] = [float(now.gpus), float(now.vcpus), float(now.memory_gib)]
                self._share[tenant] = _dominant(*self._used[tenant], totals)
            if len(members) > 1:
                members.sort(key=_within_tenant)
            gi = len(self._tasks)
            self._tasks.append(members)
            self._pos.append(0)
            self._tenant.append(tenant)
            head = members[0]
            heap.append((band, self._share[tenant], -head.waited_seconds, head.submitted_order, head.id, gi))
        heapq.heapify(heap)
        self._heap = heap

    def share(self, tenant: int) -> float:
        return self._share.get(tenant, 0.0)

    def pop(self) -> QueuedTask | None:
        heap = self._heap
        while heap:
            entry = heap[0]
            band, pushed, gi = entry[0], entry[1], entry[5]
            share = self._share[self._tenant[gi]]
            if share > pushed:
                heapq.heapreplace(heap, (band, share, entry[2], entry[3], entry[4], gi))
                continue
            members = self._tasks[gi]
            pos = self._pos[gi]
            task = members[pos]
            pos += 1
            self._pos[gi] = pos
            if pos < len(members):
                nxt = members[pos]
                heapq.heapreplace(heap, (band, share, -nxt.waited_seconds, nxt.submitted_order, nxt.id, gi))
            else:
                heapq.heappop(heap)
            return task
        return None

    def __iter__(self) -> Iterator[QueuedTask]:
        while (task := self.pop()) is not None:
            yield task

    def charge(self, tenant: int, gpus: float, vcpus: float, memory: float) -> None:
        used = self._used.setdefault(tenant, [0.0, 0.0, 0.0])
        used[0] += gpus
        used[1] += vcpus
        used[2] += memory
        self._share[tenant] = _dominant(used[0], used[1], used[2], self._totals)


def _projected_gpus(task: QueuedTask) -> float:
    if task.gpus > 0:
        return float(task.gpus)
    return task.vgpu_slices / PROJECTED_SLICES_PER_GPU


def ordered(
    tasks: Iterable[QueuedTask],
    usage: Mapping[int, TenantUsage],
    cluster_totals: TenantUsage,
    ageing_seconds: float = DEFAULT_AGEING_SECONDS,
    reserve_after_seconds: float | None = None,
) -> list[QueuedTask]:
    """The queue in scheduling order, as if every task were admitted in turn.

    Each task taken charges its tenant's DRF share with its own demand (a vGPU slice projected as
    1/PROJECTED_SLICES_PER_GPU of a GPU), so between equal tenants the order alternates. `plan_pass`
    walks the same order but charges only what it actually assigns. Pass the same
    `reserve_after_seconds` as `plan_pass` to include the starvation guard's promotions (None: none).
    O(n log n).
    """
    tasks = list(tasks)
    fair = _FairQueue(tasks, usage, cluster_totals, ageing_seconds, starving_heads(tasks, reserve_after_seconds))
    out = []
    for task in fair:
        out.append(task)
        fair.charge(task.tenant_id, _projected_gpus(task), task.vcpus, task.memory_gib)
    return out


# --------------------------------------------------------------------------------------------
# Placement


def _whole_picks(node: NodeState, used: list[int], count: int) -> list[tuple[int, int]] | None:
    free = [pos for pos in range(len(node.gpus)) if used[pos] == 0]
    if len(free) < count:
        return None
    # Passthrough-only GPUs first, so GPUs that can be sliced stay available to slices.
    free.sort(key=lambda pos: (node.gpus[pos].slices_total, pos))
    return [(pos, node.gpus[pos].slices_total) for pos in free[:count]]


def _slice_node(task: QueuedTask, node: NodeState) -> bool:
    return node.pool == GENERAL_POOL and (task.gpu_model is None or node.gpu_model == task.gpu_model)


def _picks_on(
    task: QueuedTask, node: NodeState, used: list[int], cpus: int, memory: int
) -> list[tuple[int, int]] | None:
    """Where on this node (GPU list positions and slices) the task would go, given a GPU usage
    vector and free CPU/memory; None when it does not fit. The same rules as NodeIndex."""
    if cpus < task.vcpus or memory < task.memory_gib:
        return None
    if task.gpus > 0:
        if task.gpu_model is not None and node.gpu_model != task.gpu_model:
            return None
        return _whole_picks(node, used, task.gpus)
    if task.vgpu_slices > 0:
        if not _slice_node(task, node):
            return None
        need = task.vgpu_slices
        best = None
        for pos, slot in enumerate(node.gpus):
            room = slot.slices_total - used[pos]
            if slot.slices_total > 1 and room >= need:
                key = (used[pos] == 0, room - need, pos)  # partly used GPUs first, then tightest
                if best is None or key < best:
                    best = key
        return None if best is None else [(best[2], need)]
    return []


def _shape(task: QueuedTask) -> tuple[tuple, tuple[int, int, int]]:
    if task.gpus > 0:
        return ("whole", task.gpu_model), (task.gpus, task.vcpus, task.memory_gib)
    if task.vgpu_slices > 0:
        return ("slices", task.gpu_model), (task.vgpu_slices, task.vcpus, task.memory_gib)
    return ("cpu", None), (0, task.vcpus, task.memory_gib)


def _dominated(memo: list[tuple[int, int, int]], shape: tuple[int, int, int]) -> bool:
    return any(f[0] <= shape[0] and f[1] <= shape[1] and f[2] <= shape[2] for f in memo)


def _remember(memo: list[tuple[int, int, int]], shape: tuple[int, int, int]) -> None:
    memo[:] = [f for f in memo if not (shape[0] <= f[0] and shape[1] <= f[1] and shape[2] <= f[2])]
    memo.append(shape)
    if len(memo) > _UNFIT_MEMO_SIZE:
        del memo[0]


class NodeIndex:
    """The schedulable nodes with their free capacity bucketed, so a placement looks at few nodes.

    * whole GPUs: per GPU model, buckets by the node's count of untouched GPUs (slices_used == 0);
      a task needing g GPUs scans buckets g, g+1, … and takes the first node there whose CPU and
      memory fit — best fit on GPUs (least left over), first fit in node order within a bucket.
    * vGPU slices: per GPU model, general-pool GPUs with slices_total > 1, bucketed by free slices,
      partly used GPUs apart from untouched ones; a task needing s slices takes the partly used GPU
      with the fewest slices left that still holds s, else the tightest untouched one. A GPU never
      goes past slices_total; a whole GPU holds all its slices, so whole and sliced never mix.
    * CPU-only: nodes without GPUs first, then GPU nodes, each sorted by (free vCPUs, free memory):
      the node with the fewest vCPUs that still fit (best fit), found by bisection.

    It also remembers shapes (amount, vCPUs, memory) that found no room: capacity only shrinks
    while one index is used, so any task at least as large is refused without a scan. That keeps a
    pass over a long queue on a full cluster near O(1) per task.

    The index owns its NodeState objects: `place`/`commit` mutate them (GPU slices_used, cpus_free,
    memory_free_gib). `plan_pass` builds it over copies; `place()` over the caller's nodes.
    Building is O(nodes × GPUs per node); each commit re-buckets one node, O(GPUs + nodes) for the
    sorted CPU list (a memmove, microseconds at 1,000 nodes).
    """

    def __init__(self, nodes: Iterable[NodeState]):
        self.nodes: dict[str, NodeState] = {}
        self._gpu_pos: dict[str, dict[int, int]] = {}
        self.max_gpus: dict[str | None, int] = {}
        self.max_slices: dict[str | None, int] = {}
        for node in nodes:
            if not node.schedulable:
                continue
            if node.name in self.nodes:
                raise ValueError(f"duplicate node {node.name!r}")
            self.nodes[node.name] = node
            self._gpu_pos[node.name] = {slot.index: pos for pos, slot in enumerate(node.gpus)}
            if node.gpus:
                model = node.gpu_model
                self.max_gpus[model] = max(self.max_gpus.get(model, 0), len(node.gpus))
                if node.pool == GENERAL_POOL:
                    top = max(slot.slices_total for slot in node.gpus)
                    if top > 1:
                        self.max_slices[model] = max(self.max_slices.get(model, 0), top)
        self._whole: dict[str | None, list[dict[str, None]]] = {
            m: [{} for _ in range(n + 1)] for m, n in self.max_gpus.items()
        }
        self._partial: dict[str | None, list[dict[tuple[str, int], None]]] = {
            m: [{} for _ in range(n + 1)] for m, n in self.max_slices.items()
        }
        self._fresh: dict[str | None, list[dict[tuple[str, int], None]]] = {
            m: [{} for _ in range(n + 1)] for m, n in self.max_slices.items()
        }
        self._whole_at: dict[str, int] = {}
        self._slice_at: dict[tuple[str, int], tuple[bool, int]] = {}
        self._cpu: tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]] = ([], [])
        self._cpu_at: dict[str, tuple[int, tuple[int, int, str]]] = {}
        self._unfit: dict[tuple, list[tuple[int, int, int]]] = {}
        for node in self.nodes.values():
            self._add(node)

    # -- bookkeeping

    def _add(self, node: NodeState) -> None:
        name = node.name
        if node.gpus:
            free = sum(1 for slot in node.gpus if slot.slices_used == 0)
            self._whole[node.gpu_model][free][name] = None
            self._whole_at[name] = free
            if node.pool == GENERAL_POOL and node.gpu_model in self._partial:
                for pos, slot in enumerate(node.gpus):
                    room = slot.slices_total - slot.slices_used
                    if slot.slices_total > 1 and room > 0:
                        partial = slot.slices_used > 0
                        table = self._partial if partial else self._fresh
                        table[node.gpu_model][room][(name, pos)] = None
                        self._slice_at[(name, pos)] = (partial, room)
        which = 1 if node.gpus else 0
        entry = (node.cpus_free, node.memory_free_gib, name)
        insort(self._cpu[which], entry)
        self._cpu_at[name] = (which, entry)

    def _remove(self, node: NodeState) -> None:
        name = node.name
        if name in self._whole_at:
            del self._whole[node.gpu_model][self._whole_at.pop(name)][name]
            for pos in range(len(node.gpus)):
                at = self._slice_at.pop((name, pos), None)
                if at is not None:
                    table = self._partial if at[0] else self._fresh
                    del table[node.gpu_model][at[1]][(name, pos)]
        which, entry = self._cpu_at.pop(name)
        lst = self._cpu[which]
        del lst[bisect_left(lst, entry)]

    def gpu_position(self, node: str) -> dict[int, int]:
        """GPU index → position in node.gpus."""
        return self._gpu_pos[node]

    # -- queries

    def could_ever_fit(self, task: QueuedTask) -> bool:
        """Whether some schedulable node is big enough in GPUs if it were empty."""
        if task.gpus > 0:
            if task.gpu_model is None:
                return any(n >= task.gpus for n in self.max_gpus.values())
            return self.max_gpus.get(task.gpu_model, 0) >= task.gpus
        if task.vgpu_slices > 0:
            if task.gpu_model is None:
                return any(n >= task.vgpu_slices for n in self.max_slices.values())
            return self.max_slices.get(task.gpu_model, 0) >= task.vgpu_slices
        return bool(self.nodes)

    def known_unfit(self, task: QueuedTask) -> bool:
        kind, shape = _shape(task)
        memo = self._unfit.get(kind)
        return memo is not None and _dominated(memo, shape)

    def find(self, task: QueuedTask) -> tuple[str, list[tuple[int, int]]] | None:
        """The best-fit node and GPU picks (list positions, slices) for the task; changes nothing."""
        if self.known_unfit(task):
            return None
        if task.gpus > 0:
            hit = self._find_whole(task)
        elif task.vgpu_slices > 0:
            hit = self._find_slices(task)
        else:
            hit = self._find_cpu(task)
        if hit is None:
            kind, shape = _shape(task)
            _remember(self._unfit.setdefault(kind, []), shape)
        return hit

    def _find_whole(self, task: QueuedTask) -> tuple[str, list[tuple[int, int]]] | None:
        models = [task.gpu_model] if task.gpu_model is not None else list(self._whole)
        tables = [self._whole[m] for m in models if m in self._whole]
        top = max((len(t) for t in tables), default=0)
        for free in range(task.gpus, top):
            for table in tables:
                if free >= len(table):
                    continue
                for name in table[free]:
                    node = self.nodes[name]
                    if node.cpus_free >= task.vcpus and node.memory_free_gib >= task.memory_gib:
                        return name, _whole_picks(node, [s.slices_used for s in node.gpus], task.gpus)
        return None

    def _find_slices(self, task: QueuedTask) -> tuple[str, list[tuple[int, int]]] | None:
        models = [task.gpu_model] if task.gpu_model is not None else list(self._partial)
        need = task.vgpu_slices
        for tables in (self._partial, self._fresh):
            best = None
            for model in models:
                buckets = tables.get(model)
                if buckets is None:
                    continue
                for room in range(need, len(buckets)):
                    if best is not None and room - need >= best[0]:
                        break
                    hit = None
                    for name, pos in buckets[room]:
                        node = self.nodes[name]
                        if node.cpus_free >= task.vcpus and node.memory_free_gib >= task.memory_gib:
                            hit = (name, pos)
                            break
                    if hit is not None:
                        best = (room - need, hit)
                        break
            if best is not None:
                name, pos = best[1]
                return name, [(pos, need)]
        return None

    def _find_cpu(self, task: QueuedTask) -> tuple[str, list[tuple[int, int]]] | None:
        for lst in self._cpu:
            for i in range(bisect_left(lst, (task.vcpus,)), len(lst)):
                _cpus, memory, name = lst[i]
                if memory >= task.memory_gib:
                    return name, []
        return None

    # -- changes

    def commit(self, node_name: str, picks: list[tuple[int, int]], vcpus: int, memory_gib: int) -> tuple:
        """Take `picks` (GPU list position, slices) and CPU/memory on a node; returns the picks as
        (gpu index, slices). The caller has checked they fit."""
        node = self.nodes[node_name]
        self._remove(node)
        out = []
        for pos, slices in picks:
            slot = node.gpus[pos]
            slot.slices_used += slices
            out.append((slot.index, slices))
        node.cpus_free -= vcpus
        node.memory_free_gib -= memory_gib
        self._add(node)
        return tuple(out)

    def place(self, task: QueuedTask) -> tuple[str, tuple[tuple[int, int], ...]] | None:
        hit = self.find(task)
        if hit is None:
            return None
        name, picks = hit
        return name, self.commit(name, picks, task.vcpus, task.memory_gib)


def place(task: QueuedTask, nodes: "NodeIndex | Iterable[NodeState]") -> tuple[str, tuple[tuple[int, int], ...]] | None:
    """Place one task: (node name, ((gpu index, slices), …)) or None when nothing fits.

    Rules: whole GPUs only on untouched GPUs (slices_used == 0) of nodes of the task's model;
    vGPU slices (gpus == 0, vgpu_slices > 0) only on general-pool GPUs offering slices_total > 1,
    packed onto the most-used GPU that still has room, never past slices_total; CPU-only tasks on
    any node, CPU-only nodes first; always the best-fit node (least left after placement) so big
    holes stay whole, with cpus_free and memory_free_gib respected.

    On success the chosen NodeState is MUTATED (slices_used, cpus_free, memory_free_gib). Given a
    list, the index is built for this one call (O(nodes)); to place many tasks build one
    `NodeIndex(nodes)` and pass it, which keeps each placement cheap.
    """
    index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
    return index.place(task)


def apply(assignment: Assignment, task: QueuedTask, nodes: Mapping[str, NodeState]) -> None:
    """Mutate the assigned node as if the task had started there."""
    node = nodes[assignment.node]
    pos = {slot.index: i for i, slot in enumerate(node.gpus)}
    for index, slices in assignment.gpu_indices:
        node.gpus[pos[index]].slices_used += slices
    node.cpus_free -= task.vcpus
    node.memory_free_gib -= task.memory_gib


def release(task: RunningTask, nodes: Mapping[str, NodeState]) -> None:
    """Mutate the task's node as if it had stopped: give back its slices, CPUs and memory."""
    node = nodes[task.node]
    pos = {slot.index: i for i, slot in enumerate(node.gpus)}
    for index, slices in task.gpu_indices:
        slot = node.gpus[pos[index]]
        slot.slices_used = max(0, slot.slices_used - slices)
    node.cpus_free += task.vcpus
    node.memory_free_gib += task.memory_gib


# --------------------------------------------------------------------------------------------
# Preemption


def _victim_pref(task: RunningTask) -> tuple:
    return (task.tier_rank, -task.started_at, task.id)


def _set_key(victims: Iterable[RunningTask]) -> tuple:
    """Fewest victims, then lowest tiers, then the set whose oldest member started most recently."""
    victims = list(victims)
    if not victims:
        return (0, (), 0.0)
    return (
        len(victims),
        tuple(sorted((v.tier_rank for v in victims), reverse=True)),
        -min(v.started_at for v in victims),
    )


def _compatible(task: QueuedTask, node: NodeState) -> bool:
    if task.gpus > 0:
        return (task.gpu_model is None or node.gpu_model == task.gpu_model) and len(node.gpus) >= task.gpus
    if task.vgpu_slices > 0:
        return _slice_node(task, node) and any(slot.slices_total >= max(2, task.vgpu_slices) for slot in node.gpus)
    return True


def _same_kind(task: QueuedTask, node: NodeState) -> bool:
    """Whether the node serves this kind of task at all (model and pool, whatever the amount)."""
    if task.gpus > 0:
        return bool(node.gpus) and (task.gpu_model is None or node.gpu_model == task.gpu_model)
    if task.vgpu_slices > 0:
        return _slice_node(task, node) and any(slot.slices_total > 1 for slot in node.gpus)
    return True


@dataclass
class _Plan:
    key: tuple
    node: str
    picks: list[tuple[int, int]]
    victims: tuple[RunningTask, ...]
    stopping: tuple[RunningTask, ...]


class _VictimPool:
    """Running tasks a Diamond task may displace, indexed by node, plus those already stopping."""

    def __init__(self, running: Iterable[RunningTask], index: NodeIndex):
        self.index = index
        self.by_node: dict[str, list[RunningTask]] = {}
        self.stopping: dict[str, list[RunningTask]] = {}
        self.taken: set[str] = set()
        everyone = []
        for task in running:
            if task.node not in index.nodes:
                continue
            if task.stopping:
                self.stopping.setdefault(task.node, []).append(task)
            elif task.preemptible and task.tier_rank < DIAMOND:
                self.by_node.setdefault(task.node, []).append(task)
                everyone.append(task)
        for victims in self.by_node.values():
            victims.sort(key=_victim_pref)
        everyone.sort(key=_victim_pref)
        self._everyone = everyone
        self._lists: dict[tuple, list[RunningTask]] = {}
        self._starts: dict[tuple, int] = {}

    def _list_for(self, task: QueuedTask) -> tuple[tuple, list[RunningTask]]:
        kind, _ = _shape(task)
        lst = self._lists.get(kind)
        if lst is None:
            nodes = self.index.nodes
            lst = [v for v in self._everyone if _same_kind(task, nodes[v.node])]
            self._lists[kind] = lst
            self._starts[kind] = 0
        return kind, lst

    def singles(self, task: QueuedTask) -> Iterator[RunningTask]:
        """Untaken victims on compatible nodes, most preferred first."""
        kind, lst = self._list_for(task)
        start = self._starts[kind]
        while start < len(lst) and lst[start].id in self.taken:
            start += 1
        self._starts[kind] = start
        for i in range(start, len(lst)):
            victim = lst[i]
            if victim.id not in self.taken:
                yield victim

    def victims_on(self, node: str, below_tier: int) -> list[RunningTask]:
        return [v for v in self.by_node.get(node, ()) if v.id not in self.taken and v.tier_rank < below_tier]

    def stopping_on(self, node: str) -> list[RunningTask]:
        return [s for s in self.stopping.get(node, ()) if s.id not in self.taken]

    def take(self, tasks: Iterable[RunningTask]) -> None:
        self.taken.update(t.id for t in tasks)


def _state_after(
    node: NodeState, pos_of: Mapping[int, int], released: Iterable[RunningTask]
) -> tuple[list[int], int, int]:
    used = [slot.slices_used for slot in node.gpus]
    cpus, memory = node.cpus_free, node.memory_free_gib
    for task in released:
        for index, slices in task.gpu_indices:
            pos = pos_of.get(index)
            if pos is not None:
                used[pos] = max(0, used[pos] - slices)
        cpus += task.vcpus
        memory += task.memory_gib
    return used, cpus, memory


def _fit_after(
    task: QueuedTask, node: NodeState, pos_of: Mapping[int, int], released: Iterable[RunningTask]
) -> list[tuple[int, int]] | None:
    used, cpus, memory = _state_after(node, pos_of, released)
    return _picks_on(task, node, used, cpus, memory)


def _fewest_victims_on(
    task: QueuedTask,
    node: NodeState,
    pos_of: Mapping[int, int],
    victims: list[RunningTask],
    base: list[RunningTask],
    max_k: int,
) -> tuple[tuple, tuple[RunningTask, ...]] | None:
    """The best victim set of size 2..max_k on one node (exhaustive while the number of sets stays
    under _COMBINATION_BUDGET, else greedy in preference order and then pruned)."""
    tried = 0
    for k in range(2, min(max_k, len(victims)) + 1):
        count = comb(len(victims), k)
        if tried + count > _COMBINATION_BUDGET:
            break
        tried += count
        best = None
        for combo in combinations(victims, k):
            if _fit_after(task, node, pos_of, [*base, *combo]) is not None:
                key = _set_key(combo)
                if best is None or key < best[0]:
                    best = (key, combo)
        if best is not None:
            return best
    else:
        return None
    chosen: list[RunningTask] = []
    for victim in victims:
        chosen.append(victim)
        if _fit_after(task, node, pos_of, [*base, *chosen]) is not None:
            break
    else:
        return None
    for victim in reversed(list(chosen)):  # drop the ones not needed, least preferred first
        trial = [v for v in chosen if v is not victim]
        if _fit_after(task, node, pos_of, [*base, *trial]) is not None:
            chosen = trial
    if len(chosen) > max_k:
        return None
    return _set_key(chosen), tuple(chosen)


def _finish_plan(
    task: QueuedTask,
    node: NodeState,
    pos_of: Mapping[int, int],
    victims: tuple[RunningTask, ...],
    stopping: list[RunningTask],
    key: tuple,
) -> _Plan:
    needed = list(stopping)
    for st in stopping:  # claim only the stopping tasks this one really needs
        trial = [s for s in needed if s is not st]
        if _fit_after(task, node, pos_of, [*victims, *trial]) is not None:
            needed = trial
    picks = _fit_after(task, node, pos_of, [*victims, *needed])
    return _Plan(key, node.name, picks, victims, tuple(needed))


def _plan_preemption(task: QueuedTask, index: NodeIndex, pool: _VictimPool, budget: int) -> _Plan | None:
    """Where a Diamond task fits once some running tasks stop, with the fewest new victims.

    1. tasks already stopping (earlier preemptions, cancellations) cost nothing: a node where they
       suffice is taken at once;
    2. one victim: preemptible lower-tier tasks in preference order (lowest tier, most recently
       started), across all compatible nodes; the first whose release makes room wins;
    3. two or more victims on one node: each node whose whole victim set would make room is
       searched for its smallest set (exhaustive within a budget); the best set across nodes wins.
    """
    nodes = index.nodes
    for name in pool.stopping:
        stopping = pool.stopping_on(name)
        node = nodes[name]
        if stopping and _compatible(task, node):
            pos_of = index.gpu_position(name)
            if _fit_after(task, node, pos_of, stopping) is not None:
                return _finish_plan(task, node, pos_of, (), stopping, _set_key(()))
    if budget < 1:
        return None
    for victim in pool.singles(task):
        if victim.tier_rank >= task.tier_rank:
            continue
        node = nodes[victim.node]
        pos_of = index.gpu_position(victim.node)
        stopping = pool.stopping_on(victim.node)
        if _fit_after(task, node, pos_of, [victim, *stopping]) is not None:
            return _finish_plan(task, node, pos_of, (victim,), stopping, _set_key((victim,)))
    if budget < 2:
        return None
    best: _Plan | None = None
    for name in pool.by_node:
        node = nodes[name]
        if not _compatible(task, node):
            continue
        victims = pool.victims_on(name, task.tier_rank)
        max_k = min(budget, best.key[0] if best is not None else budget)
        if len(victims) < 2 or max_k < 2:
            continue
        pos_of = index.gpu_position(name)
        stopping = pool.stopping_on(name)
        if _fit_after(task, node, pos_of, [*victims, *stopping]) is None:
            continue
        found = _fewest_victims_on(task, node, pos_of, victims, stopping, max_k)
        if found is not None and (best is None or (found[0], name) < (best.key, best.node)):
            best = _finish_plan(task, node, pos_of, found[1], stopping, found[0])
    return best


# --------------------------------------------------------------------------------------------
# The pass


class _Room:
    """What is left of one tenant's Limits during a pass."""

    __slots__ = ("gpus", "memory", "tasks", "vcpus")

    def __init__(self, limits: Limits):
        self.tasks = limits.tasks_free
        self.gpus = {model: float(n) for model, n in limits.gpus_free.items()}
        self.vcpus = limits.vcpus_free
        self.memory = limits.memory_free_gib

    def refuses(self, task: QueuedTask) -> str | None:
        if self.tasks < 1:
            return REASON_QUOTA_TASKS
        if self.vcpus is not None and task.vcpus > self.vcpus:
            return REASON_QUOTA_VCPUS
        if self.memory is not None and task.memory_gib > self.memory:
            return REASON_QUOTA_MEMORY
        if task.gpu_model is not None:
            if task.gpus > 0:
                return self.refuses_gpus(task.gpu_model, task.gpus)
            if task.vgpu_slices > 0 and self.gpus.get(task.gpu_model, 0.0) <= _EPS:
                return _quota_gpus(task.gpu_model)
        return None

    def refuses_gpus(self, model: str | None, amount: float) -> str | None:
        if amount > 0 and self.gpus.get(model, 0.0) + _EPS < amount:
            return _quota_gpus(model)
        return None

    def take(self, task: QueuedTask, model: str | None, gpus: float) -> None:
        self.tasks -= 1
        if self.vcpus is not None:
            self.vcpus -= task.vcpus
        if self.memory is not None:
            self.memory -= task.memory_gib
        if gpus > 0:
            self.gpus[model] = self.gpus.get(model, 0.0) - gpus


def _quota_gpus(model: str | None) -> str:
    return f"quota: {model} GPUs"


def _gpu_fraction(node: NodeState, picks: Iterable[tuple[int, int]]) -> float:
    """GPUs a placement holds: a whole GPU is 1, s slices of an n-slice GPU are s/n."""
    return sum(slices / max(node.gpus[pos].slices_total, 1) for pos, slices in picks)


def _copy_node(node: NodeState) -> NodeState:
    return NodeState(
        name=node.name,
        pool=node.pool,
        gpu_model=node.gpu_model,
        gpus=[GpuSlot(slot.index, slot.slices_total, slot.slices_used) for slot in node.gpus],
        cpus_free=node.cpus_free,
        memory_free_gib=node.memory_free_gib,
        schedulable=node.schedulable,
    )


def cluster_totals_of(nodes: Iterable[NodeState], running: Iterable[RunningTask]) -> TenantUsage:
    """Schedulable capacity for DRF: GPUs counted on the nodes, vCPUs and memory as free + running."""
    gpus = cpus = memory = 0
    names = set()
    for node in nodes:
        if node.schedulable:
            names.add(node.name)
            gpus += len(node.gpus)
            cpus += node.cpus_free
            memory += node.memory_free_gib
    for task in running:
        if task.node in names:
            cpus += task.vcpus
            memory += task.memory_gib
    return TenantUsage(gpus=float(gpus), vcpus=cpus, memory_gib=memory)


def plan_pass(
    queue: Iterable[QueuedTask],
    nodes: Iterable[NodeState],
    running: Iterable[RunningTask],
    usage: Mapping[int, TenantUsage],
    limits: Mapping[int, Limits],
    can_pay: "set[int] | frozenset[int] | Callable[[int], bool]",
    *,
    ageing_seconds: float = DEFAULT_AGEING_SECONDS,
    allow_preemption: bool = True,
    max_assignments: int | None = None,
    reserve_after_seconds: float | None = DEFAULT_RESERVE_AFTER_SECONDS,
    max_preemptions: int | None = DEFAULT_MAX_PREEMPTIONS,
    cluster_totals: TenantUsage | None = None,
) -> PassResult:
    """One scheduling pass. Pure: works on copies of `nodes`; nothing passed in is changed.

    Every queued task ends in exactly one of `assignments` (start it now) or `waiting` (why not);
    a Diamond task that will run once its victims stop is in `waiting` ("preempting N task(s)")
    and in `pending` (where it will go), and its victims are in `preemptions`.

    Walk: tasks come in `ordered` order, DRF shares charged as tasks are assigned. For each:
    1. payment (`can_pay`: a set of tenant ids or a callable, asked once per tenant) — else
       REASON_CANNOT_PAY;
    2. quota (`limits`, copied, decremented as the pass assigns; a tenant absent from `limits` is
       not limited here) — concurrent tasks, vCPUs, memory, GPUs of the model (a slice counts as
       its fraction of the GPU it lands on) — else "quota: …";
    3. backfill reservation: if an earlier task holds its capacity (see below) it waits, even if
       it would fit — "held: …";
    4. placement (`NodeIndex`, best fit); if it fits it is assigned.
    5. a Diamond task that does not fit may preempt (`allow_preemption`): preemptible tasks of a
       lower tier, never Diamond and never non-preemptible ones, all on one node, chosen by fewest
       victims, then lowest tiers, then most recently started; tasks already stopping are used
       first at no cost, so repeated passes while victims drain do not preempt again. The free
       part of the planned place is held for it for the rest of the pass; its quota and DRF share
       are charged. At most `max_preemptions` victims per pass (None: no limit). The victims must
       be stopped gracefully and requeued with their waited time kept (their place); that is the
       caller's part.
    6. backfill and its starvation guard: a task that does not fit does not stop later tasks
       from using what is free (backfill), so one big task cannot block the queue. But a task that
       has waited `reserve_after_seconds` or more and still does not fit reserves its capacity
       label (its GPU model, or "CPU" for CPU-only tasks): every later task with that label in the
       pass is held, so running work drains until the old task fits. So that the reservation
       belongs to one task and stays with it from pass to pass, the oldest such task per (tier,
       package, label) is moved to the front of its class (`starving_heads`); without that the
       reservation would go to whichever old task DRF put first, and a big task could lose it to
       smaller old ones pass after pass. Only tasks that could ever fit (some node has enough
       GPUs) reserve. The guard is per model, not per node, because the pass does not know when
       running tasks end; it trades some idle GPUs of that model for a bound on the wait. Higher
       tiers and package holders still go first (they are walked before it). CPU-only
       reservations hold CPU-only tasks, not the CPUs that GPU tasks bring. None turns it off.

    `max_assignments` stops assigning after that many (the rest wait with REASON_PASS_LIMIT).
    `cluster_totals` defaults to `cluster_totals_of(nodes, running)`.

    Cost: O(n log n) in queued tasks for the order; placement touches a few buckets per task and
    refuses known-unfit shapes in O(1), so the pass does not scale with tasks × nodes. Preemption
    search is bounded by `max_preemptions` and per-node combination budgets.
    """
    queue = list(queue)
    running = list(running)
    work = [_copy_node(node) for node in nodes]
    totals = cluster_totals if cluster_totals is not None else cluster_totals_of(work, running)
    index = NodeIndex(work)
    fair = _FairQueue(queue, usage, totals, ageing_seconds, starving_heads(queue, reserve_after_seconds))
    if isinstance(can_pay, (set, frozenset)):
        payer: Callable[[int], bool] = can_pay.__contains__
    else:
        payer = can_pay
    paying: dict[int, bool] = {}
    rooms: dict[int, _Room | None] = {}
    held: dict[str, str] = {}
    pool: _VictimPool | None = None
    result = PassResult()
    waiting = result.waiting
    preempt_budget = max_preemptions if max_preemptions is not None else 1 << 62

    while (task := fair.pop()) is not None:
        if max_assignments is not None and len(result.assignments) >= max_assignments:
            waiting[task.id] = REASON_PASS_LIMIT
            continue
        tenant = task.tenant_id
        ok = paying.get(tenant)
        if ok is None:
            ok = paying[tenant] = bool(payer(tenant))
        if not ok:
            waiting[task.id] = REASON_CANNOT_PAY
            continue
        if tenant in rooms:
            room = rooms[tenant]
        else:
            lim = limits.get(tenant)
            room = rooms[tenant] = _Room(lim) if lim is not None else None
        if room is not None and (reason := room.refuses(task)) is not None:
            waiting[task.id] = reason
            continue
        label = capacity_label(task)
        holder = held.get(label)
        if holder is not None:
            waiting[task.id] = f"held: {label} capacity is reserved for task {holder}, which has waited longer"
            continue
        if not index.could_ever_fit(task):
            waiting[task.id] = f"never fits: no schedulable node offers {_demand(task)}"
            continue

        hit = index.find(task)
        if hit is not None:
            name, picks = hit
            node = index.nodes[name]
            gpus = _gpu_fraction(node, picks)
            if room is not None and (reason := room.refuses_gpus(node.gpu_model, gpus)) is not None:
                waiting[task.id] = reason
                continue
            result.assignments.append(Assignment(task.id, name, index.commit(name, picks, task.vcpus, task.memory_gib)))
            if room is not None:
                room.take(task, node.gpu_model, gpus)
            fair.charge(tenant, gpus, task.vcpus, task.memory_gib)
            continue

        if allow_preemption and task.tier_rank >= DIAMOND:
            if pool is None:
                pool = _VictimPool(running, index)
            plan = _plan_preemption(task, index, pool, preempt_budget)
            if plan is not None:
                node = index.nodes[plan.node]
                gpus = _gpu_fraction(node, plan.picks)
                if room is not None and (reason := room.refuses_gpus(node.gpu_model, gpus)) is not None:
                    waiting[task.id] = reason
                    continue
                pool.take(plan.victims)
                pool.take(plan.stopping)
                preempt_budget -= len(plan.victims)
                result.preemptions.extend(Preemption(v.id, task.id) for v in plan.victims)
                result.pending.append(
                    Assignment(task.id, plan.node, tuple((node.gpus[pos].index, s) for pos, s in plan.picks))
                )
                # Hold what is free of the planned place now, so later tasks in this pass leave it.
                hold = []
                for pos, slices in plan.picks:
                    slot = node.gpus[pos]
                    free = min(slices, max(0, slot.slices_total - slot.slices_used))
                    if free:
                        hold.append((pos, free))
                index.commit(
                    plan.node,
                    hold,
                    min(task.vcpus, max(0, node.cpus_free)),
                    min(task.memory_gib, max(0, node.memory_free_gib)),
                )
                if plan.victims:
                    waiting[task.id] = f"preempting {len(plan.victims)} task(s)"
                else:
                    waiting[task.id] = f"waiting for {len(plan.stopping)} stopping task(s) to end"
                if room is not None:
                    room.take(task, node.gpu_model, gpus)
                fair.charge(tenant, gpus, task.vcpus, task.memory_gib)
                continue

        if reserve_after_seconds is not None and task.waited_seconds >= reserve_after_seconds:
            held[label] = task.id
            result.reservations[label] = task.id
            waiting[task.id] = f"{REASON_NO_CAPACITY}: {label} capacity is now reserved for it"
        else:
            waiting[task.id] = f"{REASON_NO_CAPACITY} for {_demand(task)}"
    return result


def _demand(task: QueuedTask) -> str:
    if task.gpus > 0:
        gpu = f"{task.gpus}×{task.gpu_model or 'GPU'}"
    elif task.vgpu_slices > 0:
        gpu = f"{task.vgpu_slices} vGPU slice(s) of {task.gpu_model or 'a GPU'}"
    else:
        gpu = "no GPU"
    return f"{gpu}, {task.vcpus} vCPU, {task.memory_gib} GiB"
