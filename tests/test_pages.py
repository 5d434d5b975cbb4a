"""The pages a person clicks through: they render, refuse what they must, and show form errors."""

import time

import pytest
from allauth.mfa.totp.internal.auth import TOTP, format_hotp_value, generate_totp_secret, hotp_value
from django.db import connection
from django.test.utils import CaptureQueriesContext

from crm.models import StaffRole
from tenants import services
from tenants.models import ApiToken, AuditEvent, Invitation, Membership, Role, SshKey
from tests.factories import UserFactory, add_member, make_tenant, new_public_key, staff_with_role

pytestmark = pytest.mark.django_db

PAGES = [
    "/",
    "/compute/",
    "/tasks/",
    "/billing/",
    "/team/",
    "/tenant/",
    "/tenants/new/",
    "/settings/",
    "/settings/ssh-keys/",
    "/settings/tokens/",
    "/settings/audit/",
]


@pytest.mark.parametrize("url", PAGES)
def test_owner_sees_every_page_with_the_navigation(client, user, tenant, url):
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    for label in ("Dashboard", "Compute", "Tasks", "Billing", "Team", "Settings"):
        assert f">{label}</a>" in html


def test_anonymous_is_sent_to_login(client):
    for url in PAGES:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_dashboard_shows_tier_and_quotas(client, user, tenant):
    client.force_login(user)
    html = client.get("/").content.decode()
    assert "Standard" in html and 'data-quota="gpu:A100"' in html and "Base scheduling priority" in html


class TestForms:
    def test_bad_ssh_key_is_a_form_error_and_nothing_is_saved(self, client, user, tenant):
        client.force_login(user)
        response = client.post("/settings/ssh-keys/", {"name": "old", "public_key": "ssh-rsa AAAA"})
        assert response.status_code == 200
        assert response.context["form"].errors["public_key"]
        assert not SshKey.objects.exists()

    def test_good_ssh_key_is_saved(self, client, user, tenant):
        client.force_login(user)
        response = client.post("/settings/ssh-keys/", {"name": "laptop", "public_key": new_public_key()})
        assert response.status_code == 302
        assert SshKey.objects.get().tenant == tenant

    def test_token_secret_is_shown_once(self, client, user, tenant):
        client.force_login(user)
        response = client.post("/settings/tokens/", {"name": "ci"})
        secret = response.context["issued"].secret
        assert secret in response.content.decode()
        assert secret not in client.get("/settings/tokens/").content.decode()
        assert ApiToken.objects.get().name == "ci"

    def test_invite_form_errors_and_success(self, client, user, tenant):
        client.force_login(user)
        bad = client.post("/team/", {"email": user.email, "role": "member"})
        assert bad.status_code == 200 and "already a member" in bad.context["invite_form"].errors["email"][0]
        good = client.post("/team/", {"email": "new@example.com", "role": "viewer"})
        assert good.status_code == 302 and Invitation.objects.get().role == "viewer"

    def test_last_owner_demotion_shows_the_reason(self, client, user, tenant, owner_membership):
        client.force_login(user)
        add_member(tenant, Role.ADMIN)
        response = client.post("/team/leave/", follow=True)
        assert "last owner" in response.content.decode()
        assert Membership.objects.filter(pk=owner_membership.pk).exists()


class TestIsolationAndRoles:
    @pytest.fixture
    def rival(self):
        owner = UserFactory()
        tenant = make_tenant(owner=owner, name="Rival")
        membership = tenant.memberships.get()
        return {
            "member": add_member(tenant, Role.MEMBER),
            "key": services.ssh_key_add(membership=membership, actor=owner, name="k", public_key=new_public_key()),
            "token": services.api_token_create(membership=membership, actor=owner, name="t").token,
            "invitation": services.invitation_create(
                membership=membership, actor=owner, email="z@example.com", role=Role.MEMBER
            )[0],
            "tenant": tenant,
        }

    def test_other_tenants_objects_are_404_and_untouched(self, client, user, tenant, rival):
        client.force_login(user)
        assert client.post(f"/team/members/{rival['member'].pk}/role/", {"role": "admin"}).status_code == 404
        assert client.post(f"/team/members/{rival['member'].pk}/remove/").status_code == 404
        assert client.post(f"/settings/ssh-keys/{rival['key'].pk}/delete/").status_code == 404
        assert client.post(f"/settings/tokens/{rival['token'].pk}/revoke/").status_code == 404
        assert client.post(f"/team/invitations/{rival['invitation'].pk}/revoke/").status_code == 404
        assert client.post("/tenants/switch/", {"tenant": rival["tenant"].slug}).status_code == 404
        assert Membership.objects.get(pk=rival["member"].pk).role == Role.MEMBER
        assert SshKey.objects.filter(pk=rival["key"].pk).exists()
        assert ApiToken.objects.get(pk=rival["token"].pk).revoked_at is None

    def test_switching_tenant_changes_what_pages_show(self, client, user, tenant):
        second = make_tenant(owner=user, name="Second Org")
        client.force_login(user)
        client.post("/tenants/switch/", {"tenant": second.slug})
        assert client.get("/team/").context["active_tenant"] == second
        client.post("/tenants/switch/", {"tenant": tenant.slug})
        assert client.get("/team/").context["active_tenant"] == tenant

    def test_viewer_reads_but_cannot_manage(self, client, tenant, member_of):
        viewer = member_of(tenant, Role.VIEWER)
        target = add_member(tenant, Role.MEMBER)
        client.force_login(viewer)
        assert client.get("/team/").status_code == 200
        assert client.post("/team/", {"email": "a@example.com", "role": "member"}).status_code == 403
        assert client.post(f"/team/members/{target.pk}/role/", {"role": "admin"}).status_code == 403
        page = client.get("/settings/ssh-keys/")
        assert page.status_code == 200 and 'id="ssh-key-form"' not in page.content.decode()

    def test_billing_role_does_not_see_compute_keys(self, client, tenant, member_of):
        client.force_login(member_of(tenant, Role.BILLING))
        assert client.get("/settings/ssh-keys/").status_code == 403
        assert client.get("/team/").status_code == 200


def test_team_page_query_count_does_not_grow_with_members(client, user, tenant):
    client.force_login(user)
    client.get("/team/")  # the first request also saves the session
    second = make_tenant(owner=user, name="Second")
    with CaptureQueriesContext(connection) as few:
        client.get("/team/")
    for _ in range(30):
        add_member(tenant, Role.MEMBER)
    for _ in range(10):
        services.invitation_create(
            membership=tenant.memberships.get(user=user), actor=user, email=f"p{_}@example.com", role=Role.VIEWER
        )
    for n in range(5):
        make_tenant(owner=user, name=f"Org {n}")  # more entries in the tenant switcher
    add_member(second, Role.MEMBER)
    with CaptureQueriesContext(connection) as many:
        client.get("/team/")
    assert len(many) == len(few)


class TestConsole:
    def login_staff_with_totp(self, client):
        staff = staff_with_role(StaffRole.ADMIN, email="am@example.com")  # quotas of any customer
        secret = generate_totp_secret()
        TOTP.activate(staff, secret)
        client.post("/accounts/login/", {"login": "am@example.com", "password": "correct-horse-battery"})
        client.post(
            "/accounts/2fa/authenticate/", {"code": format_hotp_value(hotp_value(secret, int(time.time()) // 30))}
        )
        return staff

    def test_staff_searches_customers_and_changes_quotas(self, client, tenant):
        staff = self.login_staff_with_totp(client)
        listing = client.get("/console/", {"q": tenant.name[:4]})
        assert tenant in list(listing.context["page"])
        url = f"/console/tenants/{tenant.slug}/quotas/"
        form = client.get(url).context["form"]
        data = {name: form.initial[name] for name in form.fields} | {"gpu_H100": 2, "vcpus": 96}
        assert client.post(url, data).status_code == 302
        tenant.quota.refresh_from_db()
        assert tenant.quota.vcpus == 96 and tenant.gpu_quotas.get(gpu_model__code="H100").limit == 2
        event = AuditEvent.objects.get(action="quota.updated")
        assert event.actor == staff and event.via == "console"
        bad = client.post(url, data | {"vcpus": -5})
        assert bad.status_code == 200 and bad.context["form"].errors["vcpus"]

    def test_console_list_query_count_is_constant(self, client, tenant):
        self.login_staff_with_totp(client)
        client.get("/console/")
        with CaptureQueriesContext(connection) as few:
            client.get("/console/")
        for n in range(20):
            make_tenant(name=f"Customer {n}")
        with CaptureQueriesContext(connection) as many:
            client.get("/console/")
        assert len(many) == len(few)
