"""The tamper-evident usage log: appends, idempotency, the hash chain, verify_usage_log, the
customer's own verification (the snippet in docs/billing.md), and per-second metering."""

import csv
import io
import itertools
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from billing import hashing, services
from billing.models import GENESIS_HASH, UsageChainHead, UsageRecord
from billing.services import UsageEvent
from billing.verification import verify_chain
from tests.factories import make_tenant
from tests.test_billing_helpers import at, lifecycle, make_vm, scale_up, task_run

pytestmark = pytest.mark.django_db

DOC = Path(settings.BASE_DIR) / "docs" / "billing.md"


def event(tenant, n: int, **extra) -> UsageEvent:
    start = at(2026, 3, 1) + timedelta(hours=n)
    return UsageEvent(
        tenant_id=tenant.pk,
        idempotency_key=extra.pop("key", f"test:{tenant.pk}:{n}"),
        source="task",
        source_id=str(n),
        resource="cpu",
        unit="core_second",
        quantity=Decimal(3600 + n),
        period_start=start,
        period_end=start + timedelta(hours=1),
        meta={"n": str(n)},
        **extra,
    )


@pytest.fixture
def chain(tenant):
    services.usage_append(events=[event(tenant, n) for n in range(1, 7)])
    return tenant


def tamper(sql: str, params=()) -> None:
    """Change the log behind the portal's back (on PostgreSQL the append-only trigger is lifted first)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # what a superuser bypassing the triggers could do
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(sql, params)
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")


def verify_command(*args) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("verify_usage_log", *args, stdout=out)
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    return 0, out.getvalue()


# --- Appending ----------------------------------------------------------------------------------


def test_records_are_chained_with_consecutive_sequences(chain):
    records = list(UsageRecord.objects.filter(tenant=chain).order_by("sequence"))
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert all(hashing.hash_of(r) == r.hash for r in records)
    head = UsageChainHead.objects.get(tenant=chain)
    assert (head.last_sequence, head.last_hash) == (6, records[-1].hash)
    assert verify_chain(chain.pk) == []


def test_a_replayed_event_is_appended_once(chain):
    result = services.usage_append(events=[event(chain, 3), event(chain, 3), event(chain, 7), event(chain, 7)])
    assert (result.appended, result.duplicates) == (1, 3)
    assert UsageRecord.objects.filter(tenant=chain).count() == 7


def test_each_tenant_has_its_own_chain(chain):
    other = make_tenant(name="Other lab")
    services.usage_append(events=[event(other, 1), event(chain, 8)])
    assert UsageRecord.objects.get(tenant=other).sequence == 1
    assert UsageRecord.objects.get(tenant=chain, source_id="8").sequence == 7


def test_bad_events_are_refused(tenant):
    with pytest.raises(ValueError, match="never negative"):
        services.usage_append(events=[UsageEvent(**{**event(tenant, 1).__dict__, "quantity": Decimal(-1)})])
    with pytest.raises(ValueError, match="unknown usage source"):
        services.usage_append(events=[UsageEvent(**{**event(tenant, 1).__dict__, "source": "magic"})])
    assert not UsageRecord.objects.exists()


def test_records_refuse_edits_in_the_model(chain):
    record = UsageRecord.objects.filter(tenant=chain).first()
    record.quantity = Decimal(1)
    with pytest.raises(Exception, match="append-only"):
        record.save()
    with pytest.raises(Exception, match="append-only"):
        record.delete()


@pytest.mark.postgres
def test_postgresql_refuses_update_and_delete(chain):
    for sql in ("UPDATE billing_usagerecord SET quantity = 1", "DELETE FROM billing_usagerecord"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert UsageRecord.objects.count() == 6


# --- verify_usage_log ---------------------------------------------------------------------------


def test_verify_passes_an_intact_log(chain):
    code, out = verify_command("--tenant", chain.slug)
    assert code == 0 and "OK" in out and "6 records" in out


def test_verify_catches_an_edited_record(chain):
    tamper("UPDATE billing_usagerecord SET quantity = %s WHERE tenant_id = %s AND sequence = 4", ["1", chain.pk])
    code, out = verify_command()
    assert code == 1
    assert f"BROKEN {chain.slug} #4: edited" in out


def test_verify_catches_a_deleted_record(chain):
    tamper("DELETE FROM billing_usagerecord WHERE tenant_id = %s AND sequence = 3", [chain.pk])
    code, out = verify_command("--tenant", chain.slug)
    assert code == 1
    assert "#3: record(s) 3 missing (deleted)" in out


def test_verify_catches_the_newest_record_deleted(chain):
    tamper("DELETE FROM billing_usagerecord WHERE tenant_id = %s AND sequence = 6", [chain.pk])
    code, out = verify_command("--tenant", chain.slug)
    assert code == 1 and "#6: record(s) 6–6 missing at the end (deleted)" in out


def test_verify_catches_reordered_records(chain):
    for old, new in ((2, 1000), (5, 2), (1000, 5)):  # swap 2 and 5 (one row at a time: the pair is unique)
        tamper(
            "UPDATE billing_usagerecord SET sequence = %s WHERE tenant_id = %s AND sequence = %s", [new, chain.pk, old]
        )
    code, out = verify_command("--tenant", chain.slug)
    assert code == 1
    assert "#2: reordered: this record belongs at sequence 5" in out
    assert "#5: reordered: this record belongs at sequence 2" in out


def test_verify_with_an_unknown_tenant_is_an_error(chain):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("verify_usage_log", "--tenant", "nobody")


# --- The customer's own verification -------------------------------------------------------------


def documented_verifier():
    text = DOC.read_text(encoding="utf-8")
    code = re.search(r"### Verify your usage log yourself.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('print(verify_usage_csv("usage-records.csv"))', "")
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["verify_usage_csv"]


def test_the_documented_snippet_verifies_the_csv_export(api, user, chain, tmp_path):
    response = api(user).get("/api/v1/usage/records/", {"format": "csv"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    path = tmp_path / "usage-records.csv"
    path.write_bytes(response.content)
    verify = documented_verifier()
    assert verify(path) == "OK"

    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 6
    rows[3]["quantity"] = "1.000000000"
    write(path, rows)
    assert verify(path) == "sequence 4: edited (its fields do not match its hash)"

    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    write(path, rows[:2] + rows[3:])
    assert verify(path) == "sequence 3: missing (deleted or reordered)"

    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    rows[1], rows[2] = rows[2], rows[1]
    write(path, rows)
    assert verify(path).startswith("sequence 2: missing")


def test_the_snippet_and_the_portal_hash_the_same_way(chain):
    record = UsageRecord.objects.filter(tenant=chain).first()
    fields = hashing.canonical_fields(
        tenant_id=record.tenant_id,
        sequence=record.sequence,
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
    import hashlib
    import json

    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == record.hash
    assert fields["quantity"] == "3601.000000000" and fields["period_start"].endswith("Z")


def write(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_records_api_is_paginated_json_and_tenant_scoped(api, user, chain):
    other = make_tenant(name="Other lab")
    services.usage_append(events=[event(other, 1)])
    body = api(user).get("/api/v1/usage/records/").json()
    assert body["count"] == 6 and {r["tenant_id"] for r in body["results"]} == {chain.pk}


# --- Per-second metering ------------------------------------------------------------------------


def test_task_runs_are_metered_per_second_and_only_when_chargeable(tenant):
    run = task_run(tenant, start=at(2026, 3, 1, 8, 0, 0, 400000), end=at(2026, 3, 1, 8, 0, 59, 900000), gpus="0.5")
    lost = task_run(tenant, start=at(2026, 3, 1, 9), end=at(2026, 3, 1, 10), chargeable=False, attempt=2, task=run.task)
    services.usage_meter_task_run(run_id=run.pk)
    services.usage_meter_task_run(run_id=lost.pk)
    quantities = dict(UsageRecord.objects.values_list("resource", "quantity"))
    assert quantities == {"gpu:A100": Decimal("29.5"), "cpu": Decimal(8 * 59), "memory": Decimal(32 * 59)}


def test_an_on_demand_vm_is_metered_per_second_in_hourly_pieces(tenant):
    vm = make_vm(tenant, plan="t4-1x-general", billing_mode="on_demand")
    lifecycle(vm, "started", at(2026, 3, 1, 9, 15))
    assert services.usage_meter_vm(vm_id=vm.pk, until=at(2026, 3, 1, 11, 30)) == 2  # whole hours only while running
    lifecycle(vm, "stopped", at(2026, 3, 1, 11, 40, 10))
    lifecycle(vm, "started", at(2026, 3, 1, 12, 0))
    lifecycle(vm, "released", at(2026, 3, 1, 12, 0, 30))
    assert services.usage_meter_vm(vm_id=vm.pk, until=at(2026, 3, 2)) == 2
    assert services.usage_meter_vm(vm_id=vm.pk, until=at(2026, 3, 2)) == 0
    seconds = sum(UsageRecord.objects.values_list("quantity", flat=True), Decimal(0))
    assert seconds == Decimal(2 * 3600 + 25 * 60 + 10 + 30)
    assert verify_chain(tenant.pk) == []


def test_a_subscription_vm_is_not_metered_per_second(tenant):
    vm = make_vm(tenant, billing_mode="monthly")
    lifecycle(vm, "started", at(2026, 3, 1, 9))
    lifecycle(vm, "stopped", at(2026, 3, 1, 19))
    assert services.usage_meter_vm(vm_id=vm.pk) == 0


def test_scale_up_days_are_metered_as_they_begin(tenant):
    vm = make_vm(tenant, billing_mode="monthly")
    grant = scale_up(vm, start=at(2026, 3, 1, 12), days=3, gpus=1, memory_gib=8)
    assert services.usage_meter_scale_ups(vm_id=vm.pk, now=at(2026, 3, 1, 12, 0, 1)) == 2  # day 1: GPU and memory
    assert services.usage_meter_scale_ups(vm_id=vm.pk, now=at(2026, 3, 2, 13)) == 2
    grant.reverted_at = at(2026, 3, 2, 20)  # reverted early: day 3 never begins
    grant.save()
    assert services.usage_meter_scale_ups(vm_id=vm.pk, now=at(2026, 3, 5)) == 0
