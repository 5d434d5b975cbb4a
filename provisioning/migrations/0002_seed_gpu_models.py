from django.db import migrations

GPU_MODELS = [
    # code, name, Kubernetes resource (passthrough), memory GiB, pool, order
    ("T4", "NVIDIA Tesla T4", "nvidia.com/TU104GL_Tesla_T4", 16, "general", 10),
    ("A10", "NVIDIA A10", "nvidia.com/GA102GL_A10", 24, "general", 20),
    ("A100", "NVIDIA A100 80GB PCIe", "nvidia.com/GA100_A100_PCIE_80GB", 80, "high_end", 30),
    ("H100", "NVIDIA H100 80GB PCIe", "nvidia.com/GH100_H100_PCIE", 80, "high_end", 40),
]


def seed(apps, schema_editor):
    GpuModel = apps.get_model("provisioning", "GpuModel")
    for code, name, resource, memory, pool, order in GPU_MODELS:
        GpuModel.objects.update_or_create(
            code=code,
            defaults={"name": name, "resource_name": resource, "memory_gib": memory, "pool": pool,
                      "display_order": order},
        )


class Migration(migrations.Migration):
    dependencies = [("provisioning", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
