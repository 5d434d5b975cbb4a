"""The demo catalogue of GPU VM plans and their first price version (CNY, DESIGN.md section 3)."""

from decimal import Decimal

from django.db import migrations
from django.utils import timezone

PLANS = [
    # code, name, profile, gpu, count, sockets, cores, threads, memory, hugepages, disk, data, log,
    # overcommit, idle minutes, monthly, yearly, hourly
    ("a100-2x-training", "2× A100 · AI training", "ai_training", "A100", 2, 1, 8, 2, 128, "2Mi", 500, 0, 0,
     "1.00", 120, "28000", "280000", "56"),
    ("a100-1x-general", "1× A100 · General", "general", "A100", 1, 1, 8, 2, 64, "", 200, 0, 0,
     "1.50", 120, "15000", "150000", "30"),
    ("h100-2x-training", "2× H100 · AI training", "ai_training", "H100", 2, 1, 8, 2, 128, "2Mi", 500, 0, 0,
     "1.00", 120, "40000", "400000", "80"),
    ("a10-1x-general", "1× A10 · General", "general", "A10", 1, 1, 4, 2, 32, "", 100, 0, 0,
     "1.50", 60, "2500", "25000", "6"),
    ("t4-1x-general", "1× T4 · General", "general", "T4", 1, 1, 2, 2, 16, "", 100, 0, 0,
     "1.50", 60, "1200", "12000", "3"),
    ("db-64g", "Database · 4 vCPU · 64 GiB", "database", None, 0, 1, 4, 1, 64, "1Gi", 100, 500, 100,
     "1.00", None, "3000", "30000", "6"),
]


def seed(apps, schema_editor):
    Plan = apps.get_model("provisioning", "Plan")
    PlanPrice = apps.get_model("provisioning", "PlanPrice")
    GpuModel = apps.get_model("provisioning", "GpuModel")
    start = timezone.now().replace(year=2026, month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    for order, row in enumerate(PLANS):
        (code, name, profile, gpu, count, sockets, cores, threads, memory, hugepages, disk, data, log,
         overcommit, idle, monthly, yearly, hourly) = row
        plan, _ = Plan.objects.update_or_create(
            code=code,
            defaults={
                "name": name, "profile": profile, "gpu_model": GpuModel.objects.get(code=gpu) if gpu else None,
                "gpu_count": count, "sockets": sockets, "cores": cores, "threads": threads, "memory_gib": memory,
                "hugepage_size": hugepages, "disk_gib": disk, "data_disk_gib": data, "log_disk_gib": log,
                "cpu_overcommit": Decimal(overcommit), "idle_release_minutes": idle, "display_order": order,
            },
        )
        PlanPrice.objects.get_or_create(
            plan=plan, effective_from=start,
            defaults={"monthly": Decimal(monthly), "yearly": Decimal(yearly), "hourly": Decimal(hourly)},
        )


class Migration(migrations.Migration):
    dependencies = [("provisioning", "0003_vm_rental")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
