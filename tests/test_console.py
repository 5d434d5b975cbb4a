"""The account-manager console: the customer list (figures, search, filters, sorting, CSV, a constant
number of queries), the customer 360 page, notes, tier and manager changes, maker-checker credits,
viewing as the customer, pools and the audit search. Staff log in with a real TOTP second factor."""

import csv
import io
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import TOTP, format_hotp_value, generate_totp_secret, hotp_value
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import services as billing_services
from billing.models import CreditGrant, LedgerEntry, LedgerKind, Wallet
from crm import services as crm_services
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
from hosting.models import Task, TaskState
from notifications.models import Notification, NotificationKind
from provisioning.models import GpuModel, Node, Placement, Plan, Pool, VirtualMachine, VmState
from tenants.models import AuditEvent, Role, Tier
from tests.factories import UserFactory, add_member, make_tenant

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery"  # UserFactory's
LIST_QUERIES = 12  # a page of the customer list: session, user, role, managers, count, the page itself…


# --- Staff and customers -----------------------------------------------------------------------------


def make_staff(role: str | None = StaffRole.ACCOUNT_MANAGER, *, email: str | None = None, superuser: bool = False):
    """A staff member with a console role and TOTP turned on; returns (user, TOTP secret)."""
    user = UserFactory(is_staff=True, is_superuser=superuser, **({"email": email} if email else {}))
    if role:
        StaffProfile.objects.create(user=user, role=role)
    secret = generate_totp_secret()
    TOTP.activate(user, secret)
    return user, secret


def current_code(secret: str) -> str:
    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


def log_in_with_totp(client: Client, user, secret: str) -> None:
    """The real login: password, then the authenticator code (so the session used MFA)."""
    first = client.post("/accounts/login/", {"login": user.email, "password": PASSWORD})
    assert first.status_code == 302 and first["Location"] == "/accounts/2fa/authenticate/", first
    second = client.post("/accounts/2fa/authenticate/", {"code": current_code(secret)})
    assert second.status_code == 302, second


def staff_login(role: str | None = StaffRole.ACCOUNT_MANAGER, **kwargs) -> tuple[Client, object]:
    """A Client logged in with TOTP as a new staff member of `role`, and the user."""
    user, secret = make_staff(role, **kwargs)
    client = Client()
    log_in_with_totp(client, user, secret)
    return client, user


@pytest.fixture
def staff_client():
    """staff_client(role, **kw) → (a Client logged in with TOTP as a new staff member, the user)."""
    return staff_login


def manage(tenant, manager) -> CustomerAccount:
    account, _ = CustomerAccount.objects.get_or_create(tenant=tenant)
    account.account_manager = manager
    account.save()
    return account


def charge(tenant, amount, when=None) -> LedgerEntry:
    """A charge of `amount` (what the customer spent), posted directly: the ledger is append-only."""
    return LedgerEntry.objects.create(
        tenant=tenant,
        kind=LedgerKind.CHARGE,
        amount=-Decimal(amount),
        reason="usage",
        reference=f"test:{tenant.pk}:{amount}",
        created_at=when or timezone.now(),
    )


def running_vm(tenant, *, state=VmState.RUNNING, node_name="", plan="t4-1x-general") -> VirtualMachine:
    return VirtualMachine.objects.create(
        tenant=tenant,
        created_by=tenant.memberships.first().user,
        plan=Plan.objects.get(code=plan),
        name=f"vm-{VirtualMachine.objects.count()}",
        billing_mode="on_demand",
        state=state,
        node_name=node_name,
        queued_at=timezone.now() if state == VmState.QUEUED else None,
    )


def task(tenant, *, state=TaskState.RUNNING, model="A100", node_name="", queued_since=None) -> Task:
    return Task.objects.create(
        tenant=tenant,
        created_by=tenant.memberships.first().user,
        name="train",
        framework="pytorch",
        image="pytorch:latest",
        command="python train.py",
        gpu_model=GpuModel.objects.get(code=model) if model else None,
        gpus=1 if model else 0,
        state=state,
        node_name=node_name,
        queued_since=queued_since or timezone.now(),
    )


def rows_of(page) -> dict:
    return {t.slug: t for t in page.context["page"]}


# --- Customer list -----------------------------------------------------------------------------------


class TestCustomerList:
    def test_shows_tier_manager_spend_balance_work_and_churn(self, staff_client):
        client, admin = staff_client(StaffRole.ADMIN)
        manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER, email="am@example.com")
        acme = make_tenant(name="Acme AI")
        account = manage(acme, manager)
        account.churn_risk, account.churn_reason = True, "no_spend_two_months"
        account.churn_detail = {"reason": {"en": "No spend in two months.", "zh": "两个月无消费。"}}
        account.save()
        charge(acme, "300.00")
        charge(acme, "1200.00", timezone.now() - timedelta(days=70))
        billing_services.wallet_adjust(tenant=acme, actor=admin, amount=Decimal("500.00"), reason="goodwill")
        CreditGrant.objects.create(
            tenant=acme,
            name="Pack",
            granted=Decimal("1100"),
            remaining=Decimal("800.00"),
            expires_at=timezone.now() + timedelta(days=90),
        )
        CreditGrant.objects.create(  # expired: not counted
            tenant=acme, name="Old", granted=Decimal("50"), remaining=Decimal("50"), expires_at=timezone.now()
        )
        running_vm(acme)
        running_vm(acme, state=VmState.STOPPED)
        task(acme)
        task(acme, state=TaskState.SUCCEEDED)
        make_tenant(name="Beta Labs")

        page = client.get("/console/")
        assert page.status_code == 200
        rows = rows_of(page)
        row = rows[acme.slug]
        assert row.spend_mtd == Decimal("300.00") and row.spend_12m == Decimal("1500.00")
        assert row.cash_balance == Decimal("500.00") and row.package_credit == Decimal("800.00")
        assert (row.running_vms, row.running_tasks) == (1, 1)
        assert row.manager_email == "am@example.com" and row.churn_risk
        html = page.content.decode()
        assert "¥1,500.00" in html and "am@example.com" in html and "No spend for two months" in html

    def test_search_filters_and_sorts(self, staff_client):
        client, _ = staff_client(StaffRole.SUPPORT)
        manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
        owner = UserFactory(email="founder@deepmind.example")
        alpha = make_tenant(name="Alpha", owner=owner)
        beta = make_tenant(name="Beta")
        gamma = make_tenant(name="Gamma")
        gamma.tier = Tier.objects.get(code="gold")
        gamma.save()
        manage(beta, manager)
        CustomerAccount.objects.filter(tenant=beta).update(churn_risk=True, churn_reason="spend_below_half_average")
        charge(alpha, "10")
        charge(beta, "300")
        charge(gamma, "50")

        assert set(rows_of(client.get("/console/", {"q": "deepmind"}))) == {alpha.slug}
        assert set(rows_of(client.get("/console/", {"q": "gamm"}))) == {gamma.slug}
        assert set(rows_of(client.get("/console/", {"tier": "gold"}))) == {gamma.slug}
        assert set(rows_of(client.get("/console/", {"manager": str(manager.pk)}))) == {beta.slug}
        assert beta.slug not in rows_of(client.get("/console/", {"manager": "none"}))
        assert set(rows_of(client.get("/console/", {"churn": "yes"}))) == {beta.slug}
        assert beta.slug not in rows_of(client.get("/console/", {"churn": "no"}))
        by_spend = [t.slug for t in client.get("/console/", {"sort": "-spend_mtd"}).context["page"]]
        assert by_spend.index(beta.slug) < by_spend.index(gamma.slug) < by_spend.index(alpha.slug)
        by_tier = [t.slug for t in client.get("/console/", {"sort": "-tier"}).context["page"]]
        assert by_tier[0] == gamma.slug

    def test_a_bad_filter_is_a_400_with_the_field_named(self, staff_client):
        client, _ = staff_client(StaffRole.SUPPORT)
        response = client.get("/console/", {"tier": "platinum", "sort": "evil"})
        assert response.status_code == 400
        assert set(response.context["form"].errors) == {"tier", "sort"}

    def test_paginates_by_50(self, staff_client):
        client, _ = staff_client(StaffRole.ADMIN)
        for n in range(55):
            make_tenant(name=f"Customer {n:02d}")
        first = client.get("/console/")
        total = first.context["page"].paginator.count
        assert len(first.context["page"]) == 50 and total >= 55
        second = client.get("/console/", {"page": 2})
        assert len(second.context["page"]) == total - 50

    def test_csv_export_streams_the_same_filtered_rows(self, staff_client):
        client, _ = staff_client(StaffRole.FINANCE)
        alpha = make_tenant(name="Alpha")
        make_tenant(name="Beta")
        charge(alpha, "42.50")
        response = client.get("/console/", {"q": "Alph", "export": "csv"})
        assert response.status_code == 200 and response.streaming
        assert response["Content-Type"].startswith("text/csv")
        body = b"".join(response.streaming_content).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(body)))
        assert [r["slug"] for r in rows] == [alpha.slug]
        assert rows[0]["spend_mtd"] == "42.50" and rows[0]["tier"] == "standard"

    @staticmethod
    def seed(count: int, manager) -> None:
        for n in range(count):
            tenant = make_tenant(name=f"Customer {CustomerAccount.objects.count():03d}")
            manage(tenant, manager)
            charge(tenant, str(n + 1))
            running_vm(tenant)
            task(tenant)

    @pytest.mark.parametrize("count", [5, 60])
    def test_a_page_takes_a_bounded_number_of_queries(self, staff_client, django_assert_max_num_queries, count):
        client, _ = staff_client(StaffRole.ADMIN)
        manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
        self.seed(count, manager)
        with django_assert_max_num_queries(LIST_QUERIES):
            page = client.get("/console/", {"sort": "-spend_12m", "churn": "no"})
        assert len(page.context["page"]) == min(count, 50)

    def test_the_query_count_does_not_grow_with_the_customers(self, staff_client):
        client, _ = staff_client(StaffRole.ADMIN)
        manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
        self.seed(5, manager)
        with CaptureQueriesContext(connection) as few:
            client.get("/console/", {"sort": "-spend_12m"})
        self.seed(55, manager)
        with CaptureQueriesContext(connection) as many:
            client.get("/console/", {"sort": "-spend_12m"})
        assert len(few) == len(many)


# --- Customer 360 ------------------------------------------------------------------------------------


class TestCustomer360:
    def test_shows_everything_about_the_customer(self, staff_client):
        from tests.test_billing_helpers import meter_and_rate, task_run

        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant(name="Acme AI")
        manage(acme, manager)
        add_member(acme, Role.MEMBER, UserFactory(email="dev@acme.example"))
        running_vm(acme)
        task(acme)
        now = timezone.now()
        meter_and_rate(task_run(acme, start=now - timedelta(hours=3), end=now - timedelta(hours=1), gpus="2"))
        CustomerNote.objects.create(tenant=acme, author=manager, kind="call", body="Discussed H100 capacity.")
        CustomerAccount.objects.filter(tenant=acme).update(
            upsell={
                "offer_code": "pack-5000",
                "name_en": "Compute package 5,000",
                "name_zh": "算力包 5,000",
                "price": "5000.00",
                "saving": "420.00",
                "usage_30d": "5400.00",
            }
        )

        page = client.get(f"/console/customers/{acme.slug}/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "Compute package 5,000 would have saved ¥420.00 on ¥5400.00" in html
        for expected in ("dev@acme.example", "Discussed H100 capacity.", 'id="usage-chart"', "A100", "Invoices"):
            assert expected in html
        usage = page.context["usage"]
        assert usage.models == ["A100"] and usage.total == Decimal("4.0")  # 2 GPUs × 2 hours
        assert page.context["summary"].cash_balance < 0  # the GPU hours were charged
        assert any(e.action == "tenant.created" for e in page.context["audit"])

    def test_notes_are_kept_and_audited_and_an_empty_one_is_a_400(self, staff_client):
        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        manage(acme, manager)
        url = f"/console/customers/{acme.slug}/notes/"
        bad = client.post(url, {"kind": "call", "body": "  "})
        assert bad.status_code == 400 and bad.context["note_form"].errors["body"]
        assert not CustomerNote.objects.exists()
        assert client.post(url, {"kind": "meeting", "body": "Quarterly review booked."}).status_code == 302
        note = CustomerNote.objects.get()
        assert (note.kind, note.author) == ("meeting", manager)
        assert AuditEvent.objects.get(action="crm.note.added").tenant == acme
        assert "Quarterly review booked." in client.get(f"/console/customers/{acme.slug}/").content.decode()

    def test_tier_override_needs_a_reason_pins_and_unpins(self, staff_client):
        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        manage(acme, manager)
        url = f"/console/customers/{acme.slug}/tier/"
        bad = client.post(url, {"action": "override", "tier": "diamond", "reason": ""})
        assert bad.status_code == 400 and bad.context["tier_form"].errors["reason"]
        acme.refresh_from_db()
        assert acme.tier.code == "standard" and not TierChange.objects.exists()
        assert (
            client.post(url, {"action": "override", "tier": "diamond", "reason": "Strategic account"}).status_code
            == 302
        )
        acme.refresh_from_db()
        assert acme.tier.code == "diamond" and CustomerAccount.objects.get(tenant=acme).tier_pinned
        change = TierChange.objects.get()
        assert change.actor == manager and change.source == "staff"
        page = client.get(f"/console/customers/{acme.slug}/").content.decode()
        assert "Strategic account" in page and "Dedicated account manager" in page
        assert client.post(url, {"action": "unpin"}).status_code == 302
        assert not CustomerAccount.objects.get(tenant=acme).tier_pinned

    def test_only_account_managers_can_be_assigned(self, staff_client):
        client, admin = staff_client(StaffRole.ADMIN)
        manager, _ = make_staff(StaffRole.ACCOUNT_MANAGER, email="am@example.com")
        finance, _ = make_staff(StaffRole.FINANCE, email="fin@example.com")
        acme = make_tenant()
        url = f"/console/customers/{acme.slug}/manager/"
        refused = client.post(url, {"manager": str(finance.pk)})
        assert refused.status_code == 400 and refused.context["manager_form"].errors["manager"]
        assert client.post(url, {"manager": str(manager.pk)}).status_code == 302
        assert CustomerAccount.objects.get(tenant=acme).account_manager == manager
        event = AuditEvent.objects.get(action="crm.manager.assigned")
        assert event.after == {"account_manager": "am@example.com"} and event.actor == admin
        assert client.post(url, {"manager": ""}).status_code == 302
        assert CustomerAccount.objects.get(tenant=acme).account_manager is None

    def test_opens_and_sends_a_usage_review(self, staff_client):
        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        manage(acme, manager)
        review = UsageReview.objects.create(
            tenant=acme,
            period_start=timezone.localdate().replace(day=1) - timedelta(days=31),
            period_end=timezone.localdate().replace(day=1),
            report={"period": {"label": "last month"}, "gpu_usage": [], "vms": [], "recommendations": []},
        )
        page = client.get(f"/console/customers/{acme.slug}/reviews/{review.pk}/")
        assert page.status_code == 200 and f'id="usage-review-{review.pk}"' in page.content.decode()
        assert client.post(f"/console/customers/{acme.slug}/reviews/{review.pk}/send/").status_code == 302
        review.refresh_from_db()
        assert review.status == "sent" and review.sent_by == manager


# --- Credits: maker-checker --------------------------------------------------------------------------


class TestCredits:
    def test_at_or_below_the_threshold_is_applied_at_once(self, staff_client):
        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        manage(acme, manager)
        response = client.post(
            f"/console/customers/{acme.slug}/credits/", {"amount": "1000.00", "reason": "Outage on 3 March"}
        )
        assert response.status_code == 302
        credit = CreditAdjustment.objects.get()
        assert credit.status == CreditRequestStatus.APPLIED and credit.decided_by == manager
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("1000.00")
        entry = LedgerEntry.objects.get(kind=LedgerKind.ADJUSTMENT)
        assert entry.reason == "Outage on 3 March" and str(entry.pk) == credit.ledger_reference
        assert {"crm.credit.proposed", "crm.credit.applied", "billing.adjustment"} <= set(
            AuditEvent.objects.filter(tenant=acme).values_list("action", flat=True)
        )

    def test_above_the_threshold_waits_notifies_and_is_applied_once_by_someone_else(self, staff_client):
        maker_client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        checker_client, finance = staff_client(StaffRole.FINANCE)
        other_admin, _ = make_staff(StaffRole.ADMIN)
        _support, _ = make_staff(StaffRole.SUPPORT)
        acme = make_tenant()
        manage(acme, manager)
        maker_client.post(f"/console/customers/{acme.slug}/credits/", {"amount": "5000", "reason": "SLA credit"})
        credit = CreditAdjustment.objects.get()
        assert credit.status == CreditRequestStatus.PENDING
        assert not Wallet.objects.filter(tenant=acme, cash_balance__gt=0).exists()
        told = set(
            Notification.objects.filter(kind=NotificationKind.CREDIT_APPROVAL_REQUESTED).values_list("user", flat=True)
        )
        assert told == {finance.pk, other_admin.pk}  # not the maker, not support

        own = maker_client.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert own.status_code == 403  # an account manager has no approval right at all
        pending = checker_client.get("/console/credits/")
        assert str(credit.pk) in pending.content.decode()
        approved = checker_client.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "¥5000.00 credited" in approved.content.decode()
        again = checker_client.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "already applied" in again.content.decode()
        credit.refresh_from_db()
        assert credit.status == CreditRequestStatus.APPLIED and credit.decided_by == finance
        assert LedgerEntry.objects.filter(tenant=acme, kind=LedgerKind.ADJUSTMENT).count() == 1
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("5000.00")
        assert AuditEvent.objects.get(action="crm.credit.approved").actor == finance

    def test_the_maker_cannot_approve_their_own_request(self, staff_client):
        client, _finance = staff_client(StaffRole.FINANCE)
        acme = make_tenant()
        client.post(f"/console/customers/{acme.slug}/credits/", {"amount": "2500", "reason": "Refund of error"})
        credit = CreditAdjustment.objects.get()
        response = client.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "You proposed this credit" in response.content.decode()
        credit.refresh_from_db()
        assert credit.status == CreditRequestStatus.PENDING
        assert not LedgerEntry.objects.filter(kind=LedgerKind.ADJUSTMENT).exists()

    def test_rejected_credit_posts_nothing(self, staff_client):
        maker_client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        checker_client, _admin = staff_client(StaffRole.ADMIN)
        acme = make_tenant()
        manage(acme, manager)
        maker_client.post(f"/console/customers/{acme.slug}/credits/", {"amount": "-3000", "reason": "Clawback"})
        credit = CreditAdjustment.objects.get()
        assert credit.status == CreditRequestStatus.PENDING  # the threshold holds either way
        checker_client.post(f"/console/credits/{credit.pk}/reject/", {"note": "Not agreed"})
        credit.refresh_from_db()
        assert credit.status == CreditRequestStatus.REJECTED and credit.decision_note == "Not agreed"
        assert not LedgerEntry.objects.exists()
        refused = checker_client.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "already rejected" in refused.content.decode()
        assert not LedgerEntry.objects.exists()

    @pytest.mark.parametrize(
        "data, field",
        [
            ({"amount": "abc", "reason": "x"}, "amount"),
            ({"amount": "0", "reason": "x"}, "amount"),
            ({"amount": "10.001", "reason": "x"}, "amount"),
            ({"amount": "100", "reason": ""}, "reason"),
            ({"amount": "", "reason": "x"}, "amount"),
        ],
    )
    def test_bad_amounts_and_missing_reasons_are_400s_and_create_nothing(self, staff_client, data, field):
        client, _ = staff_client(StaffRole.FINANCE)
        acme = make_tenant()
        response = client.post(f"/console/customers/{acme.slug}/credits/", data)
        assert response.status_code == 400 and response.context["credit_form"].errors[field]
        assert not CreditAdjustment.objects.exists() and not LedgerEntry.objects.exists()

    def test_the_threshold_is_a_setting(self, staff_client, settings):
        settings.PORTAL_CREDIT_APPROVAL_THRESHOLD = Decimal("50.00")
        client, _ = staff_client(StaffRole.FINANCE)
        acme = make_tenant()
        client.post(f"/console/customers/{acme.slug}/credits/", {"amount": "50.01", "reason": "Small"})
        assert CreditAdjustment.objects.get().status == CreditRequestStatus.PENDING


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_two_approvals_at_once_apply_the_credit_once():
    maker, _ = make_staff(StaffRole.ACCOUNT_MANAGER)
    first, _ = make_staff(StaffRole.FINANCE)
    second, _ = make_staff(StaffRole.ADMIN)
    acme = make_tenant()
    manage(acme, maker)
    credit = crm_services.credit_propose(tenant=acme, actor=maker, amount=Decimal("7777.00"), reason="Big SLA credit")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(approver):
        from django.db import connections

        try:
            request = CreditAdjustment.objects.select_related("tenant").get(pk=credit.pk)
            barrier.wait()
            crm_services.credit_approve(request=request, approver=approver)
            outcomes.append("applied")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=approve, args=(who,)) for who in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ValidationError", "applied"]
    assert LedgerEntry.objects.filter(tenant=acme, kind=LedgerKind.ADJUSTMENT).count() == 1
    assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("7777.00")
    assert AuditEvent.objects.filter(action="crm.credit.approved").count() == 1


# --- The billing console's "Adjustment or refund": the same maker-checker --------------------------------


class TestWalletAdjustments:
    """/console/billing/tenants/<slug>/ posts adjustments and refunds through crm.services.credit_propose:
    above the threshold, either way, nothing reaches the ledger until a second finance or admin member
    approves it."""

    def post(self, client, tenant, amount, reason="Goodwill", kind="adjustment", follow=True):
        data = {"form": "adjust", "adjust-kind": kind, "adjust-amount": amount, "adjust-reason": reason}
        return client.post(f"/console/billing/tenants/{tenant.slug}/", data, follow=follow)

    def fund(self, tenant, amount):
        admin, _ = make_staff(StaffRole.ADMIN)
        billing_services.wallet_adjust(tenant=tenant, actor=admin, amount=Decimal(amount), reason="opening balance")

    def test_at_or_below_the_threshold_either_way_is_posted_at_once(self, staff_client):
        client, finance = staff_client(StaffRole.FINANCE)
        acme = make_tenant()
        page = self.post(client, acme, "1000.00", reason="Outage credit").content.decode()
        assert "¥1000.00 posted to the wallet of Acme AI" in page
        refund = self.post(client, acme, "200", reason="Double charge", kind="refund").content.decode()
        assert "¥200.00 posted" in refund
        self.post(client, acme, "-1000.00", reason="Credit given twice")
        assert CreditAdjustment.objects.filter(status=CreditRequestStatus.APPLIED, decided_by=finance).count() == 3
        kinds = sorted(LedgerEntry.objects.filter(tenant=acme).values_list("kind", "amount"))
        assert kinds == [
            ("adjustment", Decimal("-1000.00")),
            ("adjustment", Decimal("1000.00")),
            ("refund", Decimal("200.00")),
        ]
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("200.00")

    def test_above_the_threshold_waits_and_a_second_member_applies_it_once(self, staff_client):
        maker, finance = staff_client(StaffRole.FINANCE)
        checker, admin = staff_client(StaffRole.ADMIN)
        acme = make_tenant()
        page = self.post(maker, acme, "2500", reason="Refund of a failed run", kind="refund").content.decode()
        assert "¥2500.00 is above ¥1000.00: nothing is posted until another member" in page
        assert 'id="pending-credits"' in page and 'href="/console/credits/"' in page
        assert "Refund of a failed run" in page and "Cash ¥0.00" in page
        credit = CreditAdjustment.objects.get()
        assert (
            credit.status == CreditRequestStatus.PENDING and credit.kind == "refund" and credit.requested_by == finance
        )
        assert not LedgerEntry.objects.exists()
        told = Notification.objects.filter(kind=NotificationKind.CREDIT_APPROVAL_REQUESTED).values_list(
            "user", flat=True
        )
        assert admin.pk in set(told) and finance.pk not in set(told)

        own = maker.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "You proposed this credit" in own.content.decode()
        assert not LedgerEntry.objects.exists()

        approvals = checker.get("/console/credits/").content.decode()
        assert str(credit.pk) in approvals and "Refund</span>" in approvals
        checker.post(f"/console/credits/{credit.pk}/approve/")
        again = checker.post(f"/console/credits/{credit.pk}/approve/", follow=True)
        assert "already applied" in again.content.decode()
        entry = LedgerEntry.objects.get(tenant=acme)
        assert entry.kind == "refund" and entry.amount == Decimal("2500.00") and entry.actor == admin
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("2500.00")
        wallet_page = maker.get(f"/console/billing/tenants/{acme.slug}/").content.decode()
        assert 'id="pending-credits"' not in wallet_page and "Cash ¥2500.00" in wallet_page

    def test_a_large_debit_waits_too_and_cannot_overdraw_at_approval(self, staff_client):
        maker, _finance = staff_client(StaffRole.FINANCE)
        checker, _admin = staff_client(StaffRole.ADMIN)
        acme = make_tenant()
        self.fund(acme, "3000")
        self.post(maker, acme, "-2500", reason="Top-up booked twice")
        credit = CreditAdjustment.objects.get()
        assert credit.status == CreditRequestStatus.PENDING  # a debit can hurt the customer as much
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("3000.00")

        self.fund(acme, "-1000")  # the customer spent in the meantime: 2,000 left
        refused = checker.post(f"/console/credits/{credit.pk}/approve/", follow=True).content.decode()
        assert "Taking ¥2500.00 would overdraw the wallet: ¥2000.00 is available" in refused
        credit.refresh_from_db()
        assert credit.status == CreditRequestStatus.PENDING and credit.decided_by is None
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("2000.00")
        assert not AuditEvent.objects.filter(action="crm.credit.approved").exists()

        Wallet.objects.filter(tenant=acme).update(credit_limit=Decimal("500.00"))  # now it fits, to zero
        checker.post(f"/console/credits/{credit.pk}/approve/")
        credit.refresh_from_db()
        assert credit.status == CreditRequestStatus.APPLIED
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("-500.00")

    def test_a_small_debit_that_would_overdraw_is_refused_on_the_form(self, staff_client):
        client, _ = staff_client(StaffRole.FINANCE)
        acme = make_tenant()
        self.fund(acme, "100")
        response = self.post(client, acme, "-150", follow=False)
        assert response.status_code == 200
        assert "would overdraw the wallet: ¥100.00 is available" in response.context["adjust_form"].errors["amount"][0]
        assert not CreditAdjustment.objects.exists()
        assert Wallet.objects.get(tenant=acme).cash_balance == Decimal("100.00")
        negative_refund = self.post(client, acme, "-50", kind="refund", follow=False)
        assert negative_refund.context["adjust_form"].errors["amount"] == [
            "A refund gives money back: enter a positive amount."
        ]
        assert not CreditAdjustment.objects.exists()

    def test_support_and_account_managers_cannot_post_one(self, staff_client):
        support, _ = staff_client(StaffRole.SUPPORT)
        manager_client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        manage(acme, manager)
        assert self.post(support, acme, "10").status_code == 403
        assert self.post(support, acme, "5000").status_code == 403
        assert self.post(manager_client, acme, "10").status_code == 403  # they propose on the 360 page
        assert not CreditAdjustment.objects.exists() and not LedgerEntry.objects.exists()
        assert not AuditEvent.objects.filter(tenant=acme, action__startswith="crm.credit").exists()


# --- View as the customer ----------------------------------------------------------------------------


class TestViewAs:
    def start(self, client, tenant, reason="Ticket #42: billing page looks wrong"):
        return client.post(f"/console/customers/{tenant.slug}/view-as/", {"reason": reason})

    def test_read_only_banner_audited_and_seen_by_the_customer(self, staff_client, client):
        staff, manager = staff_client(StaffRole.ACCOUNT_MANAGER, email="am@example.com")
        owner = UserFactory(email="owner@acme.example")
        acme = make_tenant(name="Acme AI", owner=owner)
        manage(acme, manager)
        missing = self.start(staff, acme, reason="")
        assert missing.status_code == 400 and missing.context["view_as_form"].errors["reason"]
        assert not ViewAsSession.objects.exists()

        assert self.start(staff, acme)["Location"] == "/"
        session = ViewAsSession.objects.get()
        assert session.expires_at - session.started_at == timedelta(minutes=30)
        landing = staff.get("/")
        assert landing.status_code == 200 and "Viewing as Acme AI" in landing.content.decode()
        dashboard = staff.get("/tenant/")
        html = dashboard.content.decode()
        assert dashboard.context["active_tenant"] == acme
        assert 'id="view-as-banner"' in html and "Viewing as Acme AI" in html and "read-only" in html
        assert staff.get("/team/").status_code == 200 and "owner@acme.example" in staff.get("/team/").content.decode()

        audit_before = AuditEvent.objects.count()
        assert staff.post("/tenant/", {"name": "Hacked"}).status_code == 403
        assert staff.post("/team/leave/").status_code == 403
        assert staff.post("/settings/ssh-keys/", {"name": "k", "public_key": "ssh-ed25519 AAAA"}).status_code == 403
        assert staff.get("/api/v1/tenant/").status_code == 403
        assert staff.post("/api/v1/tokens/", {"name": "t"}).status_code == 403
        acme.refresh_from_db()
        assert acme.name == "Acme AI" and AuditEvent.objects.count() == audit_before
        assert acme.memberships.count() == 1

        stopped = staff.post("/console/view-as/stop/")
        assert stopped["Location"] == f"/console/customers/{acme.slug}/"
        after = staff.get("/tenant/")
        assert 'id="view-as-banner"' not in after.content.decode() and after.context.get("active_tenant") != acme
        session.refresh_from_db()
        assert session.ended_at is not None

        client.force_login(owner)  # the customer reads their own audit log
        log = client.get("/settings/audit/").content.decode()
        assert "crm.view_as.started" in log and "crm.view_as.ended" in log and "am@example.com" in log

    def test_it_ends_at_expiry(self, staff_client):
        staff, _manager = staff_client(StaffRole.ADMIN)
        acme = make_tenant(name="Acme AI")
        self.start(staff, acme)
        ViewAsSession.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
        page = staff.get("/tenant/")
        assert 'id="view-as-banner"' not in page.content.decode() and page.context.get("active_tenant") != acme
        ended = AuditEvent.objects.get(action="crm.view_as.ended")
        assert ended.tenant == acme and ended.after["how"] == "expired"
        assert ViewAsSession.objects.get().ended_at is not None

    def test_support_and_other_managers_cannot_start_one(self, staff_client):
        support, _ = staff_client(StaffRole.SUPPORT)
        other, _ = staff_client(StaffRole.ACCOUNT_MANAGER)
        acme = make_tenant()
        assert self.start(support, acme).status_code == 403
        assert self.start(other, acme).status_code == 404
        assert not ViewAsSession.objects.exists()


# --- Pools --------------------------------------------------------------------------------------------


def test_pools_show_utilisation_queues_and_warn_when_free_capacity_is_low(staff_client, settings):
    settings.PORTAL_POOL_FREE_WARNING_PERCENT = 20
    client, _ = staff_client(StaffRole.SUPPORT)
    a100, t4 = GpuModel.objects.get(code="A100"), GpuModel.objects.get(code="T4")
    busy = Node.objects.create(name="a100-1", pool=Pool.HIGH_END, gpu_model=a100, gpus=8, cpus=128, memory_gib=1024)
    Node.objects.create(
        name="t4-1", pool=Pool.GENERAL, gpu_model=t4, gpus=4, vgpu_slices_per_gpu=4, cpus=48, memory_gib=256
    )
    Placement.objects.create(
        node=busy,
        holder_type="vm",
        holder_id="x",
        gpus=7,
        gpu_slots=[[i, 1] for i in range(7)],
        cpus=64,
        memory_gib=512,
    )
    t4_node = Node.objects.get(name="t4-1")
    Placement.objects.create(node=t4_node, holder_type="task", holder_id="y", gpu_slots=[[0, 2]], cpus=4, memory_gib=16)
    acme = make_tenant()
    running_vm(acme, node_name="a100-1", plan="a100-1x-general")
    task(acme, model="T4", node_name="t4-1")
    task(acme, state=TaskState.QUEUED, model="A100", queued_since=timezone.now() - timedelta(hours=2))
    task(acme, state=TaskState.QUEUED, model="A100")
    running_vm(acme, state=VmState.QUEUED, plan="a100-1x-general")

    page = client.get("/console/pools/")
    assert page.status_code == 200
    lines = {(line.pool, line.gpu_model): line for line in page.context["lines"]}
    high = lines[(Pool.HIGH_END, "A100")]
    assert (high.gpus_used, high.used_percent, high.free_percent, high.low) == (Decimal("7.00"), 88, 12, True)
    assert high.running_vms == 1
    general = lines[(Pool.GENERAL, "T4")]
    assert general.gpus_used == Decimal("0.50") and not general.low and general.running_tasks == 1
    queues = {q.gpu_model: q for q in page.context["queues"]}
    assert (queues["A100"].tasks_waiting, queues["A100"].vms_waiting) == (2, 1)
    assert timezone.now() - queues["A100"].oldest_since > timedelta(hours=1, minutes=59)
    html = page.content.decode()
    assert "only 12% free capacity left" in html and html.count('class="alert alert-danger py-2 pool-warning"') == 1


# --- Audit search -------------------------------------------------------------------------------------


class TestAuditSearch:
    def test_filters_paginates_and_exports(self, staff_client):
        client, admin = staff_client(StaffRole.ADMIN, email="boss@example.com")
        acme = make_tenant(name="Acme AI")
        beta = make_tenant(name="Beta")
        crm_services.note_add(tenant=acme, actor=admin, kind="note", body="hello")
        crm_services.note_add(tenant=beta, actor=admin, kind="note", body="hi")
        old = AuditEvent.objects.create(  # append-only: written with its time
            actor_label="system", tenant=acme, action="crm.note.added", created_at=timezone.now() - timedelta(days=10)
        )

        found = client.get("/console/audit/", {"actor": "boss@", "tenant": acme.slug, "action": "crm.note"})
        assert [e.tenant for e in found.context["page"]] == [acme]
        since = (timezone.localdate() - timedelta(days=1)).isoformat()
        recent = client.get("/console/audit/", {"action": "crm.note", "since": since})
        assert len(recent.context["page"]) == 2
        until = (timezone.localdate() - timedelta(days=5)).isoformat()
        older = client.get("/console/audit/", {"action": "crm.note", "until": until})
        assert [e.pk for e in older.context["page"]] == [old.pk]
        by_name = client.get("/console/audit/", {"tenant": "beta", "action": "crm."})
        assert {e.tenant for e in by_name.context["page"]} == {beta}

        export = client.get("/console/audit/", {"action": "crm.note", "since": since, "export": "csv"})
        rows = list(csv.DictReader(io.StringIO(b"".join(export.streaming_content).decode("utf-8-sig"))))
        assert sorted(r["tenant"] for r in rows) == sorted([acme.slug, beta.slug])
        assert rows[0]["actor"] == "boss@example.com"

        for _n in range(55):
            AuditEvent.objects.create(actor_label="system", tenant=beta, action="test.bulk")
        first = client.get("/console/audit/", {"action": "test.bulk"})
        assert len(first.context["page"]) == 50
        assert len(client.get("/console/audit/", {"action": "test.bulk", "page": 2}).context["page"]) == 5

    def test_bad_dates_are_a_400_with_field_messages(self, staff_client):
        client, _ = staff_client(StaffRole.SUPPORT)
        response = client.get("/console/audit/", {"since": "yesterday"})
        assert response.status_code == 400 and response.context["form"].errors["since"]
        reversed_range = client.get("/console/audit/", {"since": "2030-01-02", "until": "2030-01-01"})
        assert reversed_range.status_code == 400 and reversed_range.context["form"].errors["until"]

    def test_an_account_manager_sees_only_their_customers_events(self, staff_client):
        client, manager = staff_client(StaffRole.ACCOUNT_MANAGER)
        mine = make_tenant(name="Mine")
        theirs = make_tenant(name="Theirs")
        manage(mine, manager)
        page = client.get("/console/audit/", {"action": "tenant."})
        tenants = {e.tenant_id for e in page.context["page"]}
        assert mine.pk in tenants and theirs.pk not in tenants


def test_seed_demo_makes_the_manager_an_account_manager_and_adds_finance(capsys):
    from django.core.management import call_command

    call_command("seed_demo")
    out = capsys.readouterr().out
    assert "manager@example.com / manager-password-123" in out
    assert "finance@example.com / finance-password-123" in out
    manager = StaffProfile.objects.get(user__email="manager@example.com")
    finance = StaffProfile.objects.get(user__email="finance@example.com")
    assert (manager.role, finance.role) == (StaffRole.ACCOUNT_MANAGER, StaffRole.FINANCE)
    assert Authenticator.objects.filter(user=finance.user, type=Authenticator.Type.TOTP).exists()
    lab = CustomerAccount.objects.get(tenant__name="Demo AI Lab")
    assert lab.account_manager == manager.user
    call_command("seed_demo")  # again: nothing doubles
    assert StaffProfile.objects.filter(user__email="finance@example.com").count() == 1
