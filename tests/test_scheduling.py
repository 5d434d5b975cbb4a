"""The scheduling policy (hosting.scheduling): pure functions, no database."""

import random
import time

import pytest

from hosting.scheduling import (
    AGED_PRIORITY_CAP,
    REASON_CANNOT_PAY,
    REASON_PASS_LIMIT,
    REASON_QUOTA_TASKS,
    GpuSlot,
    Limits,
    NodeIndex,
    NodeState,
    QueuedTask,
    RunningTask,
    TenantUsage,
    effective_priority,
    order_key,
    ordered,
    place,
    plan_pass,
)

STEP = 600.0  # ageing step used throughout
BIG = TenantUsage(gpus=1000.0, vcpus=100_000, memory_gib=1_000_000)


def task(
    id,
    *,
    tenant=1,
    tier=1,
    package=False,
    priority=5,
    waited=0.0,
    model="A100",
    gpus=1,
    slices=0,
    vcpus=4,
    memory=16,
    order=0,
):
    return QueuedTask(
        id=id,
        tenant_id=tenant,
        tier_rank=tier,
        holds_package=package,
        priority=priority,
        waited_seconds=waited,
        gpu_model=model,
        gpus=gpus,
        vgpu_slices=slices,
        vcpus=vcpus,
        memory_gib=memory,
        submitted_order=order,
    )


def gpu_node(name, model="A100", gpus=8, *, slices=1, used=(), pool=None, cpus=128, memory=1024):
    pool = pool or ("general" if slices > 1 else "high_end")
    slots = [GpuSlot(i, slices, used[i] if i < len(used) else 0) for i in range(gpus)]
    return NodeState(name, pool, model, slots, cpus, memory)


def cpu_node(name, cpus=64, memory=256):
    return NodeState(name, "general", None, [], cpus, memory)


def running(id, node, gpu_indices, *, tier=1, preemptible=True, tenant=9, started=0.0, stopping=False, model="A100"):
    return RunningTask(
        id=id,
        tenant_id=tenant,
        tier_rank=tier,
        preemptible=preemptible,
        node=node,
        gpu_model=model,
        gpu_indices=tuple(gpu_indices),
        vcpus=4,
        memory_gib=16,
        started_at=started,
        stopping=stopping,
    )


def ids(tasks):
    return [t.id for t in tasks]


def order(tasks, usage=None, totals=BIG):
    return ids(ordered(tasks, usage or {}, totals, STEP))


def run(queue, nodes, *, running_tasks=(), usage=None, limits=None, can_pay=None, **kw):
    tenants = {t.tenant_id for t in queue}
    return plan_pass(
        queue,
        nodes,
        running_tasks,
        usage or {},
        limits or {},
        tenants if can_pay is None else can_pay,
        ageing_seconds=STEP,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Order


def test_tier_beats_priority_age_and_package():
    queue = [
        task("std", tier=1, priority=9, waited=100 * STEP, package=True, tenant=1),
        task("gold", tier=2, priority=0, tenant=2),
        task("diamond", tier=3, priority=0, tenant=3),
    ]
    assert order(queue) == ["diamond", "gold", "std"]


def test_package_holders_first_within_a_tier_but_not_across_tiers():
    queue = [
        task("gold-plain", tier=2, priority=9, tenant=1),
        task("gold-pkg", tier=2, priority=0, package=True, tenant=2),
        task("std-pkg", tier=1, priority=9, package=True, tenant=3),
    ]
    assert order(queue) == ["gold-pkg", "gold-plain", "std-pkg"]


def test_priority_orders_within_a_class():
    queue = [task("p3", priority=3, tenant=1), task("p7", priority=7, tenant=2), task("p5", priority=5, tenant=3)]
    assert order(queue) == ["p7", "p5", "p3"]


def test_ageing_adds_one_step_per_interval_up_to_the_cap():
    assert effective_priority(task("t", priority=2, waited=STEP - 1), STEP) == 2
    assert effective_priority(task("t", priority=2, waited=STEP), STEP) == 3
    assert effective_priority(task("t", priority=0, waited=1000 * STEP), STEP) == AGED_PRIORITY_CAP
    assert effective_priority(task("t", priority=0, waited=1000 * STEP), 0) == 0  # ageing off


def test_ageing_lifts_an_old_low_priority_task_over_a_newer_high_priority_one():
    fresh = task("new-p9", priority=9, tenant=2, waited=0)
    # Priority 2 + 6 steps = 8 < 9: the newer, higher-priority task still goes first.
    assert order([task("old-p2", priority=2, tenant=1, waited=6 * STEP), fresh]) == ["new-p9", "old-p2"]
    # + 7 steps = 9: equal effective priority and equal shares, so the one that waited longer.
    assert order([task("old-p2", priority=2, tenant=1, waited=7 * STEP), fresh]) == ["old-p2", "new-p9"]
    # + 8 steps reaches the cap (10): above every fresh task, whatever the shares.
    busy = {1: TenantUsage(gpus=500.0)}
    assert order([task("old-p2", priority=2, tenant=1, waited=8 * STEP), fresh], busy) == ["old-p2", "new-p9"]
    assert order([task("old-p2", priority=2, tenant=1, waited=7 * STEP), fresh], busy) == ["new-p9", "old-p2"]


def test_ageing_never_crosses_a_tier_or_package_status():
    ancient = 10_000 * STEP
    assert order([task("std-old", tier=1, priority=0, waited=ancient), task("gold-new", tier=2, priority=0)]) == [
        "gold-new",
        "std-old",
    ]
    assert order([task("gold-old", tier=2, priority=0, waited=ancient), task("dia-new", tier=3, priority=0)]) == [
        "dia-new",
        "gold-old",
    ]
    assert order(
        [task("plain-old", package=False, priority=0, waited=ancient), task("pkg-new", package=True, priority=0)]
    ) == ["pkg-new", "plain-old"]


def test_drf_alternates_between_two_equal_tenants():
    queue = [task(f"a{i}", tenant=1, order=i) for i in range(3)] + [
        task(f"b{i}", tenant=2, order=10 + i) for i in range(3)
    ]
    assert order(queue) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_drf_serves_the_tenant_with_the_smaller_dominant_share_first():
    totals = TenantUsage(gpus=100.0, vcpus=1000, memory_gib=10_000)
    # Tenant 1 holds 10 % of the GPUs; tenant 2 holds 30 % of the memory (its dominant resource).
    usage = {1: TenantUsage(gpus=10.0), 2: TenantUsage(memory_gib=3000)}
    queue = [task(f"b{i}", tenant=2, gpus=10, order=i) for i in range(2)] + [
        task(f"a{i}", tenant=1, gpus=10, order=10 + i) for i in range(2)
    ]
    # a0 lifts tenant 1 to 20 %, a1 to 30 % — tied with tenant 2, whose task has the lower order.
    assert order(queue, usage, totals) == ["a0", "a1", "b0", "b1"]
    # Without usage, the memory hog is 0 as well and the two alternate.
    assert order(queue, {}, totals) == ["b0", "a0", "b1", "a1"]


def test_order_key_matches_ordered_with_one_task_per_tenant():
    rng = random.Random(7)
    queue = [
        task(
            f"t{i}",
            tenant=i,
            tier=rng.choice([1, 2, 3]),
            package=rng.random() < 0.3,
            priority=rng.randrange(10),
            waited=rng.random() * 20 * STEP,
            order=i,
        )
        for i in range(200)
    ]
    usage = {i: TenantUsage(gpus=float(rng.randrange(50))) for i in range(200)}
    expected = sorted(
        queue,
        key=lambda t: order_key(t, usage_share=usage[t.tenant_id].gpus / BIG.gpus, now_ageing_seconds_per_step=STEP),
    )
    assert order(queue, usage) == ids(expected)


# ---------------------------------------------------------------------------------------------
# Admission


def test_plan_pass_drf_alternates_assignments_between_equal_tenants():
    queue = [task(f"a{i}", tenant=1, order=i) for i in range(4)] + [
        task(f"b{i}", tenant=2, order=10 + i) for i in range(4)
    ]
    result = run(queue, [gpu_node("n1", gpus=4)])
    assert [a.task_id for a in result.assignments] == ["a0", "b0", "a1", "b1"]
    assert set(result.waiting) == {"a2", "a3", "b2", "b3"}


def test_quota_limits_concurrent_tasks_and_gpus_per_model():
    queue = [
        task("t1", tenant=1, gpus=1, order=1),
        task("t2", tenant=1, gpus=1, order=2),
        task("t3", tenant=1, gpus=1, order=3),
        task("h", tenant=2, gpus=4, order=4),
        task("h2", tenant=2, gpus=2, order=5),
        task("other-model", tenant=2, model="H100", gpus=1, order=6),
    ]
    limits = {1: Limits(tasks_free=2, gpus_free={"A100": 8}), 2: Limits(tasks_free=10, gpus_free={"A100": 3})}
    result = run(queue, [gpu_node("a"), gpu_node("h", model="H100")], limits=limits)
    assigned = {a.task_id for a in result.assignments}
    assert assigned == {"t1", "t2", "h2"}
    assert result.waiting["t3"] == REASON_QUOTA_TASKS
    assert result.waiting["h"] == "quota: A100 GPUs"
    assert result.waiting["other-model"] == "quota: H100 GPUs"  # a model missing from the quota has no room


def test_gpu_quota_is_decremented_as_the_pass_assigns():
    queue = [task("x", gpus=2, order=1), task("y", gpus=2, order=2)]
    result = run(queue, [gpu_node("a")], limits={1: Limits(tasks_free=5, gpus_free={"A100": 3})})
    assert [a.task_id for a in result.assignments] == ["x"]
    assert result.waiting["y"] == "quota: A100 GPUs"


def test_a_vgpu_slice_counts_as_its_fraction_of_the_gpu_quota():
    queue = [task(f"s{i}", model="T4", gpus=0, slices=2, order=i) for i in range(3)]
    limits = {1: Limits(tasks_free=10, gpus_free={"T4": 1})}
    result = run(queue, [gpu_node("t", "T4", 1, slices=4)], limits=limits)
    assert [a.task_id for a in result.assignments] == ["s0", "s1"]  # 2/4 + 2/4 = one GPU
    assert result.waiting["s2"] == "quota: T4 GPUs"


def test_cannot_pay_is_skipped_with_a_reason_and_others_proceed():
    queue = [task("broke", tenant=1, tier=3), task("payer", tenant=2)]
    for can_pay in ({2}, lambda tenant: tenant == 2):
        result = run(queue, [gpu_node("a")], can_pay=can_pay)
        assert [a.task_id for a in result.assignments] == ["payer"]
        assert result.waiting == {"broke": REASON_CANNOT_PAY}


def test_every_task_is_either_assigned_or_waiting_and_inputs_are_untouched():
    rng = random.Random(3)
    nodes = [gpu_node(f"a{i}") for i in range(3)] + [gpu_node(f"t{i}", "T4", 4, slices=8) for i in range(3)]
    before = repr(nodes)
    queue = [
        task(
            f"q{i}",
            tenant=rng.randrange(5),
            tier=rng.choice([1, 1, 2, 3]),
            model=rng.choice(["A100", "T4"]),
            gpus=rng.choice([0, 1, 2, 4]),
            slices=rng.choice([1, 2]),
            order=i,
        )
        for i in range(300)
    ]
    result = run(queue, nodes)
    assigned = {a.task_id for a in result.assignments}
    assert not assigned & set(result.waiting)
    assert assigned | set(result.waiting) == {t.id for t in queue}
    assert repr(nodes) == before


def test_max_assignments_stops_the_pass():
    queue = [task(f"t{i}", tenant=i, order=i) for i in range(5)]
    result = run(queue, [gpu_node("a")], max_assignments=2)
    assert len(result.assignments) == 2
    assert sum(1 for r in result.waiting.values() if r == REASON_PASS_LIMIT) == 3


# ---------------------------------------------------------------------------------------------
# Placement


@pytest.mark.parametrize("ratio", [4, 8])
def test_vgpu_slices_never_exceed_the_per_gpu_limit(ratio):
    node = gpu_node("t", "T4", 2, slices=ratio)
    index = NodeIndex([node])
    placed = [index.place(task(f"s{i}", model="T4", gpus=0, slices=1)) for i in range(2 * ratio + 1)]
    assert all(p is not None for p in placed[: 2 * ratio])
    assert placed[-1] is None
    assert [slot.slices_used for slot in node.gpus] == [ratio, ratio]
    # A task asking for more slices than one GPU offers never fits.
    assert place(task("huge", model="T4", gpus=0, slices=ratio + 1), [gpu_node("u", "T4", 2, slices=ratio)]) is None


def test_slices_pack_onto_partly_used_gpus_first():
    node = gpu_node("t", "T4", 4, slices=8, used=(0, 3, 0, 6))
    # GPU 3 has 2 slices left and holds 2; GPU 1 has 5 left. Best fit on partly used GPUs: GPU 3.
    assert place(task("s", model="T4", gpus=0, slices=2), [node]) == ("t", ((3, 2),))
    # A partly used GPU on another node beats an untouched GPU on this one.
    fresh = gpu_node("fresh", "T4", 4, slices=4)
    partly = gpu_node("partly", "T4", 4, slices=4, used=(4, 4, 1, 4))
    assert place(task("s", model="T4", gpus=0, slices=1), [fresh, partly]) == ("partly", ((2, 1),))


def test_slices_only_on_general_pool_gpus_of_the_model_that_slice():
    passthrough = gpu_node("p", "T4", 4, slices=1, pool="general")
    other_model = gpu_node("a", "A10", 4, slices=4)
    high_end = gpu_node("h", "T4", 4, slices=4, pool="high_end")
    assert place(task("s", model="T4", gpus=0, slices=1), [passthrough, other_model, high_end]) is None


def test_a_whole_gpu_never_lands_on_a_gpu_with_slices_in_use():
    node = gpu_node("t", "T4", 2, slices=4, used=(1, 0))
    index = NodeIndex([node])
    assert index.place(task("w", model="T4", gpus=1)) == ("t", ((1, 4),))  # holds all 4 slices
    assert index.place(task("w2", model="T4", gpus=1)) is None
    assert index.place(task("s", model="T4", gpus=0, slices=3)) == ("t", ((0, 3),))
    assert [slot.slices_used for slot in node.gpus] == [4, 4]


def test_whole_gpus_go_to_the_best_fit_node_and_respect_cpu_and_memory():
    roomy = gpu_node("roomy")
    tight = gpu_node("tight", used=(1, 1, 1, 1, 1, 1, 0, 0))
    assert place(task("x", gpus=2), [roomy, tight]) == ("tight", ((6, 1), (7, 1)))
    starved = gpu_node("starved", cpus=2)
    assert place(task("x", gpus=1, vcpus=4), [starved]) is None
    assert place(task("x", model="H100", gpus=1), [gpu_node("a")]) is None


def test_cpu_only_tasks_prefer_cpu_nodes_then_the_tightest_fit():
    nodes = [gpu_node("g", cpus=8), cpu_node("big", cpus=64), cpu_node("small", cpus=8)]
    index = NodeIndex(nodes)
    assert index.place(task("c1", model=None, gpus=0, vcpus=6)) == ("small", ())
    assert index.place(task("c2", model=None, gpus=0, vcpus=6)) == ("big", ())
    assert index.place(task("c3", model=None, gpus=0, vcpus=4, memory=10_000)) is None
    assert nodes[2].cpus_free == 2 and nodes[1].cpus_free == 58


def test_place_mutates_the_chosen_node():
    node = gpu_node("a", cpus=16, memory=64)
    assert place(task("x", gpus=3, vcpus=10, memory=40), [node]) == ("a", ((0, 1), (1, 1), (2, 1)))
    assert [s.slices_used for s in node.gpus][:4] == [1, 1, 1, 0]
    assert (node.cpus_free, node.memory_free_gib) == (6, 24)


def test_unschedulable_nodes_are_skipped():
    node = gpu_node("a")
    node.schedulable = False
    assert place(task("x"), [node]) is None


# ---------------------------------------------------------------------------------------------
# Preemption


def full_a100(name):
    return gpu_node(name, used=(1,) * 8)


def test_diamond_preempts_the_fewest_preemptible_lower_tier_tasks():
    nodes = [full_a100("one"), full_a100("two")]
    busy = [
        running("big", "one", [(i, 1) for i in range(4)], started=10),
        running("keep", "one", [(i, 1) for i in range(4, 8)], preemptible=False),
        running("s1", "two", [(0, 1), (1, 1)], started=1),
        running("s2", "two", [(2, 1), (3, 1)], started=2),
        running("s3", "two", [(4, 1), (5, 1), (6, 1), (7, 1)], tier=3),
    ]
    result = run([task("d", tier=3, gpus=4)], nodes, running_tasks=busy)
    assert [(p.victim_id, p.for_task_id) for p in result.preemptions] == [("big", "d")]
    assert result.assignments == []
    assert result.waiting["d"] == "preempting 1 task(s)"
    assert result.pending[0].node == "one" and len(result.pending[0].gpu_indices) == 4


def test_diamond_prefers_lower_tier_then_most_recently_started_victims():
    nodes = [full_a100("n")]
    busy = [
        running("gold-new", "n", [(0, 1)], tier=2, started=50),
        running("std-old", "n", [(1, 1)], tier=1, started=10),
        running("std-new", "n", [(2, 1)], tier=1, started=40),
        running("rest", "n", [(i, 1) for i in range(3, 8)], preemptible=False),
    ]
    result = run([task("d", tier=3, gpus=1)], nodes, running_tasks=busy)
    assert [p.victim_id for p in result.preemptions] == ["std-new"]
    two = run([task("d", tier=3, gpus=2)], nodes, running_tasks=busy)
    assert sorted(p.victim_id for p in two.preemptions) == ["std-new", "std-old"]


def test_never_preempts_non_preemptible_or_diamond_tasks():
    nodes = [full_a100("n")]
    busy = [
        running("core", "n", [(i, 1) for i in range(4)], tier=3, preemptible=True),
        running("firm", "n", [(i, 1) for i in range(4, 8)], preemptible=False),
    ]
    result = run([task("d", tier=3, gpus=1)], nodes, running_tasks=busy)
    assert result.preemptions == []
    assert result.waiting["d"].startswith("no capacity")


def test_gold_tasks_do_not_preempt():
    busy = [running("v", "n", [(i, 1) for i in range(8)])]
    result = run([task("g", tier=2, gpus=1)], [full_a100("n")], running_tasks=busy)
    assert result.preemptions == [] and result.pending == []
    assert result.waiting["g"].startswith("no capacity")


def test_preemption_can_be_switched_off():
    busy = [running("v", "n", [(i, 1) for i in range(8)])]
    result = run([task("d", tier=3)], [full_a100("n")], running_tasks=busy, allow_preemption=False)
    assert result.preemptions == []


def test_preemption_needs_victims_on_one_node_and_holds_the_free_part():
    # 2 free GPUs on the node + a 2-GPU victim make room for a 4-GPU Diamond task.
    node = gpu_node("n", used=(1, 1, 1, 1, 1, 1, 0, 0))
    busy = [
        running("v", "n", [(0, 1), (1, 1)]),
        running("firm", "n", [(i, 1) for i in range(2, 6)], preemptible=False),
    ]
    queue = [task("d", tier=3, gpus=4, tenant=1), task("late", tier=1, gpus=1, tenant=2, order=5)]
    result = run(queue, [node], running_tasks=busy)
    assert [p.victim_id for p in result.preemptions] == ["v"]
    assert sorted(i for i, _ in result.pending[0].gpu_indices) == [0, 1, 6, 7]
    # The two free GPUs are kept for the Diamond task, not given to a later task in the pass.
    assert result.assignments == []
    assert result.waiting["late"].startswith("no capacity")


def test_tasks_already_stopping_are_used_before_new_victims():
    busy = [
        running("stopping", "n", [(i, 1) for i in range(4)], stopping=True),
        running("other", "n", [(i, 1) for i in range(4, 8)]),
    ]
    result = run([task("d", tier=3, gpus=4)], [full_a100("n")], running_tasks=busy)
    assert result.preemptions == []
    assert result.waiting["d"] == "waiting for 1 stopping task(s) to end"
    # A second Diamond task does not get the same stopping task; it preempts the other.
    two = run(
        [task("d", tier=3, gpus=4, order=1), task("e", tier=3, gpus=4, tenant=2, order=2)],
        [full_a100("n")],
        running_tasks=busy,
    )
    assert [(p.victim_id, p.for_task_id) for p in two.preemptions] == [("other", "e")]


def test_preemption_for_vgpu_slices_frees_a_sliced_gpu():
    node = gpu_node("t", "T4", 1, slices=4, used=(4,))
    busy = [
        running("a", "t", [(0, 1)], model="T4", started=1),
        running("b", "t", [(0, 3)], model="T4", started=2),
    ]
    result = run([task("d", tier=3, model="T4", gpus=0, slices=2)], [node], running_tasks=busy)
    assert [p.victim_id for p in result.preemptions] == ["b"]


def test_max_preemptions_bounds_a_pass():
    nodes = [full_a100(f"n{i}") for i in range(4)]
    busy = [running(f"v{i}", f"n{i}", [(g, 1) for g in range(8)]) for i in range(4)]
    queue = [task(f"d{i}", tier=3, gpus=8, tenant=i, order=i) for i in range(4)]
    result = run(queue, nodes, running_tasks=busy, max_preemptions=2)
    assert len(result.preemptions) == 2
    assert sum(1 for r in result.waiting.values() if r.startswith("no capacity")) == 2


# ---------------------------------------------------------------------------------------------
# Backfill and its starvation guard


def half_full():
    return gpu_node("n", used=(1, 1, 1, 1, 0, 0, 0, 0))


def test_a_big_task_that_does_not_fit_does_not_block_smaller_later_ones():
    queue = [task("big", gpus=8, tier=2, waited=60), task("small", gpus=2, tier=1, order=1, tenant=2)]
    result = run(queue, [half_full()], reserve_after_seconds=3600)
    assert [a.task_id for a in result.assignments] == ["small"]
    assert result.waiting["big"].startswith("no capacity")
    assert result.reservations == {}


def test_a_big_task_that_waited_past_the_threshold_reserves_its_gpu_model():
    queue = [
        task("big", gpus=8, tier=2, waited=7200),
        task("small", gpus=2, tier=1, order=1, tenant=2),
        task("elsewhere", model="T4", gpus=1, tier=1, order=2, tenant=3),
    ]
    result = run(queue, [half_full(), gpu_node("t", "T4", 4)], reserve_after_seconds=3600)
    assert [a.task_id for a in result.assignments] == ["elsewhere"]  # other models still backfill
    assert result.reservations == {"A100": "big"}
    assert result.waiting["small"].startswith("held: A100 capacity is reserved for task big")
    assert result.waiting["big"] == "no capacity: A100 capacity is now reserved for it"


def test_the_oldest_starving_task_leads_its_class_and_holds_the_reservation():
    # DRF alone would put the small old task of the idle tenant first; it would fit and the big one
    # would keep losing capacity to such tasks. The guard puts the oldest starving task first.
    queue = [
        task("big", tenant=1, gpus=8, waited=9000),
        task("old-small", tenant=2, gpus=2, waited=8000, order=1),
        task("new", tenant=3, gpus=1, order=2),
        task("gold", tenant=4, tier=2, gpus=1, order=3),
    ]
    usage = {1: TenantUsage(gpus=40.0)}
    assert order(queue, usage) == ["gold", "old-small", "big", "new"]
    assert ids(ordered(queue, usage, BIG, STEP, reserve_after_seconds=3600)) == ["gold", "big", "old-small", "new"]
    result = run(queue, [half_full()], usage=usage, reserve_after_seconds=3600)
    assert [a.task_id for a in result.assignments] == ["gold"]  # a higher tier still goes first
    assert result.reservations == {"A100": "big"}
    assert result.waiting["old-small"].startswith("held") and result.waiting["new"].startswith("held")
    # Switched off, the small old task backfills and nothing is reserved.
    off = run(queue, [half_full()], usage=usage, reserve_after_seconds=None)
    assert {a.task_id for a in off.assignments} == {"gold", "old-small", "new"}
    assert off.reservations == {}


def test_a_task_that_can_never_fit_reserves_nothing():
    queue = [task("huge", gpus=16, waited=10**6), task("small", gpus=2, order=1, tenant=2)]
    result = run(queue, [half_full()], reserve_after_seconds=3600)
    assert [a.task_id for a in result.assignments] == ["small"]
    assert result.waiting["huge"].startswith("never fits")


def test_reservation_lets_the_old_task_in_once_capacity_drains():
    # Pass 1: the old big task reserves; the small one waits. Pass 2 (the running half finished): it fits.
    queue = [task("big", gpus=8, waited=7200), task("small", gpus=2, order=1, tenant=2)]
    first = run(queue, [half_full()], reserve_after_seconds=3600)
    assert first.assignments == []
    second = run(queue, [gpu_node("n")], reserve_after_seconds=3600)
    assert [a.task_id for a in second.assignments] == ["big"]


# ---------------------------------------------------------------------------------------------
# Complexity


def test_a_pass_over_a_long_queue_is_fast():
    rng = random.Random(11)
    nodes = [gpu_node(f"a{i}") for i in range(150)] + [gpu_node(f"t{i}", "T4", 4, slices=8) for i in range(150)]
    queue = []
    for i in range(20_000):
        model = rng.choice(["A100", "T4"])
        whole = rng.random() < 0.7
        queue.append(
            task(
                f"q{i}",
                tenant=rng.randrange(200),
                tier=rng.choices([1, 2, 3], [70, 25, 5])[0],
                package=rng.random() < 0.2,
                priority=rng.randrange(10),
                waited=rng.random() * 7200,
                model=model,
                gpus=rng.choice([1, 2, 4]) if whole else 0,
                slices=0 if whole else rng.choice([1, 2]),
                order=i,
            )
        )
    start = time.perf_counter()
    result = run(queue, nodes)
    elapsed = time.perf_counter() - start
    assert len(result.assignments) + len(result.waiting) == len(queue)
    assert elapsed < 2.0, elapsed
