"""The notification centre: who hears about what, in which language, by email only when they want it;
every source that tells people something; the bell, the page, the preferences and the API."""

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core import mail
from django.core.exceptions import ValidationError
from django.utils import timezone

from billing import services as billing_services
from billing.models import CreditGrant, Invoice, InvoiceStatus
from hosting import services as hosting_services
from hosting.executors.base import Outcome
from hosting.models import TaskState
from notifications import services
from notifications.models import EmailPreference, Notification, NotificationKind
from portal.events import dashboard_group
from provisioning.models import VirtualMachine
from tenants import services as tenant_services
from tenants.models import AuditEvent, Membership, Role
from tests.factories import UserFactory, add_member, make_tenant
from tests.test_billing_helpers import at, meter_and_rate, owner_membership_of, task_run, top_up
from tests.test_tasks_core import FAIL, LONG, pool, submit  # noqa: F401  (pool: a fixture, used by name)
from tests.test_vm_lifecycle import cluster, order, reconcile, ssh_key  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.django_db

K = NotificationKind


def kinds_for(user) -> list[str]:
    return list(Notification.objects.filter(user=user).values_list("kind", flat=True))


@pytest.fixture
def team(tenant, user):
    """The owner and one member of each other role."""
    people = {Role.OWNER: user}
    for role in (Role.ADMIN, Role.BILLING, Role.MEMBER, Role.VIEWER):
        people[role] = add_member(tenant, role).user
    return people


# --- notify() ---------------------------------------------------------------------------------------


def test_staff_kinds_about_a_customer_are_never_pushed_to_its_dashboards(tenant, django_capture_on_commit_callbacks):
    staff = UserFactory(is_staff=True)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(dashboard_group(tenant.pk), channel)
    with django_capture_on_commit_callbacks(execute=True):
        created = services.notify(
            kind=K.CHURN_FLAGGED, tenant=tenant, users=[staff], params={"reason": "No spend for two months."}
        )
    assert [n.user for n in created] == [staff]
    with pytest.raises(asyncio.TimeoutError):
        async_to_sync(asyncio.wait_for)(layer.receive(channel), 0.2)


def test_billing_kinds_reach_owners_admins_and_billing_and_push_a_dashboard_event(
    tenant, team, django_capture_on_commit_callbacks
):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(dashboard_group(tenant.pk), channel)
    with django_capture_on_commit_callbacks(execute=True):
        created = services.notify(
            kind=K.LOW_BALANCE,
            tenant=tenant,
            roles=services.BILLING_ROLES,
            params={"balance": "12.00", "threshold": "100.00"},
            url="/billing/",
        )
    assert {n.user for n in created} == {team[Role.OWNER], team[Role.ADMIN], team[Role.BILLING]}
    assert kinds_for(team[Role.MEMBER]) == [] and kinds_for(team[Role.VIEWER]) == []
    assert created[0].title == f"Low balance: {tenant.name}"
    assert "¥12.00" in created[0].body and "¥100.00" in created[0].body
    event = async_to_sync(layer.receive)(channel)
    assert event["kind"] == "notification" and event["payload"] == {"kind": K.LOW_BALANCE}
    assert sorted(m.to[0] for m in mail.outbox) == sorted(
        u.email for u in (team[Role.OWNER], team[Role.ADMIN], team[Role.BILLING])
    )


def test_preference_off_keeps_the_notification_but_sends_no_email(user, tenant, django_capture_on_commit_callbacks):
    services.set_email_preferences(user=user, choices={K.TASK_FAILED: False})
    with django_capture_on_commit_callbacks(execute=True):
        services.notify(kind=K.TASK_FAILED, tenant=tenant, users=[user], params={"task": "train", "reason": "oom"})
    note = Notification.objects.get(user=user)
    assert note.kind == K.TASK_FAILED and note.emailed_at is None and note.read_at is None
    assert mail.outbox == []


def test_preference_on_emails_in_the_recipients_own_language(tenant, user, team, django_capture_on_commit_callbacks):
    chinese = team[Role.BILLING]
    chinese.language = "zh-hans"
    chinese.save()
    services.set_email_preferences(user=user, choices={K.TASK_FINISHED: True})  # off by default
    with django_capture_on_commit_callbacks(execute=True):
        services.notify(
            kind=K.LOW_BALANCE,
            tenant=tenant,
            users=[user, chinese],
            params={"balance": "12.00", "threshold": "100.00"},
            url="/billing/",
        )
        services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[user, chinese], params={"task": "train"})
    to_chinese = [m for m in mail.outbox if m.to == [chinese.email]]
    to_owner = [m for m in mail.outbox if m.to == [user.email]]
    assert [m.subject for m in to_chinese] == [f"[GPU Portal] 余额不足提醒：{tenant.name}"]  # task_finished: off
    assert [m.subject for m in to_owner] == [
        f"[GPU Portal] Low balance: {tenant.name}",
        "[GPU Portal] Task train finished",
    ]
    assert "http://localhost:8000/billing/" in to_owner[0].body
    assert "/settings/notifications/" in to_owner[0].body  # where to turn it off
    assert Notification.objects.filter(emailed_at__isnull=False).count() == 3


def test_a_failing_mail_server_loses_no_notification_and_a_retry_sends_it(
    tenant, team, monkeypatch, django_capture_on_commit_callbacks
):
    real_send = services.send_mail
    down = {team[Role.ADMIN].email}

    def flaky(**kwargs):
        if kwargs["recipient_list"][0] in down:
            raise ConnectionRefusedError("SMTP is down")
        return real_send(**kwargs)

    monkeypatch.setattr(services, "send_mail", flaky)
    with django_capture_on_commit_callbacks(execute=True):
        created = services.notify(kind=K.INVOICE_ISSUED, tenant=tenant, users=[team[Role.OWNER], team[Role.ADMIN]])
    assert [m.to for m in mail.outbox] == [[team[Role.OWNER].email]]
    assert Notification.objects.filter(emailed_at__isnull=True).get().user == team[Role.ADMIN]
    down.clear()
    assert services.send_emails([n.pk for n in created]) == 1  # the retry sends only the one not sent
    assert len(mail.outbox) == 2


def test_a_dedupe_key_tells_each_person_once(tenant, user, django_capture_on_commit_callbacks):
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            services.notify(kind=K.INVOICE_ISSUED, tenant=tenant, users=[user], dedupe_key="invoice:1")
    assert Notification.objects.filter(user=user).count() == 1
    assert len(mail.outbox) == 1


def test_email_false_keeps_it_in_the_portal_only(user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.notify(kind=K.INVITATION_RECEIVED, users=[user], email=False)
    assert Notification.objects.filter(user=user).exists()
    assert mail.outbox == []


def test_inactive_people_are_not_notified(tenant, team):
    team[Role.ADMIN].is_active = False
    team[Role.ADMIN].save()
    created = services.notify(kind=K.INVOICE_ISSUED, tenant=tenant, roles=services.BILLING_ROLES)
    assert team[Role.ADMIN] not in {n.user for n in created}


def test_marking_read_touches_only_ones_own_and_is_audited(user, tenant, team):
    mine = services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[user], params={"task": "a"})[0]
    theirs = services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[team[Role.MEMBER]], params={"task": "b"})[0]
    assert services.mark_read(user=user, ids=[mine.pk, theirs.pk]) == 1
    theirs.refresh_from_db()
    assert theirs.read_at is None
    assert services.mark_read(user=user) == 0  # nothing left
    assert AuditEvent.objects.filter(action="notifications.read", actor=user).count() == 1


def test_email_preferences_refuse_unknown_kinds_and_audit_changes(user):
    with pytest.raises(ValidationError):
        services.set_email_preferences(user=user, choices={"no_such_kind": True})
    services.set_email_preferences(user=user, choices={K.LOW_BALANCE: False, K.TASK_FINISHED: False})
    assert EmailPreference.objects.get(user=user, kind=K.LOW_BALANCE).email is False
    event = AuditEvent.objects.get(action="notifications.email_preferences_changed")
    assert event.after == {K.LOW_BALANCE: False, K.TASK_FINISHED: False}
    services.set_email_preferences(user=user, choices={K.LOW_BALANCE: False})  # no change: not audited again
    assert AuditEvent.objects.filter(action="notifications.email_preferences_changed").count() == 1


# --- Every source -----------------------------------------------------------------------------------


@pytest.fixture
def enforce(settings):
    settings.PORTAL_BILLING_ENFORCE = True
    return settings


def test_low_balance_tells_the_billing_people_once_per_crossing(tenant, team, django_capture_on_commit_callbacks):
    membership = owner_membership_of(tenant)
    top_up(tenant, "1000")
    billing_services.wallet_set_low_balance_threshold(
        membership=membership, actor=membership.user, threshold=Decimal("500")
    )
    with django_capture_on_commit_callbacks(execute=True):
        meter_and_rate(task_run(tenant, start=at(2026, 11, 1, 0), end=at(2026, 11, 1, 12)))  # ¥686.40
        meter_and_rate(task_run(tenant, start=at(2026, 11, 2, 0), end=at(2026, 11, 2, 1)))  # still below
    notes = Notification.objects.filter(kind=K.LOW_BALANCE)
    assert {n.user for n in notes} == {team[Role.OWNER], team[Role.ADMIN], team[Role.BILLING]}
    assert notes[0].params["balance"] == "313.60" and notes[0].url == "/billing/"
    assert len(mail.outbox) == 3 and all("Low balance" in m.subject for m in mail.outbox)  # one each, no more


def test_running_out_of_credit_is_announced_once(tenant, team, enforce, django_capture_on_commit_callbacks):
    enforce.PORTAL_TASK_STOPPER = ""
    top_up(tenant, "100")
    with django_capture_on_commit_callbacks(execute=True):
        meter_and_rate(task_run(tenant, start=at(2026, 10, 1, 0), end=at(2026, 10, 1, 3)))
        meter_and_rate(task_run(tenant, start=at(2026, 10, 2, 0), end=at(2026, 10, 2, 1)))
    notes = Notification.objects.filter(kind=K.CREDIT_EXHAUSTED)
    assert {n.user for n in notes} == {team[Role.OWNER], team[Role.ADMIN], team[Role.BILLING]}
    assert "no pay-as-you-go credit left" in notes[0].body


def test_packages_expiring_within_seven_days_are_announced_once_each(tenant, team):
    now = timezone.now()

    def grant(name, remaining, expires_in):
        return CreditGrant.objects.create(
            tenant=tenant, name=name, granted=Decimal("1000.00"), remaining=Decimal(remaining),
            expires_at=now + expires_in,
        )  # fmt: skip

    soon = grant("Package 1,000", "250.00", timedelta(days=5))
    grant("Package 5,000", "900.00", timedelta(days=10))  # not yet
    grant("Spent package", "0.00", timedelta(days=2))  # nothing left to lose
    grant("Expired package", "80.00", -timedelta(hours=1))  # already written off
    assert services.notify_packages_expiring(now=now) == 3  # owner, admin, billing
    assert services.notify_packages_expiring(now=now + timedelta(days=1)) == 0  # once per grant
    note = Notification.objects.filter(kind=K.PACKAGE_EXPIRING, user=team[Role.BILLING]).get()
    assert note.params["package"] == "Package 1,000" and note.params["remaining"] == "250.00"
    assert note.params["expires"] == timezone.localtime(soon.expires_at).date().isoformat()  # Asia/Shanghai
    assert kinds_for(team[Role.MEMBER]) == []


def test_an_issued_invoice_is_announced_with_its_number_and_total(tenant, team, django_capture_on_commit_callbacks):
    top_up(tenant, "10000")
    meter_and_rate(task_run(tenant, start=at(2026, 3, 2, 10), end=at(2026, 3, 2, 12)))
    invoice = Invoice.objects.get(tenant=tenant, period_start="2026-03-01")
    with django_capture_on_commit_callbacks(execute=True):
        billing_services.invoice_finalise(invoice_id=invoice.pk, now=at(2026, 4, 5))
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.FINAL
    notes = Notification.objects.filter(kind=K.INVOICE_ISSUED)
    assert {n.user for n in notes} == {team[Role.OWNER], team[Role.ADMIN], team[Role.BILLING]}
    assert notes[0].title == f"Invoice {invoice.number} issued"
    assert f"¥{invoice.total}" in notes[0].body and notes[0].url == f"/billing/invoices/{invoice.pk}/"
    billing_services.invoice_finalise(invoice_id=invoice.pk, now=at(2026, 4, 6))
    assert notes.count() == 3


@pytest.mark.usefixtures("cluster")
def test_an_idle_vm_warns_its_creator_and_the_owners_and_admins(
    request, tenant, team, settings, django_capture_on_commit_callbacks
):
    settings.PORTAL_IDLE_WARNING_MINUTES = 15
    order_vm = request.getfixturevalue("order")
    creator = team[Role.MEMBER]
    creator_membership = Membership.objects.get(tenant=tenant, user=creator)
    vm = order_vm(plan="t4-1x-general", billing_mode="on_demand", membership=creator_membership)
    reconcile(django_capture_on_commit_callbacks)
    reconcile(django_capture_on_commit_callbacks)
    VirtualMachine.objects.filter(pk=vm.pk).update(idle_since=timezone.now() - timedelta(minutes=46))
    mail.outbox.clear()
    reconcile(django_capture_on_commit_callbacks)
    reconcile(django_capture_on_commit_callbacks)  # still idle, already warned: no second warning
    notes = Notification.objects.filter(kind=K.VM_IDLE_WARNING)
    assert {n.user for n in notes} == {creator, team[Role.OWNER], team[Role.ADMIN]}
    assert notes[0].params["vm"] == vm.name and notes[0].url == f"/compute/vms/{vm.pk}/"
    assert "will be released in 14 minutes" in notes[0].body
    assert sorted(m.to[0] for m in mail.outbox) == sorted(
        u.email for u in (creator, team[Role.OWNER], team[Role.ADMIN])
    )


@pytest.mark.usefixtures("pool")
def test_a_finished_task_tells_its_submitter(tenant, team, django_capture_on_commit_callbacks):
    submitter = Membership.objects.get(tenant=tenant, user=team[Role.MEMBER])
    task = submit(submitter, django_capture_on_commit_callbacks, name="resnet")
    task.refresh_from_db()
    assert task.state == TaskState.SUCCEEDED
    note = Notification.objects.get(kind=K.TASK_FINISHED)
    assert note.user == team[Role.MEMBER] and note.title == "Task resnet finished"
    assert note.url == f"/tasks/{task.pk}/"
    assert Notification.objects.count() == 1  # nobody else, and nothing for the states on the way


@pytest.mark.usefixtures("pool")
def test_a_failed_task_after_its_retries_tells_the_submitter_why(
    owner_membership, settings, user, django_capture_on_commit_callbacks
):
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 0
    task = submit(owner_membership, django_capture_on_commit_callbacks, command=FAIL, max_retries=1, name="broken")
    with django_capture_on_commit_callbacks(execute=True):
        hosting_services.schedule_pass()  # the retry
    task.refresh_from_db()
    assert task.state == TaskState.FAILED and task.attempts == 2
    note = Notification.objects.get(user=user)  # the retry on the way was not news
    assert note.kind == K.TASK_FAILED and "exited with code 3" in note.body


@pytest.mark.usefixtures("pool")
def test_a_timed_out_task_tells_the_submitter(owner_membership, user, django_capture_on_commit_callbacks):
    task = submit(owner_membership, command=LONG, name="forever")
    task.__class__.objects.filter(pk=task.pk).update(max_runtime_seconds=1)
    with django_capture_on_commit_callbacks(execute=True):
        hosting_services.schedule_pass()
    task.refresh_from_db()
    assert task.state == TaskState.TIMED_OUT
    assert kinds_for(user) == [K.TASK_TIMED_OUT]


@pytest.mark.usefixtures("pool")
def test_a_preempted_task_tells_the_submitter_it_was_requeued(owner_membership, user, monkeypatch):
    monkeypatch.setattr(hosting_services, "dispatch", lambda task_id, attempt: None)  # the executor reports below
    task = submit(owner_membership, command=LONG, name="spot", preemptible=True)
    hosting_services.schedule_pass()
    reporter = hosting_services.Reporter(str(task.pk), 1)
    reporter.started()
    task.__class__.objects.filter(pk=task.pk).update(stop_requested="preempt")
    reporter.finished(Outcome(status="cancelled", reason="SIGTERM"))
    task.refresh_from_db()
    assert task.state == TaskState.QUEUED
    note = Notification.objects.get(user=user)
    assert note.kind == K.TASK_PREEMPTED and "requeued" in note.body


@pytest.mark.usefixtures("pool")
def test_a_task_whose_submitter_left_tells_the_owners_and_admins(tenant, team, django_capture_on_commit_callbacks):
    submitter = Membership.objects.get(tenant=tenant, user=team[Role.MEMBER])
    task = submit(submitter, command=FAIL, name="orphan")
    submitter.delete()
    with django_capture_on_commit_callbacks(execute=True):
        hosting_services.schedule_pass()
    task.refresh_from_db()
    assert task.state == TaskState.FAILED
    assert {n.user for n in Notification.objects.filter(kind=K.TASK_FAILED)} == {team[Role.OWNER], team[Role.ADMIN]}


def test_an_invitation_to_someone_with_an_account_shows_in_the_portal_without_a_second_email(
    tenant, user, django_capture_on_commit_callbacks
):
    invitee = UserFactory(email="colleague@example.com")
    membership = owner_membership_of(tenant)
    with django_capture_on_commit_callbacks(execute=True):
        tenant_services.invitation_create(
            membership=membership, actor=user, email="Colleague@example.com", role="admin"
        )
        tenant_services.invitation_create(
            membership=membership, actor=user, email="stranger@example.com", role="member"
        )
    note = Notification.objects.get()  # the stranger has no account: the email is all they get
    assert note.user == invitee and note.kind == K.INVITATION_RECEIVED and note.emailed_at is None
    assert note.body.startswith(f"{user} invited you to join {tenant.name} as Admin.")
    assert "invitations/" not in note.url  # the secret link stays in the email
    assert sorted(m.to[0] for m in mail.outbox) == ["colleague@example.com", "stranger@example.com"]
    invitee.language = "zh-hans"
    invitee.save()
    from django.utils import translation

    with translation.override("zh-hans"):
        assert "管理员" in note.body  # the role follows the reader's language


# --- Pages -----------------------------------------------------------------------------------------


def many(user, tenant, count):
    return [
        services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[user], params={"task": f"job-{i}"})[0]
        for i in range(count)
    ]


def test_the_page_lists_ones_own_newest_first_paginated_and_highlights_unread(client, user, tenant, team):
    notes = many(user, tenant, 25)
    services.mark_read(user=user, ids=[notes[0].pk])
    services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[team[Role.MEMBER]], params={"task": "not-yours"})
    client.force_login(user)
    page = client.get("/notifications/").content.decode()
    assert page.index("Task job-24 finished") < page.index("Task job-23 finished")
    assert "job-4 " not in page and "not-yours" not in page  # 20 a page
    assert page.count('data-unread="true"') == 20
    assert 'id="notification-bell"' in page and 'data-unread="24"' in page
    second = client.get("/notifications/?page=2").content.decode()
    assert "Task job-0 finished" in second and 'data-unread="false"' in second


def test_marking_one_read_with_htmx_swaps_the_item_and_the_bell(client, user, tenant, team):
    first, second = many(user, tenant, 2)
    client.force_login(user)
    response = client.post(f"/notifications/{first.pk}/read/", headers={"HX-Request": "true"})
    body = response.content.decode()
    assert response.status_code == 200
    assert f'id="notification-{first.pk}"' in body and 'data-unread="false"' in body and "Mark as read" not in body
    assert 'hx-swap-oob="true"' in body and 'data-unread="1"' in body  # the bell, one left
    theirs = services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[team[Role.MEMBER]], params={"task": "x"})[0]
    assert client.post(f"/notifications/{theirs.pk}/read/").status_code == 404
    assert client.get(f"/notifications/{second.pk}/read/").status_code == 405
    response = client.post(f"/notifications/{second.pk}/read/", {"next": "/notifications/?page=1"})
    assert response.status_code == 302 and response["Location"] == "/notifications/?page=1"
    assert Notification.objects.filter(user=user, read_at__isnull=True).count() == 0


def test_marking_all_read(client, user, tenant):
    many(user, tenant, 3)
    client.force_login(user)
    body = client.post("/notifications/read/", headers={"HX-Request": "true"}).content.decode()
    assert 'data-unread="true"' not in body and 'data-unread="0"' in body
    assert Notification.objects.filter(user=user, read_at__isnull=True).count() == 0
    assert client.post("/notifications/read/").status_code == 302


def test_the_bell_counts_unread_on_every_page(client, user, tenant):
    client.force_login(user)
    assert 'data-unread="0"' in client.get("/").content.decode()
    many(user, tenant, 2)
    bell = client.get("/notifications/bell/").content.decode()
    assert 'data-unread="2"' in bell and "Notifications: 2 unread" in bell
    assert 'hx-trigger="portal-notification from:document"' in bell
    assert client.get("/settings/").content.decode().count('id="notification-bell"') == 1


def test_pages_need_a_login(client):
    assert client.get("/notifications/").status_code == 302
    assert client.get("/settings/notifications/").status_code == 302


def test_email_preferences_page(client, user):
    client.force_login(user)
    page = client.get("/settings/notifications/").content.decode()
    assert "always kept in the portal" in page
    assert 'name="email_low_balance" id="email-low_balance" checked' in page
    assert 'name="email_task_finished" id="email-task_finished">' in page  # off by default
    assert "email_churn_flagged" not in page  # staff kinds only for staff
    assert "email_invitation_received" not in page  # the invitation's own email always goes
    response = client.post("/settings/notifications/", {"email_task_finished": "on"})  # everything else unticked
    assert response.status_code == 302
    assert services.wants_email(user, K.TASK_FINISHED) and not services.wants_email(user, K.LOW_BALANCE)
    page = client.get("/settings/notifications/").content.decode()
    assert 'name="email_task_finished" id="email-task_finished" checked' in page
    staff = UserFactory(is_staff=True)
    client.force_login(staff)
    assert "email_churn_flagged" in client.get("/settings/notifications/").content.decode()


def test_chinese_page(client, user, tenant):
    user.language = "zh-hans"
    user.save()
    services.notify(kind=K.LOW_BALANCE, tenant=tenant, users=[user], params={"balance": "1.00", "threshold": "9.00"})
    client.force_login(user)
    assert f"余额不足提醒：{tenant.name}" in client.get("/notifications/").content.decode()


# --- API -------------------------------------------------------------------------------------------


def test_api_lists_and_marks_read(api, user, tenant, team):
    notes = many(user, tenant, 3)
    client = api(user)
    data = client.get("/api/v1/notifications/").json()
    assert data["count"] == 3
    first = data["results"][0]
    assert set(first) == {
        "id", "kind", "title", "body", "url", "tenant", "tenant_name", "created_at", "read_at", "unread",
    }  # fmt: skip
    assert first["id"] == notes[-1].pk and first["title"] == "Task job-2 finished" and first["unread"] is True
    assert first["tenant"] == tenant.pk and first["tenant_name"] == tenant.name
    theirs = services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[team[Role.MEMBER]], params={"task": "x"})[0]
    result = client.post("/api/v1/notifications/read/", {"ids": [notes[0].pk, theirs.pk]}, format="json").json()
    assert result == {"marked": 1, "unread": 2}
    theirs.refresh_from_db()
    assert theirs.read_at is None
    assert client.get("/api/v1/notifications/?unread=true").json()["count"] == 2
    assert client.post("/api/v1/notifications/read/", {"all": True}, format="json").json() == {"marked": 2, "unread": 0}
    bad = client.post("/api/v1/notifications/read/", {}, format="json")
    assert bad.status_code == 400 and "ids" in bad.json()
    assert api().get("/api/v1/notifications/").status_code in (401, 403)


def test_an_api_token_sees_its_tenants_notifications_and_personal_ones_only(api, user, tenant):
    other = make_tenant(owner=user, name="Other Lab")
    services.notify(kind=K.TASK_FINISHED, tenant=tenant, users=[user], params={"task": "here"})
    services.notify(kind=K.TASK_FINISHED, tenant=other, users=[user], params={"task": "elsewhere"})
    services.notify(kind=K.INVITATION_RECEIVED, users=[user], params={"tenant": "Third", "inviter": "x", "role": "y"})
    issued = tenant_services.api_token_create(membership=owner_membership_of(tenant), actor=user, name="ci")
    titles = [n["title"] for n in api(token=issued.secret).get("/api/v1/notifications/").json()["results"]]
    assert titles == ["Invitation to Third", "Task here finished"]
    marked = api(token=issued.secret).post("/api/v1/notifications/read/", {"all": True}, format="json").json()
    assert marked == {"marked": 2, "unread": 0}
    assert Notification.objects.get(params__task="elsewhere").read_at is None
    assert api(user).get("/api/v1/notifications/?unread=true").json()["count"] == 1  # the session sees all


def test_api_is_in_the_schema(client):
    import yaml

    schema = yaml.safe_load(client.get("/api/schema/").content)
    assert {"/api/v1/notifications/", "/api/v1/notifications/read/"} <= set(schema["paths"])
    fields = schema["components"]["schemas"]["Notification"]["properties"]
    assert all(spec.get("description") for name, spec in fields.items() if name != "kind")
