"""Upsell: the compute package that would have saved a pay-as-you-go Standard tenant the most.

Who: Standard tenants holding no active compute package (no unexpired package credit left).

Usage: U = what the tenant's package-eligible charges (task hosting: the invoice lines billing
marks ``package_eligible``, i.e. what package credit may pay) came to over the last 30 complete
days of its time zone, from the statement's daily rows (ChargeDay), volume discounts applied.

For each package on sale (price P, credit C = P + bonus B):

- it is a candidate only if the tenant would use its credit before it expires at its current
  rate: U × default validity in months ≥ C (30 days counted as a month). Otherwise the bonus
  would be written off, not saved;
- covered = min(U, C): the part of the 30 days' usage the package's credit would have paid;
- saving = covered × B / C, to the fen (ROUND_HALF_UP): each yuan of package credit costs P / C
  yuan of cash, so paying `covered` from the package instead of cash saves covered × (1 − P/C).

Example, U = 3,000.00: pkg-1000 (C 1,050, B 50) covers 1,050 and saves 50.00; pkg-5000
(C 5,500, B 500) covers 3,000 and saves 272.73; pkg-10000 (C 11,500, B 1,500; 3,000 × 12 ≥ 11,500)
covers 3,000 and saves 391.30, the best. The best saving (ties: the cheaper package) is kept in
CustomerAccount.upsell; nothing is kept when no package saves anything. The account manager is
told when a different package becomes the best.
"""

from datetime import datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing.models import ChargeDay, CreditGrant, PackageOffer
from billing.money import local_date, to_fen, zone
from billing.selectors import packages_on_sale
from crm.models import CustomerAccount
from crm.selectors import console_url
from crm.spend import ZERO
from notifications.models import NotificationKind
from notifications.services import notify
from tenants.models import Tenant, TierCode

BATCH_SIZE = 500
WINDOW_DAYS = 30


def package_saving(usage: Decimal, offer: PackageOffer) -> Decimal | None:
    """What `offer` would have saved on `usage` (30 days of package-eligible spend), or None when
    the tenant would not use its credit before it expires at that rate."""
    credit = offer.credit
    if credit <= 0 or usage * offer.default_validity_months < credit:
        return None
    covered = min(usage, credit)
    return to_fen(covered * offer.bonus / credit)


def best_package(usage: Decimal, offers: list[PackageOffer]) -> tuple[PackageOffer, Decimal] | None:
    """The offer saving the most on `usage` (ties: the cheaper), or None if none saves anything."""
    best = None
    for offer in sorted(offers, key=lambda o: o.price):
        saving = package_saving(usage, offer)
        if saving is not None and saving > 0 and (best is None or saving > best[1]):
            best = (offer, saving)
    return best


def _window(tenant: Tenant, now: datetime):
    today = local_date(now, zone(tenant.time_zone))
    return today - timedelta(days=WINDOW_DAYS), today


def eligible_usage(tenant_ids, *, start, end) -> dict[int, Decimal]:
    """Package-eligible charges per tenant on local days [start, end), in one query."""
    rows = (
        ChargeDay.objects.filter(
            line__invoice__tenant_id__in=tenant_ids, line__package_eligible=True, day__gte=start, day__lt=end
        )
        .values("line__invoice__tenant_id")
        .annotate(total=Sum("amount_unrounded"))
        .order_by()
    )
    return {row["line__invoice__tenant_id"]: to_fen(Decimal(row["total"] or 0)) for row in rows}


def _holding_packages(tenant_ids, now: datetime) -> set[int]:
    return set(
        CreditGrant.objects.filter(
            tenant_id__in=tenant_ids, remaining__gt=0, expires_at__gt=now, payment__isnull=False
        ).values_list("tenant_id", flat=True)
    )


def _suggestion(tenant: Tenant, usage: Decimal, offers, now: datetime) -> dict:
    best = best_package(usage, offers)
    if best is None:
        return {}
    offer, saving = best
    start, end = _window(tenant, now)
    return {
        "offer_code": offer.code,
        "offer_id": offer.pk,
        "name_en": offer.name_en,
        "name_zh": offer.name_zh,
        "price": str(offer.price),
        "bonus_percent": str(offer.bonus_percent),
        "credit": str(offer.credit),
        "saving": str(saving),
        "usage_30d": str(usage),
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
    }


def _store(tenant: Tenant, suggestion: dict, now: datetime) -> bool:
    """Keep the suggestion; tell the manager when the best package changed. True when it did."""
    with transaction.atomic():
        account, _ = CustomerAccount.objects.select_for_update().get_or_create(tenant=tenant)
        previous = (account.upsell or {}).get("offer_code")
        account.upsell = suggestion
        account.upsell_computed_at = now
        account.save(update_fields=["upsell", "upsell_computed_at", "updated_at"])
        new_best = bool(suggestion) and suggestion["offer_code"] != previous
        if new_best and account.account_manager_id:
            notify(
                kind=NotificationKind.UPSELL_SUGGESTED,
                tenant=tenant,
                users=[account.account_manager],
                params={
                    "package": {"en": suggestion["name_en"], "zh": suggestion["name_zh"]},
                    "saving": f"{Decimal(suggestion['saving']):,.2f}",
                },
                url=console_url(tenant),
                dedupe_key=f"upsell:{tenant.pk}:{suggestion['offer_code']}:{now.date().isoformat()}",
            )
    return new_best


def upsell_compute(*, tenant: Tenant, now: datetime | None = None) -> dict:
    """Compute and keep one tenant's suggestion (empty when it is not Standard and paying as it goes)."""
    now = now or timezone.now()
    suggestion = {}
    if tenant.tier.code == TierCode.STANDARD and tenant.pk not in _holding_packages([tenant.pk], now):
        start, end = _window(tenant, now)
        usage = eligible_usage([tenant.pk], start=start, end=end).get(tenant.pk, ZERO)
        suggestion = _suggestion(tenant, usage, packages_on_sale(), now)
    _store(tenant, suggestion, now)
    return suggestion


def upsell_compute_all(now: datetime | None = None) -> dict:
    """Daily: every tenant's suggestion, in batches (one usage query per batch and time zone)."""
    now = now or timezone.now()
    offers = packages_on_sale()
    stats = {"standard_payg": 0, "suggested": 0, "new_best": 0, "cleared": 0}
    # Tenants that are no longer candidates lose a suggestion they had, in one statement.
    stats["cleared"] = (
        CustomerAccount.objects.exclude(upsell={})
        .exclude(tenant__tier__code=TierCode.STANDARD)
        .update(upsell={}, upsell_computed_at=now)
    )
    ids = list(Tenant.objects.filter(tier__code=TierCode.STANDARD).order_by("pk").values_list("pk", flat=True))
    for begin in range(0, len(ids), BATCH_SIZE):
        batch = ids[begin : begin + BATCH_SIZE]
        holding = _holding_packages(batch, now)
        tenants = list(Tenant.objects.filter(pk__in=batch).select_related("tier"))
        current = dict(CustomerAccount.objects.filter(tenant_id__in=batch).values_list("tenant_id", "upsell"))
        usage: dict[int, Decimal] = {}
        for window in {_window(t, now) for t in tenants}:
            members = [t.pk for t in tenants if _window(t, now) == window]
            usage.update(eligible_usage(members, start=window[0], end=window[1]))
        for tenant in tenants:
            suggestion = {}
            if tenant.pk not in holding:
                stats["standard_payg"] += 1
                suggestion = _suggestion(tenant, usage.get(tenant.pk, ZERO), offers, now)
            if suggestion:
                stats["suggested"] += 1
            if not suggestion and not current.get(tenant.pk):
                continue  # nothing before, nothing now
            if _store(tenant, suggestion, now):
                stats["new_best"] += 1
            if not suggestion:
                stats["cleared"] += 1
        CustomerAccount.objects.filter(tenant_id__in=batch).update(upsell_computed_at=now)
    return stats
