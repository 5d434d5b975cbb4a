"""Races on PostgreSQL: the rules hold when two people act at the same instant."""

import threading

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection

from tenants import services
from tenants.models import Invitation, Membership, Role
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def race(*actions):
    """Run the callables at the same moment in separate threads (own DB connections); return outcomes."""
    barrier = threading.Barrier(len(actions))
    outcomes = [None] * len(actions)

    def run(i, action):
        try:
            barrier.wait()
            action()
            outcomes[i] = "ok"
        except ValidationError as exc:
            outcomes[i] = exc.messages[0]
        except PermissionDenied as exc:  # the loser was demoted by the winner first
            outcomes[i] = str(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_two_owners_demoting_each_other_leave_one_owner():
    first = UserFactory()
    tenant = make_tenant(owner=first)
    a = tenant.memberships.get(user=first)
    b = add_member(tenant, Role.OWNER)
    for _ in range(5):
        outcomes = race(
            lambda: services.membership_change_role(membership=a, actor=a.user, target=b, role=Role.ADMIN),
            lambda: services.membership_change_role(membership=b, actor=b.user, target=a, role=Role.ADMIN),
        )
        owners = Membership.objects.filter(tenant=tenant, role=Role.OWNER)
        assert owners.count() == 1, outcomes
        assert outcomes.count("ok") == 1
        assert None not in outcomes
        # reset: make both owners again for the next round
        survivor = owners.get()
        other = a if survivor.pk == b.pk else b
        Membership.objects.filter(pk=other.pk).update(role=Role.OWNER)


def test_two_owners_leaving_at_once_leave_one_owner():
    first = UserFactory()
    tenant = make_tenant(owner=first)
    a = tenant.memberships.get(user=first)
    b = add_member(tenant, Role.OWNER)
    outcomes = race(
        lambda: services.membership_remove(membership=a, actor=a.user, target=a),
        lambda: services.membership_remove(membership=b, actor=b.user, target=b),
    )
    assert sorted(outcomes)[0].startswith("You are the last owner") or sorted(outcomes)[1] == "ok"
    assert outcomes.count("ok") == 1
    assert Membership.objects.filter(tenant=tenant, role=Role.OWNER).count() == 1


def test_one_invitation_accepted_twice_at_once_makes_one_membership():
    owner = UserFactory()
    tenant = make_tenant(owner=owner)
    _invitation, key = services.invitation_create(
        membership=tenant.memberships.get(), actor=owner, email="twin@example.com", role=Role.MEMBER
    )
    twin = UserFactory(email="twin@example.com")
    outcomes = race(
        lambda: services.invitation_accept(key=key, user=twin), lambda: services.invitation_accept(key=key, user=twin)
    )
    assert outcomes.count("ok") == 1
    assert Membership.objects.filter(tenant=tenant, user=twin).count() == 1
    assert Invitation.objects.get().status == "accepted"


def test_concurrent_vm_orders_never_exceed_quota_or_capacity(settings):
    """24 orders at once from 8 tenants for 2×A100 training VMs: three A100 nodes take one each
    (anti-affinity), each tenant's quota takes one; the rest are refused; nothing is half-created."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from provisioning import services as vm_services
    from provisioning.models import Placement, Plan, VirtualMachine

    settings.PORTAL_LOCAL_PROVISION_SECONDS = 0
    settings.PORTAL_LOCAL_BOOT_SECONDS = 0
    vm_services.inventory_sync()
    plan = Plan.objects.get(code="a100-2x-training")
    orders = []
    for t in range(8):
        owner = UserFactory()
        tenant = make_tenant(owner=owner, name=f"Lab {t}")
        membership = tenant.memberships.get()
        public = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        key = services.ssh_key_add(membership=membership, actor=owner, name="k", public_key=public)
        for n in range(3):
            orders.append(
                lambda m=membership, k=key, n=n: vm_services.vm_order(
                    membership=m, actor=m.user, plan=plan, name=f"vm-{n}", billing_mode="monthly", ssh_key_ids=[k.pk]
                )
            )
    outcomes = race(*orders)
    assert outcomes.count("ok") == 3
    assert None not in outcomes
    assert VirtualMachine.objects.count() == 3
    assert VirtualMachine.objects.values("tenant").distinct().count() == 3  # one per tenant: quota 2 A100
    per_node = Placement.objects.filter(released_at__isnull=True).values_list("node__name", flat=True)
    assert len(per_node) == len(set(per_node)) == 3
