"""Customer tiers (DESIGN.md section 4): automatic upgrades, staff overrides, the nightly run.

Rules, on spend as crm.spend defines it (charges net of refunds, calendar months of the tenant's
time zone, entries up to the evaluation time):

- Gold when any of:
  ``cumulative_5000``: cumulative spend ≥ 5,000.00;
  ``three_months_50000``: any three consecutive calendar months of the tenant's history each with
  spend ≥ 50,000.00. The current month counts with its spend so far: a month that has already
  reached 50,000 can only stay there (short of refunds), so there is no reason to wait for it to
  end;
  ``trailing_12m_100000``: spend in the current calendar month and the eleven before it ≥ 100,000.00.
- Diamond when ``trailing_12m_500000``: that trailing-12-month spend ≥ 500,000.00.

As DESIGN.md states them, both other Gold rules imply the first (150,000 and 100,000 are both
≥ 5,000), so in practice cumulative spend decides Gold; every rule is still evaluated and the
ones met are recorded in TierChange.figures["rules_met"], and TierChange.rule names the first met
in the order above.

Upgrades only: automatic evaluation never lowers a tier, and leaves a tenant whose tier staff
pinned (CustomerAccount.tier_pinned, set by tier_override) alone. Evaluation locks the tenant
row, so the nightly run and an after-payment evaluation racing make one change.

An upgrade raises each quota to the new tier's default where it is lower and leaves any limit
already above it (staff raised it) as it is. Scheduling priority, storage discounts and yearly
renewal prices read tenant.tier when they are used, so they follow the change at once.
"""

import logging
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from crm.models import CustomerAccount, TierChange, TierChangeSource
from crm.selectors import account_of, console_url
from crm.spend import ZERO, monthly_spend
from notifications.models import NotificationKind
from notifications.services import notify
from provisioning.models import GpuModel
from tenants.audit import audit_record
from tenants.models import GpuQuota, Role, Tenant, TenantQuota, Tier, TierCode
from tenants.services import QUOTA_FIELDS

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
TRIGGERS = ("nightly", "payment", "manual")
CUSTOMER_ROLES = (Role.OWNER, Role.ADMIN, Role.BILLING)
STAFF_CHANGE_FOR_CUSTOMER = {"en": "Set by your account team.", "zh": "由客户服务团队设定。"}


def _money(amount: Decimal) -> str:
    return f"{amount:,.2f}"


def _month_label(month: date) -> str:
    return month.strftime("%Y-%m")


# --- Figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpendFigures:
    """A tenant's spend per calendar month (its whole history up to the month of `now`, oldest
    first, zero-filled) and the totals the rules read from it."""

    time_zone: str
    now: datetime
    months: dict[date, Decimal]

    @property
    def cumulative(self) -> Decimal:
        return sum(self.months.values(), ZERO)

    @property
    def trailing_12m(self) -> Decimal:
        return sum(list(self.months.values())[-12:], ZERO)

    @property
    def current_month(self) -> date:
        return list(self.months)[-1]

    def consecutive_run(self, count: int, threshold: Decimal) -> list[date] | None:
        """The latest `count` consecutive months each with spend ≥ threshold, or None."""
        months = list(self.months.items())
        for end in range(len(months), count - 1, -1):
            window = months[end - count : end]
            if all(spent >= threshold for _, spent in window):
                return [month for month, _ in window]
        return None

    def as_json(self) -> dict:
        return {
            "time_zone": self.time_zone,
            "evaluated_at": self.now.isoformat(),
            "cumulative": str(self.cumulative),
            "trailing_12m": str(self.trailing_12m),
            "last_12_months": {_month_label(m): str(v) for m, v in list(self.months.items())[-12:]},
        }


def spend_figures(tenant: Tenant, now: datetime | None = None) -> SpendFigures:
    now = now or timezone.now()
    months = monthly_spend([tenant.pk], None, now=now)[tenant.pk]
    return SpendFigures(time_zone=tenant.time_zone, now=now, months=months)


# --- Rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierRule:
    """One upgrade rule. kind: "cumulative", "trailing_12m" or "consecutive_months"."""

    code: str
    tier: str
    kind: str
    threshold: Decimal
    label: dict
    months: int = 0

    def met(self, figures: SpendFigures) -> bool:
        if self.kind == "cumulative":
            return figures.cumulative >= self.threshold
        if self.kind == "trailing_12m":
            return figures.trailing_12m >= self.threshold
        return figures.consecutive_run(self.months, self.threshold) is not None

    def additional_spend(self, figures: SpendFigures) -> Decimal | None:
        """The least spend from now on that meets this rule, or None when spending now alone
        cannot (a run of months needs its earlier months already at the threshold)."""
        if self.kind == "cumulative":
            return max(self.threshold - figures.cumulative, ZERO)
        if self.kind == "trailing_12m":
            return max(self.threshold - figures.trailing_12m, ZERO)
        if self.met(figures):
            return ZERO
        earlier = list(figures.months.values())[-self.months : -1]
        if len(earlier) < self.months - 1 or any(spent < self.threshold for spent in earlier):
            return None
        return max(self.threshold - figures.months[figures.current_month], ZERO)

    def reason(self, figures: SpendFigures, tier: Tier) -> dict:
        """Why this rule moved the tenant, in both languages."""
        threshold = _money(self.threshold)
        if self.kind == "cumulative":
            value = _money(figures.cumulative)
            return {
                "en": f"Cumulative spend ¥{value} reached the {tier.name_en} threshold of ¥{threshold}.",
                "zh": f"累计消费 ¥{value}，达到{tier.name_zh}等级门槛 ¥{threshold}。",
            }
        if self.kind == "trailing_12m":
            value = _money(figures.trailing_12m)
            return {
                "en": f"Spend over the last 12 calendar months, ¥{value}, reached the {tier.name_en} "
                f"threshold of ¥{threshold}.",
                "zh": f"近 12 个自然月消费 ¥{value}，达到{tier.name_zh}等级门槛 ¥{threshold}。",
            }
        run = figures.consecutive_run(self.months, self.threshold) or []
        spans = ", ".join(f"{_month_label(m)}: ¥{_money(figures.months[m])}" for m in run)
        return {
            "en": f"Spend of at least ¥{threshold} in each of {self.months} consecutive calendar months "
            f"({spans}) meets the {tier.name_en} rule.",
            "zh": f"连续 {self.months} 个自然月每月消费均不低于 ¥{threshold}（{spans}），达到{tier.name_zh}等级条件。",
        }


RULES = (
    TierRule(
        code="cumulative_5000",
        tier=TierCode.GOLD,
        kind="cumulative",
        threshold=Decimal("5000.00"),
        label={"en": "Cumulative spend ≥ ¥5,000", "zh": "累计消费 ≥ ¥5,000"},
    ),
    TierRule(
        code="three_months_50000",
        tier=TierCode.GOLD,
        kind="consecutive_months",
        threshold=Decimal("50000.00"),
        months=3,
        label={"en": "3 consecutive months each ≥ ¥50,000", "zh": "连续 3 个自然月每月 ≥ ¥50,000"},
    ),
    TierRule(
        code="trailing_12m_100000",
        tier=TierCode.GOLD,
        kind="trailing_12m",
        threshold=Decimal("100000.00"),
        label={"en": "Last 12 months ≥ ¥100,000", "zh": "近 12 个月消费 ≥ ¥100,000"},
    ),
    TierRule(
        code="trailing_12m_500000",
        tier=TierCode.DIAMOND,
        kind="trailing_12m",
        threshold=Decimal("500000.00"),
        label={"en": "Last 12 months ≥ ¥500,000", "zh": "近 12 个月消费 ≥ ¥500,000"},
    ),
)


def rules_for(tier_code: str) -> list[TierRule]:
    return [rule for rule in RULES if rule.tier == tier_code]


def rules_met(figures: SpendFigures) -> list[TierRule]:
    return [rule for rule in RULES if rule.met(figures)]


def earned_tier(figures: SpendFigures, tiers: list[Tier]) -> tuple[Tier | None, list[TierRule]]:
    """The highest tier whose rules the figures meet (None: no rule met), and the rules it met."""
    met = rules_met(figures)
    for tier in sorted(tiers, key=lambda t: -t.rank):
        own = [rule for rule in met if rule.tier == tier.code]
        if own:
            return tier, own
    return None, []


# --- Changing a tier ----------------------------------------------------------------------------


def _raise_quotas(tenant: Tenant, tier: Tier) -> dict:
    """Raise every limit below the tier's default to it; never lower one. Returns what changed."""
    changed: dict = {}
    quota = TenantQuota.objects.select_for_update().filter(tenant=tenant).first()
    if quota is None:
        quota = TenantQuota.objects.create(tenant=tenant, **dict.fromkeys(QUOTA_FIELDS, 0))
    for field in QUOTA_FIELDS:
        default = getattr(tier, f"default_{field}")
        if getattr(quota, field) < default:
            changed[field] = [getattr(quota, field), default]
            setattr(quota, field, default)
    if changed:
        quota.save()
    limits = {q.gpu_model_id: q for q in GpuQuota.objects.select_for_update().filter(tenant=tenant)}
    for model in GpuModel.objects.all():
        default = int(tier.default_gpus.get(model.code, 0))
        current = limits.get(model.pk)
        if current is None:
            GpuQuota.objects.create(tenant=tenant, gpu_model=model, limit=default)
            changed[f"gpu_{model.code}"] = [0, default]
        elif current.limit < default:
            changed[f"gpu_{model.code}"] = [current.limit, default]
            current.limit = default
            current.save(update_fields=["limit"])
    return changed


def _tier_names(tier: Tier) -> dict:
    return {"en": tier.name_en, "zh": tier.name_zh}


def _record_change(
    *,
    tenant: Tenant,
    account: CustomerAccount,
    to_tier: Tier,
    source: str,
    rule: str,
    reason: dict,
    figures: dict,
    actor=None,
    now: datetime,
) -> TierChange:
    """Move the (locked) tenant to `to_tier`, record and audit it, tell the customer and manager."""
    from_tier = tenant.tier
    tenant.tier = to_tier
    tenant.save(update_fields=["tier"])
    quotas = _raise_quotas(tenant, to_tier) if to_tier.rank > from_tier.rank else {}
    figures = {**figures, "reason": reason, "quotas_raised": quotas}
    text = reason["en"] if reason.get("en") == reason.get("zh") else f"{reason['en']}\n{reason['zh']}"
    change = TierChange.objects.create(
        tenant=tenant,
        from_tier=from_tier,
        to_tier=to_tier,
        source=source,
        rule=rule,
        reason=text,
        figures=figures,
        actor=actor,
        created_at=now,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        action="tenant.tier_changed",
        target=tenant,
        before={"tier": from_tier.code, "pinned": account.tier_pinned},
        after={
            "tier": to_tier.code,
            "pinned": source == TierChangeSource.STAFF,
            "source": source,
            "rule": rule,
            "reason": text,
            "quotas_raised": quotas,
            "tier_change": change.pk,
        },
    )
    if from_tier.pk != to_tier.pk:
        params = {"tier": _tier_names(to_tier), "from_tier": _tier_names(from_tier), "reason": reason}
        # A staff member's reason is written for colleagues: the customer is told who, not why.
        told = params if source == TierChangeSource.AUTOMATIC else {**params, "reason": STAFF_CHANGE_FOR_CUSTOMER}
        notify(
            kind=NotificationKind.TIER_CHANGED,
            tenant=tenant,
            roles=CUSTOMER_ROLES,
            params=told,
            url=reverse("tenant_overview"),
            dedupe_key=f"tier-change:{change.pk}",
        )
        if account.account_manager_id:
            notify(
                kind=NotificationKind.CUSTOMER_TIER_CHANGED,
                tenant=tenant,
                users=[account.account_manager],
                params=params,
                url=console_url(tenant),
                dedupe_key=f"customer-tier-change:{change.pk}",
            )
    return change


def _locked(tenant: Tenant) -> tuple[Tenant, CustomerAccount]:
    # No join in the locking query: under READ COMMITTED, a waiter re-checks a joined row against
    # the tenant row as the winner left it (tier changed), the join no longer matches and it would
    # find no tenant at all. The tier is read after the lock.
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    return tenant, account_of(tenant)


def tier_evaluate(*, tenant: Tenant, now: datetime | None = None, trigger: str = "nightly") -> TierChange | None:
    """Upgrade the tenant if its spend earned a higher tier; returns the change, or None.

    Never downgrades; does nothing to a pinned tenant. The tenant row is locked for the whole
    evaluation, so concurrent evaluations of one tenant make at most one change."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}")
    now = now or timezone.now()
    with transaction.atomic():
        tenant, account = _locked(tenant)
        account.tier_evaluated_at = now
        account.save(update_fields=["tier_evaluated_at", "updated_at"])
        if account.tier_pinned:
            return None
        figures = spend_figures(tenant, now=now)
        target, met = earned_tier(figures, list(Tier.objects.all()))
        if target is None or target.rank <= tenant.tier.rank:
            return None
        rule = met[0]
        return _record_change(
            tenant=tenant,
            account=account,
            to_tier=target,
            source=TierChangeSource.AUTOMATIC,
            rule=rule.code,
            reason=rule.reason(figures, target),
            figures={
                **figures.as_json(),
                "trigger": trigger,
                "rules_met": [r.code for r in rules_met(figures)],
                "three_month_run": [_month_label(m) for m in figures.consecutive_run(3, Decimal("50000.00")) or []],
            },
            now=now,
        )


def _require_staff(actor) -> None:
    if actor is None or not getattr(actor, "is_staff", False):
        raise PermissionDenied(_("Only staff can change a customer's tier."))


def tier_override(*, tenant: Tenant, actor, tier: Tier | str, reason: str) -> TierChange:
    """Staff set the tenant's tier (up or down) with a reason, and pin it: automatic evaluation
    leaves a pinned tenant alone until tier_unpin. An upgrade raises quotas like an automatic
    one; a downgrade leaves quotas as they are (staff lower them with quota_update if they mean to)."""
    _require_staff(actor)
    reason = (reason or "").strip()
    errors = {}
    if not reason:
        errors["reason"] = _("Say why the tier changes: the customer's history keeps it.")
    target = tier if isinstance(tier, Tier) else Tier.objects.filter(code=tier).first()
    if target is None:
        errors["tier"] = _("Choose a tier.")
    if errors:
        raise ValidationError(errors)
    now = timezone.now()
    with transaction.atomic():
        tenant, account = _locked(tenant)
        change = _record_change(
            tenant=tenant,
            account=account,
            to_tier=target,
            source=TierChangeSource.STAFF,
            rule="staff_override",
            reason={"en": reason, "zh": reason},
            figures=spend_figures(tenant, now=now).as_json(),
            actor=actor,
            now=now,
        )
        account.tier_pinned = True
        account.save(update_fields=["tier_pinned", "updated_at"])
    return change


def tier_unpin(*, tenant: Tenant, actor) -> CustomerAccount:
    """Hand the tenant back to automatic evaluation (which runs right after commit)."""
    _require_staff(actor)
    with transaction.atomic():
        tenant, account = _locked(tenant)
        if not account.tier_pinned:
            return account
        account.tier_pinned = False
        account.save(update_fields=["tier_pinned", "updated_at"])
        audit_record(
            actor=actor,
            tenant=tenant,
            action="tenant.tier_unpinned",
            target=tenant,
            before={"tier": tenant.tier.code, "pinned": True},
            after={"tier": tenant.tier.code, "pinned": False},
        )
        tenant_id = tenant.pk
        transaction.on_commit(lambda: tier_evaluate_soon(tenant_id, trigger="manual"), robust=True)
    return account


def tier_evaluate_soon(tenant_id: int, *, trigger: str) -> None:
    """Hand the evaluation of one tenant to a worker (inline where Celery runs eagerly)."""
    from crm.tasks import tier_evaluate_tenant

    tier_evaluate_tenant.delay(tenant_id, trigger=trigger)


def tiers_evaluate_all(now: datetime | None = None) -> dict:
    """The nightly run: every tenant, in batches, one monthly_spend query per batch. Only tenants
    whose figures earn a higher tier are locked and evaluated again (tier_evaluate)."""
    now = now or timezone.now()
    tiers = list(Tier.objects.all())
    stats = {"evaluated": 0, "upgraded": 0, "pinned": 0, "failed": 0}
    ids = list(Tenant.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), BATCH_SIZE):
        batch = ids[start : start + BATCH_SIZE]
        CustomerAccount.objects.bulk_create(
            [CustomerAccount(tenant_id=pk) for pk in batch], ignore_conflicts=True, batch_size=BATCH_SIZE
        )
        spend = monthly_spend(batch, None, now=now)
        pinned = set(
            CustomerAccount.objects.filter(tenant_id__in=batch, tier_pinned=True).values_list("tenant_id", flat=True)
        )
        for tenant in Tenant.objects.filter(pk__in=batch).select_related("tier"):
            stats["evaluated"] += 1
            if tenant.pk in pinned:
                stats["pinned"] += 1
                continue
            figures = SpendFigures(time_zone=tenant.time_zone, now=now, months=spend[tenant.pk])
            target, _met = earned_tier(figures, tiers)
            if target is None or target.rank <= tenant.tier.rank:
                continue
            try:
                if tier_evaluate(tenant=tenant, now=now, trigger="nightly"):
                    stats["upgraded"] += 1
            except Exception:  # one tenant's failure must not stop the run
                stats["failed"] += 1
                logger.exception("Tier evaluation of tenant %s failed", tenant.pk)
        CustomerAccount.objects.filter(tenant_id__in=batch).update(tier_evaluated_at=now)
    return stats
