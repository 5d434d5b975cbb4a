"""The REST API under /api/v1/: contract names, token auth, tenant isolation, roles and 400s."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.utils import timezone

from tenants import services
from tenants.models import ApiToken, AuditEvent, Invitation, Membership, Role, SshKey
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = pytest.mark.django_db


def new_public_key(comment="me@laptop") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " " + comment


def token_for(membership) -> str:
    return services.api_token_create(membership=membership, actor=membership.user, name="t").secret


class TestTokens:
    def test_token_is_shown_once_stored_hashed_and_authenticates(self, api, user, owner_membership):
        created = api(user).post("/api/v1/tokens/", {"name": "ci-pipeline"}, format="json")
        assert created.status_code == 201
        secret = created.json()["token"]
        assert secret.startswith("gpk_")
        stored = ApiToken.objects.get(name="ci-pipeline")
        assert secret not in (stored.token_hash, stored.prefix) and len(stored.token_hash) == 64
        listed = api(user).get("/api/v1/tokens/").json()["results"]
        assert "token" not in listed[0]

        me = api(token=secret).get("/api/v1/tenant/")
        assert me.status_code == 200 and me.json()["slug"] == owner_membership.tenant.slug
        stored.refresh_from_db()
        assert stored.last_used_at is not None

    def test_revoked_expired_and_garbage_tokens_are_401(self, api, user, owner_membership):
        issued = services.api_token_create(membership=owner_membership, actor=user, name="old")
        assert api(token=issued.secret).delete(f"/api/v1/tokens/{issued.token.pk}/").status_code == 204
        assert api(token=issued.secret).get("/api/v1/tenant/").status_code == 401
        expiring = services.api_token_create(membership=owner_membership, actor=user, name="soon", expires_in_days=1)
        ApiToken.objects.filter(pk=expiring.token.pk).update(expires_at=timezone.now())
        assert api(token=expiring.secret).get("/api/v1/tenant/").status_code == 401
        assert api(token="gpk_nothing_here").get("/api/v1/tenant/").status_code == 401
        assert api(token=issued.secret[:-2] + "xx").get("/api/v1/tenant/").status_code == 401
        assert api().get("/api/v1/tenant/").status_code in (401, 403)

    def test_token_fixes_the_tenant_whatever_the_session_says(self, api, user, owner_membership):
        other = make_tenant(owner=user, name="Other org")
        secret = token_for(other.memberships.get(user=user))
        assert api(token=secret).get("/api/v1/tenant/").json()["slug"] == other.slug

    def test_bad_token_input_is_a_400_with_field_messages(self, api, user, owner_membership):
        response = api(user).post("/api/v1/tokens/", {"name": "", "expires_in_days": 0}, format="json")
        assert response.status_code == 400
        assert set(response.json()) == {"name", "expires_in_days"}

    def test_members_see_only_their_own_tokens_and_admins_see_all(self, api, tenant, user, owner_membership):
        member = add_member(tenant, Role.MEMBER)
        token_for(member)
        token_for(owner_membership)
        assert len(api(member.user).get("/api/v1/tokens/").json()["results"]) == 1
        assert len(api(user).get("/api/v1/tokens/").json()["results"]) == 2
        owners_token = ApiToken.objects.get(user=user)
        assert api(member.user).delete(f"/api/v1/tokens/{owners_token.pk}/").status_code == 404


class TestTenantAndMembers:
    def test_tenant_shows_tier_role_and_quotas_with_use(self, api, user, tenant):
        body = api(user).get("/api/v1/tenant/").json()
        assert body["role"] == "owner" and body["tier"]["code"] == "standard"
        assert "Base scheduling priority" in body["tier"]["benefits"]
        keys = {line["key"]: line for line in body["quotas"]}
        assert keys["gpu:A100"] == {"key": "gpu:A100", "label": "A100 GPUs", "used": 0, "limit": 2, "free": 2}
        assert {"vcpus", "memory_gib", "hugepages_gib", "vms", "concurrent_tasks", "storage_gib"} <= set(keys)

    def test_tier_is_shown_in_chinese(self, api, user, tenant):
        body = api(user).get("/api/v1/tenant/", HTTP_ACCEPT_LANGUAGE="zh-hans").json()
        assert body["tier"]["name"] == "普通"

    def test_rename_requires_admin_and_a_name(self, api, user, tenant):
        viewer = add_member(tenant, Role.VIEWER).user
        assert api(viewer).patch("/api/v1/tenant/", {"name": "X"}, format="json").status_code == 403
        bad = api(user).patch("/api/v1/tenant/", {"name": ""}, format="json")
        assert bad.status_code == 400 and "name" in bad.json()
        assert api(user).patch("/api/v1/tenant/", {"name": "Renamed"}, format="json").json()["name"] == "Renamed"

    def test_invite_change_role_remove_through_the_api(self, api, user, tenant):
        client = api(user)
        invited = client.post("/api/v1/members/", {"email": "a@example.com", "role": "viewer"}, format="json")
        assert invited.status_code == 201 and invited.json()["status"] == "pending"
        assert client.get("/api/v1/invitations/").json()["results"][0]["email"] == "a@example.com"
        bad = client.post("/api/v1/members/", {"email": "nope", "role": "emperor"}, format="json")
        assert bad.status_code == 400 and set(bad.json()) == {"email", "role"}

        member = add_member(tenant, Role.MEMBER)
        changed = client.patch(f"/api/v1/members/{member.pk}/", {"role": "admin"}, format="json")
        assert changed.status_code == 200 and changed.json()["role"] == "admin"
        assert client.delete(f"/api/v1/members/{member.pk}/").status_code == 204
        assert not Membership.objects.filter(pk=member.pk).exists()

    def test_last_owner_is_a_400_with_a_reason(self, api, user, owner_membership):
        response = api(user).patch(f"/api/v1/members/{owner_membership.pk}/", {"role": "viewer"}, format="json")
        assert response.status_code == 400
        assert "last owner" in response.json()["role"][0]
        leave = api(user).post("/api/v1/members/leave/")
        assert leave.status_code == 400 and "last owner" in leave.json()["non_field_errors"][0]

    def test_withdraw_invitation(self, api, user, tenant):
        api(user).post("/api/v1/members/", {"email": "a@example.com", "role": "member"}, format="json")
        invitation = Invitation.objects.get()
        assert api(user).delete(f"/api/v1/invitations/{invitation.pk}/").status_code == 204
        assert api(user).get("/api/v1/invitations/").json()["results"] == []


class TestSshKeys:
    def test_add_list_delete(self, api, user, tenant):
        client = api(user)
        created = client.post("/api/v1/ssh-keys/", {"name": "laptop", "public_key": new_public_key()}, format="json")
        assert created.status_code == 201
        body = created.json()
        assert body["key_type"] == "ssh-ed25519" and body["fingerprint"].startswith("SHA256:")
        assert [k["name"] for k in client.get("/api/v1/ssh-keys/").json()["results"]] == ["laptop"]
        assert client.delete(f"/api/v1/ssh-keys/{body['id']}/").status_code == 204
        assert AuditEvent.objects.filter(action__in=["ssh_key.added", "ssh_key.deleted"]).count() == 2

    def test_invalid_key_is_a_400_on_the_field_and_nothing_is_stored(self, api, user, tenant):
        response = api(user).post("/api/v1/ssh-keys/", {"name": "old", "public_key": "ssh-dss AAAA"}, format="json")
        assert response.status_code == 400
        assert "DSA keys are no longer secure" in response.json()["public_key"][0]
        missing = api(user).post("/api/v1/ssh-keys/", {}, format="json")
        assert missing.status_code == 400 and set(missing.json()) == {"name", "public_key"}
        assert not SshKey.objects.exists()

    def test_duplicate_key_or_name_is_refused(self, api, user, tenant):
        key = new_public_key()
        api(user).post("/api/v1/ssh-keys/", {"name": "a", "public_key": key}, format="json")
        again = api(user).post("/api/v1/ssh-keys/", {"name": "a", "public_key": key}, format="json")
        assert again.status_code == 400 and set(again.json()) == {"name", "public_key"}


class TestTenantIsolation:
    """Another tenant's objects answer 404 — never 403, which would confirm they exist."""

    @pytest.fixture
    def other(self):
        owner = UserFactory()
        other = make_tenant(owner=owner, name="Rival Inc")
        membership = other.memberships.get()
        key = services.ssh_key_add(membership=membership, actor=owner, name="theirs", public_key=new_public_key())
        token = services.api_token_create(membership=membership, actor=owner, name="theirs").token
        member = add_member(other, Role.MEMBER)
        invitation, _ = services.invitation_create(
            membership=membership, actor=owner, email="x@example.com", role=Role.MEMBER
        )
        return {"ssh-keys": key.pk, "tokens": token.pk, "members": member.pk, "invitations": invitation.pk}

    @pytest.mark.parametrize("resource", ["ssh-keys", "tokens", "members", "invitations"])
    def test_read_and_delete_are_404(self, api, user, tenant, other, resource):
        client = api(user)
        assert client.get(f"/api/v1/{resource}/{other[resource]}/").status_code == 404
        assert client.delete(f"/api/v1/{resource}/{other[resource]}/").status_code == 404
        assert other[resource] not in [row["id"] for row in client.get(f"/api/v1/{resource}/").json()["results"]]

    def test_role_change_on_another_tenants_member_is_404(self, api, user, tenant, other):
        response = api(user).patch(f"/api/v1/members/{other['members']}/", {"role": "admin"}, format="json")
        assert response.status_code == 404
        assert Membership.objects.get(pk=other["members"]).role == Role.MEMBER


class TestRoleRules:
    """viewer reads only; billing sees billing; member uses compute; admin manages members and keys."""

    @pytest.mark.parametrize(
        ("role", "can_read_keys", "can_add_key", "can_invite", "can_see_invitations"),
        [
            (Role.OWNER, True, True, True, True),
            (Role.ADMIN, True, True, True, True),
            (Role.MEMBER, True, True, False, False),
            (Role.BILLING, False, False, False, False),
            (Role.VIEWER, True, False, False, False),
        ],
    )
    def test_matrix(self, api, tenant, role, can_read_keys, can_add_key, can_invite, can_see_invitations):
        client = api(add_member(tenant, role).user)
        assert client.get("/api/v1/tenant/").status_code == 200  # every role sees the tenant
        assert client.get("/api/v1/members/").status_code == 200
        assert (client.get("/api/v1/ssh-keys/").status_code == 200) is can_read_keys
        added = client.post("/api/v1/ssh-keys/", {"name": f"k-{role}", "public_key": new_public_key()}, format="json")
        assert (added.status_code == 201) is can_add_key
        invited = client.post("/api/v1/members/", {"email": f"{role}@example.com", "role": "viewer"}, format="json")
        assert (invited.status_code == 201) is can_invite
        assert (client.get("/api/v1/invitations/").status_code == 200) is can_see_invitations
        if not can_add_key:
            assert added.status_code == 403
        if not can_invite:
            assert invited.status_code == 403

    def test_member_may_delete_only_own_keys_admin_any(self, api, tenant, user):
        member = add_member(tenant, Role.MEMBER).user
        admin = add_member(tenant, Role.ADMIN).user
        owners_key = services.ssh_key_add(
            membership=tenant.memberships.get(user=user), actor=user, name="owner", public_key=new_public_key()
        )
        assert api(member).delete(f"/api/v1/ssh-keys/{owners_key.pk}/").status_code == 403
        assert api(admin).delete(f"/api/v1/ssh-keys/{owners_key.pk}/").status_code == 204
