"""Checks of billing's tamper-evidence and caches: the usage chain and the wallet balances."""

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from billing.hashing import hash_of
from billing.models import GENESIS_HASH, CreditGrant, LedgerEntry, UsageChainHead, UsageRecord, Wallet


@dataclass(frozen=True)
class ChainProblem:
    tenant_id: int
    sequence: int
    problem: str

    def __str__(self) -> str:
        return f"tenant {self.tenant_id}, sequence {self.sequence}: {self.problem}"


def verify_chain(tenant_id: int) -> list[ChainProblem]:
    """Walk one tenant's usage log in sequence order and say what is wrong where.

    * a record whose fields no longer hash to its stored hash was edited — unless its fields hash
      correctly at another position, which means it was moved (reordered);
    * a missing sequence number, or a prev_hash that is not the hash of the record before, means
      records were deleted, inserted or reordered;
    * a chain head ahead of the last record means the newest records were deleted.
    """
    problems: list[ChainProblem] = []
    records = list(UsageRecord.objects.filter(tenant_id=tenant_id).order_by("sequence", "id"))
    by_hash = {r.hash: r for r in records}
    expected_sequence = 1
    previous_hash = GENESIS_HASH
    for record in records:
        say = lambda text, seq=record.sequence: problems.append(ChainProblem(tenant_id, seq, text))  # noqa: E731
        if record.sequence > expected_sequence:
            missing = (
                str(expected_sequence)
                if record.sequence == expected_sequence + 1
                else f"{expected_sequence}–{record.sequence - 1}"
            )
            problems.append(ChainProblem(tenant_id, expected_sequence, f"record(s) {missing} missing (deleted)"))
        elif record.sequence < expected_sequence:
            say("sequence number repeated (a record was inserted or renumbered)")
        if hash_of(record) != record.hash:
            predecessor = by_hash.get(record.prev_hash)
            original = 1 if record.prev_hash == GENESIS_HASH else (predecessor.sequence + 1 if predecessor else None)
            if (
                original is not None
                and original != record.sequence
                and hash_of(record, sequence=original) == record.hash
            ):
                say(f"reordered: this record belongs at sequence {original}")
            else:
                say("edited: its fields no longer match its hash")
        if record.prev_hash != previous_hash:
            say("chain broken: prev_hash is not the hash of the record before it (deleted, inserted or reordered)")
        previous_hash = record.hash
        expected_sequence = record.sequence + 1
    head = UsageChainHead.objects.filter(tenant_id=tenant_id).first()
    last = records[-1].sequence if records else 0
    if head is not None and head.last_sequence > last:
        problems.append(
            ChainProblem(tenant_id, last + 1, f"record(s) {last + 1}–{head.last_sequence} missing at the end (deleted)")
        )
    elif head is not None and records and head.last_hash != records[-1].hash:
        problems.append(ChainProblem(tenant_id, last, "the newest record is not the one the chain head remembers"))
    return problems


@dataclass(frozen=True)
class BalanceProblem:
    tenant_id: int
    what: str
    cached: Decimal
    ledger: Decimal

    def __str__(self) -> str:
        return f"tenant {self.tenant_id}: {self.what} is {self.cached} but its ledger entries sum to {self.ledger}"


def verify_balances(tenant_ids=None) -> list[BalanceProblem]:
    """The cached balances (wallet cash, each grant's remaining) equal the sums of ledger entries."""
    problems = []
    wallets = Wallet.objects.all()
    grants = CreditGrant.objects.all()
    entries = LedgerEntry.objects.all()
    if tenant_ids is not None:
        wallets, grants, entries = (
            wallets.filter(tenant_id__in=tenant_ids),
            grants.filter(tenant_id__in=tenant_ids),
            entries.filter(tenant_id__in=tenant_ids),
        )
    # Summed here, not in SQL: SQLite would add the amounts as floats.
    cash: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    per_grant: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for tenant_id, grant_id, amount in entries.values_list("tenant_id", "grant_id", "amount").iterator(
        chunk_size=10000
    ):
        if grant_id is None:
            cash[tenant_id] += amount
        else:
            per_grant[grant_id] += amount
    for wallet in wallets:
        ledger = cash.get(wallet.tenant_id) or Decimal("0.00")
        if wallet.cash_balance != ledger:
            problems.append(BalanceProblem(wallet.tenant_id, "cash balance", wallet.cash_balance, ledger))
    for tenant_id in set(cash) - set(wallets.values_list("tenant_id", flat=True)):
        problems.append(BalanceProblem(tenant_id, "cash balance (no wallet)", Decimal("0.00"), cash[tenant_id]))
    for grant in grants:
        ledger = per_grant.get(grant.pk) or Decimal("0.00")
        if grant.remaining != ledger:
            problems.append(BalanceProblem(grant.tenant_id, f"package {grant.pk} remaining", grant.remaining, ledger))
    return problems
