"""The compute pages: catalogue, ordering with form errors, a VM's status, actions and access handoff."""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from provisioning import secrets, services
from provisioning.models import Node, Plan, VirtualMachine, VmState
from tenants import services as tenant_services
from tenants.models import AuditEvent, Role
from tests.factories import UserFactory, add_member, make_tenant, new_public_key

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def cluster(settings, db):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 0
    settings.PORTAL_LOCAL_BOOT_SECONDS = 0
    services.inventory_sync()


@pytest.fixture
def key(owner_membership, user):
    return tenant_services.ssh_key_add(
        membership=owner_membership, actor=user, name="laptop", public_key=new_public_key()
    )


@pytest.fixture
def running_vm(owner_membership, user, key, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        vm = services.vm_order(
            membership=owner_membership,
            actor=user,
            plan=Plan.objects.get(code="a100-1x-general"),
            name="train-01",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile()
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING
    return vm


def order_data(key, **fields) -> dict:
    return {"plan": "a100-1x-general", "name": "train-01", "billing_mode": "monthly", "ssh_key_ids": [key.pk]} | fields


class TestCatalogue:
    def test_plans_with_prices_and_availability(self, client, user, tenant):
        client.force_login(user)
        response = client.get("/compute/")
        assert response.status_code == 200
        html = response.content.decode()
        card = html[html.index('data-plan="a100-1x-general"') :]
        card = card[: card.index('data-plan="', 10)]
        assert "¥15,000.00" in card and "¥150,000.00" in card and "¥30.00" in card
        assert "24 available now" in card
        assert "16 (8 cores × 2 threads × 1 sockets)" in card
        assert 'href="/compute/order/?plan=a100-1x-general"' in card
        assert "1 GiB pages" in html  # the database plan's hugepages

    def test_full_plan_offers_to_wait(self, client, user, tenant):
        Node.objects.filter(gpu_model__code="H100").update(schedulable=False)
        client.force_login(user)
        html = client.get("/compute/").content.decode()
        card = html[html.index('data-plan="h100-2x-training"') :]
        assert "Full — you can wait in line" in card[: card.index('data-plan="', 10)]

    def test_vm_table_links_to_the_detail_with_a_live_badge(self, client, user, tenant, running_vm):
        client.force_login(user)
        html = client.get("/compute/").content.decode()
        assert f'href="/compute/vms/{running_vm.pk}/"' in html
        assert f'id="vm-state-{running_vm.pk}"' in html and "/ws/dashboard/" in html

    def test_released_vms_are_hidden_unless_asked(self, client, user, tenant, owner_membership, running_vm):
        services.vm_release(membership=owner_membership, actor=user, vm=running_vm)
        client.force_login(user)
        assert f"vm-state-{running_vm.pk}" not in client.get("/compute/").content.decode()
        assert f"vm-state-{running_vm.pk}" in client.get("/compute/", {"released": "1"}).content.decode()

    def test_billing_role_sees_the_catalogue_but_no_vms(self, client, tenant, member_of, running_vm):
        client.force_login(member_of(tenant, Role.BILLING))
        response = client.get("/compute/")
        assert response.status_code == 200
        html = response.content.decode()
        assert 'id="vms"' not in html and "/compute/order/" not in html
        assert client.get(f"/compute/vms/{running_vm.pk}/").status_code == 403
        assert client.get("/compute/order/").status_code == 403

    def test_compute_page_query_count_does_not_grow_with_vms(self, client, user, tenant):
        client.force_login(user)
        plan = Plan.objects.get(code="t4-1x-general")

        def add(count, start):
            VirtualMachine.objects.bulk_create(
                VirtualMachine(
                    tenant=tenant,
                    created_by=user,
                    plan=plan,
                    name=f"bulk-{n}",
                    billing_mode="monthly",
                    state=VmState.RUNNING,
                    state_changed_at=timezone.now() - timedelta(minutes=n),
                )
                for n in range(start, start + count)
            )

        add(5, 0)
        client.get("/compute/")
        with CaptureQueriesContext(connection) as few:
            assert len(client.get("/compute/").context["page"]) == 5
        add(495, 5)
        with CaptureQueriesContext(connection) as many:
            response = client.get("/compute/")
        assert response.context["page"].paginator.count == 500
        assert len(many) == len(few)


class TestOrderPage:
    def test_plan_is_preselected_and_keys_offered(self, client, user, tenant, key):
        client.force_login(user)
        response = client.get("/compute/order/", {"plan": "t4-1x-general"})
        assert response.status_code == 200
        assert response.context["form"]["plan"].value() == "t4-1x-general"
        html = response.content.decode()
        assert 'name="ssh_key_ids"' in html and "laptop" in html and 'name="wait_if_full"' in html
        assert response.context["form"]["ssh_key_ids"].value() == [key.pk]  # your own keys are ticked

    def test_without_keys_it_links_to_adding_one(self, client, user, tenant):
        client.force_login(user)
        html = client.get("/compute/order/").content.decode()
        assert 'id="no-ssh-keys"' in html and 'href="/settings/ssh-keys/"' in html

    def test_order_redirects_to_the_vm(self, client, user, tenant, key, django_capture_on_commit_callbacks):
        client.force_login(user)
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post("/compute/order/", order_data(key))
        vm = VirtualMachine.objects.get()
        assert response.status_code == 302 and response["Location"] == f"/compute/vms/{vm.pk}/"
        assert vm.state == VmState.PROVISIONING and vm.ssh_key_names == ["laptop"]

    @pytest.mark.parametrize(
        ("fields", "field", "message"),
        [
            ({"name": "Bad Name"}, "name", "lowercase"),
            ({"ssh_key_ids": []}, "ssh_key_ids", "at least one"),
            ({"ssh_key_ids": [987654]}, "ssh_key_ids", "valid choice"),
            ({"billing_mode": "weekly"}, "billing_mode", "valid choice"),
            ({"plan": "nope"}, "plan", "valid choice"),
            ({"cloud_init_extra": "users: []"}, "cloud_init_extra", "may not set 'users'"),
        ],
    )
    def test_field_errors(self, client, user, tenant, key, fields, field, message):
        client.force_login(user)
        response = client.post("/compute/order/", order_data(key, **fields))
        assert response.status_code == 200
        assert message in response.context["form"].errors[field][0]
        assert not VirtualMachine.objects.exists()

    def test_quota_refusal_is_shown_on_top_of_the_form(self, client, user, tenant, key):
        client.force_login(user)
        response = client.post("/compute/order/", order_data(key, plan="h100-2x-training"))
        assert response.status_code == 200
        errors = response.context["form"].non_field_errors()
        assert any("H100 GPUs: 2 requested" in e for e in errors)
        assert "H100 GPUs: 2 requested" in response.content.decode()
        assert not VirtualMachine.objects.exists()

    def test_full_pool_refuses_then_waits_in_line(self, client, user, tenant, key):
        Node.objects.filter(gpu_model__code="A100").update(schedulable=False)
        client.force_login(user)
        refused = client.post("/compute/order/", order_data(key))
        assert "wait in line" in refused.context["form"].errors["plan"][0]
        response = client.post("/compute/order/", order_data(key, wait_if_full="on"), follow=True)
        vm = VirtualMachine.objects.get()
        assert vm.state == VmState.QUEUED
        assert 'id="vm-queue"' in response.content.decode() and "number 1 in line" in response.content.decode()

    def test_viewer_cannot_order(self, client, tenant, member_of, key):
        client.force_login(member_of(tenant, Role.VIEWER))
        assert client.get("/compute/order/").status_code == 403
        assert client.post("/compute/order/", order_data(key)).status_code == 403
        assert not VirtualMachine.objects.exists()


class TestVmDetail:
    def test_running_vm_shows_stepper_history_and_actions(self, client, user, tenant, running_vm):
        client.force_login(user)
        html = client.get(f"/compute/vms/{running_vm.pk}/").content.decode()
        assert f'id="vm-state-{running_vm.pk}"' in html and ">Running</span>" in html
        assert 'id="vm-stepper"' in html and html.count('data-step-status="done"') == 4
        assert 'data-action="stop"' in html and 'data-action="release"' in html and 'data-action="start"' not in html
        assert "data-confirm=" in html
        history = html[html.index('id="vm-history"') :]
        assert "<strong>Provisioning</strong>: The cluster accepted the VM." in history
        assert "<strong>Running</strong>: Ready: SSH and Jupyter are available." in history
        assert f'hx-post="/compute/vms/{running_vm.pk}/access/"' in html and 'id="show-access"' in html
        assert 'id="scale-up-form"' in html
        token = secrets.decrypt(running_vm.jupyter_token_encrypted)
        assert token not in html and "ssh -p" not in html

    def test_access_partial_reveals_and_is_audited(self, client, user, tenant, running_vm):
        client.force_login(user)
        response = client.post(f"/compute/vms/{running_vm.pk}/access/", HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        html = response.content.decode()
        assert "<html" not in html
        assert re.search(r'<code[^>]*id="ssh-command">ssh -p \d+ ubuntu@127\.0\.0\.1</code>', html)
        assert 'data-copy="ssh-command"' in html
        assert "no-store" in response["Cache-Control"]
        assert AuditEvent.objects.filter(action="vm.access_revealed", actor=user).count() == 1
        assert "<html" in client.post(f"/compute/vms/{running_vm.pk}/access/").content.decode()  # without JS

    def test_access_shows_the_jupyter_link_with_its_token(self, client, user, tenant, running_vm):
        VirtualMachine.objects.filter(pk=running_vm.pk).update(jupyter_url="http://127.0.0.1:28000/")
        client.force_login(user)
        html = client.post(f"/compute/vms/{running_vm.pk}/access/", HTTP_HX_REQUEST="true").content.decode()
        token = secrets.decrypt(running_vm.jupyter_token_encrypted)
        assert f"http://127.0.0.1:28000/lab?token={token}" in html and 'data-copy="jupyter-url"' in html

    @pytest.mark.parametrize("role", [Role.VIEWER])
    def test_viewer_sees_status_but_no_access_button_or_secret(self, client, tenant, member_of, running_vm, role):
        client.force_login(member_of(tenant, role))
        response = client.get(f"/compute/vms/{running_vm.pk}/")
        assert response.status_code == 200
        html = response.content.decode()
        assert f'id="vm-state-{running_vm.pk}"' in html
        assert 'id="show-access"' not in html and "/access/" not in html and 'data-action="' not in html
        assert client.post(f"/compute/vms/{running_vm.pk}/access/").status_code == 403
        assert client.post(f"/compute/vms/{running_vm.pk}/stop/").status_code == 403
        assert not AuditEvent.objects.filter(action="vm.access_revealed").exists()

    @pytest.mark.parametrize(("role", "sees_button"), [(Role.OWNER, True), (Role.ADMIN, True), (Role.MEMBER, True)])
    def test_members_who_use_compute_see_the_access_button(self, client, tenant, running_vm, role, sees_button):
        client.force_login(add_member(tenant, role).user)
        assert ('id="show-access"' in client.get(f"/compute/vms/{running_vm.pk}/").content.decode()) is sees_button

    def test_status_partial(self, client, user, tenant, running_vm):
        client.force_login(user)
        response = client.get(f"/compute/vms/{running_vm.pk}/status/")
        assert response.status_code == 200
        html = response.content.decode()
        assert "<html" not in html and f'id="vm-state-{running_vm.pk}"' in html and 'id="vm-history"' in html

    def test_stop_start_and_release_from_the_page(self, client, user, tenant, running_vm):
        client.force_login(user)
        url = f"/compute/vms/{running_vm.pk}"
        response = client.post(f"{url}/stop/", follow=True)
        assert response.redirect_chain[-1][0] == f"{url}/" and "Stopping train-01." in response.content.decode()
        running_vm.refresh_from_db()
        assert running_vm.state == VmState.STOPPING
        refused = client.post(f"{url}/restart/", follow=True)
        assert "cannot be restarted" in refused.content.decode()
        client.post(f"{url}/release/")
        running_vm.refresh_from_db()
        assert running_vm.state == VmState.RELEASED
        assert client.post(f"{url}/explode/").status_code == 404

    def test_scale_up_form_errors_and_success(self, client, user, tenant, running_vm):
        client.force_login(user)
        url = f"/compute/vms/{running_vm.pk}/scale-up/"
        bad = client.post(url, {"extra_gpus": 0, "extra_vcpus": 0, "extra_memory_gib": 0, "days": 3})
        assert bad.status_code == 200 and bad.context["scale_up_form"].errors["extra_gpus"]
        good = client.post(url, {"extra_gpus": 0, "extra_vcpus": 4, "extra_memory_gib": 0, "days": 3})
        assert good.status_code == 302 and running_vm.scale_ups.count() == 1

    def test_failed_vm_explains_why(self, client, user, tenant, running_vm):
        from provisioning.models import LocalClusterVm

        LocalClusterVm.objects.update(failure="The GPU stopped answering.")
        services.reconcile()
        client.force_login(user)
        html = client.get(f"/compute/vms/{running_vm.pk}/").content.decode()
        assert 'id="vm-failure"' in html and "The GPU stopped answering." in html


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
                name="theirs",
                billing_mode="monthly",
                ssh_key_ids=[key.pk],
            )
        services.reconcile()
        return vm

    def test_another_tenants_vm_is_404_on_every_page(self, client, user, tenant, rival_vm):
        client.force_login(user)
        base = f"/compute/vms/{rival_vm.pk}"
        assert client.get(f"{base}/").status_code == 404
        assert client.get(f"{base}/status/").status_code == 404
        for action in ("access", "start", "stop", "restart", "release", "rotate-jupyter-token", "scale-up"):
            assert client.post(f"{base}/{action}/", {"days": 1, "extra_vcpus": 1}).status_code == 404
        rival_vm.refresh_from_db()
        assert rival_vm.state == VmState.RUNNING
        assert not AuditEvent.objects.filter(action="vm.access_revealed").exists()
