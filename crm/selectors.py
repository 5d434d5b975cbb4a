"""Reads for customer accounts: the account row, progress to the next tier, the upsell suggestion."""

from datetime import datetime
from decimal import Decimal

from django.urls import NoReverseMatch, reverse
from django.utils.translation import get_language

from crm.models import CustomerAccount, TierChange
from tenants.models import Tenant, Tier


def account_of(tenant: Tenant) -> CustomerAccount:
    """The tenant's CustomerAccount, created empty on first use."""
    account, _ = CustomerAccount.objects.get_or_create(tenant=tenant)
    return account


def console_url(tenant: Tenant) -> str:
    """Where staff open this customer in the console (the customer page once the console has one)."""
    for name, kwargs in (("console_customer", {"slug": tenant.slug}), ("console", {})):
        try:
            return reverse(name, kwargs=kwargs)
        except NoReverseMatch:
            continue
    return ""


def bilingual(value) -> str:
    """Pick the active language from a {"en": ..., "zh": ...} pair (or return a plain string)."""
    if isinstance(value, dict) and "en" in value:
        return value.get("zh", value["en"]) if (get_language() or "").startswith("zh") else value["en"]
    return value or ""


def tier_change_reason(change: TierChange) -> str:
    """The reason of a tier change in the reader's language: automatic changes keep both in
    figures["reason"]; a staff override's reason is what the staff member typed."""
    return bilingual((change.figures or {}).get("reason")) or change.reason


def next_tier_progress(tenant: Tenant, now: datetime | None = None) -> dict | None:
    """How far the tenant is from the next tier: the smallest additional spend that would meet any
    rule of the next tier, from the same figures automatic evaluation uses. None at the top tier.

    {"tier": Tier, "tier_code", "tier_name": {"en", "zh"}, "amount": Decimal (0.00 when a rule
    is already met), "rule": code, "rule_label": {"en", "zh"}, "figures": {...}}"""
    from crm import tiering

    next_tier = Tier.objects.filter(rank__gt=tenant.tier.rank).order_by("rank").first()
    if next_tier is None:
        return None
    figures = tiering.spend_figures(tenant, now=now)
    options = []
    for rule in tiering.rules_for(next_tier.code):
        needed = rule.additional_spend(figures)
        if needed is not None:
            options.append((needed, rule))
    if not options:
        return None
    amount, rule = min(options, key=lambda option: option[0])
    return {
        "tier": next_tier,
        "tier_code": next_tier.code,
        "tier_name": {"en": next_tier.name_en, "zh": next_tier.name_zh},
        "amount": amount,
        "rule": rule.code,
        "rule_label": rule.label,
        "figures": figures.as_json(),
    }


def upsell_for(tenant: Tenant) -> dict | None:
    """The package that would have saved this Standard, pay-as-you-go tenant the most over its
    last 30 days (crm.upsell), with money as Decimal; None when there is none to suggest."""
    upsell = CustomerAccount.objects.filter(tenant=tenant).values_list("upsell", flat=True).first()
    if not upsell or not upsell.get("offer_code"):
        return None
    out = dict(upsell)
    for key in ("price", "bonus_percent", "credit", "saving", "usage_30d"):
        if key in out:
            out[key] = Decimal(out[key])
    return out
