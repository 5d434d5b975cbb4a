"""Churn risk (流失预警, DESIGN.md section 4), flagged daily on CustomerAccount.

Months are calendar months of the tenant's time zone; M is the month containing the scan time,
M-1 the last complete month. Spend is crm.spend's (charges net of refunds); "no spend" means a
month's spend is zero or less.

- ``no_spend_two_months``: no spend in M-2 and M-1, nor so far in M, by a tenant that had spend
  in some month before M-2. A tenant that never spent is not churning (it never started), and
  the tenant stops being flagged as soon as it spends again, without waiting for the month to end.
- ``spend_below_half_average``: spend in M-1 below half the average of M-4, M-3 and M-2, when that
  average is above zero, and spend so far in M also below that half: a customer whose current
  month has already recovered to half its former average is no longer at risk. Exactly half is
  not below half.

When both hold, the first is the reason. The flag keeps its rule code in churn_reason and the
figures behind it (with the reason in both languages) in churn_detail; it clears itself on the
first scan where neither rule holds. Newly flagged tenants are reported to their account manager;
flagging and clearing are audited.
"""

import logging
from datetime import date, datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from billing.money import add_months
from crm.models import CustomerAccount
from crm.selectors import console_url
from crm.spend import ZERO, monthly_spend
from notifications.models import NotificationKind
from notifications.services import notify
from tenants.audit import audit_record
from tenants.models import Tenant

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
NO_SPEND = "no_spend_two_months"
SPEND_DROP = "spend_below_half_average"


def _label(month: date) -> str:
    return month.strftime("%Y-%m")


def churn_assess(months: dict[date, Decimal]) -> dict | None:
    """The churn flag that a tenant's monthly spend (whole history, oldest first, the current month
    last; crm.spend.monthly_spend) calls for: {"rule", "figures", "reason": {"en", "zh"}} or None."""
    values = list(months.items())
    if not values:
        return None
    while len(values) < 5:  # months before the history began had no spend
        values.insert(0, (add_months(values[0][0], -1), ZERO))
    (m2, spent_m2), (m1, spent_m1), (current, spent_now) = values[-3:]
    earlier = [spent for _, spent in values[:-3]]
    if spent_m2 <= 0 and spent_m1 <= 0 and spent_now <= 0 and any(spent > 0 for spent in earlier):
        last = max(month for month, spent in values[:-3] if spent > 0)
        return {
            "rule": NO_SPEND,
            "figures": {
                "months": {_label(m2): str(spent_m2), _label(m1): str(spent_m1), _label(current): str(spent_now)},
                "last_month_with_spend": _label(last),
            },
            "reason": {
                "en": f"No spend in {_label(m2)} and {_label(m1)} (nor so far in {_label(current)}); "
                f"the last month with spend was {_label(last)}.",
                "zh": f"{_label(m2)} 与 {_label(m1)} 两个月无消费（{_label(current)} 至今亦无），"
                f"最近一次有消费的月份为 {_label(last)}。",
            },
        }
    before = values[-5:-2]
    average = sum((spent for _, spent in before), ZERO) / 3
    half = average / 2
    if average > 0 and spent_m1 < half and spent_now < half:
        shown_average = average.quantize(Decimal("0.01"))
        shown_half = half.quantize(Decimal("0.01"))
        months_before = ", ".join(f"{_label(m)}: ¥{spent:,.2f}" for m, spent in before)
        return {
            "rule": SPEND_DROP,
            "figures": {
                "month": _label(m1),
                "spend": str(spent_m1),
                "previous_months": {_label(m): str(spent) for m, spent in before},
                "previous_average": str(shown_average),
                "half_average": str(shown_half),
                "current_month_so_far": str(spent_now),
            },
            "reason": {
                "en": f"Spend in {_label(m1)} was ¥{spent_m1:,.2f}, below half of the ¥{shown_average:,.2f} "
                f"monthly average of the three months before ({months_before}).",
                "zh": f"{_label(m1)} 消费 ¥{spent_m1:,.2f}，低于此前三个月（{months_before}）"
                f"月均 ¥{shown_average:,.2f} 的一半。",
            },
        }
    return None


def _apply(tenant: Tenant, months: dict[date, Decimal], now: datetime) -> str | None:
    """Flag, update or clear one tenant; returns "flagged", "cleared" or None (nothing new)."""
    verdict = churn_assess(months)
    with transaction.atomic():
        account, _ = CustomerAccount.objects.select_for_update().get_or_create(tenant=tenant)
        if verdict is None:
            if not account.churn_risk:
                return None
            before = {"churn_risk": True, "reason": account.churn_reason}
            account.churn_risk = False
            account.churn_reason = ""
            account.churn_detail = {}
            account.churn_flagged_at = None
            account.save(update_fields=["churn_risk", "churn_reason", "churn_detail", "churn_flagged_at", "updated_at"])
            audit_record(
                actor=None,
                tenant=tenant,
                action="churn.cleared",
                target=account,
                before=before,
                after={"churn_risk": False},
            )
            return "cleared"
        detail = {**verdict["figures"], "reason": verdict["reason"], "assessed_at": now.isoformat()}
        newly = not account.churn_risk
        previous_rule = account.churn_reason
        changed_rule = previous_rule != verdict["rule"]
        account.churn_risk = True
        account.churn_reason = verdict["rule"]
        account.churn_detail = detail
        if newly:
            account.churn_flagged_at = now
        account.save(update_fields=["churn_risk", "churn_reason", "churn_detail", "churn_flagged_at", "updated_at"])
        if not (newly or changed_rule):
            return None
        audit_record(
            actor=None,
            tenant=tenant,
            action="churn.flagged",
            target=account,
            before={"churn_risk": not newly, "reason": previous_rule},
            after={"churn_risk": True, "reason": verdict["rule"], "detail": detail},
        )
        if newly and account.account_manager_id:
            notify(
                kind=NotificationKind.CHURN_FLAGGED,
                tenant=tenant,
                users=[account.account_manager],
                params={"reason": verdict["reason"]},
                url=console_url(tenant),
                dedupe_key=f"churn:{tenant.pk}:{now.date().isoformat()}",
            )
        return "flagged" if newly else None


def churn_scan(now: datetime | None = None) -> dict:
    """Assess every tenant (daily by beat), one monthly_spend query per batch of tenants."""
    now = now or timezone.now()
    stats = {"scanned": 0, "flagged": 0, "cleared": 0, "failed": 0}
    ids = list(Tenant.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), BATCH_SIZE):
        batch = ids[start : start + BATCH_SIZE]
        spend = monthly_spend(batch, None, now=now)
        flagged = set(
            CustomerAccount.objects.filter(tenant_id__in=batch, churn_risk=True).values_list("tenant_id", flat=True)
        )
        for tenant in Tenant.objects.filter(pk__in=batch):
            stats["scanned"] += 1
            months = spend[tenant.pk]
            if tenant.pk not in flagged and churn_assess(months) is None:
                continue  # the common case: nothing to write
            try:
                outcome = _apply(tenant, months, now)
            except Exception:  # one tenant's failure must not stop the scan
                stats["failed"] += 1
                logger.exception("Churn assessment of tenant %s failed", tenant.pk)
                continue
            if outcome:
                stats[outcome] += 1
    return stats
