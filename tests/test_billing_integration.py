"""Billing wired to the real VM lifecycle: the signals reach billing, and running out of credit
stops on-demand VMs through provisioning's services."""

from datetime import timedelta
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.core.exceptions import ValidationError
from django.utils import timezone

from billing import services
from billing.models import Invoice, Subscription, UsageRecord, Wallet
from provisioning import services as vm_services
from provisioning.models import LifecycleEvent, Plan, VmState
from tenants import services as tenant_services
from tenants.models import AuditEvent
from tests.test_billing_helpers import top_up

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster(settings):
    settings.PORTAL_LOCAL_PROVISION_SECONDS = 0
    settings.PORTAL_LOCAL_BOOT_SECONDS = 0
    vm_services.inventory_sync()


@pytest.fixture
def key(owner_membership, user):
    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return tenant_services.ssh_key_add(membership=owner_membership, actor=user, name="k", public_key=public)


def order_and_run(capture, membership, key, *, plan, mode, name="box"):
    with capture(execute=True):
        vm = vm_services.vm_order(
            membership=membership,
            actor=membership.user,
            plan=Plan.objects.get(code=plan),
            name=name,
            billing_mode=mode,
            ssh_key_ids=[key.pk],
        )
    with capture(execute=True):
        vm_services.reconcile()
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING
    return vm


def test_ordering_without_money_is_refused_when_enforced(settings, cluster, owner_membership, key):
    settings.PORTAL_BILLING_ENFORCE = True
    with pytest.raises(ValidationError) as error:
        vm_services.vm_order(
            membership=owner_membership,
            actor=owner_membership.user,
            plan=Plan.objects.get(code="a100-1x-general"),
            name="box",
            billing_mode="monthly",
            ssh_key_ids=[key.pk],
        )
    assert "billing_mode" in error.value.message_dict


def test_a_subscribed_vm_is_charged_its_first_period_when_it_runs(
    settings, cluster, tenant, owner_membership, key, django_capture_on_commit_callbacks
):
    settings.PORTAL_BILLING_ENFORCE = True
    top_up(tenant, "15000")
    vm = order_and_run(
        django_capture_on_commit_callbacks, owner_membership, key, plan="a100-1x-general", mode="monthly"
    )
    subscription = Subscription.objects.get(vm=vm)
    assert subscription.charges.get().amount == Decimal("15000.00")
    assert Wallet.objects.get(tenant=tenant).cash_balance == Decimal("0.00")
    with django_capture_on_commit_callbacks(execute=True):
        vm_services.vm_release(membership=owner_membership, actor=owner_membership.user, vm=vm)
    subscription.refresh_from_db()
    assert subscription.status == "ended"


def test_credit_running_out_stops_on_demand_vms_through_provisioning(
    settings, cluster, tenant, owner_membership, key, django_capture_on_commit_callbacks
):
    settings.PORTAL_BILLING_ENFORCE = True
    top_up(tenant, "100")
    vm = order_and_run(
        django_capture_on_commit_callbacks, owner_membership, key, plan="a100-1x-general", mode="on_demand"
    )
    started = LifecycleEvent.objects.get(vm=vm, kind="started")
    # Pretend it has run for six hours at 30 an hour. The sweep meters whole clock hours up to five
    # minutes ago, so at least five of them (150 > 100) whatever the minute the test runs at.
    LifecycleEvent.objects.filter(pk=started.pk).update(at=timezone.now() - timedelta(hours=6, minutes=10))
    with django_capture_on_commit_callbacks(execute=True):
        services.usage_meter_vm(vm_id=vm.pk)
    assert UsageRecord.objects.filter(source="vm").exists()
    vm.refresh_from_db()
    assert vm.state in (VmState.STOPPING, VmState.STOPPED)
    assert AuditEvent.objects.filter(action="billing.vm_stopped_for_credit", target_id=str(vm.pk)).exists()
    assert Wallet.objects.get(tenant=tenant).cash_balance < 0
    # The stop closed the interval: the part after the last whole hour is metered too.
    with django_capture_on_commit_callbacks(execute=True):
        vm_services.reconcile()
    invoice = Invoice.objects.get(tenant=tenant)
    assert invoice.lines.get(kind="vm_on_demand").amount > Decimal("120.00")
