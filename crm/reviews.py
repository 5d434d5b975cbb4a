"""Periodic usage reviews (DESIGN.md section 4): Gold quarterly, Diamond monthly.

The period length is Tier.usage_review_months (Gold 3, Diamond 1). Periods are calendar months
of the tenant's time zone aligned to the year: monthly reviews cover one month, quarterly ones
January–March, April–June, July–September, October–December. usage_reviews_generate (daily by
beat) makes the review of the period that ended most recently, once per tenant and period (the
unique constraint on (tenant, period_start) makes a second run, or two racing, harmless).

The report (UsageReview.report, JSON):
- ``gpu_usage``: GPU-hours per GPU model: task hosting from the metered usage log (gpu:<model>
  records, GPU-seconds), rented VMs from their running time (lifecycle started → stopped/released)
  × the plan's GPUs; with the task-hosting GPU charges of the period;
- ``vms``: each VM that existed in the period: hours it ran against the hours it existed
  (wall-clock) in the period, as a percentage. The portal keeps no history of in-guest GPU
  utilisation, so this running share is the utilisation figure;
- ``spend_trend``: spend per month (crm.spend) of the six months ending with the period's last;
- ``spend_by_kind``: the period's charges by invoice line kind;
- ``recommendations``: derived from the above, each {"code", "en", "zh"}.
"""

import logging
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.template.loader import render_to_string
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from billing.models import ChargeDay, CreditGrant, UsageRecord, UsageSource
from billing.money import add_months, local_midnight, to_fen, zone
from billing.selectors import packages_on_sale, price_book_in_force
from crm.models import UsageReview, UsageReviewStatus
from crm.selectors import account_of, console_url
from crm.spend import month_from_index, month_index, month_start, monthly_spend
from crm.upsell import best_package
from notifications.models import NotificationKind
from notifications.services import notify
from provisioning.models import BillingMode, LifecycleEvent, LifecycleKind, VirtualMachine
from tenants.audit import audit_record
from tenants.models import Role, Tenant

logger = logging.getLogger(__name__)

HOURS = Decimal(3600)
IDLE_SUBSCRIPTION_PERCENT = Decimal(30)
BUSY_ON_DEMAND_PERCENT = Decimal(70)
MIN_WALL_HOURS = Decimal(7 * 24)  # a VM that existed less than a week says little either way
RECIPIENT_ROLES = (Role.OWNER, Role.BILLING)


def _hours(seconds) -> Decimal:
    return (Decimal(seconds) / HOURS).quantize(Decimal("0.01"))


def _label(month: date) -> str:
    return month.strftime("%Y-%m")


def review_period(tenant: Tenant, months: int, now: datetime) -> tuple[date, date]:
    """[start, end) of the most recent complete review period of `months` months (tenant's zone)."""
    current = month_index(month_start(now, tenant.time_zone))
    end_index = current - current % months
    end = month_from_index(end_index)
    return add_months(end, -months), end


# --- The report ---------------------------------------------------------------------------------


def _running_intervals(events: list[LifecycleEvent]) -> list[tuple[datetime, datetime | None]]:
    intervals, opened = [], None
    for event in events:
        if event.kind == LifecycleKind.STARTED:
            opened = opened or event.at
        elif event.kind in (LifecycleKind.STOPPED, LifecycleKind.RELEASED) and opened is not None:
            intervals.append((opened, event.at))
            opened = None
    if opened is not None:
        intervals.append((opened, None))
    return intervals


def _overlap(start: datetime, end: datetime | None, lo: datetime, hi: datetime) -> float:
    end = hi if end is None else min(end, hi)
    start = max(start, lo)
    return max((end - start).total_seconds(), 0.0)


def _vm_usage(tenant: Tenant, lo: datetime, hi: datetime) -> list[dict]:
    vms = (
        VirtualMachine.objects.filter(tenant=tenant, requested_at__lt=hi)
        .exclude(released_at__lt=lo)
        .select_related("plan__gpu_model")
        .order_by("requested_at")
    )
    events = defaultdict(list)
    for event in LifecycleEvent.objects.filter(vm__in=vms, at__lt=hi).order_by("at", "id"):
        events[event.vm_id].append(event)
    rows = []
    for vm in vms:
        intervals = _running_intervals(events[vm.pk])
        if not intervals:
            continue  # never ran: nothing to review
        running = sum(_overlap(s, e, lo, hi) for s, e in intervals)
        wall = _overlap(max(vm.requested_at, intervals[0][0]), vm.released_at, lo, hi)
        if wall <= 0:
            continue
        percent = (Decimal(running) / Decimal(wall) * 100).quantize(Decimal("0.1"))
        rows.append(
            {
                "name": vm.name,
                "plan": vm.plan.code,
                "billing_mode": vm.billing_mode,
                "gpu_model": vm.plan.gpu_model.code if vm.plan.gpu_model_id else "",
                "gpus": vm.plan.gpu_count,
                "running_hours": str(_hours(running)),
                "wall_hours": str(_hours(wall)),
                "utilisation_percent": str(percent),
                "gpu_hours": str(_hours(Decimal(running) * vm.plan.gpu_count)),
            }
        )
    return rows


def _gpu_usage(tenant: Tenant, lo: datetime, hi: datetime, start: date, end: date, vms: list[dict]) -> list[dict]:
    by_model: dict[str, dict] = defaultdict(
        lambda: {"task_gpu_hours": Decimal("0.00"), "vm_gpu_hours": Decimal("0.00"), "task_spend": Decimal("0.00")}
    )
    task_seconds = (
        UsageRecord.objects.filter(
            tenant=tenant,
            source=UsageSource.TASK,
            resource__startswith="gpu:",
            period_start__gte=lo,
            period_start__lt=hi,
        )
        .values("resource")
        .annotate(total=Sum("quantity"))
        .order_by()
    )
    for row in task_seconds:
        by_model[row["resource"].split(":", 1)[1]]["task_gpu_hours"] += _hours(row["total"] or 0)
    task_spend = (
        ChargeDay.objects.filter(
            line__invoice__tenant=tenant, line__resource__startswith="gpu:", day__gte=start, day__lt=end
        )
        .values("line__resource")
        .annotate(total=Sum("amount_unrounded"))
        .order_by()
    )
    for row in task_spend:
        by_model[row["line__resource"].split(":", 1)[1]]["task_spend"] += to_fen(Decimal(row["total"] or 0))
    for vm in vms:
        if vm["gpu_model"]:
            by_model[vm["gpu_model"]]["vm_gpu_hours"] += Decimal(vm["gpu_hours"])
    rows = [
        {
            "gpu_model": model,
            "task_gpu_hours": str(v["task_gpu_hours"]),
            "vm_gpu_hours": str(v["vm_gpu_hours"]),
            "gpu_hours": str(v["task_gpu_hours"] + v["vm_gpu_hours"]),
            "task_spend": str(v["task_spend"]),
        }
        for model, v in by_model.items()
    ]
    return sorted(rows, key=lambda r: (-Decimal(r["gpu_hours"]), r["gpu_model"]))


def _recommendations(*, tenant, months: int, gpu_usage, vms, eligible_spend: Decimal, at: datetime) -> list[dict]:
    out = []
    for vm in vms:
        percent, wall = Decimal(vm["utilisation_percent"]), Decimal(vm["wall_hours"])
        if wall < MIN_WALL_HOURS:
            continue
        if vm["billing_mode"] != BillingMode.ON_DEMAND and percent < IDLE_SUBSCRIPTION_PERCENT:
            out.append(
                {
                    "code": "idle_vm_on_demand",
                    "en": f"VM {vm['name']} ({vm['plan']}, {vm['billing_mode']}) ran {percent}% of the time: "
                    "an on-demand VM, billed only while it runs, would likely cost less.",
                    "zh": f"虚拟机 {vm['name']}（{vm['plan']}，{vm['billing_mode']}）运行时间仅占 {percent}%："
                    "改用按需计费（仅运行时计费）通常更省。",
                }
            )
        elif vm["billing_mode"] == BillingMode.ON_DEMAND and percent >= BUSY_ON_DEMAND_PERCENT:
            out.append(
                {
                    "code": "busy_vm_subscription",
                    "en": f"On-demand VM {vm['name']} ({vm['plan']}) ran {percent}% of the time: "
                    "a monthly or yearly subscription would likely cost less.",
                    "zh": f"按需虚拟机 {vm['name']}（{vm['plan']}）运行时间占 {percent}%：包月或包年通常更省。",
                }
            )
    task_hours = sum((Decimal(r["task_gpu_hours"]) for r in gpu_usage), Decimal(0)) / months
    total_hours = sum((Decimal(r["gpu_hours"]) for r in gpu_usage), Decimal(0)) / months
    book = price_book_in_force(at)
    bands = sorted(book.bands.all(), key=lambda b: b.from_hours) if book else []
    top = next((b for b in reversed(bands) if b.discount_percent > 0), None)
    if top is not None and total_hours > top.from_hours:
        hours, threshold, pct = f"{task_hours:,.0f}", f"{top.from_hours:,.0f}", f"{top.discount_percent.normalize():f}"
        if task_hours > top.from_hours:
            en = (
                f"Task hosting averaged {hours} GPU-hours a month: the hours beyond {threshold} each month "
                f"are already billed {pct}% off (volume band)."
            )
            zh = f"任务托管月均 {hours} GPU 小时：每月超过 {threshold} 小时的部分已享 {pct}% 阶梯折扣。"
        else:
            total = f"{total_hours:,.0f}"
            en = (
                f"GPU work averaged {total} GPU-hours a month, {hours} of them on task hosting: task-hosting hours "
                f"beyond {threshold} a month are billed {pct}% off, so moving batch work from VMs to task hosting "
                "would reach that band."
            )
            zh = (
                f"月均 GPU 用量 {total} 小时，其中任务托管 {hours} 小时：任务托管每月超过 {threshold} 小时的部分"
                f"享 {pct}% 折扣，将批量作业由虚拟机迁至任务托管即可享受该阶梯。"
            )
        out.append({"code": "volume_band", "en": en, "zh": zh})
    holding = CreditGrant.objects.filter(
        tenant=tenant, remaining__gt=0, expires_at__gt=at, payment__isnull=False
    ).exists()
    monthly_eligible = to_fen(eligible_spend / months)
    best = None if holding else best_package(monthly_eligible, packages_on_sale())
    if best is not None:
        offer, saving = best
        out.append(
            {
                "code": "package",
                "en": f"{offer.name_en} would save about ¥{saving:,.2f} a month on task hosting "
                f"(¥{monthly_eligible:,.2f} a month of package-eligible usage), with scheduling priority.",
                "zh": f"购买{offer.name_zh}每月约可节省 ¥{saving:,.2f} 的任务托管费用"
                f"（月均可用算力包支付的用量 ¥{monthly_eligible:,.2f}），并享调度优先。",
            }
        )
    if not out:
        out.append(
            {
                "code": "no_change",
                "en": "Usage fits the current setup: nothing to change this period.",
                "zh": "当前用量与配置匹配，本期无需调整。",
            }
        )
    return out


def usage_review_report(tenant: Tenant, start: date, end: date) -> dict:
    """The report of one tenant over local months [start, end)."""
    tz = zone(tenant.time_zone)
    lo, hi = local_midnight(start, tz), local_midnight(end, tz)
    months = month_index(end) - month_index(start)
    vms = _vm_usage(tenant, lo, hi)
    gpu_usage = _gpu_usage(tenant, lo, hi, start, end, vms)
    trend = monthly_spend([tenant.pk], 6, now=hi - timedelta(microseconds=1))[tenant.pk]
    by_kind = (
        ChargeDay.objects.filter(line__invoice__tenant=tenant, day__gte=start, day__lt=end)
        .values("line__kind", "line__package_eligible")
        .annotate(total=Sum("amount_unrounded"))
        .order_by()
    )
    spend_by_kind: dict[str, Decimal] = defaultdict(lambda: Decimal("0.00"))
    eligible = Decimal("0.00")
    for row in by_kind:
        amount = to_fen(Decimal(row["total"] or 0))
        spend_by_kind[row["line__kind"]] += amount
        if row["line__package_eligible"]:
            eligible += amount
    period_spend = sum((v for m, v in trend.items() if start <= m < end), Decimal("0.00"))
    return {
        "period": {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "months": months,
            "label": _label(start) if months == 1 else f"{_label(start)} – {_label(add_months(end, -1))}",
            "time_zone": tenant.time_zone,
        },
        "tier": tenant.tier.code,
        "gpu_usage": gpu_usage,
        "gpu_hours_total": str(sum((Decimal(r["gpu_hours"]) for r in gpu_usage), Decimal("0.00"))),
        "vms": vms,
        "spend_trend": [{"month": _label(m), "spend": str(v)} for m, v in trend.items()],
        "spend_period": str(period_spend),
        "spend_by_kind": {kind: str(v) for kind, v in sorted(spend_by_kind.items())},
        "recommendations": _recommendations(
            tenant=tenant, months=months, gpu_usage=gpu_usage, vms=vms, eligible_spend=eligible, at=hi
        ),
    }


# --- Generating and sending ---------------------------------------------------------------------


def usage_review_create(*, tenant: Tenant, now: datetime | None = None) -> UsageReview | None:
    """The review of the tenant's period that ended last, if its tier has reviews and it has none
    for that period yet; None otherwise."""
    now = now or timezone.now()
    months = tenant.tier.usage_review_months
    if not months:
        return None
    start, end = review_period(tenant, months, now)
    if tenant.created_at >= local_midnight(end, zone(tenant.time_zone)):
        return None  # the tenant did not exist in that period
    if UsageReview.objects.filter(tenant=tenant, period_start=start).exists():
        return None
    report = usage_review_report(tenant, start, end)
    try:
        with transaction.atomic():
            review = UsageReview.objects.create(
                tenant=tenant, period_start=start, period_end=end, report=report, created_at=now
            )
            audit_record(
                actor=None,
                tenant=tenant,
                action="usage_review.created",
                target=review,
                after={"period_start": start.isoformat(), "period_end": end.isoformat()},
            )
            account = account_of(tenant)
            if account.account_manager_id:
                notify(
                    kind=NotificationKind.USAGE_REVIEW_READY,
                    tenant=tenant,
                    users=[account.account_manager],
                    params={"period": report["period"]["label"]},
                    url=console_url(tenant),
                    dedupe_key=f"usage-review:{review.pk}",
                )
    except IntegrityError:
        return None  # another run made it first
    return review


def usage_reviews_generate(now: datetime | None = None) -> dict:
    """Daily: the reviews due for every Gold and Diamond tenant (idempotent)."""
    now = now or timezone.now()
    stats = {"created": 0, "failed": 0}
    tenants = Tenant.objects.filter(tier__usage_review_months__isnull=False).select_related("tier").order_by("pk")
    for tenant in tenants.iterator(chunk_size=500):
        try:
            if usage_review_create(tenant=tenant, now=now):
                stats["created"] += 1
        except Exception:  # one tenant's failure must not stop the others
            stats["failed"] += 1
            logger.exception("Usage review of tenant %s failed", tenant.pk)
    return stats


def review_recipients(tenant: Tenant) -> list:
    from django.contrib.auth import get_user_model

    return list(
        get_user_model()
        .objects.filter(memberships__tenant=tenant, memberships__role__in=RECIPIENT_ROLES, is_active=True)
        .distinct()
        .order_by("email")
    )


def usage_review_text(review: UsageReview) -> str:
    """The review as an email body, in the active language."""
    return render_to_string("crm/usage_review_email.txt", {"review": review, "report": review.report})


def usage_review_send(*, review: UsageReview, actor) -> UsageReview:
    """Staff send a ready review to the tenant's owners and billing members (each in their own
    language, after commit) and it becomes sent. Sending twice is refused."""
    if actor is None or not getattr(actor, "is_staff", False):
        raise PermissionDenied(_("Only staff can send usage reviews."))
    with transaction.atomic():
        review = UsageReview.objects.select_for_update().select_related("tenant").get(pk=review.pk)
        if review.status == UsageReviewStatus.SENT:
            raise ValidationError(_("This usage review was already sent."))
        recipients = review_recipients(review.tenant)
        if not recipients:
            raise ValidationError(_("The customer has no owner or billing member to send the review to."))
        review.status = UsageReviewStatus.SENT
        review.sent_at = timezone.now()
        review.sent_by = actor
        review.save(update_fields=["status", "sent_at", "sent_by"])
        audit_record(
            actor=actor,
            tenant=review.tenant,
            action="usage_review.sent",
            target=review,
            before={"status": UsageReviewStatus.READY},
            after={"status": UsageReviewStatus.SENT, "recipients": [u.email for u in recipients]},
        )
        review_id = review.pk
        transaction.on_commit(lambda: _email_review(review_id))
    return review


def _email_review(review_id: int) -> None:
    from django.conf import settings

    review = UsageReview.objects.select_related("tenant").get(pk=review_id)
    for user in review_recipients(review.tenant):
        with translation.override(user.language or settings.LANGUAGE_CODE):
            subject = _("Usage review of %(tenant)s, %(period)s") % {
                "tenant": review.tenant.name,
                "period": review.report.get("period", {}).get("label", ""),
            }
            send_mail(
                subject=f"[GPU Portal] {subject}",
                message=usage_review_text(review),
                from_email=None,
                recipient_list=[user.email],
            )
