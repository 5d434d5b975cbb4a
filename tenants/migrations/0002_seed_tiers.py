"""The three customer tiers of DESIGN.md section 4, with their benefits and default quotas."""

from django.db import migrations

TIERS = [
    {
        "code": "standard", "rank": 1, "name_en": "Standard", "name_zh": "普通",
        "upgrade_rule_en": "Every new tenant starts here.",
        "upgrade_rule_zh": "新租户默认等级。",
        "benefits_en": ["Self-service portal and API", "Base scheduling priority", "List prices"],
        "benefits_zh": ["自助门户与 API", "基础调度优先级", "标准价格"],
        "support_level": "self-service", "account_manager_kind": "", "usage_review_months": None,
        "storage_discount_percent": 0, "free_storage_gib": 0, "yearly_renewal_percent": 100,
        "default_vcpus": 64, "default_memory_gib": 256, "default_hugepages_gib": 128, "default_vms": 2,
        "default_concurrent_tasks": 4, "default_storage_gib": 1024,
        "default_gpus": {"T4": 4, "A10": 4, "A100": 2, "H100": 0},
    },
    {
        "code": "gold", "rank": 2, "name_en": "Gold", "name_zh": "黄金",
        "upgrade_rule_en": "Cumulative spend ≥ 5,000; or 3 consecutive calendar months each ≥ 50,000; "
                           "or trailing-12-month spend ≥ 100,000.",
        "upgrade_rule_zh": "累计消费 ≥ 5,000；或连续 3 个自然月每月 ≥ 50,000；或近 12 个月消费 ≥ 100,000。",
        "benefits_en": ["Service specialist", "Medium scheduling priority", "5×8 support",
                        "Quarterly usage report", "Storage 50% off", "Yearly renewal at 80% of list"],
        "benefits_zh": ["专属服务专员", "中等调度优先级", "5×8 技术支持", "季度使用报告", "存储五折",
                        "包年续费享标价 8 折"],
        "support_level": "5x8", "account_manager_kind": "specialist", "usage_review_months": 3,
        "storage_discount_percent": 50, "free_storage_gib": 0, "yearly_renewal_percent": 80,
        "default_vcpus": 256, "default_memory_gib": 1024, "default_hugepages_gib": 512, "default_vms": 8,
        "default_concurrent_tasks": 16, "default_storage_gib": 10240,
        "default_gpus": {"T4": 16, "A10": 16, "A100": 8, "H100": 4},
    },
    {
        "code": "diamond", "rank": 3, "name_en": "Diamond", "name_zh": "钻石",
        "upgrade_rule_en": "Trailing-12-month spend ≥ 500,000, or set by staff.",
        "upgrade_rule_zh": "近 12 个月消费 ≥ 500,000，或由工作人员设定。",
        "benefits_en": ["Dedicated account manager", "Highest scheduling priority", "7×24 support",
                        "Periodic usage review", "First 10 TiB of storage free", "Yearly renewal at 60% of list"],
        "benefits_zh": ["专属客户经理", "最高调度优先级", "7×24 技术支持", "定期使用评审", "前 10 TiB 存储免费",
                        "包年续费享标价 6 折"],
        "support_level": "7x24", "account_manager_kind": "dedicated", "usage_review_months": 1,
        "storage_discount_percent": 0, "free_storage_gib": 10240, "yearly_renewal_percent": 60,
        "default_vcpus": 1024, "default_memory_gib": 4096, "default_hugepages_gib": 2048, "default_vms": 32,
        "default_concurrent_tasks": 64, "default_storage_gib": 51200,
        "default_gpus": {"T4": 64, "A10": 64, "A100": 32, "H100": 16},
    },
]


def seed(apps, schema_editor):
    Tier = apps.get_model("tenants", "Tier")
    for row in TIERS:
        Tier.objects.update_or_create(code=row["code"], defaults={k: v for k, v in row.items() if k != "code"})


class Migration(migrations.Migration):
    dependencies = [("tenants", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
