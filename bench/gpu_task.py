"""Run the example training task through the portal on this machine's GPU and print what the customer sees.

Everything is the real path: task_submit → scheduling pass → the local executor (a subprocess with
CUDA_VISIBLE_DEVICES set to the GPU the scheduler assigned) → events kept and pushed, with NVML
samples of GPU utilisation and memory every few seconds.

    .venv/bin/python bench/gpu_task.py            # needs an NVIDIA GPU, nvidia-ml-py and torch with CUDA

It uses a throw-away SQLite database and an inventory of one node holding the machine's GPUs.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gpu-task-"))
    import pynvml

    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    name = name.decode() if isinstance(name, bytes) else name
    (tmp / "inventory.yaml").write_text(
        "nodes:\n"
        f"  - {{name: gpu-host, pool: high_end, gpu: nvidia.com/GH100_H100_PCIE, gpus: {count}, cpus: 16, "
        "memory_gib: 120}\n"
    )
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DATABASE_URL": f"sqlite:///{tmp / 'db.sqlite3'}",
            "PORTAL_LOCAL_INVENTORY": str(tmp / "inventory.yaml"),
            "MEDIA_ROOT": str(tmp / "media"),
            "PORTAL_TASK_EXECUTE_INLINE": "1",
            "CELERY_TASK_ALWAYS_EAGER": "1",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from hosting import services
    from hosting.examples import EXAMPLES
    from hosting.models import Task, TaskEvent, TaskRun
    from provisioning.services import inventory_sync
    from tenants import services as tenant_services
    from tenants.models import User

    inventory_sync()
    owner = User.objects.create_user(email="gpu@bench.local")
    tenant = tenant_services.tenant_create(name="GPU check", owner=owner)
    staff = User.objects.create_user(email="staff@bench.local", is_staff=True)
    tenant_services.quota_update(tenant=tenant, actor=staff, limits={}, gpus={"H100": count})
    example = EXAMPLES["train"]
    began = time.monotonic()
    task = services.task_submit(
        membership=tenant.memberships.get(),
        actor=owner,
        name=example["name"],
        framework=example["framework"],
        image=example["image"],
        command=example["command"],
        gpu_model="H100",
        gpus=1,
        vcpus=4,
        memory_gib=32,
        max_runtime_seconds=example["max_runtime_seconds"],
    )
    services.schedule_pass()  # runs the attempt inline to its end
    task = Task.objects.get(pk=task.pk)
    elapsed = time.monotonic() - began
    events = list(TaskEvent.objects.filter(task=task).order_by("seq"))
    metrics: dict[str, list[float]] = {}
    for event in events:
        if event.kind == "metric":
            metrics.setdefault(event.data["name"], []).append(event.data["value"])
    run = TaskRun.objects.get(task=task)
    print(f"GPU: {count} × {name}; task ran on {task.node_name} GPUs {run.gpus} in {elapsed:.1f} s")
    print(f"state: {task.state}, progress: {task.progress}%, events: {len(events)} (seq 1..{task.last_seq})")
    for metric in ("loss", "accuracy", "gpu_util_percent", "gpu_memory_percent", "gpu_memory_used_mib"):
        values = metrics.get(metric, [])
        if values:
            print(
                f"  {metric}: {len(values)} samples, first {values[0]:.3f}, last {values[-1]:.3f}, "
                f"max {max(values):.3f}"
            )
    logs = [e.data["text"] for e in events if e.kind == "log"]
    print("log (first lines):", *logs[:6], sep="\n  ")
    print(
        f"run: {run.started_at:%H:%M:%S} → {run.ended_at:%H:%M:%S}, outcome {run.outcome}, chargeable {run.chargeable}"
    )


if __name__ == "__main__":
    main()
