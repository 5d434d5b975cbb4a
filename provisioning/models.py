import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Pool(models.TextChoices):
    HIGH_END = "high_end", _("High-end (PCI passthrough, VM rental)")
    GENERAL = "general", _("General (vGPU slices, task hosting)")
    EDGE = "edge", _("Edge (small GPUs, inference)")


class GpuModel(models.Model):
    """A GPU model the cluster offers, with the Kubernetes resource it is requested by."""

    code = models.SlugField(max_length=32, unique=True, help_text=_("Short name customers use, e.g. A100."))
    name = models.CharField(max_length=100)
    resource_name = models.CharField(
        max_length=253,
        unique=True,
        help_text=_("Kubernetes extended resource, e.g. nvidia.com/GA100_A100_PCIE_80GB."),
    )
    memory_gib = models.PositiveIntegerField()
    pool = models.CharField(max_length=16, choices=Pool.choices)
    display_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["display_order", "code"]

    def __str__(self) -> str:
        return self.code


class Profile(models.TextChoices):
    AI_TRAINING = "ai_training", _("AI training")
    DATABASE = "database", _("Database")
    GENERAL = "general", _("General")


class HugepageSize(models.TextChoices):
    NONE = "", _("None")
    SIZE_2MI = "2Mi", "2 MiB"
    SIZE_1GI = "1Gi", "1 GiB"


class BillingMode(models.TextChoices):
    MONTHLY = "monthly", _("Monthly")
    YEARLY = "yearly", _("Yearly")
    ON_DEMAND = "on_demand", _("On demand (per second)")


class Plan(models.Model):
    """A GPU VM shape customers order. Its workload profile decides how the manifest is built."""

    code = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    profile = models.CharField(max_length=16, choices=Profile.choices)
    gpu_model = models.ForeignKey(GpuModel, null=True, blank=True, on_delete=models.PROTECT, related_name="plans")
    gpu_count = models.PositiveSmallIntegerField(default=0)
    sockets = models.PositiveSmallIntegerField(default=1)
    cores = models.PositiveSmallIntegerField()
    threads = models.PositiveSmallIntegerField(default=1)
    memory_gib = models.PositiveIntegerField()
    hugepage_size = models.CharField(max_length=4, choices=HugepageSize.choices, blank=True, default="")
    disk_gib = models.PositiveIntegerField(help_text=_("Root disk size."))
    data_disk_gib = models.PositiveIntegerField(default=0, help_text=_("Separate data disk (database profile)."))
    log_disk_gib = models.PositiveIntegerField(default=0, help_text=_("Separate log disk (database profile)."))
    cpu_overcommit = models.DecimalField(
        max_digits=3,
        decimal_places=2,
        default=Decimal("1.00"),
        help_text=_("Limit ÷ request for CPU; general profile only, at most 1.5."),
    )
    image = models.CharField(max_length=300, default="docker://quay.io/containerdisks/ubuntu:24.04")
    idle_release_minutes = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("On-demand VMs idle this long are released; empty for never.")
    )
    idle_gpu_percent = models.PositiveSmallIntegerField(
        default=5, help_text=_("GPU utilisation under this percent counts as idle.")
    )
    is_active = models.BooleanField(default=True)
    display_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["display_order", "code"]
        constraints = [
            models.CheckConstraint(condition=Q(threads__lte=2), name="plan_threads_at_most_2"),
            models.CheckConstraint(
                condition=Q(cpu_overcommit__gte=1) & Q(cpu_overcommit__lte=Decimal("1.5")),
                name="plan_cpu_overcommit_range",
            ),
            models.CheckConstraint(
                condition=Q(gpu_count=0) | Q(gpu_model__isnull=False), name="plan_gpus_need_a_model"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def hugepages_gib(self) -> int:
        return self.memory_gib if self.hugepage_size else 0

    @property
    def total_disk_gib(self) -> int:
        return self.disk_gib + self.data_disk_gib + self.log_disk_gib


class PlanPrice(models.Model):
    """One version of a plan's prices (CNY). Prices change by adding a version, never by editing one."""

    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="prices")
    effective_from = models.DateTimeField()
    monthly = models.DecimalField(max_digits=12, decimal_places=2)
    yearly = models.DecimalField(max_digits=12, decimal_places=2)
    hourly = models.DecimalField(max_digits=12, decimal_places=4, help_text=_("On-demand rate per hour."))
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["plan", "-effective_from"]
        constraints = [models.UniqueConstraint(fields=["plan", "effective_from"], name="plan_price_unique_version")]

    def __str__(self) -> str:
        return f"{self.plan.code} from {self.effective_from:%Y-%m-%d}"


class Node(models.Model):
    """A cluster node the portal may place work on (from the inventory file or the cluster)."""

    name = models.CharField(max_length=253, unique=True)
    pool = models.CharField(max_length=16, choices=Pool.choices)
    gpu_model = models.ForeignKey(GpuModel, null=True, blank=True, on_delete=models.PROTECT, related_name="nodes")
    gpus = models.PositiveSmallIntegerField(default=0)
    vgpu_slices_per_gpu = models.PositiveSmallIntegerField(
        default=1, help_text=_("vGPU overcommit on general nodes (1:4 to 1:8); 1 means passthrough only.")
    )
    cpus = models.PositiveIntegerField()
    memory_gib = models.PositiveIntegerField()
    hugepages_2mi_gib = models.PositiveIntegerField(default=0)
    hugepages_1gi_gib = models.PositiveIntegerField(default=0)
    dedicated = models.BooleanField(default=False, help_text=_("Reserved for database VMs (tainted)."))
    schedulable = models.BooleanField(default=True)
    labels = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["pool", "name"]

    def __str__(self) -> str:
        return self.name


class Placement(models.Model):
    """Capacity a VM (or task) holds on one node while it exists. Free capacity = node − active placements."""

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="placements")
    holder_type = models.CharField(max_length=32)
    holder_id = models.CharField(max_length=64)
    profile = models.CharField(max_length=16, blank=True)
    gpus = models.PositiveSmallIntegerField(default=0)
    gpu_slots = models.JSONField(
        default=list,
        blank=True,
        help_text=_("[[gpu index, slices held], …]; a whole GPU holds all the slices it offers."),
    )
    cpus = models.PositiveIntegerField(default=0)
    memory_gib = models.PositiveIntegerField(default=0)
    hugepage_size = models.CharField(max_length=4, choices=HugepageSize.choices, blank=True, default="")
    hugepages_gib = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["holder_type", "holder_id"],
                condition=Q(released_at__isnull=True),
                name="placement_one_active_per_holder",
            )
        ]
        indexes = [models.Index(fields=["node"], condition=Q(released_at__isnull=True), name="placement_active")]

    def __str__(self) -> str:
        return f"{self.holder_type} {self.holder_id} on {self.node_id}"


class VmState(models.TextChoices):
    QUEUED = "queued", _("Waiting for capacity")
    REQUESTED = "requested", _("Requested")
    PROVISIONING = "provisioning", _("Provisioning")
    STARTING = "starting", _("Starting")
    RUNNING = "running", _("Running")
    STOPPING = "stopping", _("Stopping")
    STOPPED = "stopped", _("Stopped")
    RELEASING = "releasing", _("Releasing")
    RELEASED = "released", _("Released")
    FAILED = "failed", _("Failed")


ACTIVE_VM_STATES = [
    VmState.REQUESTED,
    VmState.PROVISIONING,
    VmState.STARTING,
    VmState.RUNNING,
    VmState.STOPPING,
    VmState.STOPPED,
    VmState.RELEASING,
]


class VirtualMachine(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    order_id = models.UUIDField(default=uuid.uuid4, editable=False, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="vms")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="vms")
    name = models.CharField(max_length=40)
    billing_mode = models.CharField(max_length=16, choices=BillingMode.choices)
    state = models.CharField(max_length=16, choices=VmState.choices, default=VmState.REQUESTED, db_index=True)
    failure_reason = models.TextField(blank=True)
    ssh_public_keys = models.JSONField(default=list, help_text=_("Keys injected at order time."))
    ssh_key_names = models.JSONField(default=list)
    cloud_init_extra = models.TextField(blank=True)
    node_name = models.CharField(max_length=253, blank=True)
    ssh_host = models.CharField(max_length=253, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    ssh_user = models.CharField(max_length=32, default="ubuntu")
    jupyter_url = models.CharField(max_length=300, blank=True)
    jupyter_token_encrypted = models.TextField(blank=True)
    requested_at = models.DateTimeField(default=timezone.now)
    queued_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    running_since = models.DateTimeField(null=True, blank=True)
    idle_since = models.DateTimeField(null=True, blank=True)
    idle_warned_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-requested_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=~Q(state__in=["released", "failed"]),
                name="vm_unique_live_name_per_tenant",
            )
        ]
        indexes = [models.Index(fields=["tenant", "state"], name="vm_tenant_state")]

    def __str__(self) -> str:
        return self.name


class VmEvent(models.Model):
    """The VM's history as the customer sees it: each state change with its reason."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16)
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.vm_id}: {self.from_state} → {self.to_state}"


class LifecycleKind(models.TextChoices):
    STARTED = "started", _("Started (running and reachable)")
    STOPPED = "stopped", _("Stopped")
    RESIZED = "resized", _("Resized")
    RELEASED = "released", _("Released")


class LifecycleEvent(models.Model):
    """What billing meters VMs from. Written in one place (provisioning.lifecycle), once per event."""

    idempotency_key = models.CharField(max_length=120, unique=True)
    vm = models.ForeignKey(VirtualMachine, on_delete=models.PROTECT, related_name="lifecycle_events")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=16, choices=LifecycleKind.choices)
    at = models.DateTimeField()
    details = models.JSONField(default=dict)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.vm_id} at {self.at}"


class ScaleUpState(models.TextChoices):
    ACTIVE = "active", _("Active")
    REVERTED = "reverted", _("Reverted")


class ScaleUp(models.Model):
    """Extra GPUs, vCPUs or memory on a subscribed VM for N days; reverts by itself at its end."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.PROTECT, related_name="scale_ups")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    extra_gpus = models.PositiveSmallIntegerField(default=0)
    extra_vcpus = models.PositiveSmallIntegerField(default=0)
    extra_memory_gib = models.PositiveIntegerField(default=0)
    days = models.PositiveSmallIntegerField()
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    state = models.CharField(max_length=16, choices=ScaleUpState.choices, default=ScaleUpState.ACTIVE)
    reverted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-starts_at"]

    def __str__(self) -> str:
        return f"scale-up of {self.vm_id} until {self.ends_at:%Y-%m-%d}"


class LocalClusterVm(models.Model):
    """The local backend's stand-in for the cluster's own state of one VM (embedded default and tests).

    The portal's VirtualMachine row is what the customer ordered; this row is what "the cluster"
    has, so the reconciler can find drift between the two exactly as with a real cluster.
    """

    namespace = models.CharField(max_length=63)
    name = models.CharField(max_length=63)
    vm_label = models.CharField(max_length=64, help_text=_("The portal VM id the objects are labelled with."))
    manifests = models.JSONField(default=list)
    node_name = models.CharField(max_length=253, blank=True)
    running = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    phase_since = models.DateTimeField(default=timezone.now)
    provisioned = models.BooleanField(default=False)
    failure = models.TextField(blank=True, help_text=_("Set to make the VM fail (tests, demos of failure)."))
    gpu_utilisation_percent = models.FloatField(default=0.0)
    ssh_port = models.PositiveIntegerField()
    jupyter_token = models.CharField(max_length=128, blank=True, help_text=_("As the cluster's Secret holds it."))
    jupyter_port = models.PositiveIntegerField(null=True, blank=True)
    jupyter_pid = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["namespace", "name"], name="local_vm_unique_name")]

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"
