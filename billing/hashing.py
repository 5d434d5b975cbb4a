"""The canonical serialisation of a usage record and its chain hash.

    hash = SHA-256( canonical JSON of the record's fields, prev_hash included )

The canonical JSON has sorted keys, no spaces, UTF-8, and every value a string: times in UTC as
"YYYY-MM-DDTHH:MM:SS.ffffffZ", the quantity with exactly 9 decimal places, `meta` as its own
canonical JSON. docs/billing.md shows how a customer recomputes it from the CSV export; this
module is the one implementation the portal uses, and the tests check the documented snippet
against it.
"""

import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal

from billing.models import QUANTITY_PLACES

HASHED_FIELDS = (
    "tenant_id",
    "sequence",
    "idempotency_key",
    "source",
    "source_id",
    "resource",
    "unit",
    "quantity",
    "period_start",
    "period_end",
    "meta",
    "created_at",
    "prev_hash",
)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_quantity(value: Decimal) -> str:
    return format(Decimal(value).quantize(Decimal(1).scaleb(-QUANTITY_PLACES)), "f")


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_fields(
    *,
    tenant_id: int,
    sequence: int,
    idempotency_key: str,
    source: str,
    source_id: str,
    resource: str,
    unit: str,
    quantity: Decimal,
    period_start: datetime,
    period_end: datetime,
    meta: dict,
    created_at: datetime,
    prev_hash: str,
) -> dict[str, str]:
    return {
        "tenant_id": str(tenant_id),
        "sequence": str(sequence),
        "idempotency_key": idempotency_key,
        "source": source,
        "source_id": source_id,
        "resource": resource,
        "unit": unit,
        "quantity": format_quantity(quantity),
        "period_start": format_time(period_start),
        "period_end": format_time(period_end),
        "meta": canonical_json(meta or {}),
        "created_at": format_time(created_at),
        "prev_hash": prev_hash,
    }


def record_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def hash_of(record, *, sequence: int | None = None) -> str:
    """The hash a stored record should have (optionally as if it sat at another sequence number)."""
    return record_hash(
        canonical_fields(
            tenant_id=record.tenant_id,
            sequence=record.sequence if sequence is None else sequence,
            idempotency_key=record.idempotency_key,
            source=record.source,
            source_id=record.source_id,
            resource=record.resource,
            unit=record.unit,
            quantity=record.quantity,
            period_start=record.period_start,
            period_end=record.period_end,
            meta=record.meta,
            created_at=record.created_at,
            prev_hash=record.prev_hash,
        )
    )
