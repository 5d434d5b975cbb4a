"""Teams: creating organisations, inviting, accepting, roles, removing, leaving — and the last-owner rule."""

from datetime import timedelta

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from tenants import services
from tenants.models import ApiToken, AuditEvent, Invitation, InvitationStatus, Membership, Role
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = pytest.mark.django_db


def actions(tenant) -> list[str]:
    return list(AuditEvent.objects.filter(tenant=tenant).order_by("id").values_list("action", flat=True))


def invite(tenant, actor, email="new@example.com", role=Role.MEMBER):
    membership = tenant.memberships.get(user=actor)
    return services.invitation_create(membership=membership, actor=actor, email=email, role=role)


def test_create_organisation_makes_the_creator_owner_with_tier_quotas(user):
    tenant = services.tenant_create(name="Vision Lab", owner=user)
    assert tenant.memberships.get().role == Role.OWNER
    assert tenant.tier.code == "standard"
    assert {g.gpu_model.code: g.limit for g in tenant.gpu_quotas.all()} == {"T4": 4, "A10": 4, "A100": 2, "H100": 0}
    assert actions(tenant) == ["tenant.created", "member.added"]


def test_blank_organisation_name_is_refused_and_nothing_is_created(user):
    before = Membership.objects.count()
    with pytest.raises(ValidationError) as exc:
        services.tenant_create(name="  ", owner=user)
    assert "name" in exc.value.message_dict
    assert Membership.objects.count() == before


def test_invitation_is_emailed_and_accepted_by_the_invited_address(tenant, user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        invitation, key = invite(tenant, user, "colleague@example.com", Role.ADMIN)
    assert mail.outbox[-1].to == ["colleague@example.com"]
    assert f"/invitations/{key}/" in mail.outbox[-1].body
    assert invitation.key_hash != key  # only the hash is stored

    colleague = UserFactory(email="colleague@example.com")
    membership = services.invitation_accept(key=key, user=colleague)
    assert membership.role == Role.ADMIN and membership.tenant == tenant
    invitation.refresh_from_db()
    assert invitation.status == InvitationStatus.ACCEPTED and invitation.accepted_by == colleague
    assert actions(tenant)[-3:] == ["invitation.created", "invitation.accepted", "member.added"]
    with pytest.raises(ValidationError, match="already been accepted"):
        services.invitation_accept(key=key, user=colleague)


def test_invitation_cannot_be_accepted_by_someone_else_or_after_expiry(tenant, user):
    _invitation, key = invite(tenant, user, "colleague@example.com")
    stranger = UserFactory(email="stranger@example.com")
    with pytest.raises(ValidationError, match=r"sent to colleague@example\.com"):
        services.invitation_accept(key=key, user=stranger)
    unverified = UserFactory(email="colleague@example.com", verified=False)
    with pytest.raises(ValidationError, match="verified address"):
        services.invitation_accept(key=key, user=unverified)
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(ValidationError, match="expired"):
        services.invitation_accept(key=key, user=UserFactory(email="other@example.com"))
    assert not Membership.objects.filter(tenant=tenant, user__in=[stranger, unverified]).exists()


def test_invitation_rules(tenant, user):
    with pytest.raises(ValidationError) as exc:
        invite(tenant, user, "not-an-email")
    assert "email" in exc.value.message_dict
    with pytest.raises(ValidationError) as exc:
        invite(tenant, user, user.email)
    assert "already a member" in exc.value.message_dict["email"][0]
    invite(tenant, user, "twice@example.com")
    with pytest.raises(ValidationError, match="pending invitation"):
        invite(tenant, user, "twice@example.com")
    admin = add_member(tenant, Role.ADMIN).user
    with pytest.raises(ValidationError, match="Only an owner"):
        invite(tenant, admin, "boss@example.com", Role.OWNER)
    member = add_member(tenant, Role.MEMBER).user
    with pytest.raises(PermissionDenied):
        invite(tenant, member, "friend@example.com")


def test_revoked_invitation_cannot_be_used(tenant, user):
    invitation, key = invite(tenant, user, "colleague@example.com")
    services.invitation_revoke(membership=tenant.memberships.get(user=user), actor=user, invitation=invitation)
    with pytest.raises(ValidationError, match="withdrawn"):
        services.invitation_accept(key=key, user=UserFactory(email="colleague@example.com"))


class TestRoles:
    def test_owner_changes_roles_and_it_is_audited(self, tenant, user, owner_membership):
        target = add_member(tenant, Role.MEMBER)
        services.membership_change_role(membership=owner_membership, actor=user, target=target, role=Role.BILLING)
        target.refresh_from_db()
        assert target.role == Role.BILLING
        event = AuditEvent.objects.filter(action="member.role_changed").get()
        assert event.before == {"role": "member"} and event.after["role"] == "billing"
        assert event.actor == user and event.tenant == tenant

    def test_admin_cannot_touch_owners(self, tenant, user, owner_membership):
        admin = add_member(tenant, Role.ADMIN)
        with pytest.raises(PermissionDenied):
            services.membership_change_role(
                membership=admin, actor=admin.user, target=owner_membership, role=Role.MEMBER
            )
        with pytest.raises(PermissionDenied):
            services.membership_remove(membership=admin, actor=admin.user, target=owner_membership)
        with pytest.raises(ValidationError, match="Only an owner"):
            services.membership_change_role(membership=admin, actor=admin.user, target=admin, role=Role.OWNER)

    def test_last_owner_cannot_be_demoted_removed_or_leave(self, tenant, user, owner_membership):
        with pytest.raises(ValidationError, match="last owner"):
            services.membership_change_role(
                membership=owner_membership, actor=user, target=owner_membership, role=Role.ADMIN
            )
        with pytest.raises(ValidationError, match="last owner"):
            services.membership_remove(membership=owner_membership, actor=user, target=owner_membership)
        owner_membership.refresh_from_db()
        assert owner_membership.role == Role.OWNER

    def test_with_a_second_owner_the_first_can_leave(self, tenant, user, owner_membership):
        second = add_member(tenant, Role.MEMBER)
        services.membership_change_role(membership=owner_membership, actor=user, target=second, role=Role.OWNER)
        services.membership_remove(membership=owner_membership, actor=user, target=owner_membership)
        assert list(tenant.memberships.values_list("role", flat=True)) == [Role.OWNER]
        assert actions(tenant)[-1] == "member.left"

    def test_removing_a_member_revokes_their_tokens_in_that_tenant_only(self, tenant, user, owner_membership):
        target = add_member(tenant, Role.MEMBER)
        other_tenant = make_tenant(owner=target.user, name="Side project")
        services.api_token_create(membership=target, actor=target.user, name="ci")
        services.api_token_create(membership=other_tenant.memberships.get(), actor=target.user, name="side")
        services.membership_remove(membership=owner_membership, actor=user, target=target)
        assert not Membership.objects.filter(pk=target.pk).exists()
        assert ApiToken.objects.get(name="ci").revoked_at is not None
        assert ApiToken.objects.get(name="side").revoked_at is None
