"""Verify the usage log's hash chains: every record unedited, none deleted, none reordered."""

from django.core.management.base import BaseCommand, CommandError

from billing.models import UsageChainHead, UsageRecord
from billing.verification import verify_chain
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Verify the tamper-evident usage log; exit code 1 when a chain is broken, naming where and why."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", help="Slug of one tenant to verify (default: all).")

    def handle(self, *args, tenant=None, **options):
        if tenant:
            found = Tenant.objects.filter(slug=tenant).values_list("pk", flat=True).first()
            if found is None:
                raise CommandError(f"No tenant with slug {tenant!r}.")
            tenant_ids = [found]
        else:
            tenant_ids = sorted(
                set(UsageChainHead.objects.values_list("tenant_id", flat=True))
                | set(UsageRecord.objects.values_list("tenant_id", flat=True).distinct())
            )
        slugs = dict(Tenant.objects.filter(pk__in=tenant_ids).values_list("pk", "slug"))
        broken = 0
        checked = 0
        for tenant_id in tenant_ids:
            problems = verify_chain(tenant_id)
            checked += UsageRecord.objects.filter(tenant_id=tenant_id).count()
            for problem in problems:
                self.stdout.write(f"BROKEN {slugs.get(tenant_id, tenant_id)} #{problem.sequence}: {problem.problem}")
            broken += bool(problems)
        if broken:
            self.stdout.write(self.style.ERROR(f"{broken} of {len(tenant_ids)} usage chains are broken."))
            raise SystemExit(1)
        self.stdout.write(self.style.SUCCESS(f"OK: {len(tenant_ids)} chains, {checked} records, all intact."))
