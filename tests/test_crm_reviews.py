"""Usage reviews: which tenants and periods, the report's figures and recommendations, idempotent
generation, the console partial, and sending it to the customer once."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.template.loader import render_to_string
from django.utils import translation

from crm import reviews
from crm.models import CustomerAccount, UsageReview, UsageReviewStatus
from notifications.models import Notification, NotificationKind
from provisioning.models import VirtualMachine
from tenants.models import AuditEvent, Role, Tenant, Tier, TierCode
from tests.crm_helpers import at, charge
from tests.factories import UserFactory, add_member, make_tenant
from tests.test_billing_helpers import lifecycle, make_vm, meter_and_rate, task_run

pytestmark = pytest.mark.django_db

NOW = at(2026, 10, 5, 9)  # Gold's last quarter: July–September 2026; Diamond's last month: September


def with_tier(tenant, code: str) -> Tenant:
    Tenant.objects.filter(pk=tenant.pk).update(tier=Tier.objects.get(code=code), created_at=at(2025, 1, 1))
    return Tenant.objects.select_related("tier").get(pk=tenant.pk)


def vm_requested(vm, when) -> None:
    VirtualMachine.objects.filter(pk=vm.pk).update(requested_at=when)


@pytest.fixture
def manager(tenant):
    user = UserFactory(is_staff=True)
    CustomerAccount.objects.create(tenant=tenant, account_manager=user)
    return user


@pytest.fixture
def gold(tenant, manager):
    """A Gold tenant's third quarter: 10 A100-hours of task hosting; a monthly A100 VM that ran two
    days of the quarter; an on-demand T4 VM running since 1 August; spend in the ledger each month."""
    gold = with_tier(tenant, TierCode.GOLD)
    meter_and_rate(task_run(gold, start=at(2026, 8, 3, 8), end=at(2026, 8, 3, 18)))
    trainer = make_vm(gold, plan="a100-1x-general", billing_mode="monthly", name="trainer")
    vm_requested(trainer, at(2026, 6, 20))
    lifecycle(trainer, "started", at(2026, 7, 1))
    lifecycle(trainer, "stopped", at(2026, 7, 3))
    notebook = make_vm(gold, plan="t4-1x-general", billing_mode="on_demand", name="notebook")
    vm_requested(notebook, at(2026, 8, 1))
    lifecycle(notebook, "started", at(2026, 8, 1))
    for month, amount in ((4, "100.00"), (5, "200.00"), (6, "300.00"), (7, "15000.00"), (8, "2000.00"), (9, "900.00")):
        charge(gold, amount, at(2026, month, 15))
    return gold


def test_gold_gets_the_quarter_that_just_ended(gold, manager):
    assert reviews.usage_reviews_generate(now=NOW) == {"created": 1, "failed": 0}
    review = UsageReview.objects.get(tenant=gold)
    assert (str(review.period_start), str(review.period_end)) == ("2026-07-01", "2026-10-01")
    assert review.status == UsageReviewStatus.READY
    report = review.report
    assert report["period"]["label"] == "2026-07 – 2026-09" and report["period"]["months"] == 3
    assert report["gpu_usage"] == [
        {
            "gpu_model": "T4",
            "task_gpu_hours": "0.00",
            "vm_gpu_hours": "1464.00",
            "gpu_hours": "1464.00",
            "task_spend": "0.00",
        },
        {
            "gpu_model": "A100",
            "task_gpu_hours": "10.00",
            "vm_gpu_hours": "48.00",
            "gpu_hours": "58.00",
            "task_spend": "500.00",
        },
    ]
    assert report["gpu_hours_total"] == "1522.00"
    vms = {vm["name"]: vm for vm in report["vms"]}
    assert (vms["trainer"]["running_hours"], vms["trainer"]["wall_hours"]) == ("48.00", "2208.00")  # 92 days
    assert vms["trainer"]["utilisation_percent"] == "2.2"
    assert (vms["notebook"]["running_hours"], vms["notebook"]["utilisation_percent"]) == ("1464.00", "100.0")
    assert report["spend_trend"] == [
        {"month": "2026-04", "spend": "100.00"},
        {"month": "2026-05", "spend": "200.00"},
        {"month": "2026-06", "spend": "300.00"},
        {"month": "2026-07", "spend": "15000.00"},
        {"month": "2026-08", "spend": "2000.00"},
        {"month": "2026-09", "spend": "900.00"},
    ]
    assert report["spend_period"] == "17900.00"
    assert report["spend_by_kind"] == {"task": "572.00"}  # 10 h × (50 + 8 × 0.50 + 32 × 0.10)
    codes = [r["code"] for r in report["recommendations"]]
    assert codes == ["idle_vm_on_demand", "busy_vm_subscription", "package"]
    package = report["recommendations"][2]
    # 572.00 / 3 = 190.67 a month; pkg-1000 (190.67 × 12 ≥ 1,050): 190.67 × 50 / 1,050 = 9.079…
    assert "Compute package 1,000 would save about ¥9.08 a month" in package["en"]
    assert "算力包 1,000" in package["zh"]
    note = Notification.objects.get(kind=NotificationKind.USAGE_REVIEW_READY)
    assert note.user == manager and note.params["period"] == "2026-07 – 2026-09"
    assert AuditEvent.objects.filter(action="usage_review.created", tenant=gold).count() == 1


def test_generation_is_idempotent(gold):
    reviews.usage_reviews_generate(now=NOW)
    assert reviews.usage_reviews_generate(now=NOW + timedelta(days=20)) == {"created": 0, "failed": 0}
    assert UsageReview.objects.filter(tenant=gold).count() == 1
    assert Notification.objects.filter(kind=NotificationKind.USAGE_REVIEW_READY).count() == 1
    assert reviews.usage_reviews_generate(now=at(2027, 1, 2))["created"] == 1  # the next quarter


def test_diamond_is_monthly_standard_has_none(tenant):
    standard = make_tenant(name="Standard lab")
    Tenant.objects.filter(pk=standard.pk).update(created_at=at(2025, 1, 1))
    diamond = with_tier(tenant, TierCode.DIAMOND)
    # 8 A100s for 130 hours in September: 1,040 GPU-hours, into the >1,000 h band.
    meter_and_rate(task_run(diamond, start=at(2026, 9, 1), end=at(2026, 9, 6, 10), gpus="8"))
    assert reviews.usage_reviews_generate(now=NOW)["created"] == 1
    review = UsageReview.objects.get()
    assert review.tenant_id == diamond.pk
    assert (str(review.period_start), str(review.period_end)) == ("2026-09-01", "2026-10-01")
    assert review.report["gpu_usage"][0]["task_gpu_hours"] == "1040.00"
    band = next(r for r in review.report["recommendations"] if r["code"] == "volume_band")
    assert "hours beyond 1,000 each month are already billed 10% off" in band["en"]


def test_a_tenant_created_after_the_period_gets_no_review(tenant):
    Tenant.objects.filter(pk=tenant.pk).update(tier=Tier.objects.get(code=TierCode.GOLD), created_at=at(2026, 10, 2))
    assert reviews.usage_reviews_generate(now=NOW)["created"] == 0


def test_the_console_partial_shows_the_report(gold):
    reviews.usage_reviews_generate(now=NOW)
    review = UsageReview.objects.get()
    html = render_to_string("crm/usage_review.html", {"review": review})
    assert 'data-part="gpu-usage"' in html and "1464.00" in html and "trainer" in html
    assert "an on-demand VM, billed only while it runs, would likely cost less" in html
    with translation.override("zh-hans"):
        html_zh = render_to_string("crm/usage_review.html", {"review": review})
    assert "改用按需计费" in html_zh


def test_sending_emails_owners_and_billing_once(gold, manager, django_capture_on_commit_callbacks):
    billing = add_member(gold, Role.BILLING).user
    add_member(gold, Role.MEMBER)
    reviews.usage_reviews_generate(now=NOW)
    review = UsageReview.objects.get()
    outsider = UserFactory()
    with pytest.raises(PermissionDenied):
        reviews.usage_review_send(review=review, actor=outsider)
    with django_capture_on_commit_callbacks(execute=True):
        sent = reviews.usage_review_send(review=review, actor=manager)
    assert sent.status == UsageReviewStatus.SENT and sent.sent_by == manager and sent.sent_at
    owner = gold.memberships.get(role=Role.OWNER).user
    assert sorted(m.to[0] for m in mail.outbox) == sorted([owner.email, billing.email])
    body = mail.outbox[0].body
    assert "GPU usage by model" in body and "A100: 58.00 GPU-hours" in body
    assert "2026-07: ¥15000.00" in body
    assert mail.outbox[0].subject == "[GPU Portal] Usage review of Acme AI, 2026-07 – 2026-09"
    event = AuditEvent.objects.get(action="usage_review.sent")
    assert event.actor == manager and sorted(event.after["recipients"]) == sorted([owner.email, billing.email])
    with pytest.raises(ValidationError):
        reviews.usage_review_send(review=review, actor=manager)
    assert len(mail.outbox) == 2


def test_the_email_follows_the_recipients_language(gold, manager, django_capture_on_commit_callbacks):
    owner = gold.memberships.get(role=Role.OWNER).user
    owner.language = "zh-hans"
    owner.save(update_fields=["language"])
    reviews.usage_reviews_generate(now=NOW)
    with django_capture_on_commit_callbacks(execute=True):
        reviews.usage_review_send(review=UsageReview.objects.get(), actor=manager)
    assert "改用按需计费" in mail.outbox[0].body
    assert Decimal(UsageReview.objects.get().report["spend_period"]) == Decimal("17900.00")
