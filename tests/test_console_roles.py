"""Who may do what in the console: the role matrix, the MFA gate on every URL family, a support
member who can change nothing, an account manager confined to their own customers (others are
404), finance and admin on billing, and the defaults for superusers and staff without a role."""

import pytest
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
from django.test import Client

from billing.models import LedgerEntry, Payment
from crm.models import (
    CreditAdjustment,
    CreditRequestStatus,
    CustomerAccount,
    CustomerNote,
    StaffProfile,
    StaffRole,
    TierChange,
    UsageReview,
    ViewAsSession,
)
from crm.permissions import ROLE_CAPABILITIES, StaffCapability, staff_can, staff_role, visible_tenants
from tenants.models import AuditEvent, Tier
from tests.factories import UserFactory, make_tenant
from tests.test_console import make_staff, manage, staff_login

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client():
    return staff_login


C = StaffCapability


# --- The matrix ---------------------------------------------------------------------------------------


def test_the_role_matrix():
    manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
    support, _ = make_staff(StaffRole.SUPPORT)
    finance, _ = make_staff(StaffRole.FINANCE)
    admin, _ = make_staff(StaffRole.ADMIN)
    mine, theirs = make_tenant(name="Mine"), make_tenant(name="Theirs")
    manage(mine, manager)

    assert staff_can(manager, C.PROPOSE_CREDIT, mine) and not staff_can(manager, C.PROPOSE_CREDIT, theirs)
    assert staff_can(manager, C.VIEW_CUSTOMERS, mine) and not staff_can(manager, C.VIEW_CUSTOMERS, theirs)
    assert not staff_can(manager, C.APPROVE_CREDIT, mine) and not staff_can(manager, C.MANAGE_BILLING)
    assert not staff_can(manager, C.ASSIGN_MANAGER, mine)

    writes = set(StaffCapability) - {C.VIEW_CUSTOMERS, C.VIEW_POOLS, C.VIEW_AUDIT, C.VIEW_BILLING}
    assert not any(staff_can(support, cap, theirs) for cap in writes)
    assert all(staff_can(support, cap, theirs) for cap in (C.VIEW_CUSTOMERS, C.VIEW_POOLS, C.VIEW_AUDIT))

    assert staff_can(finance, C.APPROVE_CREDIT, theirs) and staff_can(finance, C.MANAGE_BILLING)
    assert not staff_can(finance, C.CHANGE_TIER, theirs) and not staff_can(finance, C.VIEW_AS, theirs)

    assert all(staff_can(admin, cap, theirs) for cap in StaffCapability)
    assert ROLE_CAPABILITIES[StaffRole.ADMIN] == set(StaffCapability)

    assert set(visible_tenants(manager)) == {mine}
    assert set(visible_tenants(support)) >= {mine, theirs}


def test_superusers_are_admin_and_customers_have_no_role(settings):
    root = UserFactory(is_staff=True, is_superuser=True)
    customer = UserFactory()
    assert staff_role(root) == StaffRole.ADMIN and staff_can(root, C.APPROVE_CREDIT)
    assert staff_role(customer) is None and not staff_can(customer, C.VIEW_CUSTOMERS)
    inactive = UserFactory(is_staff=True, is_superuser=True, is_active=False)
    assert staff_role(inactive) is None


def test_staff_without_a_profile_get_the_configured_default_role(settings):
    legacy = UserFactory(is_staff=True)
    assert settings.PORTAL_STAFF_DEFAULT_ROLE == StaffRole.SUPPORT  # shipped read-only
    assert staff_role(legacy) == StaffRole.SUPPORT and not staff_can(legacy, C.PROPOSE_CREDIT)
    assert not staff_can(legacy, C.MANAGE_BILLING) and not staff_can(legacy, C.APPROVE_CREDIT)
    root = UserFactory(is_staff=True, is_superuser=True)
    assert staff_role(root) == StaffRole.ADMIN  # superusers stay admin without a profile
    settings.PORTAL_STAFF_DEFAULT_ROLE = StaffRole.FINANCE
    assert staff_role(legacy) == StaffRole.FINANCE
    settings.PORTAL_STAFF_DEFAULT_ROLE = ""
    assert staff_role(legacy) is None and not staff_can(legacy, C.VIEW_CUSTOMERS)


# --- The gate: staff with MFA used in this session, on every URL family -------------------------------


@pytest.fixture
def customer_tenant():
    return make_tenant(name="Acme AI")


def url_families(tenant) -> list[str]:
    return [
        "/console/",
        f"/console/customers/{tenant.slug}/",
        f"/console/tenants/{tenant.slug}/quotas/",
        "/console/credits/",
        "/console/pools/",
        "/console/audit/",
        "/console/billing/",
        f"/console/billing/tenants/{tenant.slug}/",
    ]


def test_anonymous_visitors_are_sent_to_log_in(client, customer_tenant):
    for url in url_families(customer_tenant):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url


def test_customers_are_refused(client, customer_tenant):
    client.force_login(customer_tenant.memberships.first().user)
    for url in url_families(customer_tenant):
        assert client.get(url).status_code == 403, url
    assert client.post(f"/console/customers/{customer_tenant.slug}/notes/", {"body": "x"}).status_code == 403
    assert not CustomerNote.objects.exists()


def test_staff_without_mfa_are_sent_to_set_it_up(client, customer_tenant):
    staff = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(staff)
    for url in url_families(customer_tenant):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"] == "/accounts/2fa/totp/activate/", url


def test_staff_with_mfa_must_have_used_it_in_this_session(client, customer_tenant):
    staff = UserFactory(is_staff=True, is_superuser=True)
    TOTP.activate(staff, generate_totp_secret())
    client.force_login(staff)  # a session without the second factor
    for url in url_families(customer_tenant):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/2fa/reauthenticate/"), url
    response = client.post(f"/console/customers/{customer_tenant.slug}/credits/", {"amount": "10", "reason": "x"})
    assert response.status_code == 302 and not CreditAdjustment.objects.exists()


# --- Support: reads everything, changes nothing --------------------------------------------------------


def test_support_reads_everything_and_cannot_post_anything(staff_client, customer_tenant):
    client, _support = staff_client(StaffRole.SUPPORT)
    assert_reads_everything_and_changes_nothing(client, customer_tenant)


def test_staff_without_a_profile_read_everything_and_cannot_post_anything(staff_client, customer_tenant):
    """is_staff alone (no StaffProfile) is the read-only default role: a forgotten flag moves no money."""
    client, legacy = staff_client(None)
    assert not StaffProfile.objects.filter(user=legacy).exists()
    assert_reads_everything_and_changes_nothing(client, customer_tenant)
    wallet_page = client.get(f"/console/billing/tenants/{customer_tenant.slug}/").content.decode()
    assert "Cash ¥0.00" in wallet_page and 'name="form"' not in wallet_page  # no forms it could not post


def assert_reads_everything_and_changes_nothing(client, tenant):
    """Every console page opens; every console POST is a 403 that writes nothing, not even an audit event."""
    finance, _ = make_staff(StaffRole.FINANCE)
    for url in url_families(tenant):
        assert client.get(url).status_code == 200, url

    from crm import services as crm_services

    pending = crm_services.credit_propose(tenant=tenant, actor=finance, amount="5000", reason="SLA")
    review = UsageReview.objects.create(
        tenant=tenant, period_start="2026-01-01", period_end="2026-02-01", report={"period": {"label": "Jan"}}
    )
    membership = tenant.memberships.first()
    payment = Payment.objects.create(
        reference="P-TEST-1",
        tenant=tenant,
        kind="top_up",
        amount="100.00",
        provider="offline",
        created_by=membership.user,
    )
    audit_before = AuditEvent.objects.count()
    posts = {
        f"/console/customers/{tenant.slug}/notes/": {"kind": "note", "body": "hello"},
        f"/console/customers/{tenant.slug}/tier/": {"action": "override", "tier": "gold", "reason": "why not"},
        f"/console/customers/{tenant.slug}/manager/": {"manager": ""},
        f"/console/customers/{tenant.slug}/credits/": {"amount": "10", "reason": "x"},
        f"/console/customers/{tenant.slug}/view-as/": {"reason": "look"},
        f"/console/customers/{tenant.slug}/reviews/{review.pk}/send/": {},
        f"/console/tenants/{tenant.slug}/quotas/": {"vcpus": "999"},
        f"/console/credits/{pending.pk}/approve/": {},
        f"/console/credits/{pending.pk}/reject/": {},
        f"/console/billing/payments/{payment.pk}/confirm/": {},
        f"/console/billing/payments/{payment.pk}/cancel/": {},
        f"/console/billing/tenants/{tenant.slug}/": {
            "form": "adjust",
            "adjust-kind": "adjustment",
            "adjust-amount": "5",
            "adjust-reason": "x",
        },
        "/console/billing/price-book/": {"effective_from": "2031-01-01T00:00", "prices": "task_gpu_hour:H100 1"},
        "/console/": {},
        "/console/pools/": {},
        "/console/audit/": {},
    }
    for url, data in posts.items():
        assert client.post(url, data).status_code == 403, url
    assert AuditEvent.objects.count() == audit_before
    assert not CustomerNote.objects.exists() and not TierChange.objects.exists() and not ViewAsSession.objects.exists()
    assert not LedgerEntry.objects.exists()
    pending.refresh_from_db()
    payment.refresh_from_db()
    review.refresh_from_db()
    assert pending.status == CreditRequestStatus.PENDING and payment.status == "pending" and review.status == "ready"
    assert CreditAdjustment.objects.count() == 1
    tenant.refresh_from_db()
    assert tenant.tier.code == "standard" and tenant.quota.vcpus != 999


# --- Account managers: their own customers only ---------------------------------------------------------


def test_an_account_manager_cannot_open_another_managers_customer(staff_client):
    client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
    other_manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
    mine = make_tenant(name="Mine")
    theirs = make_tenant(name="Theirs")
    manage(mine, manager)
    manage(theirs, other_manager)

    listing = client.get("/console/")
    assert [t.slug for t in listing.context["page"]] == [mine.slug]
    export = b"".join(client.get("/console/", {"export": "csv"}).streaming_content).decode()
    assert mine.slug in export and theirs.slug not in export

    for url in (
        f"/console/customers/{theirs.slug}/",
        f"/console/tenants/{theirs.slug}/quotas/",
        f"/console/billing/tenants/{theirs.slug}/",
    ):
        assert client.get(url).status_code == 404, url
    for url, data in (
        (f"/console/customers/{theirs.slug}/notes/", {"kind": "note", "body": "x"}),
        (f"/console/customers/{theirs.slug}/credits/", {"amount": "10", "reason": "x"}),
        (f"/console/customers/{theirs.slug}/view-as/", {"reason": "x"}),
        (f"/console/customers/{theirs.slug}/tier/", {"action": "override", "tier": "gold", "reason": "x"}),
    ):
        assert client.post(url, data).status_code == 404, url
    assert not CustomerNote.objects.exists() and not CreditAdjustment.objects.exists()

    from crm import services as crm_services

    other_request = crm_services.credit_propose(tenant=theirs, actor=other_manager, amount="9000", reason="big")
    assert str(other_request.pk) not in client.get("/console/credits/").content.decode()
    assert client.get(f"/console/customers/{mine.slug}/").status_code == 200


def test_an_account_manager_cannot_assign_managers_nor_touch_billing(staff_client):
    client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
    tenant = make_tenant()
    manage(tenant, manager)
    assert client.post(f"/console/customers/{tenant.slug}/manager/", {"manager": ""}).status_code == 403
    assert CustomerAccount.objects.get(tenant=tenant).account_manager == manager
    assert client.get("/console/billing/").status_code == 403
    assert client.get("/console/billing/price-book/").status_code == 403
    wallet = client.post(
        f"/console/billing/tenants/{tenant.slug}/",
        {"form": "adjust", "adjust-kind": "adjustment", "adjust-amount": "50000", "adjust-reason": "sneaky"},
    )
    assert wallet.status_code == 403 and not LedgerEntry.objects.exists()


# --- Finance and admin on billing ------------------------------------------------------------------------


def test_finance_confirms_payments_and_publishes_prices(staff_client, api):
    client, _finance = staff_client(StaffRole.FINANCE)
    owner = UserFactory()
    tenant = make_tenant(owner=owner)
    response = api(owner).post("/api/v1/wallet/top-up/", {"amount": "500"}, format="json")
    assert response.status_code == 201
    payment = Payment.objects.get()
    assert client.post(f"/console/billing/payments/{payment.pk}/confirm/").status_code == 302
    payment.refresh_from_db()
    assert payment.status == "succeeded"
    assert LedgerEntry.objects.filter(tenant=tenant, kind="top_up").count() == 1
    page = client.get("/console/billing/price-book/")
    assert page.status_code == 200


def test_finance_cannot_change_tiers_or_view_as(staff_client):
    client, _ = staff_client(StaffRole.FINANCE)
    tenant = make_tenant()
    tier = client.post(f"/console/customers/{tenant.slug}/tier/", {"action": "override", "tier": "gold", "reason": "x"})
    assert tier.status_code == 403 and "does not allow" in tier.content.decode()
    assert client.post(f"/console/customers/{tenant.slug}/view-as/", {"reason": "x"}).status_code == 403
    tenant.refresh_from_db()
    assert tenant.tier == Tier.objects.get(code="standard")


def test_a_superuser_without_a_profile_can_do_everything(staff_client):
    client, root = staff_client(None, superuser=True)
    tenant = make_tenant()
    assert client.post(f"/console/customers/{tenant.slug}/notes/", {"kind": "note", "body": "ok"}).status_code == 302
    assert CustomerNote.objects.get().author == root


def test_support_page_hides_the_forms_it_cannot_use(staff_client):
    client, _ = staff_client(StaffRole.SUPPORT)
    tenant = make_tenant()
    html = client.get(f"/console/customers/{tenant.slug}/").content.decode()
    for form_id in ("credit-form", "note-form", "tier-form", "manager-form", "view-as-form"):
        assert f'id="{form_id}"' not in html
    admin_client, _ = staff_client(StaffRole.ADMIN)
    html = admin_client.get(f"/console/customers/{tenant.slug}/").content.decode()
    for form_id in ("credit-form", "note-form", "tier-form", "manager-form", "view-as-form"):
        assert f'id="{form_id}"' in html


def test_the_customer_never_reaches_the_console_through_a_fresh_client(customer_tenant):
    client = Client()
    client.force_login(customer_tenant.memberships.first().user)
    assert client.post("/console/view-as/stop/").status_code == 403
