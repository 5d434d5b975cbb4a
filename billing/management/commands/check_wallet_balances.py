"""Prove the cached balances equal the ledger: wallet cash and each package's remaining credit."""

from django.core.management.base import BaseCommand

from billing.verification import verify_balances


class Command(BaseCommand):
    help = "Check every cached wallet and package balance against the sum of its ledger entries; exit 1 on a mismatch."

    def handle(self, *args, **options):
        problems = verify_balances()
        for problem in problems:
            self.stdout.write(f"MISMATCH {problem}")
        if problems:
            raise SystemExit(1)
        self.stdout.write(self.style.SUCCESS("OK: every cached balance equals its ledger."))
