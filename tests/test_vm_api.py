"""GPU VM rental through /api/v1/: the catalogue, ordering, the lifecycle, access handoff, scale-ups,
tenant isolation, roles, 400s, and query counts that do not grow with the number of VMs."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from provisioning import secrets, services
from provisioning.models import LifecycleEvent, LocalClusterVm, Node, Plan, PlanPrice, VirtualMachine, VmState
from tenants import services as tenant_services
from tenants.models import AuditEvent, GpuQuota, QuotaReservation, Role, TenantQuota
from tests.factories import UserFactory, add_member, make_tenant, new_public_key

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def cluster(settings, db):
    """The local backend with instant provisioning and boot, and the nodes of provisioning/inventory.yaml."""
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 0
    settings.PORTAL_LOCAL_BOOT_SECONDS = 0
    services.inventory_sync()


@pytest.fixture
def key(owner_membership, user):
    return tenant_services.ssh_key_add(
        membership=owner_membership, actor=user, name="laptop", public_key=new_public_key()
    )


@pytest.fixture
def settle(django_capture_on_commit_callbacks):
    """Run the reconciler until the cluster and the portal agree (a few passes, as beat would)."""

    def run(passes: int = 3):
        for _ in range(passes):
            with django_capture_on_commit_callbacks(execute=True):
                services.reconcile()

    return run


@pytest.fixture
def order(api, key, django_capture_on_commit_callbacks):
    """order(client=None, **fields) → the API response to POST /vms/, with on-commit work run."""

    def post(client=None, **fields):
        body = {"plan": "a100-1x-general", "name": "train-01", "billing_mode": "monthly", "ssh_key_ids": [key.pk]}
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/api/v1/vms/", body | fields, format="json")

    return post


@pytest.fixture
def running_vm(api, user, order, settle):
    created = order(api(user))
    assert created.status_code == 201, created.json()
    settle()
    return VirtualMachine.objects.get(pk=created.json()["id"])


def raise_quota(tenant, *, gpus: int = 16):
    TenantQuota.objects.filter(tenant=tenant).update(
        vcpus=1000, memory_gib=4000, hugepages_gib=4000, vms=50, storage_gib=100_000
    )
    GpuQuota.objects.filter(tenant=tenant).update(limit=gpus)


class TestCatalogue:
    def test_plans_have_current_prices_and_live_availability(self, api, user, tenant):
        response = api(user).get("/api/v1/plans/")
        assert response.status_code == 200
        plans = {p["code"]: p for p in response.json()["results"]}
        a100 = plans["a100-1x-general"]
        assert a100["prices"]["monthly"] == "15000.00" and a100["prices"]["yearly"] == "150000.00"
        assert a100["prices"]["hourly"] == "30.0000" and a100["prices"]["currency"] == "CNY"
        assert a100["gpu_model"] == "A100" and a100["gpu_count"] == 1 and a100["vcpus"] == 16
        assert a100["available"] == 24  # 3 nodes × 8 A100s
        assert plans["a100-2x-training"]["available"] == 3  # training VMs never share a node
        assert plans["a100-2x-training"]["hugepages_gib"] == 128
        db = plans["db-64g"]
        assert db["gpu_model"] is None and db["hugepage_size"] == "1Gi" and db["data_disk_gib"] == 500

    def test_price_in_force_is_the_latest_that_has_started(self, api, user, tenant):
        plan = Plan.objects.get(code="t4-1x-general")
        now = timezone.now()
        PlanPrice.objects.create(
            plan=plan, effective_from=now - timedelta(days=1), monthly=1100, yearly=11000, hourly=2
        )
        PlanPrice.objects.create(plan=plan, effective_from=now + timedelta(days=30), monthly=9, yearly=9, hourly=9)
        body = api(user).get("/api/v1/plans/t4-1x-general/").json()
        assert body["prices"]["monthly"] == "1100.00"
        assert Decimal(body["prices"]["hourly"]) == Decimal(2)

    def test_availability_follows_placements(self, api, user, tenant):
        Node.objects.exclude(name="a100-node-1").update(schedulable=False)
        assert api(user).get("/api/v1/plans/a100-2x-training/").json()["available"] == 1
        Node.objects.filter(name="a100-node-1").update(schedulable=False)
        assert api(user).get("/api/v1/plans/a100-2x-training/").json()["available"] == 0

    def test_plan_list_query_count_is_constant(self, api, user, tenant):
        client = api(user)
        client.get("/api/v1/plans/")
        with CaptureQueriesContext(connection) as few:
            client.get("/api/v1/plans/")
        template = Plan.objects.get(code="a10-1x-general")
        for n in range(10):
            plan = Plan.objects.create(
                code=f"extra-{n}",
                name=f"Extra {n}",
                profile=template.profile,
                gpu_model=template.gpu_model,
                gpu_count=1,
                cores=4,
                threads=2,
                memory_gib=32,
                disk_gib=100,
                cpu_overcommit=Decimal("1.5"),
            )
            for days in (40, 10):
                PlanPrice.objects.create(
                    plan=plan, effective_from=timezone.now() - timedelta(days=days), monthly=1, yearly=1, hourly=1
                )
        with CaptureQueriesContext(connection) as many:
            response = client.get("/api/v1/plans/")
        assert len(response.json()["results"]) == 16
        assert len(many) == len(few)

    def test_gpu_models(self, api, user, tenant):
        models = {m["code"]: m for m in api(user).get("/api/v1/gpu-models/").json()["results"]}
        assert models["A100"]["resource_name"] == "nvidia.com/GA100_A100_PCIE_80GB"
        assert models["A100"]["pool"] == "high_end" and models["A100"]["memory_gib"] == 80

    @pytest.mark.parametrize("role", [Role.VIEWER, Role.BILLING, Role.MEMBER])
    def test_every_member_sees_the_catalogue(self, api, tenant, role):
        assert api(add_member(tenant, role).user).get("/api/v1/plans/").status_code == 200


class TestOrdering:
    def test_order_runs_and_hands_over_access(self, api, user, tenant, order, settle):
        created = order(api(user))
        assert created.status_code == 201
        body = created.json()
        assert body["plan"] == "a100-1x-general" and body["billing_mode"] == "monthly"
        assert body["state"] == "requested" and body["queue_position"] is None and body["ssh_command"] == ""
        settle()
        vm = api(user).get(f"/api/v1/vms/{body['id']}/")
        assert vm.status_code == 200
        shown = vm.json()
        assert shown["state"] == "running" and shown["state_label"] == "Running"
        assert shown["ssh_command"].startswith("ssh -p 22") and shown["ssh_command"].endswith("ubuntu@127.0.0.1")
        assert shown["running_since"] and shown["node_name"].startswith("a100-node-")

        token = secrets.decrypt(VirtualMachine.objects.get(pk=body["id"]).jupyter_token_encrypted)
        assert token not in vm.content.decode()
        assert token not in api(user).get("/api/v1/vms/").content.decode()
        access = api(user).post(f"/api/v1/vms/{body['id']}/access/")
        assert access.status_code == 200
        assert access.json()["jupyter_token"] == token and access.json()["ssh_command"] == shown["ssh_command"]
        assert access["Cache-Control"] == "no-store"
        event = AuditEvent.objects.get(action="vm.access_revealed")
        assert event.actor == user and event.tenant == tenant

    def test_access_before_running_is_a_400(self, api, user, tenant, order):
        created = order(api(user)).json()
        response = api(user).post(f"/api/v1/vms/{created['id']}/access/")
        assert response.status_code == 400 and "running" in response.json()["non_field_errors"][0]

    def test_viewer_reads_but_cannot_order_or_see_secrets(self, api, tenant, running_vm, key):
        viewer = api(add_member(tenant, Role.VIEWER).user)
        assert viewer.get("/api/v1/vms/").json()["count"] == 1
        assert viewer.get(f"/api/v1/vms/{running_vm.pk}/").status_code == 200
        assert viewer.post(f"/api/v1/vms/{running_vm.pk}/access/").status_code == 403
        assert viewer.post(f"/api/v1/vms/{running_vm.pk}/stop/").status_code == 403
        body = {"plan": "t4-1x-general", "name": "mine", "billing_mode": "monthly", "ssh_key_ids": [key.pk]}
        assert viewer.post("/api/v1/vms/", body, format="json").status_code == 403
        assert not AuditEvent.objects.filter(action="vm.access_revealed").exists()
        assert VirtualMachine.objects.count() == 1

    def test_billing_role_does_not_see_vms(self, api, tenant, running_vm):
        billing = api(add_member(tenant, Role.BILLING).user)
        assert billing.get("/api/v1/vms/").status_code == 403
        assert billing.get(f"/api/v1/vms/{running_vm.pk}/").status_code == 403

    def test_member_orders_with_a_token(self, api, tenant, key, django_capture_on_commit_callbacks):
        member = add_member(tenant, Role.MEMBER)
        secret = tenant_services.api_token_create(membership=member, actor=member.user, name="ci").secret
        body = {"plan": "t4-1x-general", "name": "ci-box", "billing_mode": "on_demand", "ssh_key_ids": [key.pk]}
        with django_capture_on_commit_callbacks(execute=True):
            response = api(token=secret).post("/api/v1/vms/", body, format="json")
        assert response.status_code == 201
        assert VirtualMachine.objects.get().created_by == member.user


class TestBadInput:
    @pytest.fixture
    def rival_key(self):
        owner = UserFactory()
        rival = make_tenant(owner=owner, name="Rival")
        return tenant_services.ssh_key_add(
            membership=rival.memberships.get(), actor=owner, name="theirs", public_key=new_public_key()
        )

    @pytest.mark.parametrize(
        ("fields", "field", "message"),
        [
            ({"name": "Bad Name!"}, "name", "lowercase"),
            ({"name": ""}, "name", ""),
            ({"ssh_key_ids": [999999]}, "ssh_key_ids", "Unknown SSH key"),
            ({"ssh_key_ids": []}, "ssh_key_ids", "at least one"),
            ({"ssh_key_ids": "nope"}, "ssh_key_ids", ""),
            ({"billing_mode": "weekly"}, "billing_mode", "valid choice"),
            ({"plan": "no-such-plan"}, "plan", ""),
            ({"cloud_init_extra": "users:\n  - name: root\n"}, "cloud_init_extra", "may not set 'users'"),
            ({"cloud_init_extra": "just text"}, "cloud_init_extra", "YAML mapping"),
            ({"cloud_init_extra": "runcmd: [unclosed"}, "cloud_init_extra", "not valid YAML"),
            ({"wait_if_full": "perhaps"}, "wait_if_full", ""),
        ],
    )
    def test_field_messages_and_nothing_created(self, api, user, tenant, order, fields, field, message):
        response = order(api(user), **fields)
        assert response.status_code == 400
        assert field in response.json()
        assert message in response.json()[field][0]
        assert not VirtualMachine.objects.exists()
        assert not QuotaReservation.objects.exists()

    def test_other_tenants_key_is_unknown(self, api, user, tenant, order, rival_key):
        response = order(api(user), ssh_key_ids=[rival_key.pk])
        assert response.status_code == 400 and response.json()["ssh_key_ids"] == ["Unknown SSH key."]
        assert not VirtualMachine.objects.exists()

    def test_name_in_use_is_refused(self, api, user, tenant, order, running_vm):
        response = order(api(user), name=running_vm.name, plan="t4-1x-general")
        assert response.status_code == 400 and "already have a VM" in response.json()["name"][0]

    def test_unknown_state_filter_is_a_400(self, api, user, tenant):
        response = api(user).get("/api/v1/vms/", {"state": "sleeping"})
        assert response.status_code == 400 and "state" in response.json()


class TestQuotaAndCapacity:
    def test_over_quota_is_a_400_on_quota_and_nothing_is_held(self, api, user, tenant, order):
        response = order(api(user), plan="h100-2x-training")  # standard tier: no H100s
        assert response.status_code == 400
        assert set(response.json()) == {"quota"}
        assert "H100 GPUs: 2 requested, 0 of 0 free" in response.json()["quota"]
        assert not VirtualMachine.objects.exists()
        assert not QuotaReservation.objects.exists()

    def test_vm_count_quota(self, api, user, tenant, order):
        assert order(api(user), name="one", plan="t4-1x-general").status_code == 201
        assert order(api(user), name="two", plan="t4-1x-general").status_code == 201
        third = order(api(user), name="three", plan="t4-1x-general")
        assert third.status_code == 400 and "Virtual machines" in third.json()["quota"][0]
        assert VirtualMachine.objects.count() == 2

    def test_full_pool_refuses_or_waits_in_line(self, api, user, tenant, order, settle):
        raise_quota(tenant)
        Node.objects.filter(gpu_model__code="A100").exclude(name="a100-node-1").update(schedulable=False)
        client = api(user)
        first = order(client, name="first", plan="a100-2x-training")
        assert first.status_code == 201
        settle()

        refused = order(client, name="second", plan="a100-2x-training")
        assert refused.status_code == 400 and set(refused.json()) == {"plan"}
        assert "wait in line" in refused.json()["plan"][0]
        assert VirtualMachine.objects.count() == 1
        assert QuotaReservation.objects.filter(released_at__isnull=True).count() == 1

        waiting = order(client, name="second", plan="a100-2x-training", wait_if_full=True)
        assert waiting.status_code == 201
        assert waiting.json()["state"] == "queued" and waiting.json()["queue_position"] == 1
        third = order(client, name="third", plan="a100-2x-training", wait_if_full=True).json()
        assert "id" in third, third
        assert third["queue_position"] == 2
        listed = {vm["name"]: vm for vm in client.get("/api/v1/vms/", {"state": "queued"}).json()["results"]}
        assert listed["second"]["queue_position"] == 1 and listed["third"]["queue_position"] == 2

        settle()
        assert client.get(f"/api/v1/vms/{waiting.json()['id']}/").json()["state"] == "queued"
        released = client.post(f"/api/v1/vms/{first.json()['id']}/release/")
        assert released.status_code == 202
        settle()
        second = client.get(f"/api/v1/vms/{waiting.json()['id']}/").json()
        assert second["state"] == "running" and second["queue_position"] is None
        assert client.get(f"/api/v1/vms/{third['id']}/").json()["queue_position"] == 1

        gave_up = client.post(f"/api/v1/vms/{third['id']}/release/")
        assert gave_up.status_code == 202 and gave_up.json()["state"] == "released"
        assert not QuotaReservation.objects.filter(holder_id=third["id"], released_at__isnull=True).exists()


class TestLifecycle:
    def test_stop_start_restart_release(self, api, user, tenant, running_vm, settle):
        client = api(user)
        url = f"/api/v1/vms/{running_vm.pk}"
        stopped = client.post(f"{url}/stop/")
        assert stopped.status_code == 202 and stopped.json()["state"] == "stopping"
        settle()
        assert client.get(f"{url}/").json()["state"] == "stopped"
        assert client.get(f"{url}/").json()["ssh_command"] == ""
        assert client.post(f"{url}/stop/").status_code == 400
        assert client.post(f"{url}/restart/").status_code == 400

        started = client.post(f"{url}/start/")
        assert started.status_code == 202 and started.json()["state"] == "starting"
        settle()
        assert client.get(f"{url}/").json()["state"] == "running"
        restarted = client.post(f"{url}/restart/")
        assert restarted.status_code == 202 and restarted.json()["state"] == "starting"
        settle()

        released = client.post(f"{url}/release/")
        assert released.status_code == 202 and released.json()["state"] == "released"
        assert client.post(f"{url}/release/").status_code == 400
        assert client.get("/api/v1/vms/").json()["count"] == 0
        assert client.get("/api/v1/vms/", {"include_released": "1"}).json()["count"] == 1
        assert client.get("/api/v1/vms/", {"state": "released"}).json()["count"] == 1
        assert not QuotaReservation.objects.filter(released_at__isnull=True).exists()

    def test_failure_is_reported_in_plain_words_and_frees_the_quota(self, api, user, tenant, running_vm, settle):
        LocalClusterVm.objects.update(failure="The GPU stopped answering.")
        settle()
        body = api(user).get(f"/api/v1/vms/{running_vm.pk}/").json()
        assert body["state"] == "failed" and body["failure_reason"] == "The GPU stopped answering."
        assert not QuotaReservation.objects.filter(released_at__isnull=True).exists()
        released = api(user).post(f"/api/v1/vms/{running_vm.pk}/release/")
        assert released.status_code == 202 and released.json()["state"] == "released"

    def test_rotate_jupyter_token(self, api, user, tenant, running_vm, settle):
        before = secrets.decrypt(running_vm.jupyter_token_encrypted)
        response = api(user).post(f"/api/v1/vms/{running_vm.pk}/rotate-jupyter-token/")
        assert response.status_code == 202 and response.json()["state"] == "starting"
        settle()
        after = api(user).post(f"/api/v1/vms/{running_vm.pk}/access/").json()["jupyter_token"]
        assert after != before
        assert AuditEvent.objects.filter(action="vm.jupyter_token_rotated").count() == 1

    def test_scale_up_a_subscription(self, api, user, tenant, running_vm, settle):
        client = api(user)
        url = f"/api/v1/vms/{running_vm.pk}/scale-ups/"
        created = client.post(url, {"extra_vcpus": 4, "extra_memory_gib": 16, "days": 3}, format="json")
        assert created.status_code == 201, created.json()
        assert created.json()["extra_vcpus"] == 4 and created.json()["state"] == "active"
        assert [s["id"] for s in client.get(url).json()] == [created.json()["id"]]
        settle()
        vm = client.get(f"/api/v1/vms/{running_vm.pk}/").json()
        assert vm["scale_ups"][0]["extra_memory_gib"] == 16
        bad = client.post(url, {"days": 0}, format="json")
        assert bad.status_code == 400 and "days" in bad.json()
        nothing = client.post(url, {"days": 2}, format="json")
        assert nothing.status_code == 400 and "extra_gpus" in nothing.json()
        too_big = client.post(url, {"extra_vcpus": 60, "days": 2}, format="json")  # standard tier: 64 vCPUs
        assert too_big.status_code == 400 and "vCPUs: 60 requested" in too_big.json()["quota"][0]
        assert running_vm.scale_ups.count() == 1

    def test_on_demand_cannot_scale_up(self, api, user, tenant, order, settle):
        created = order(api(user), billing_mode="on_demand").json()
        settle()
        response = api(user).post(f"/api/v1/vms/{created['id']}/scale-ups/", {"extra_vcpus": 2, "days": 1})
        assert response.status_code == 400 and "subscriptions" in response.json()["non_field_errors"][0]


class TestIsolation:
    @pytest.fixture
    def rival_vm(self, django_capture_on_commit_callbacks):
        owner = UserFactory()
        rival = make_tenant(owner=owner, name="Rival")
        membership = rival.memberships.get()
        key = tenant_services.ssh_key_add(membership=membership, actor=owner, name="k", public_key=new_public_key())
        with django_capture_on_commit_callbacks(execute=True):
            vm = services.vm_order(
                membership=membership,
                actor=owner,
                plan=Plan.objects.get(code="t4-1x-general"),
                name="secret-box",
                billing_mode="monthly",
                ssh_key_ids=[key.pk],
            )
        services.reconcile()
        return vm

    @pytest.mark.parametrize(
        ("method", "suffix"),
        [
            ("get", ""),
            ("post", "start/"),
            ("post", "stop/"),
            ("post", "restart/"),
            ("post", "release/"),
            ("post", "access/"),
            ("post", "rotate-jupyter-token/"),
            ("get", "scale-ups/"),
            ("post", "scale-ups/"),
        ],
    )
    def test_another_tenants_vm_is_404(self, api, user, tenant, rival_vm, method, suffix):
        response = getattr(api(user), method)(f"/api/v1/vms/{rival_vm.pk}/{suffix}", {"days": 1}, format="json")
        assert response.status_code == 404
        rival_vm.refresh_from_db()
        assert rival_vm.state == VmState.RUNNING
        assert not AuditEvent.objects.filter(action="vm.access_revealed").exists()

    def test_another_tenants_vm_is_not_listed(self, api, user, tenant, rival_vm):
        assert api(user).get("/api/v1/vms/", {"include_released": "1"}).json()["count"] == 0

    def test_garbage_id_is_404(self, api, user, tenant):
        assert api(user).get("/api/v1/vms/not-a-uuid/").status_code == 404
        assert api(user).get("/api/v1/vms/00000000-0000-0000-0000-000000000000/").status_code == 404


def bulk_vms(tenant, user, count: int) -> None:
    """Rows straight into the table (not through the service): only the list's query count is under test."""
    plans = list(Plan.objects.filter(gpu_count__gt=0))
    now = timezone.now()
    states = [VmState.RUNNING, VmState.STOPPED, VmState.QUEUED, VmState.FAILED]
    VirtualMachine.objects.bulk_create(
        VirtualMachine(
            tenant=tenant,
            created_by=user,
            plan=plans[n % len(plans)],
            name=f"bulk-{n}",
            billing_mode="monthly",
            state=states[n % len(states)],
            queued_at=now - timedelta(seconds=n) if states[n % len(states)] == VmState.QUEUED else None,
            ssh_host="127.0.0.1",
            ssh_port=22000 + n,
        )
        for n in range(count)
    )


def test_vm_list_query_count_does_not_grow(api, user, tenant):
    client = api(user)
    bulk_vms(tenant, user, 5)
    client.get("/api/v1/vms/")
    with CaptureQueriesContext(connection) as few:
        assert len(client.get("/api/v1/vms/", {"limit": 1000}).json()["results"]) == 5
    VirtualMachine.objects.all().delete()
    bulk_vms(tenant, user, 500)
    with CaptureQueriesContext(connection) as many:
        response = client.get("/api/v1/vms/", {"limit": 1000})
    assert len(response.json()["results"]) == 500
    assert len(many) == len(few)
    queued = [vm for vm in response.json()["results"] if vm["state"] == "queued"]
    assert queued and all(vm["queue_position"] >= 1 for vm in queued)


class TestServiceBugs:
    """Behaviour of provisioning.services that contradicts its own documentation; see the reasons."""

    def test_a_freed_gpu_goes_to_the_first_in_line(self, api, user, tenant, order, settle):
        raise_quota(tenant)
        Node.objects.filter(gpu_model__code="A100").exclude(name="a100-node-1").update(schedulable=False)
        client = api(user)
        first = order(client, name="first", plan="a100-2x-training").json()
        settle()
        waiting = order(client, name="second", plan="a100-2x-training", wait_if_full=True).json()
        assert waiting["queue_position"] == 1
        assert client.post(f"/api/v1/vms/{first['id']}/release/").status_code == 202
        late = order(client, name="late", plan="a100-2x-training", wait_if_full=True).json()
        settle()
        assert client.get(f"/api/v1/vms/{waiting['id']}/").json()["state"] == "running"
        assert late["state"] == "queued"

    def test_a_vm_released_before_it_ran_emits_no_billing_event(self, api, user, tenant, order):
        Node.objects.filter(gpu_model__code="A100").update(schedulable=False)
        queued = order(api(user), wait_if_full=True).json()
        assert api(user).post(f"/api/v1/vms/{queued['id']}/release/").json()["state"] == "released"
        assert not LifecycleEvent.objects.filter(vm_id=queued["id"]).exists()
