"""A VM's life through the services and the local backend: order, provision, run, stop, release,
fail, wait in line, idle release, scale-ups, and the reconciler repairing drift."""

from datetime import timedelta

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from provisioning import services
from provisioning.backends.base import VmRef
from provisioning.backends.local import LocalBackend
from provisioning.models import (
    LifecycleEvent,
    LocalClusterVm,
    Placement,
    Plan,
    ScaleUp,
    VirtualMachine,
    VmState,
)
from tenants import services as tenant_services
from tenants.models import AuditEvent, QuotaReservation, Role
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster(settings):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 0
    settings.PORTAL_LOCAL_BOOT_SECONDS = 0
    services.inventory_sync()
    return LocalBackend()


@pytest.fixture
def big_quota(tenant):
    staff = UserFactory(is_staff=True)
    tenant_services.quota_update(
        tenant=tenant,
        actor=staff,
        limits={"vcpus": 1000, "memory_gib": 8000, "hugepages_gib": 8000, "vms": 50, "storage_gib": 100000},
        gpus={"A100": 64, "H100": 64, "A10": 16, "T4": 16},
    )
    return tenant


@pytest.fixture
def ssh_key(owner_membership, user):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="laptop", public_key=public)


@pytest.fixture
def order(owner_membership, user, ssh_key, django_capture_on_commit_callbacks):
    def make(plan="a100-1x-general", name="box", billing_mode="monthly", wait=False, membership=None, extra=""):
        with django_capture_on_commit_callbacks(execute=True):
            return services.vm_order(
                membership=membership or owner_membership,
                actor=(membership or owner_membership).user,
                plan=Plan.objects.get(code=plan),
                name=name,
                billing_mode=billing_mode,
                ssh_key_ids=[ssh_key.pk],
                cloud_init_extra=extra,
                wait_if_full=wait,
            )

    return make


def reconcile(capture):
    with capture(execute=True):
        return services.reconcile()


def kinds(vm) -> list[str]:
    return list(LifecycleEvent.objects.filter(vm=vm).order_by("id").values_list("kind", flat=True))


def states(vm) -> list[str]:
    return list(vm.events.order_by("id").values_list("to_state", flat=True))


def test_order_runs_through_the_states_and_becomes_billable_only_when_running(
    cluster, order, django_capture_on_commit_callbacks, settings
):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 60
    vm = order()
    vm.refresh_from_db()
    assert vm.state == VmState.PROVISIONING and vm.node_name.startswith("a100-node")
    assert kinds(vm) == []  # provisioning is never billed
    local = LocalClusterVm.objects.get(name="box")
    assert {m["kind"] for m in local.manifests} >= {"VirtualMachine", "Service", "Secret"}

    LocalClusterVm.objects.filter(pk=local.pk).update(phase_since=timezone.now() - timedelta(seconds=61))
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING
    assert states(vm) == ["requested", "provisioning", "running"]
    assert kinds(vm) == ["started"]
    assert services.ssh_command(vm) == f"ssh -p {local.ssh_port} ubuntu@127.0.0.1"
    event = LifecycleEvent.objects.get(vm=vm)
    assert event.details == {
        "plan": "a100-1x-general",
        "billing_mode": "monthly",
        "gpu_model": "A100",
        "gpus": 1,
        "vcpus": 16,
        "memory_gib": 64,
    }
    reconcile(django_capture_on_commit_callbacks)  # nothing changes twice
    assert kinds(vm) == ["started"]


def test_order_holds_quota_and_capacity_until_release(cluster, order, tenant, django_capture_on_commit_callbacks):
    vm = order()
    reconcile(django_capture_on_commit_callbacks)
    assert QuotaReservation.objects.filter(holder_id=str(vm.pk), released_at__isnull=True).count() == 1
    assert Placement.objects.filter(holder_id=str(vm.pk), released_at__isnull=True).count() == 1
    services.vm_release(membership=tenant.memberships.get(role=Role.OWNER), actor=vm.created_by, vm=vm)
    vm.refresh_from_db()
    assert vm.state == VmState.RELEASED and vm.released_at
    assert not QuotaReservation.objects.filter(holder_id=str(vm.pk), released_at__isnull=True).exists()
    assert not Placement.objects.filter(holder_id=str(vm.pk), released_at__isnull=True).exists()
    assert not LocalClusterVm.objects.exists()
    assert kinds(vm) == ["started", "stopped", "released"]
    with pytest.raises(ValidationError, match="cannot be released"):
        services.vm_release(membership=tenant.memberships.get(role=Role.OWNER), actor=vm.created_by, vm=vm)


def test_stop_start_restart_emit_billing_boundaries(
    cluster, order, owner_membership, user, django_capture_on_commit_callbacks
):
    vm = order()
    reconcile(django_capture_on_commit_callbacks)
    services.vm_stop(membership=owner_membership, actor=user, vm=vm)
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.STOPPED
    with pytest.raises(ValidationError, match="cannot be stopped"):
        services.vm_stop(membership=owner_membership, actor=user, vm=vm)
    services.vm_start(membership=owner_membership, actor=user, vm=vm)
    reconcile(django_capture_on_commit_callbacks)
    services.vm_restart(membership=owner_membership, actor=user, vm=vm)
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING
    assert kinds(vm) == ["started", "stopped", "started", "stopped", "started"]
    assert AuditEvent.objects.filter(target_id=str(vm.pk), action="vm.stopping", actor=user).exists()


def test_failed_boot_costs_nothing_and_gives_everything_back(
    cluster, order, django_capture_on_commit_callbacks, settings
):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 60
    vm = order()
    LocalClusterVm.objects.update(failure="GPU 0000:3b:00.0 failed to attach (Xid 79)")
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.FAILED and "Xid 79" in vm.failure_reason
    assert kinds(vm) == []
    assert not QuotaReservation.objects.filter(released_at__isnull=True, holder_id=str(vm.pk)).exists()
    assert not LocalClusterVm.objects.exists()  # cleaned from the cluster
    assert "failed" in mail.outbox[-1].subject


def test_stuck_provisioning_fails_after_the_deadline_without_charge(
    cluster, order, settings, django_capture_on_commit_callbacks
):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 3600
    settings.PORTAL_PROVISION_DEADLINE_SECONDS = 600
    vm = order()
    VirtualMachine.objects.filter(pk=vm.pk).update(state_changed_at=timezone.now() - timedelta(seconds=601))
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.FAILED
    assert "did not become ready within 10 minutes" in vm.failure_reason and "not charged" in vm.failure_reason
    assert kinds(vm) == []


def test_worker_killed_before_handing_over_loses_nothing(cluster, owner_membership, user, ssh_key):
    # The order committed but its provision task never ran (the worker died): no on-commit execution here.
    vm = services.vm_order(
        membership=owner_membership,
        actor=user,
        plan=Plan.objects.get(code="t4-1x-general"),
        name="orphan",
        billing_mode="on_demand",
        ssh_key_ids=[ssh_key.pk],
    )
    assert vm.state == VmState.REQUESTED and not LocalClusterVm.objects.exists()
    services.reconcile()
    services.reconcile()
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING and LocalClusterVm.objects.count() == 1


def test_vm_lost_between_create_and_confirm_is_resubmitted(
    cluster, order, django_capture_on_commit_callbacks, settings
):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 60
    vm = order()
    LocalClusterVm.objects.all().delete()  # the cluster lost it
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert LocalClusterVm.objects.filter(name="box").exists()
    assert vm.state == VmState.PROVISIONING


def test_leftovers_of_a_half_finished_release_are_removed(cluster, order, django_capture_on_commit_callbacks):
    vm = order()
    reconcile(django_capture_on_commit_callbacks)
    ref = services.vm_ref(vm)
    VirtualMachine.objects.filter(pk=vm.pk).update(state=VmState.RELEASED)  # portal done, cluster not
    assert VmRef(ref.namespace, ref.name) in LocalBackend().list_vms()
    counts = reconcile(django_capture_on_commit_callbacks)
    assert counts["leftovers_deleted"] == 1 and not LocalClusterVm.objects.exists()


def test_running_vm_missing_from_cluster_is_failed_and_billing_stops(
    cluster, order, django_capture_on_commit_callbacks
):
    vm = order()
    reconcile(django_capture_on_commit_callbacks)
    LocalClusterVm.objects.all().delete()
    reconcile(django_capture_on_commit_callbacks)
    vm.refresh_from_db()
    assert vm.state == VmState.FAILED and "disappeared" in vm.failure_reason
    assert kinds(vm) == ["started", "stopped"]


class TestWaitingInLine:
    def test_no_capacity_without_waiting_is_refused_and_nothing_is_held(self, cluster, big_quota, order):
        for n in range(3):  # three A100 nodes, one training VM each (anti-affinity)
            order(plan="a100-2x-training", name=f"train-{n}")
        with pytest.raises(ValidationError) as exc:
            order(plan="a100-2x-training", name="train-3")
        assert "wait in line" in exc.value.message_dict["plan"][0]
        assert not VirtualMachine.objects.filter(name="train-3").exists()
        assert QuotaReservation.objects.filter(released_at__isnull=True).count() == 3

    def test_waiting_orders_start_in_order_when_gpus_free_up(
        self, cluster, big_quota, order, owner_membership, user, django_capture_on_commit_callbacks
    ):
        running = [order(plan="a100-2x-training", name=f"train-{n}") for n in range(3)]
        first = order(plan="a100-2x-training", name="waiting-1", wait=True)
        second = order(plan="a100-2x-training", name="waiting-2", wait=True)
        assert (first.state, second.state) == (VmState.QUEUED, VmState.QUEUED)
        assert services.queue_position(first) == 1 and services.queue_position(second) == 2
        reconcile(django_capture_on_commit_callbacks)
        first.refresh_from_db()
        assert first.state == VmState.QUEUED  # still no room

        services.vm_release(membership=owner_membership, actor=user, vm=running[0])
        reconcile(django_capture_on_commit_callbacks)
        reconcile(django_capture_on_commit_callbacks)
        first.refresh_from_db()
        second.refresh_from_db()
        assert first.state == VmState.RUNNING
        assert second.state == VmState.QUEUED and services.queue_position(second) == 1

    def test_a_waiting_order_can_be_cancelled(self, cluster, big_quota, order, owner_membership, user):
        for n in range(3):
            order(plan="a100-2x-training", name=f"train-{n}")
        waiting = order(plan="a100-2x-training", name="waiting", wait=True)
        services.vm_release(membership=owner_membership, actor=user, vm=waiting)
        waiting.refresh_from_db()
        assert waiting.state == VmState.RELEASED
        assert not QuotaReservation.objects.filter(holder_id=str(waiting.pk), released_at__isnull=True).exists()


class TestOrderRules:
    def test_over_quota_is_refused_with_the_shortfall_and_nothing_created(self, cluster, order):
        order(plan="a100-2x-training", name="one")  # standard tier: 2 A100
        with pytest.raises(ValidationError) as exc:
            order(plan="a100-1x-general", name="two")
        assert any("A100 GPUs" in m for m in exc.value.message_dict["quota"])
        assert not VirtualMachine.objects.filter(name="two").exists()

    def test_bad_input_gets_field_messages(self, cluster, owner_membership, user, ssh_key):
        other = make_tenant(name="Other")
        foreign_key = tenant_services.ssh_key_add(
            membership=other.memberships.get(),
            actor=other.memberships.get().user,
            name="x",
            public_key=ssh_key.public_key.replace("laptop", ""),
        )
        with pytest.raises(ValidationError) as exc:
            services.vm_order(
                membership=owner_membership,
                actor=user,
                plan=Plan.objects.get(code="t4-1x-general"),
                name="Bad_Name",
                billing_mode="weekly",
                ssh_key_ids=[foreign_key.pk],
                cloud_init_extra="users: []",
            )
        assert set(exc.value.message_dict) == {"name", "billing_mode", "ssh_key_ids", "cloud_init_extra"}
        assert not VirtualMachine.objects.exists()

    def test_duplicate_live_name_is_refused_but_a_released_name_can_be_reused(
        self, cluster, order, owner_membership, user
    ):
        vm = order(plan="t4-1x-general", name="dup")
        with pytest.raises(ValidationError, match="already have a VM called dup"):
            order(plan="t4-1x-general", name="dup")
        services.vm_release(membership=owner_membership, actor=user, vm=vm)
        assert order(plan="t4-1x-general", name="dup").state != VmState.FAILED

    def test_viewer_and_billing_cannot_order(self, cluster, tenant, ssh_key):
        for role in (Role.VIEWER, Role.BILLING):
            membership = add_member(tenant, role)
            with pytest.raises(PermissionDenied):
                services.vm_order(
                    membership=membership,
                    actor=membership.user,
                    plan=Plan.objects.get(code="t4-1x-general"),
                    name="nope",
                    billing_mode="monthly",
                    ssh_key_ids=[ssh_key.pk],
                )

    def test_order_checks_can_refuse(self, cluster, order, settings):
        settings.PORTAL_ORDER_CHECKS = ["tests.test_vm_lifecycle.refuse_everything"]
        with pytest.raises(ValidationError, match="Top up first"):
            order(plan="t4-1x-general", name="broke")
        assert not VirtualMachine.objects.exists()


def refuse_everything(*, tenant, plan, billing_mode):
    raise ValidationError("Top up first.")


class TestAccess:
    def test_reveal_is_audited_and_only_for_compute_users(
        self, cluster, order, tenant, owner_membership, user, django_capture_on_commit_callbacks
    ):
        vm = order()
        reconcile(django_capture_on_commit_callbacks)
        access = services.vm_reveal_access(membership=owner_membership, actor=user, vm=vm)
        assert access["ssh_command"].startswith("ssh -p ")
        assert len(access["jupyter_token"]) >= 32
        vm.refresh_from_db()
        assert access["jupyter_token"] not in vm.jupyter_token_encrypted  # stored encrypted
        assert AuditEvent.objects.filter(action="vm.access_revealed", actor=user, target_id=str(vm.pk)).exists()
        viewer = add_member(tenant, Role.VIEWER)
        with pytest.raises(PermissionDenied):
            services.vm_reveal_access(membership=viewer, actor=viewer.user, vm=vm)

    def test_rotation_changes_the_token_and_restarts(
        self, cluster, order, owner_membership, user, django_capture_on_commit_callbacks
    ):
        vm = order()
        reconcile(django_capture_on_commit_callbacks)
        before = services.vm_reveal_access(membership=owner_membership, actor=user, vm=vm)["jupyter_token"]
        services.vm_rotate_jupyter_token(membership=owner_membership, actor=user, vm=vm)
        reconcile(django_capture_on_commit_callbacks)
        after = services.vm_reveal_access(membership=owner_membership, actor=user, vm=vm)["jupyter_token"]
        assert before != after
        assert LocalClusterVm.objects.get().jupyter_token == after
        assert AuditEvent.objects.filter(action="vm.jupyter_token_rotated").count() == 1

    def test_another_tenants_vm_is_not_found(self, cluster, order, django_capture_on_commit_callbacks):
        vm = order()
        stranger = make_tenant(name="Stranger").memberships.get()
        with pytest.raises(VirtualMachine.DoesNotExist):
            services.vm_stop(membership=stranger, actor=stranger.user, vm=vm)


class TestIdleRelease:
    def test_idle_on_demand_vm_is_warned_then_released(
        self, cluster, order, django_capture_on_commit_callbacks, settings
    ):
        settings.PORTAL_IDLE_WARNING_MINUTES = 15
        vm = order(plan="t4-1x-general", billing_mode="on_demand")  # idle release after 60 minutes
        reconcile(django_capture_on_commit_callbacks)
        reconcile(django_capture_on_commit_callbacks)
        vm.refresh_from_db()
        assert vm.state == VmState.RUNNING and vm.idle_since is not None

        VirtualMachine.objects.filter(pk=vm.pk).update(idle_since=timezone.now() - timedelta(minutes=46))
        reconcile(django_capture_on_commit_callbacks)
        vm.refresh_from_db()
        assert vm.idle_warned_at is not None and vm.state == VmState.RUNNING
        assert "will be released" in mail.outbox[-1].subject
        assert AuditEvent.objects.filter(action="vm.idle_warning", target_id=str(vm.pk)).exists()

        VirtualMachine.objects.filter(pk=vm.pk).update(idle_since=timezone.now() - timedelta(minutes=61))
        reconcile(django_capture_on_commit_callbacks)
        vm.refresh_from_db()
        assert vm.state == VmState.RELEASED
        assert "60 minutes" in vm.events.get(to_state="releasing").message

    def test_busy_gpu_resets_the_idle_clock_and_subscriptions_are_never_idle_released(
        self, cluster, order, django_capture_on_commit_callbacks
    ):
        on_demand = order(plan="t4-1x-general", name="busy", billing_mode="on_demand")
        monthly = order(plan="t4-1x-general", name="monthly", billing_mode="monthly")
        reconcile(django_capture_on_commit_callbacks)
        reconcile(django_capture_on_commit_callbacks)
        LocalClusterVm.objects.filter(name="busy").update(gpu_utilisation_percent=87.5)
        VirtualMachine.objects.filter(pk=on_demand.pk).update(idle_since=timezone.now() - timedelta(minutes=59))
        reconcile(django_capture_on_commit_callbacks)
        on_demand.refresh_from_db()
        monthly.refresh_from_db()
        assert on_demand.idle_since is None and on_demand.state == VmState.RUNNING
        assert monthly.idle_since is None and monthly.state == VmState.RUNNING


class TestScaleUps:
    def test_scale_up_adds_then_reverts_by_itself(
        self, cluster, big_quota, order, owner_membership, user, django_capture_on_commit_callbacks
    ):
        vm = order(plan="a100-1x-general")
        reconcile(django_capture_on_commit_callbacks)
        scale_up = services.scale_up_add(
            membership=owner_membership, actor=user, vm=vm, extra_gpus=1, extra_vcpus=8, extra_memory_gib=32, days=3
        )
        assert scale_up.ends_at - scale_up.starts_at == timedelta(days=3)
        vm_object = next(m for m in LocalClusterVm.objects.get().manifests if m["kind"] == "VirtualMachine")
        assert len(vm_object["spec"]["template"]["spec"]["domain"]["devices"]["gpus"]) == 2
        reconcile(django_capture_on_commit_callbacks)
        resized = LifecycleEvent.objects.get(vm=vm, kind="resized")
        assert resized.details["gpus"] == 2 and resized.details["vcpus"] == 24 and resized.details["memory_gib"] == 96

        ScaleUp.objects.update(ends_at=timezone.now() - timedelta(seconds=1))
        assert services.scale_ups_revert_due() == 1
        scale_up.refresh_from_db()
        assert scale_up.state == "reverted"
        assert not QuotaReservation.objects.filter(holder_type="scaleup", released_at__isnull=True).exists()
        vm_object = next(m for m in LocalClusterVm.objects.get().manifests if m["kind"] == "VirtualMachine")
        assert len(vm_object["spec"]["template"]["spec"]["domain"]["devices"]["gpus"]) == 1
        assert services.scale_ups_revert_due() == 0

    def test_scale_up_rules(self, cluster, order, owner_membership, user, django_capture_on_commit_callbacks):
        on_demand = order(plan="t4-1x-general", name="od", billing_mode="on_demand")
        reconcile(django_capture_on_commit_callbacks)
        with pytest.raises(ValidationError, match="monthly and yearly"):
            services.scale_up_add(membership=owner_membership, actor=user, vm=on_demand, extra_vcpus=2, days=1)
        with pytest.raises(ValidationError) as exc:
            services.scale_up_add(membership=owner_membership, actor=user, vm=on_demand, days=0)
        assert {"days", "extra_gpus"} <= set(exc.value.message_dict)
        monthly = order(plan="t4-1x-general", name="mo")
        reconcile(django_capture_on_commit_callbacks)
        with pytest.raises(ValidationError) as exc:  # standard quota: 4 T4 in use by nobody else, limit 4
            services.scale_up_add(membership=owner_membership, actor=user, vm=monthly, extra_gpus=4, days=1)
        assert "quota" in exc.value.message_dict
        assert not ScaleUp.objects.exists()


def test_availability_counts_what_can_start_now(cluster, big_quota, order):
    from provisioning.capacity import availability

    plans = {p.code: p for p in Plan.objects.all()}
    before = availability(plans.values())
    assert before[plans["a100-2x-training"].pk] == 3  # one per A100 node
    assert before[plans["h100-2x-training"].pk] == 2
    assert before[plans["db-64g"].pk] == 6  # 384 GiB of 1 GiB hugepages / 64
    order(plan="a100-2x-training", name="t1")
    after = availability(plans.values())
    assert after[plans["a100-2x-training"].pk] == 2
    assert after[plans["a100-1x-general"].pk] == before[plans["a100-1x-general"].pk] - 2  # 2 of its 8 GPUs
