from django.db import models
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
