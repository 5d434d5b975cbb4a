"""The first price book (CNY, DESIGN.md section 3): task hosting, volume bands, packages,
elastic scale-ups, storage and support. VM subscription prices are provisioning's PlanPrice."""

from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.db import migrations

EFFECTIVE_FROM = datetime(2026, 1, 1, tzinfo=ZoneInfo("Asia/Shanghai"))

# code, unit, price, set by staff, label (en), label (zh)
ITEMS = [
    ("task_gpu_hour:T4", "gpu_hour", "5.00", False, "T4 GPU-hour", "T4 GPU·小时"),
    ("task_gpu_hour:A10", "gpu_hour", "15.00", False, "A10 GPU-hour", "A10 GPU·小时"),
    ("task_gpu_hour:A100", "gpu_hour", "50.00", False, "A100 GPU-hour", "A100 GPU·小时"),
    ("task_gpu_hour:H100", "gpu_hour", "90.00", True, "H100 GPU-hour", "H100 GPU·小时"),
    ("task_cpu_core_hour", "core_hour", "0.50", False, "CPU core-hour", "CPU 核·小时"),
    ("task_memory_gib_hour", "gib_hour", "0.10", False, "Memory GiB-hour", "内存 GiB·小时"),
    ("scale_up_gpu_day:A100", "gpu_day", "600.00", False, "A100 GPU-day", "A100 GPU·天"),
    ("scale_up_gpu_day:H100", "gpu_day", "1080.00", True, "H100 GPU-day", "H100 GPU·天"),
    ("scale_up_gpu_day:A10", "gpu_day", "180.00", True, "A10 GPU-day", "A10 GPU·天"),
    ("scale_up_gpu_day:T4", "gpu_day", "60.00", True, "T4 GPU-day", "T4 GPU·天"),
    ("scale_up_cpu_core_day", "core_day", "20.00", False, "CPU core-day", "CPU 核·天"),
    ("scale_up_memory_gib_day", "gib_day", "2.00", False, "Memory GiB-day", "内存 GiB·天"),
    ("storage_gib_day", "gib_day", "0.05", False, "Storage GiB-day", "存储 GiB·天"),
    ("support_7x24_month", "month", "3000.00", False, "7×24 support, per month", "7×24 技术支持（每月）"),
]
BANDS = [("0", "100", "0"), ("100", "1000", "5"), ("1000", None, "10")]
PACKAGES = [
    ("pkg-1000", "Compute package 1,000", "算力包 1,000", "1000.00", "5"),
    ("pkg-5000", "Compute package 5,000", "算力包 5,000", "5000.00", "10"),
    ("pkg-10000", "Compute package 10,000", "算力包 10,000", "10000.00", "15"),
]


def seed(apps, schema_editor):
    Version = apps.get_model("billing", "PriceBookVersion")
    Item = apps.get_model("billing", "PriceItem")
    Band = apps.get_model("billing", "VolumeBand")
    Offer = apps.get_model("billing", "PackageOffer")
    version, created = Version.objects.get_or_create(
        effective_from=EFFECTIVE_FROM,
        # Whole seconds: a row must survive a JSON round trip unchanged (the history tables refuse edits).
        defaults={"note": "Launch prices (DESIGN.md section 3); H100 and non-A100 scale-ups set by staff.",
                  "created_at": EFFECTIVE_FROM},
    )
    if not created:
        return
    Item.objects.bulk_create(
        Item(version=version, code=code, unit=unit, unit_price=Decimal(price), set_by_staff=staff, label_en=en, label_zh=zh)
        for code, unit, price, staff, en, zh in ITEMS
    )
    Band.objects.bulk_create(
        Band(version=version, from_hours=Decimal(lo), to_hours=Decimal(hi) if hi else None, discount_percent=Decimal(pct))
        for lo, hi, pct in BANDS
    )
    Offer.objects.bulk_create(
        Offer(version=version, code=code, name_en=en, name_zh=zh, price=Decimal(price), bonus_percent=Decimal(bonus))
        for code, en, zh, price, bonus in PACKAGES
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
