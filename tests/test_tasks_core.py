"""Task hosting through the services and the local executor: admission, runs, retries, timeouts,
cancel, preemption, zombies, credit stops — and nothing dispatched twice."""

import threading
import time
from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.utils import timezone

from hosting import services
from hosting.models import Task, TaskEvent, TaskRun, TaskState
from provisioning.models import Placement
from provisioning.services import inventory_sync
from tenants import services as tenant_services
from tenants.models import QuotaReservation, Role, Tier
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = pytest.mark.django_db

QUICK = "python3 -c \"print('##progress 50'); print('##metric loss=0.5'); print('hello'); print('##progress 100')\""
FAIL = "python3 -c \"print('##progress 10'); raise SystemExit(3)\""
# Runs until told to stop; on SIGTERM says so and exits 143 like a well-behaved trainer.
LONG = (
    'python3 -c "import signal, sys, time\n'
    "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
    "print('##progress 1', flush=True)\n"
    'while True: time.sleep(0.05)"'
)


@pytest.fixture(autouse=True)
def _no_executor_outlives_its_test():
    """Attempts running on threads are told to stop and awaited, so none writes while the database is
    flushed for the next test. An attempt that ends can dispatch another (a retry, the next in line),
    so this waits until no executor thread is left."""
    yield
    deadline = time.monotonic() + 60
    while running := [t for t in threading.enumerate() if t.name.startswith("task-") and t.is_alive()]:
        Task.objects.exclude(state__in=["succeeded", "failed", "timed_out", "cancelled"]).update(
            stop_requested="cancel"
        )
        for thread in running:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        assert time.monotonic() < deadline, f"executor threads outlived their test: {running}"


@pytest.fixture
def pool(settings, tmp_path):
    settings.PORTAL_TASK_EXECUTE_INLINE = True
    settings.PORTAL_TASK_GRACE_SECONDS = 1
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 0
    inventory_sync()


def submit(membership, capture=None, **fields):
    data = {
        "name": "job",
        "framework": "custom",
        "image": "python:3.11",
        "command": QUICK,
        "vcpus": 1,
        "memory_gib": 1,
        "max_runtime_seconds": 120,
    } | fields
    if capture is None:
        return services.task_submit(membership=membership, actor=membership.user, **data)
    with capture(execute=True):
        return services.task_submit(membership=membership, actor=membership.user, **data)


def events(task, kind=None):
    rows = TaskEvent.objects.filter(task=task).order_by("seq")
    if kind:
        rows = rows.filter(kind=kind)
    return list(rows)


def test_a_task_runs_reports_and_gives_everything_back(pool, owner_membership, django_capture_on_commit_callbacks):
    task = submit(owner_membership, django_capture_on_commit_callbacks, gpu_model="T4", gpus=1)
    task.refresh_from_db()
    assert task.state == TaskState.SUCCEEDED and task.progress == 100 and task.attempts == 1
    seqs = [e.seq for e in events(task)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.data["text"] for e in events(task, "log")] == ["hello"]
    assert [e.data["state"] for e in events(task, "state")] == ["queued", "starting", "running", "succeeded"]
    run = TaskRun.objects.get(task=task)
    assert run.chargeable and run.outcome == "succeeded" and run.ended_at >= run.started_at
    assert run.gpu_model.code == "T4" and run.gpus == 1
    assert len(task.assigned_gpus) == 0  # given back with the placement
    assert not QuotaReservation.objects.filter(holder_id=str(task.pk), released_at__isnull=True).exists()
    assert not Placement.objects.filter(holder_id=str(task.pk), released_at__isnull=True).exists()


def test_cuda_visible_devices_are_the_assigned_gpus(pool, owner_membership, django_capture_on_commit_callbacks):
    task = submit(
        owner_membership,
        django_capture_on_commit_callbacks,
        gpu_model="A10",
        gpus=2,
        command="python3 -c \"import os; print('GPUS=' + os.environ['CUDA_VISIBLE_DEVICES'])\"",
    )
    line = events(task, "log")[0].data["text"]
    assert line in ("GPUS=0,1", "GPUS=1,2", "GPUS=2,3")


def test_a_slice_task_shares_a_gpu(pool, owner_membership, django_capture_on_commit_callbacks):
    task = submit(owner_membership, django_capture_on_commit_callbacks, gpu_model="T4", vgpu_slices=2)
    task.refresh_from_db()
    run = TaskRun.objects.get(task=task)
    assert task.state == TaskState.SUCCEEDED and run.gpus == pytest.approx(0.25)  # 2 of a T4's 8 slices


def test_failure_is_retried_with_backoff_then_fails(
    pool, owner_membership, django_capture_on_commit_callbacks, settings
):
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 60
    task = submit(owner_membership, django_capture_on_commit_callbacks, command=FAIL, max_retries=2)
    for backoff in (60, 120):
        task.refresh_from_db()
        assert task.state == TaskState.RETRY_WAIT and "exited with code 3" in events(task, "state")[-1].data["message"]
        wait = (task.next_attempt_at - timezone.now()).total_seconds()
        assert backoff - 5 < wait <= backoff
        services.schedule_pass()  # too early: nothing happens
        task.refresh_from_db()
        assert task.state == TaskState.RETRY_WAIT
        Task.objects.filter(pk=task.pk).update(next_attempt_at=timezone.now())
        with django_capture_on_commit_callbacks(execute=True):
            services.schedule_pass()
    task.refresh_from_db()
    assert task.state == TaskState.FAILED and task.attempts == 3 and task.exit_code == 3
    assert TaskRun.objects.filter(task=task, chargeable=True).count() == 3  # the customer's own failures count


def test_time_limit_stops_the_task(pool, owner_membership, django_capture_on_commit_callbacks):
    task = submit(owner_membership, command=LONG)
    Task.objects.filter(pk=task.pk).update(max_runtime_seconds=1)  # below what the form allows, to be quick
    with django_capture_on_commit_callbacks(execute=True):
        services.schedule_pass()
    task.refresh_from_db()
    assert task.state == TaskState.TIMED_OUT
    assert "got SIGTERM" in [e.data["text"] for e in events(task, "log")]
    assert TaskRun.objects.get(task=task).outcome == "timed_out"


def test_cancel_queued_and_cancel_during_start(pool, owner_membership, django_capture_on_commit_callbacks):
    queued = submit(owner_membership)  # no on-commit run: it stays queued
    services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=queued)
    queued.refresh_from_db()
    assert queued.state == TaskState.CANCELLED

    starting = submit(owner_membership)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.schedule_pass()
    starting.refresh_from_db()
    assert starting.state == TaskState.STARTING
    services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=starting)
    for callback in callbacks:
        callback()  # the executor picks it up only now
    starting.refresh_from_db()
    assert starting.state == TaskState.CANCELLED
    assert not TaskRun.objects.filter(task=starting).exists()  # it never ran: nothing to charge


THREADED = pytest.mark.django_db(transaction=True, serialized_rollback=True)
# Several threads writing at once: SQLite's shared in-memory test database locks whole tables.
THREADS_WRITING = pytest.mark.postgres


@THREADED
@THREADS_WRITING
def test_running_task_cancel_sends_sigterm(settings, pool, owner_membership):
    settings.PORTAL_TASK_EXECUTE_INLINE = False  # a thread, so the test can act while it runs
    task = submit(owner_membership, command=LONG)
    services.schedule_pass()
    _wait_for(task, TaskState.RUNNING)
    services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=task)
    _wait_for(task, TaskState.CANCELLED, timeout=15)
    assert "got SIGTERM" in [e.data["text"] for e in events(task, "log")]


def _wait_for(task, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task.refresh_from_db()
        if task.state == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"task is {task.state}, expected {state}")


class TestAdmission:
    @THREADED
    @THREADS_WRITING
    def test_concurrent_task_quota_holds_the_rest_with_a_reason(self, pool, owner_membership, settings):
        settings.PORTAL_TASK_EXECUTE_INLINE = False
        tasks = [submit(owner_membership, command=LONG, name=f"t{i}") for i in range(5)]  # Standard: 4 at once
        services.schedule_pass()
        states = sorted(Task.objects.filter(pk__in=[t.pk for t in tasks]).values_list("state", flat=True))
        assert states.count(TaskState.QUEUED) == 1
        waiting = Task.objects.get(state=TaskState.QUEUED)
        assert "quota" in waiting.waiting_reason.lower()
        for task in tasks:
            task.refresh_from_db()
            if task.state != TaskState.QUEUED:
                services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=task)
        for task in tasks:
            if task.pk != waiting.pk:
                _wait_for(task, TaskState.CANCELLED, timeout=15)

    def test_cannot_pay_keeps_it_queued_with_the_reason(self, pool, owner_membership, settings):
        settings.PORTAL_TASK_PAYMENT_CHECK = "tests.test_tasks_core.cannot_pay"
        task = submit(owner_membership)
        services.schedule_pass()
        task.refresh_from_db()
        assert task.state == TaskState.QUEUED and task.waiting_reason == "Top up to run tasks."

    def test_bad_input_and_impossible_requests_are_refused_up_front(self, pool, owner_membership):
        with pytest.raises(ValidationError) as exc:
            submit(
                owner_membership,
                command="",
                max_runtime_seconds=72 * 3600 + 1,
                max_retries=4,
                gpu_model="T4",
                gpus=1,
                vgpu_slices=2,
                env={"CUDA_VISIBLE_DEVICES": "0"},
                input_url="http://example.com/data",
            )
        assert {"command", "max_runtime_seconds", "max_retries", "vgpu_slices", "env", "input_url"} <= set(
            exc.value.message_dict
        )
        with pytest.raises(ValidationError, match="can never start"):
            submit(owner_membership, gpu_model="H100", gpus=1)  # Standard quota: 0 H100
        with pytest.raises(ValidationError, match="not offered in vGPU slices"):
            submit(owner_membership, gpu_model="A100", vgpu_slices=1)
        assert not Task.objects.exists()

    def test_viewer_cannot_submit(self, pool, tenant):
        viewer = add_member(tenant, Role.VIEWER)
        with pytest.raises(PermissionDenied):
            submit(viewer)


def cannot_pay(*, tenant):
    return False, "Top up to run tasks."


@THREADED
@THREADS_WRITING
class TestPreemption:
    @pytest.fixture
    def one_node(self, settings, tmp_path, pool):
        inventory = tmp_path / "inventory.yaml"
        inventory.write_text(
            "nodes:\n  - {name: a100-solo, pool: high_end, gpu: nvidia.com/GA100_A100_PCIE_80GB, "
            "gpus: 2, cpus: 32, memory_gib: 256}\n"
        )
        settings.PORTAL_LOCAL_INVENTORY = inventory
        settings.PORTAL_TASK_EXECUTE_INLINE = False
        inventory_sync()

    def test_diamond_preempts_a_preemptible_task_which_keeps_its_place_and_is_not_charged(
        self, one_node, tenant, owner_membership
    ):
        victim = submit(owner_membership, command=LONG, gpu_model="A100", gpus=2, preemptible=True)
        services.schedule_pass()
        _wait_for(victim, TaskState.RUNNING)
        place_before = Task.objects.get(pk=victim.pk).queued_since

        core_owner = UserFactory()
        core = make_tenant(owner=core_owner, name="Core Co")
        core.tier = Tier.objects.get(code="diamond")
        core.save()
        core_membership = core.memberships.get()
        vip = submit(core_membership, command=QUICK, gpu_model="A100", gpus=2)
        services.schedule_pass()  # asks the victim to stop
        _wait_for(victim, TaskState.QUEUED, timeout=15)
        assert "got SIGTERM" in [e.data["text"] for e in events(victim, "log")]
        victim.refresh_from_db()
        assert victim.queued_since == place_before  # keeps its place in line
        lost = TaskRun.objects.get(task=victim, attempt=1)
        assert lost.outcome == "preempted" and not lost.chargeable
        services.schedule_pass()
        _wait_for(vip, TaskState.SUCCEEDED, timeout=15)
        services.schedule_pass()
        _wait_for(victim, TaskState.RUNNING, timeout=15)
        services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=victim)
        _wait_for(victim, TaskState.CANCELLED, timeout=15)

    def test_non_preemptible_tasks_are_never_preempted(self, one_node, owner_membership):
        safe = submit(owner_membership, command=LONG, gpu_model="A100", gpus=2, preemptible=False)
        services.schedule_pass()
        _wait_for(safe, TaskState.RUNNING)
        core = make_tenant(name="Core Co")
        core.tier = Tier.objects.get(code="diamond")
        core.save()
        vip = submit(core.memberships.get(), command=QUICK, gpu_model="A100", gpus=2)
        services.schedule_pass()
        safe.refresh_from_db()
        vip.refresh_from_db()
        assert safe.state == TaskState.RUNNING and not safe.stop_requested and vip.state == TaskState.QUEUED
        services.task_cancel(membership=owner_membership, actor=owner_membership.user, task=safe)
        _wait_for(safe, TaskState.CANCELLED, timeout=15)


def test_zombie_is_reaped_retried_and_its_lost_attempt_not_charged(pool, owner_membership, settings):
    task = submit(owner_membership, max_retries=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services, "dispatch", lambda task_id, attempt: None)  # the executor never reports back
        services.schedule_pass()
    task.refresh_from_db()
    assert task.state == TaskState.STARTING
    # An executor that started, then went silent.
    services.Reporter(str(task.pk), task.attempts).started()
    Task.objects.filter(pk=task.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    counts = services.tasks_reap()
    task.refresh_from_db()
    assert counts["lost"] == 1 and task.state == TaskState.RETRY_WAIT
    run = TaskRun.objects.get(task=task, attempt=1)
    assert run.outcome == "lost" and not run.chargeable


def test_a_start_nobody_picked_up_goes_back_in_line(pool, owner_membership, settings):
    task = submit(owner_membership)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services, "dispatch", lambda task_id, attempt: None)
        services.schedule_pass()
    Task.objects.filter(pk=task.pk).update(state_changed_at=timezone.now() - timedelta(hours=1))
    assert services.tasks_reap()["requeued"] == 1
    task.refresh_from_db()
    assert task.state == TaskState.QUEUED
    assert not QuotaReservation.objects.filter(holder_id=str(task.pk), released_at__isnull=True).exists()


@THREADED
@THREADS_WRITING
def test_credit_exhausted_stops_running_tasks(settings, pool, owner_membership, tenant):
    settings.PORTAL_TASK_EXECUTE_INLINE = False
    task = submit(owner_membership, command=LONG)
    services.schedule_pass()
    _wait_for(task, TaskState.RUNNING)
    assert services.tasks_stop_for_credit(tenant=tenant, reason="Your credit is exhausted.") == 1
    _wait_for(task, TaskState.CANCELLED, timeout=15)
    assert "credit" in events(task, "state")[-1].data["message"].lower()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_nothing_is_dispatched_twice_when_passes_and_workers_race(settings):
    """Eight threads run scheduling passes at once (beat ticks and workers racing), and every dispatch
    is delivered twice (a redelivered Celery message): each task still runs exactly once."""
    settings.PORTAL_TASK_EXECUTE_INLINE = True
    settings.PORTAL_TASK_GRACE_SECONDS = 1
    inventory_sync()
    owner = UserFactory()
    tenant = make_tenant(owner=owner)
    staff = UserFactory(is_staff=True)
    tenant_services.quota_update(tenant=tenant, actor=staff, limits={"concurrent_tasks": 100, "vcpus": 400}, gpus={})
    membership = tenant.memberships.get()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services, "_schedule_soon", lambda: None)  # leave them all for the racing passes
        tasks = [submit(membership, name=f"t{i}") for i in range(24)]
    dispatched = []
    real_execute = services.execute

    def twice(task_id, attempt):
        dispatched.append(task_id)
        real_execute(task_id, attempt)
        real_execute(task_id, attempt)  # the duplicate delivery

    barrier = threading.Barrier(8)

    def racer():
        try:
            barrier.wait()
            for _ in range(3):
                services.schedule_pass()
        finally:
            connection.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services, "execute", twice)
        threads = [threading.Thread(target=racer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(dispatched) == sorted(str(t.pk) for t in tasks)  # each dispatched once
    assert TaskRun.objects.count() == 24 and set(TaskRun.objects.values_list("attempt", flat=True)) == {1}
    assert Task.objects.filter(state=TaskState.SUCCEEDED).count() == 24
