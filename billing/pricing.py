"""Prices in force at a moment: the billing price book and provisioning's plan prices.

A rating pass loads every version once (a handful of rows) and asks for the version in force at
each usage period's start, so a price change never re-prices usage from before it.
"""

from bisect import bisect_right
from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from billing.models import PriceBookVersion, PriceItem, VolumeBand
from provisioning.models import PlanPrice


class MissingPrice(LookupError):
    """No price is in force for this item at this moment: the usage stays unrated until staff add one."""


class PriceBook:
    def __init__(self):
        versions = list(PriceBookVersion.objects.order_by("effective_from").prefetch_related("items", "bands"))
        self._starts = [v.effective_from for v in versions]
        self._versions = versions
        self._items = {v.pk: {item.code: item for item in v.items.all()} for v in versions}
        self._bands = {v.pk: sorted(v.bands.all(), key=lambda b: b.from_hours) for v in versions}
        plan_prices: dict[str, list[PlanPrice]] = defaultdict(list)
        for price in PlanPrice.objects.select_related("plan").order_by("effective_from"):
            plan_prices[price.plan.code].append(price)
        self._plan_prices = plan_prices

    def version_at(self, at: datetime) -> PriceBookVersion:
        index = bisect_right(self._starts, at) - 1
        if index < 0:
            raise MissingPrice(f"no price book is in force at {at.isoformat()}")
        return self._versions[index]

    def item(self, code: str, at: datetime) -> PriceItem:
        version = self.version_at(at)
        try:
            return self._items[version.pk][code]
        except KeyError as exc:
            raise MissingPrice(f"{code} has no price in the price book from {version.effective_from:%Y-%m-%d}") from exc

    def bands(self, at: datetime) -> list[VolumeBand]:
        return self._bands[self.version_at(at).pk]

    def plan_price(self, plan_code: str, at: datetime) -> PlanPrice:
        versions = self._plan_prices.get(plan_code, [])
        index = bisect_right([p.effective_from for p in versions], at) - 1
        if index < 0:
            raise MissingPrice(f"plan {plan_code} has no price in force at {at.isoformat()}")
        return versions[index]


def split_into_bands(
    done: Decimal, amount: Decimal, bands: list[VolumeBand], *, scale: int = 1
) -> list[tuple[Decimal, VolumeBand | None]]:
    """Graduated banding: the month's usage [done, done + amount) cut by band, where a band's hours
    count `scale` metered units each (3600 GPU-seconds to the GPU-hour).

    Returns (amount in the band, band) pieces; usage outside every band comes back with band None
    (no discount).
    """
    pieces: list[tuple[Decimal, VolumeBand | None]] = []
    cursor = done
    end = done + amount
    for band in bands:
        if cursor >= end:
            break
        band_start = band.from_hours * scale
        band_end = band.to_hours * scale if band.to_hours is not None else end
        if cursor < band_start:
            gap_end = min(end, band_start)
            pieces.append((gap_end - cursor, None))
            cursor = gap_end
        if cursor < band_end and cursor < end:
            piece_end = min(end, band_end)
            pieces.append((piece_end - cursor, band))
            cursor = piece_end
    if cursor < end:
        pieces.append((end - cursor, None))
    return [(h, b) for h, b in pieces if h > 0]
