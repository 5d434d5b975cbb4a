from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from provisioning import selectors, services
from provisioning.models import BillingMode, GpuModel, Plan, PlanPrice, ScaleUp, VirtualMachine, VmState

CURRENCY = "CNY"


class GpuModelSerializer(serializers.ModelSerializer):
    class Meta:
        model = GpuModel
        fields = ["code", "name", "resource_name", "memory_gib", "pool"]
        read_only_fields = fields
        extra_kwargs = {
            "code": {"help_text": "Short name customers use, e.g. A100."},
            "name": {"help_text": "Full name of the GPU."},
            "resource_name": {"help_text": "Kubernetes extended resource, e.g. nvidia.com/GA100_A100_PCIE_80GB."},
            "memory_gib": {"help_text": "GPU memory, GiB."},
            "pool": {"help_text": "high_end (passthrough, VM rental), general (vGPU slices, tasks) or edge."},
        }


class PlanPriceSerializer(serializers.ModelSerializer):
    currency = serializers.SerializerMethodField(help_text="Always CNY.")

    class Meta:
        model = PlanPrice
        fields = ["monthly", "yearly", "hourly", "currency", "effective_from"]
        read_only_fields = fields
        extra_kwargs = {
            "monthly": {"help_text": "Monthly subscription price, decimal string."},
            "yearly": {"help_text": "Yearly subscription price, decimal string."},
            "hourly": {"help_text": "On-demand rate per hour (billed per second), decimal string."},
            "effective_from": {"help_text": "When this price version took effect."},
        }

    def get_currency(self, price) -> str:
        return CURRENCY


class PlanSerializer(serializers.ModelSerializer):
    gpu_model = serializers.SlugRelatedField(
        slug_field="code", read_only=True, allow_null=True, help_text="GPU model code, or null for a CPU-only plan."
    )
    vcpus = serializers.IntegerField(read_only=True, help_text="vCPUs: sockets × cores × threads.")
    hugepages_gib = serializers.IntegerField(read_only=True, help_text="Guest memory backed by hugepages, GiB.")
    prices = serializers.SerializerMethodField(help_text="The price version in force, or null when none is yet.")
    available = serializers.SerializerMethodField(help_text="How many VMs of this plan could start right now.")

    class Meta:
        model = Plan
        fields = [
            "code",
            "name",
            "description",
            "profile",
            "gpu_model",
            "gpu_count",
            "vcpus",
            "sockets",
            "cores",
            "threads",
            "memory_gib",
            "hugepage_size",
            "hugepages_gib",
            "disk_gib",
            "data_disk_gib",
            "log_disk_gib",
            "prices",
            "idle_release_minutes",
            "idle_gpu_percent",
            "available",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "code": {"help_text": "Stable identifier of the plan, used when ordering."},
            "name": {"help_text": "Display name."},
            "description": {"help_text": "What the plan is for."},
            "profile": {"help_text": "Workload profile that shapes the VM: ai_training, database or general."},
            "gpu_count": {"help_text": "Passthrough GPUs in the VM."},
            "sockets": {"help_text": "CPU sockets of the guest."},
            "cores": {"help_text": "Cores per socket."},
            "threads": {"help_text": "Threads per core."},
            "memory_gib": {"help_text": "Guest memory, GiB."},
            "hugepage_size": {"help_text": "2Mi, 1Gi, or empty when memory is not hugepage-backed."},
            "disk_gib": {"help_text": "Root disk, GiB."},
            "data_disk_gib": {"help_text": "Separate data disk, GiB (0 for none)."},
            "log_disk_gib": {"help_text": "Separate log disk, GiB (0 for none)."},
            "idle_release_minutes": {
                "help_text": "On-demand VMs idle this long are released; null for never.",
            },
            "idle_gpu_percent": {"help_text": "GPU utilisation under this percent counts as idle."},
        }

    @extend_schema_field(PlanPriceSerializer(allow_null=True))
    def get_prices(self, plan) -> dict | None:
        price = selectors.current_price(plan)
        return PlanPriceSerializer(price).data if price else None

    def get_available(self, plan) -> int:
        availability = self.context.get("availability")
        if availability is None:
            availability = selectors.plan_availability([plan])
        return availability.get(plan.pk, 0)


class ScaleUpSerializer(serializers.ModelSerializer):
    class Meta:
        model = ScaleUp
        fields = ["id", "extra_gpus", "extra_vcpus", "extra_memory_gib", "days", "starts_at", "ends_at", "state"]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Scale-up id."},
            "extra_gpus": {"help_text": "GPUs added to the plan's."},
            "extra_vcpus": {"help_text": "vCPUs added to the plan's."},
            "extra_memory_gib": {"help_text": "Memory added to the plan's, GiB."},
            "days": {"help_text": "How many days it lasts."},
            "starts_at": {"help_text": "When it took effect."},
            "ends_at": {"help_text": "When it reverts by itself."},
            "state": {"help_text": "active or reverted."},
        }


class ScaleUpCreateSerializer(serializers.Serializer):
    extra_gpus = serializers.IntegerField(
        min_value=0, max_value=16, default=0, help_text="GPUs to add (same model as the plan's)."
    )
    extra_vcpus = serializers.IntegerField(min_value=0, max_value=256, default=0, help_text="vCPUs to add.")
    extra_memory_gib = serializers.IntegerField(min_value=0, max_value=4096, default=0, help_text="Memory to add, GiB.")
    days = serializers.IntegerField(min_value=1, max_value=365, help_text="How many days, 1 to 365.")


class VmSerializer(serializers.ModelSerializer):
    """A VM as its tenant sees it. Never carries the Jupyter token: that is POST …/access/ only."""

    plan = serializers.SlugRelatedField(slug_field="code", read_only=True, help_text="Code of the plan ordered.")
    state_label = serializers.CharField(
        source="get_state_display", read_only=True, help_text="The state in plain words, in the request's language."
    )
    queue_position = serializers.SerializerMethodField(
        help_text="Place in line while waiting for capacity (1 starts next); null otherwise."
    )
    ssh_command = serializers.SerializerMethodField(
        help_text="ssh -p PORT user@host while the VM is running; empty otherwise. Log in with your own key."
    )
    jupyter_available = serializers.SerializerMethodField(
        help_text="True when the running VM has a Jupyter server; POST …/access/ for its link."
    )
    scale_ups = serializers.SerializerMethodField(help_text="Elastic scale-ups in force now.")

    class Meta:
        model = VirtualMachine
        fields = [
            "id",
            "name",
            "plan",
            "billing_mode",
            "state",
            "state_label",
            "failure_reason",
            "queue_position",
            "node_name",
            "ssh_command",
            "jupyter_available",
            "requested_at",
            "running_since",
            "scale_ups",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "VM id (UUID)."},
            "name": {"help_text": "Name given at order time, unique among the tenant's live VMs."},
            "billing_mode": {"help_text": "monthly, yearly or on_demand."},
            "state": {"help_text": "Lifecycle state: queued, requested, provisioning, starting, running, …"},
            "failure_reason": {"help_text": "Why the VM failed, in plain words; empty unless failed."},
            "node_name": {"help_text": "Cluster node the VM runs on, once placed."},
            "requested_at": {"help_text": "When it was ordered."},
            "running_since": {"help_text": "When it last became ready, or null."},
        }

    def get_queue_position(self, vm) -> int | None:
        if vm.state != VmState.QUEUED:
            return None
        positions = self.context.get("queue_positions")
        if positions is not None and vm.pk in positions:
            return positions[vm.pk]
        return services.queue_position(vm)

    def get_ssh_command(self, vm) -> str:
        return services.ssh_command(vm) if vm.state == VmState.RUNNING else ""

    def get_jupyter_available(self, vm) -> bool:
        return vm.state == VmState.RUNNING and bool(vm.jupyter_url)

    @extend_schema_field(ScaleUpSerializer(many=True))
    def get_scale_ups(self, vm) -> list[dict]:
        return ScaleUpSerializer(selectors.active_scale_ups(vm), many=True).data


class VmOrderSerializer(serializers.Serializer):
    plan = serializers.SlugRelatedField(
        slug_field="code", queryset=Plan.objects.all(), help_text="Code of the plan, from GET /plans/."
    )
    name = serializers.CharField(
        max_length=40, help_text="1–40 lowercase letters, digits and hyphens, starting with a letter."
    )
    billing_mode = serializers.ChoiceField(choices=BillingMode.choices, help_text="monthly, yearly or on_demand.")
    ssh_key_ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        allow_empty=True,
        max_length=20,
        help_text="Ids of the tenant's SSH keys (GET /ssh-keys/) to inject with cloud-init; at least one.",
    )
    cloud_init_extra = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        help_text="Optional cloud-config YAML merged into the VM's cloud-init (packages, runcmd, write_files).",
    )
    wait_if_full = serializers.BooleanField(
        default=False,
        help_text="When no GPU is free: true waits in line (state queued), false refuses with a 400 on plan.",
    )


class VmAccessSerializer(serializers.Serializer):
    ssh_command = serializers.CharField(help_text="ssh -p PORT user@host; log in with a key you picked.")
    jupyter_url = serializers.CharField(help_text="Jupyter link with its token, or empty when there is none.")
    jupyter_token = serializers.CharField(help_text="The Jupyter token alone. Secret: do not share it.")
