"""The scheduling policy (hosting/scheduling.py) measured: pass time, and behaviour on a job trace.

No database, no Django: the same pure functions the service calls.

    .venv/bin/python bench/scheduler.py                         # one pass at 1k, 10k, 100k queued tasks
    .venv/bin/python bench/scheduler.py --generate trace.csv --jobs 5000 --tenants 40 --seed 1
    .venv/bin/python bench/scheduler.py --trace trace.csv --nodes 64

Default mode: 1,000 simulated nodes (A100 and H100 8-GPU passthrough nodes; A10 4-GPU nodes at
1:4 vGPU slices and T4 4-GPU nodes at 1:8), filled to about 70 % with running tasks (some of
them preemptible), then one `plan_pass` over 1k, 10k and 100k queued tasks of random tiers,
packages, priorities and sizes (fixed seed), and the same over an empty cluster. Prints the pass
time (best of a few runs), what it decided, and how time grows: the ratio between sizes and the
apparent exponent log(t2/t1) / log(n2/n1) (1.0 = linear).

--trace FILE replays a job trace (CSV: submit_time_s, duration_s, gpu_count, gpu_model, tenant,
tier; optional preemptible, package) in virtual time — a discrete-event simulation with a
scheduling pass at every instant something happens (submissions, completions, preempted tasks
stopping) — once with our policy (`plan_pass`: tiers, packages, ageing, DRF, best fit, backfill
with its reservation guard, Diamond preemption of preemptible tasks, requeued with their place
kept) and once with a FIFO baseline (strict submission order, first fit, no preemption: the
queue stops at the first task that does not fit). It prints for both:

* GPU utilisation: GPU-seconds busy / (GPUs × makespan), makespan = first submission to last
  completion; busy time includes runs later lost to preemption, and "goodput" counts only the
  runs that completed;
* queue wait per tier, mean and p95, where a job's wait = completion − submission − duration
  (time queued, plus any run lost to preemption);
* Jain's fairness index across tenants, J = (Σx)² / (n·Σx²) over x_t = GPU-seconds tenant t
  received up to time T ÷ GPU-seconds it had asked for (jobs submitted by T), evaluated at
  T = end of the arrival window ("at end") and averaged over T = 10 %, 20 %, …, 100 % of it
  ("mean"); 1.0 means every tenant got the same fraction of what it asked for. Given for all
  tenants and for the Standard tenants alone (equal standing: tiers are meant to be unequal).
"""

import argparse
import csv
import heapq
import math
import random
import statistics
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hosting.scheduling import (  # noqa: E402
    DEFAULT_AGEING_SECONDS,
    DEFAULT_RESERVE_AFTER_SECONDS,
    GpuSlot,
    Limits,
    NodeIndex,
    NodeState,
    QueuedTask,
    RunningTask,
    TenantUsage,
    apply,
    plan_pass,
    release,
)

TIER_NAMES = {1: "standard", 2: "gold", 3: "diamond"}
TIER_RANKS = {"standard": 1, "gold": 2, "diamond": 3, "1": 1, "2": 2, "3": 3}
# (model, pool, GPUs per node, vGPU slices per GPU, vCPUs, memory GiB)
NODE_KINDS = [
    ("A100", "high_end", 8, 1, 128, 1024),
    ("H100", "high_end", 8, 1, 128, 1024),
    ("A10", "general", 4, 4, 64, 256),
    ("T4", "general", 4, 8, 64, 256),
]
VCPUS_PER_GPU = 8
MEMORY_PER_GPU = 48
PREEMPT_GRACE_S = 30.0  # a preempted task is stopped gracefully: it holds its GPUs this long


def make_nodes(count: int) -> list[NodeState]:
    """`count` nodes, a quarter of each kind (round robin)."""
    nodes = []
    for i in range(count):
        model, pool, gpus, slices, cpus, memory = NODE_KINDS[i % len(NODE_KINDS)]
        nodes.append(
            NodeState(
                name=f"{model.lower()}-{i:04d}",
                pool=pool,
                gpu_model=model,
                gpus=[GpuSlot(g, slices) for g in range(gpus)],
                cpus_free=cpus,
                memory_free_gib=memory,
            )
        )
    return nodes


# ---------------------------------------------------------------------------------------------
# Default mode: one pass


_TENANT_WEIGHTS: dict[int, list[float]] = {}


def random_tenant(rng: random.Random, tenants: int) -> int:
    """Zipf-like: tenant r weighs 1 / (r + 1)^0.8, so a few tenants submit much of the work."""
    cum = _TENANT_WEIGHTS.get(tenants)
    if cum is None:
        cum = _TENANT_WEIGHTS[tenants] = list(accumulate(1 / (r + 1) ** 0.8 for r in range(tenants)))
    return rng.choices(range(tenants), cum_weights=cum)[0]


def random_task(rng: random.Random, i: int, tenants: int) -> QueuedTask:
    kind = rng.random()
    model = rng.choice(["A100", "H100", "A10", "T4"])
    gpus = slices = 0
    if kind < 0.65:
        gpus = rng.choices([1, 2, 4, 8], [45, 25, 18, 12])[0]
        if model in ("A10", "T4"):
            gpus = min(gpus, 4)
        vcpus, memory = VCPUS_PER_GPU * gpus, MEMORY_PER_GPU * gpus
    elif kind < 0.90:
        model = rng.choice(["A10", "T4"])
        slices = rng.choice([1, 1, 2, 4])
        vcpus, memory = 2 * slices, 8 * slices
    else:
        model = None
        vcpus, memory = rng.choice([2, 4, 8, 16]), rng.choice([8, 16, 32, 64])
    tenant = random_tenant(rng, tenants)
    return QueuedTask(
        id=f"q{i}",
        tenant_id=tenant,
        tier_rank=rng.choices([1, 2, 3], [70, 25, 5])[0],
        holds_package=rng.random() < 0.2,
        priority=rng.randrange(10),
        waited_seconds=rng.expovariate(1 / 1800),
        gpu_model=model,
        gpus=gpus,
        vgpu_slices=slices,
        vcpus=vcpus,
        memory_gib=memory,
        submitted_order=i,
    )


def fill(nodes: list[NodeState], rng: random.Random, target: float, tenants: int) -> list[RunningTask]:
    """Place random tasks until `target` of the GPUs are in use; returns them as running tasks."""
    index = NodeIndex(nodes)
    total = sum(len(n.gpus) for n in nodes)
    used = 0.0
    out = []
    i = 0
    misses = 0
    while used < target * total and misses < 1000:
        task = random_task(rng, i, tenants)
        i += 1
        hit = index.place(task)
        if hit is None:
            misses += 1
            continue
        name, gpu_indices = hit
        node = index.nodes[name]
        slots = {s.index: s for s in node.gpus}
        used += sum(s / slots[g].slices_total for g, s in gpu_indices)
        out.append(
            RunningTask(
                id=f"r{i}",
                tenant_id=task.tenant_id,
                tier_rank=task.tier_rank,
                preemptible=task.tier_rank < 3 and rng.random() < 0.4,
                node=name,
                gpu_model=task.gpu_model,
                gpu_indices=gpu_indices,
                vcpus=task.vcpus,
                memory_gib=task.memory_gib,
                started_at=rng.random() * 86400,
            )
        )
    return out


def usage_of(running: list[RunningTask], nodes: list[NodeState]) -> dict[int, TenantUsage]:
    slices = {(n.name, s.index): s.slices_total for n in nodes for s in n.gpus}
    acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for r in running:
        a = acc[r.tenant_id]
        a[0] += sum(s / slices[(r.node, g)] for g, s in r.gpu_indices)
        a[1] += r.vcpus
        a[2] += r.memory_gib
    return {t: TenantUsage(gpus=a[0], vcpus=a[1], memory_gib=a[2]) for t, a in acc.items()}


def bench_passes(seed: int) -> None:
    tenants = 500
    sizes = [1_000, 10_000, 100_000]
    rng = random.Random(seed)
    busy_nodes = make_nodes(1000)
    busy_running = fill(busy_nodes, rng, 0.70, tenants)
    limits = {
        t: Limits(tasks_free=200, gpus_free={"A100": 64, "H100": 64, "A10": 32, "T4": 32}) for t in range(tenants)
    }
    can_pay = {t for t in range(tenants) if rng.random() < 0.97}
    queue_all = [random_task(rng, i, tenants) for i in range(max(sizes))]
    gpus_total = sum(len(n.gpus) for n in busy_nodes)
    print(
        f"cluster: {len(busy_nodes)} nodes, {gpus_total} GPUs "
        f"(A100/H100 ×8 passthrough, A10 ×4 at 1:4, T4 ×4 at 1:8); {tenants} tenants; seed {seed}"
    )
    busy_label = f"70% busy ({len(busy_running)} running, {sum(r.preemptible for r in busy_running)} preemptible)"
    for label, nodes, running, reserve_after in (
        (busy_label, busy_nodes, busy_running, DEFAULT_RESERVE_AFTER_SECONDS),
        (busy_label + ", starvation guard off: every task goes through placement", busy_nodes, busy_running, None),
        ("empty", make_nodes(1000), [], DEFAULT_RESERVE_AFTER_SECONDS),
    ):
        usage = usage_of(running, nodes)
        print(f"\n{label}:")
        print(f"  {'queued':>8}  {'pass s':>8}  {'µs/task':>8}  {'assigned':>8}  {'preempt':>7}  {'waiting':>8}")
        times = []
        for n in sizes:
            queue = queue_all[:n]
            runs = 5 if n <= 10_000 else 3
            best = math.inf
            result = None
            for _ in range(runs):
                start = time.perf_counter()
                result = plan_pass(queue, nodes, running, usage, limits, can_pay, reserve_after_seconds=reserve_after)
                best = min(best, time.perf_counter() - start)
            times.append(best)
            print(
                f"  {n:>8,}  {best:>8.3f}  {best / n * 1e6:>8.1f}  {len(result.assignments):>8,}  "
                f"{len(result.preemptions):>7}  {len(result.waiting):>8,}"
            )
        reasons = Counter(r.split(":")[0].split(" for ")[0] for r in result.waiting.values())
        print("  why the 100k-queue tasks wait: " + ", ".join(f"{r} {c:,}" for r, c in reasons.most_common()))
        for k in range(1, len(sizes)):
            n1, n2, t1, t2 = sizes[k - 1], sizes[k], times[k - 1], times[k]
            exponent = math.log(t2 / t1) / math.log(n2 / n1)
            print(f"  {n1:,} → {n2:,}: ×{t2 / t1:.1f} time for ×{n2 // n1} tasks, apparent exponent {exponent:.2f}")


# ---------------------------------------------------------------------------------------------
# Trace generation


def generate(path: Path, jobs: int, tenants: int, seed: int, nodes: int, load: float) -> None:
    """A synthetic trace: bursty arrivals (a two-state modulated Poisson process, bursts at 6× the
    calm rate, and each arrival a batch of 1–8 similar jobs from one tenant, like a sweep),
    heavy-tailed durations (log-normal, median 30 min, σ 1.6, clipped to 1 min … 72 h), GPU counts
    1/2/4/8 (8 only on the 8-GPU models), models in proportion to the pool's GPUs, tiers weighted
    70/25/5 % by job, some tenants holding packages, half of the Standard/Gold jobs preemptible.
    The arrival window is scaled so the offered GPU load is `load` × the GPUs of `nodes` nodes."""
    rng = random.Random(seed)
    n_dia = max(1, round(0.05 * tenants))
    n_gold = max(1, round(0.25 * tenants))
    tier_of = {}
    for t in range(tenants):
        tier_of[t] = 3 if t < n_dia else 2 if t < n_dia + n_gold else 1
    package = {t: rng.random() < 0.3 for t in range(tenants)}
    by_tier = {k: [t for t in range(tenants) if tier_of[t] == k] for k in (1, 2, 3)}
    weights = {k: [1 / (r + 1) ** 0.8 for r in range(len(v))] for k, v in by_tier.items()}
    counts = {"A100": [1, 2, 4, 8], "H100": [1, 2, 4, 8], "A10": [1, 2, 4], "T4": [1, 2, 4]}
    count_w = {"A100": [45, 25, 18, 12], "H100": [45, 25, 18, 12], "A10": [50, 30, 20], "T4": [50, 30, 20]}
    pool = make_nodes(nodes)
    capacity = defaultdict(int)
    for n in pool:
        capacity[n.gpu_model] += len(n.gpus)
    mean_gpus = {m: sum(c * w for c, w in zip(counts[m], count_w[m], strict=True)) / sum(count_w[m]) for m in counts}
    model_w = [capacity[m] / mean_gpus[m] for m in counts]

    rows = []
    batches = []  # (first row, rows in the batch)
    while len(rows) < jobs:
        tier = rng.choices([1, 2, 3], [70, 25, 5])[0]
        tenant = rng.choices(by_tier[tier], weights[tier])[0]
        model = rng.choices(list(counts), model_w)[0]
        gpus = rng.choices(counts[model], count_w[model])[0]
        preemptible = tier < 3 and rng.random() < 0.5
        size = min(jobs - len(rows), 1 + min(7, int(rng.expovariate(1 / 1.5))))
        base = rng.lognormvariate(math.log(1800), 1.6)
        batches.append((len(rows), size))
        for _ in range(size):
            duration = min(72 * 3600, max(60, base * rng.uniform(0.7, 1.3)))
            rows.append(
                [0.0, round(duration), gpus, model, tenant, TIER_NAMES[tier], int(preemptible), int(package[tenant])]
            )
    # Arrivals: batches at the times of a modulated Poisson process, then scaled to the window.
    work = sum(r[1] * r[2] for r in rows)
    window = work / (sum(capacity.values()) * load)
    t, burst, switch = 0.0, False, rng.expovariate(1 / 3.0)
    for first, size in batches:
        t += rng.expovariate(6.0 if burst else 1.0)
        if t > switch:
            burst = not burst
            switch = t + rng.expovariate(1 / (1.0 if burst else 3.0))
        for r in rows[first : first + size]:
            r[0] = t
    scale = window / rows[-1][0]
    for r in rows:
        r[0] = round(r[0] * scale, 1)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["submit_time_s", "duration_s", "gpu_count", "gpu_model", "tenant", "tier", "preemptible", "package"]
        )
        w.writerows(rows)
    print(
        f"wrote {len(rows)} jobs from {tenants} tenants to {path}: arrival window {window / 3600:.1f} h, "
        f"{work / 3600:,.0f} GPU-hours offered = {load:.0%} of {sum(capacity.values())} GPUs over the window"
    )


# ---------------------------------------------------------------------------------------------
# Trace replay


@dataclass
class Job:
    id: str
    order: int
    submit: float
    duration: float
    gpus: int
    model: str
    tenant: int
    tier: int
    preemptible: bool
    package: bool
    finish: float = -1.0
    wasted: float = 0.0  # seconds of runs lost to preemption


def load_trace(path: Path) -> list[Job]:
    jobs = []
    names: dict[str, int] = {}  # tenant names that are not numbers get numbers in order of appearance
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            tenant = row["tenant"].strip()
            jobs.append(
                Job(
                    id=f"j{i}",
                    order=i,
                    submit=float(row["submit_time_s"]),
                    duration=max(1.0, float(row["duration_s"])),
                    gpus=int(row["gpu_count"]),
                    model=row["gpu_model"],
                    tenant=int(tenant) if tenant.isdigit() else names.setdefault(tenant, -1 - len(names)),
                    tier=TIER_RANKS[row["tier"].strip().lower()],
                    preemptible=row.get("preemptible", "0") in ("1", "true", "True"),
                    package=row.get("package", "0") in ("1", "true", "True"),
                )
            )
    jobs.sort(key=lambda j: (j.submit, j.order))
    return jobs


class Sim:
    """Virtual time; a pass at every instant with events. Subclasses decide what starts."""

    def __init__(self, jobs: list[Job], nodes: list[NodeState]):
        self.jobs = {j.id: j for j in jobs}
        self.nodes = {n.name: n for n in nodes}
        self.node_list = nodes
        self.capacity = {n.name: (n.cpus_free, n.memory_free_gib) for n in nodes}
        self.events: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        self.now = 0.0
        self.running: dict[str, tuple[RunningTask, float, int]] = {}  # id → (task, started, token)
        self.runs: list[tuple[str, float, float, int, bool]] = []  # (job, start, end, gpus, completed)
        self.passes = 0
        self.pass_seconds = 0.0
        self.stopping: set[str] = set()  # preempted, within their grace period
        for j in jobs:
            self.push(j.submit, "submit", j.id, 0)

    def push(self, at: float, kind: str, job: str, token: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, job, token))

    def start(self, job: Job, node: str, gpu_indices: tuple) -> None:
        self.seq += 1
        task = RunningTask(
            id=job.id,
            tenant_id=job.tenant,
            tier_rank=job.tier,
            preemptible=job.preemptible,
            node=node,
            gpu_model=job.model,
            gpu_indices=gpu_indices,
            vcpus=VCPUS_PER_GPU * job.gpus,
            memory_gib=MEMORY_PER_GPU * job.gpus,
            started_at=self.now,
        )
        self.running[job.id] = (task, self.now, self.seq)
        self.push(self.now + job.duration, "finish", job.id, self.seq)

    def stop(self, job_id: str, completed: bool) -> None:
        task, started, _ = self.running.pop(job_id)
        release(task, self.nodes)
        job = self.jobs[job_id]
        self.runs.append((job_id, started, self.now, job.gpus, completed))
        self.stopping.discard(job_id)
        if completed:
            job.finish = self.now
        else:
            job.wasted += self.now - started

    def run(self) -> None:
        while self.events:
            self.now = self.events[0][0]
            while self.events and self.events[0][0] == self.now:
                _, _, kind, job_id, token = heapq.heappop(self.events)
                if kind == "submit":
                    self.enqueue(self.jobs[job_id], requeued=False)
                elif kind == "finish":
                    entry = self.running.get(job_id)
                    if entry is not None and entry[2] == token:
                        self.stop(job_id, completed=True)
                elif kind == "stopped":  # a preempted run ends (unless it finished during the grace period)
                    entry = self.running.get(job_id)
                    if entry is not None and entry[2] == token:
                        self.stop(job_id, completed=False)
                        self.enqueue(self.jobs[job_id], requeued=True)
            start = time.perf_counter()
            self.schedule()
            self.pass_seconds += time.perf_counter() - start
            self.passes += 1
            self.check()
        for node in self.node_list:
            if (node.cpus_free, node.memory_free_gib) != self.capacity[node.name] or any(
                slot.slices_used for slot in node.gpus
            ):
                raise SystemExit(f"{node.name} did not get all its resources back")

    def check(self) -> None:
        """Nothing over-allocated: no GPU past its slices, no node below zero CPU or memory."""
        for node in self.node_list:
            if node.cpus_free < 0 or node.memory_free_gib < 0:
                raise SystemExit(f"{node.name} over-allocated at t={self.now}")
            for slot in node.gpus:
                if not 0 <= slot.slices_used <= slot.slices_total:
                    raise SystemExit(f"{node.name} GPU {slot.index} has {slot.slices_used}/{slot.slices_total} slices")


class FifoSim(Sim):
    """Strict submission order, first fit on the node list, no preemption."""

    def __init__(self, jobs, nodes):
        super().__init__(jobs, nodes)
        self.queue: deque[Job] = deque()

    def enqueue(self, job: Job, requeued: bool) -> None:
        self.queue.append(job)

    def schedule(self) -> None:
        while self.queue:
            job = self.queue[0]
            vcpus, memory = VCPUS_PER_GPU * job.gpus, MEMORY_PER_GPU * job.gpus
            for node in self.node_list:
                if node.gpu_model != job.model or node.cpus_free < vcpus or node.memory_free_gib < memory:
                    continue
                free = [s for s in node.gpus if s.slices_used == 0]
                if len(free) >= job.gpus:
                    picks = tuple((s.index, s.slices_total) for s in free[: job.gpus])
                    for s in free[: job.gpus]:
                        s.slices_used = s.slices_total
                    node.cpus_free -= vcpus
                    node.memory_free_gib -= memory
                    self.queue.popleft()
                    self.start(job, node.name, picks)
                    break
            else:
                return


class PolicySim(Sim):
    """Our policy: plan_pass at every event; preempted tasks stop after a grace period and requeue
    with their original submission time (their place)."""

    def __init__(self, jobs, nodes, reserve_after: float):
        super().__init__(jobs, nodes)
        self.queue: dict[str, Job] = {}
        self.reserve_after = reserve_after
        self.preemptions = 0

    def enqueue(self, job: Job, requeued: bool) -> None:
        self.queue[job.id] = job

    def schedule(self) -> None:
        if not self.queue:
            return
        now = self.now
        queued = [
            QueuedTask(
                id=j.id,
                tenant_id=j.tenant,
                tier_rank=j.tier,
                holds_package=j.package,
                priority=5,
                waited_seconds=now - j.submit,
                gpu_model=j.model,
                gpus=j.gpus,
                vgpu_slices=0,
                vcpus=VCPUS_PER_GPU * j.gpus,
                memory_gib=MEMORY_PER_GPU * j.gpus,
                submitted_order=j.order,
            )
            for j in self.queue.values()
        ]
        running = []
        usage: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0])
        for job_id, (task, _started, _token) in self.running.items():
            if job_id in self.stopping:
                task = replace(task, stopping=True)
            running.append(task)
            u = usage[task.tenant_id]
            u[0] += self.jobs[job_id].gpus
            u[1] += task.vcpus
            u[2] += task.memory_gib
        result = plan_pass(
            queued,
            self.node_list,
            running,
            {t: TenantUsage(gpus=u[0], vcpus=u[1], memory_gib=u[2]) for t, u in usage.items()},
            {},
            lambda tenant: True,
            ageing_seconds=DEFAULT_AGEING_SECONDS,
            reserve_after_seconds=self.reserve_after,
        )
        by_id = {q.id: q for q in queued}
        for a in result.assignments:
            apply(a, by_id[a.task_id], self.nodes)
            self.start(self.queue.pop(a.task_id), a.node, a.gpu_indices)
        for p in result.preemptions:
            self.stopping.add(p.victim_id)
            self.preemptions += 1
            self.push(now + PREEMPT_GRACE_S, "stopped", p.victim_id, self.running[p.victim_id][2])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def jain(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s, s2 = sum(xs), sum(x * x for x in xs)
    return s * s / (len(xs) * s2) if s2 > 0 else 1.0


def fairness(sim: Sim, jobs: list[Job], at: float, only_tier: int | None) -> float:
    demand: dict[int, float] = defaultdict(float)
    for j in jobs:
        if j.submit <= at and (only_tier is None or j.tier == only_tier):
            demand[j.tenant] += j.gpus * j.duration
    served: dict[int, float] = defaultdict(float)
    for job_id, start, end, gpus, _completed in sim.runs:
        tenant = sim.jobs[job_id].tenant
        if tenant in demand and start < at:
            served[tenant] += gpus * (min(end, at) - start)
    for job_id, (_task, start, _token) in sim.running.items():  # nothing is running at the end; kept for safety
        tenant = sim.jobs[job_id].tenant
        if tenant in demand and start < at:
            served[tenant] += sim.jobs[job_id].gpus * (at - start)
    return jain([served[t] / d for t, d in demand.items() if d > 0])


def report(name: str, sim: Sim, jobs: list[Job], total_gpus: int, elapsed: float) -> dict:
    first = min(j.submit for j in jobs)
    last_submit = max(j.submit for j in jobs)
    end = max(j.finish for j in jobs)
    makespan = end - first
    busy = sum((e - s) * g for _, s, e, g, _ in sim.runs)
    busy_window = sum((min(e, last_submit) - s) * g for _, s, e, g, _ in sim.runs if s < last_submit)
    good = sum((e - s) * g for _, s, e, g, done in sim.runs if done)
    waits: dict[int, list[float]] = defaultdict(list)
    for j in jobs:
        waits[j.tier].append(j.finish - j.submit - j.duration)
    checkpoints = [first + (last_submit - first) * k / 10 for k in range(1, 11)]
    out = {
        "util": busy / (total_gpus * makespan),
        "good": good / (total_gpus * makespan),
        "util_window": busy_window / (total_gpus * (last_submit - first)),
        "makespan_h": makespan / 3600,
        "waits": {t: (statistics.fmean(w) / 60, percentile(w, 0.95) / 60, len(w)) for t, w in waits.items()},
        "jain_end": fairness(sim, jobs, last_submit, None),
        "jain_mean": statistics.fmean(fairness(sim, jobs, c, None) for c in checkpoints),
        "jain_std_end": fairness(sim, jobs, last_submit, 1),
        "jain_std_mean": statistics.fmean(fairness(sim, jobs, c, 1) for c in checkpoints),
        "passes": sim.passes,
        "pass_ms": sim.pass_seconds / max(sim.passes, 1) * 1000,
        "elapsed": elapsed,
        "preemptions": getattr(sim, "preemptions", 0),
    }
    return out


def replay(path: Path, node_count: int, reserve_after: float) -> None:
    all_jobs = load_trace(path)
    pool = make_nodes(node_count)
    biggest: dict[str, int] = {}
    for n in pool:
        biggest[n.gpu_model] = max(biggest.get(n.gpu_model, 0), len(n.gpus))
    jobs = [j for j in all_jobs if 0 < j.gpus <= biggest.get(j.model, 0)]
    dropped = len(all_jobs) - len(jobs)
    total_gpus = sum(len(n.gpus) for n in pool)
    tenants = len({j.tenant for j in jobs})
    print(
        f"trace {path}: {len(jobs)} jobs from {tenants} tenants"
        + (f" ({dropped} dropped: no node of the pool could ever hold them)" if dropped else "")
    )
    print(
        f"pool: {node_count} nodes, {total_gpus} GPUs; preempted tasks stop after {PREEMPT_GRACE_S:.0f} s; "
        f"ageing step {DEFAULT_AGEING_SECONDS:.0f} s; reservation after {reserve_after / 3600:.1f} h waiting"
    )
    results = {}
    for name, make in (
        ("policy", lambda js: PolicySim(js, make_nodes(node_count), reserve_after)),
        ("fifo", lambda js: FifoSim(js, make_nodes(node_count))),
    ):
        fresh = [replace(j, finish=-1.0, wasted=0.0) for j in jobs]
        sim = make(fresh)
        start = time.perf_counter()
        sim.run()
        elapsed = time.perf_counter() - start
        unfinished = sum(1 for j in fresh if j.finish < 0)
        if unfinished:
            raise SystemExit(f"{name}: {unfinished} jobs never finished")
        results[name] = report(name, sim, fresh, total_gpus, elapsed)

    p, f = results["policy"], results["fifo"]
    rows = [
        ("GPU utilisation (busy)", f"{p['util']:.1%}", f"{f['util']:.1%}"),
        ("GPU goodput (completed runs)", f"{p['good']:.1%}", f"{f['good']:.1%}"),
        ("GPU utilisation during the arrival window", f"{p['util_window']:.1%}", f"{f['util_window']:.1%}"),
        ("makespan", f"{p['makespan_h']:.1f} h", f"{f['makespan_h']:.1f} h"),
    ]
    for tier in (3, 2, 1):
        if tier in p["waits"]:
            pm, pp, n = p["waits"][tier]
            fm, fp, _ = f["waits"][tier]
            rows.append(
                (
                    f"wait {TIER_NAMES[tier]} ({n} jobs) mean / p95",
                    f"{pm:.0f} / {pp:.0f} min",
                    f"{fm:.0f} / {fp:.0f} min",
                )
            )
    rows += [
        (
            "Jain, all tenants, at end / mean",
            f"{p['jain_end']:.3f} / {p['jain_mean']:.3f}",
            f"{f['jain_end']:.3f} / {f['jain_mean']:.3f}",
        ),
        (
            "Jain, Standard tenants, at end / mean",
            f"{p['jain_std_end']:.3f} / {p['jain_std_mean']:.3f}",
            f"{f['jain_std_end']:.3f} / {f['jain_std_mean']:.3f}",
        ),
        ("preemptions", str(p["preemptions"]), "0"),
        (
            "scheduling passes, mean ms per pass",
            f"{p['passes']} / {p['pass_ms']:.2f}",
            f"{f['passes']} / {f['pass_ms']:.2f}",
        ),
        ("simulation wall time", f"{p['elapsed']:.1f} s", f"{f['elapsed']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'policy':>22}  {'FIFO':>22}")
    for label, a, b in rows:
        print(f"{label:<{width}}  {a:>22}  {b:>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, help="replay this CSV trace (policy vs FIFO)")
    parser.add_argument("--generate", type=Path, help="write a synthetic trace to this CSV")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=64, help="simulated pool for --trace / --generate")
    parser.add_argument("--load", type=float, default=0.9, help="--generate: offered GPU load on --nodes")
    parser.add_argument("--reserve-after", type=float, default=2 * 3600, help="--trace: starvation guard, seconds")
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.jobs, args.tenants, args.seed, args.nodes, args.load)
    if args.trace:
        replay(args.trace, args.nodes, args.reserve_after)
    if not args.generate and not args.trace:
        bench_passes(args.seed)


if __name__ == "__main__":
    main()
