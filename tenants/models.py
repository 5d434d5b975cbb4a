from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy


class UserManager(BaseUserManager):
    use_in_migrations = True

    def _create_user(self, email, password, **extra):
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email, password=None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email, password=None, **extra):
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self._create_user(email, password, **extra)


class User(AbstractUser):
    """A person. Logs in with an email address; belongs to tenants through memberships."""

    username = None
    email = models.EmailField(_("email address"), unique=True)
    display_name = models.CharField(_("display name"), max_length=150, blank=True)
    language = models.CharField(_("language"), max_length=10, choices=settings.LANGUAGES, blank=True, default="")

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    def __str__(self) -> str:
        return self.display_name or self.email


class Role(models.TextChoices):
    OWNER = "owner", _("Owner")
    ADMIN = "admin", _("Admin")
    MEMBER = "member", _("Member")
    BILLING = "billing", pgettext_lazy("role", "Billing")
    VIEWER = "viewer", _("Viewer")


class TierCode(models.TextChoices):
    STANDARD = "standard", _("Standard")
    GOLD = "gold", _("Gold")
    DIAMOND = "diamond", _("Diamond")


class Tier(models.Model):
    """A customer tier and its benefits (DESIGN.md section 4). Seeded as data."""

    code = models.CharField(max_length=16, choices=TierCode.choices, unique=True)
    rank = models.PositiveSmallIntegerField(unique=True, help_text=_("Higher ranks schedule first."))
    name_en = models.CharField(max_length=50)
    name_zh = models.CharField(max_length=50)
    upgrade_rule_en = models.TextField(blank=True)
    upgrade_rule_zh = models.TextField(blank=True)
    benefits_en = models.JSONField(default=list, help_text=_("List of benefit lines, English."))
    benefits_zh = models.JSONField(default=list, help_text=_("List of benefit lines, Chinese."))
    support_level = models.CharField(max_length=20)
    account_manager_kind = models.CharField(max_length=20, blank=True)
    usage_review_months = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text=_("Months between usage reviews; empty for none.")
    )
    storage_discount_percent = models.PositiveSmallIntegerField(default=0)
    free_storage_gib = models.PositiveIntegerField(default=0)
    yearly_renewal_percent = models.PositiveSmallIntegerField(
        default=100, help_text=_("Yearly renewal price as a percent of list.")
    )
    # Default quotas for tenants of this tier.
    default_vcpus = models.PositiveIntegerField()
    default_memory_gib = models.PositiveIntegerField()
    default_hugepages_gib = models.PositiveIntegerField()
    default_vms = models.PositiveIntegerField()
    default_concurrent_tasks = models.PositiveIntegerField()
    default_storage_gib = models.PositiveIntegerField()
    default_gpus = models.JSONField(
        default=dict, help_text=_('GPU model code → default number of GPUs, e.g. {"A100": 2}.')
    )

    class Meta:
        ordering = ["rank"]

    def __str__(self) -> str:
        return self.name_en

    @property
    def name(self) -> str:
        from django.utils.translation import get_language

        return self.name_zh if (get_language() or "").startswith("zh") else self.name_en

    @property
    def benefits(self) -> list[str]:
        from django.utils.translation import get_language

        return self.benefits_zh if (get_language() or "").startswith("zh") else self.benefits_en

    @property
    def upgrade_rule(self) -> str:
        from django.utils.translation import get_language

        return self.upgrade_rule_zh if (get_language() or "").startswith("zh") else self.upgrade_rule_en


class TenantKind(models.TextChoices):
    PERSONAL = "personal", _("Personal")
    ORGANISATION = "organisation", _("Organisation")


class Tenant(models.Model):
    """The unit that owns resources, quotas, money and audit history."""

    slug = models.SlugField(max_length=50, unique=True)
    name = models.CharField(_("name"), max_length=100)
    kind = models.CharField(max_length=16, choices=TenantKind.choices, default=TenantKind.ORGANISATION)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="tenants")
    time_zone = models.CharField(max_length=64, default="Asia/Shanghai")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class InvitationStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    ACCEPTED = "accepted", _("Accepted")
    REVOKED = "revoked", _("Revoked")


class Invitation(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices)
    # Only the SHA-256 of the link's secret is kept; the link itself is emailed once.
    key_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=InvitationStatus.choices, default=InvitationStatus.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    accepted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "email"],
                condition=Q(status="pending"),
                name="invitation_one_pending_per_email",
            )
        ]

    def __str__(self) -> str:
        return f"{self.email} → {self.tenant}"

    @property
    def is_expired(self) -> bool:
        return timezone.now() >= self.expires_at


class TenantQuota(models.Model):
    """Limits of one tenant. GPU limits per model live in GpuQuota rows."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota")
    vcpus = models.PositiveIntegerField(_("vCPUs"))
    memory_gib = models.PositiveIntegerField(_("memory (GiB)"))
    hugepages_gib = models.PositiveIntegerField(_("hugepages (GiB)"))
    vms = models.PositiveIntegerField(_("virtual machines"))
    concurrent_tasks = models.PositiveIntegerField(_("concurrent tasks"))
    storage_gib = models.PositiveIntegerField(_("storage (GiB)"))
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"quota of {self.tenant}"


class GpuQuota(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="gpu_quotas")
    gpu_model = models.ForeignKey("provisioning.GpuModel", on_delete=models.PROTECT, related_name="+")
    limit = models.PositiveIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "gpu_model"], name="gpu_quota_unique_model")]

    def __str__(self) -> str:
        return f"{self.limit} × {self.gpu_model_id} for tenant {self.tenant_id}"


class QuotaReservation(models.Model):
    """Resources held against a tenant's quota by one VM or task while it exists.

    Current use of a quota is the sum of the tenant's active (unreleased)
    reservations, so reserving and releasing is the one place quota is enforced.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_reservations")
    holder_type = models.CharField(max_length=32, help_text=_("What holds it, e.g. vm or task."))
    holder_id = models.CharField(max_length=64)
    gpu_model = models.ForeignKey(
        "provisioning.GpuModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    gpus = models.PositiveIntegerField(default=0)
    vcpus = models.PositiveIntegerField(default=0)
    memory_gib = models.PositiveIntegerField(default=0)
    hugepages_gib = models.PositiveIntegerField(default=0)
    vms = models.PositiveIntegerField(default=0)
    tasks = models.PositiveIntegerField(default=0)
    storage_gib = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["holder_type", "holder_id"],
                condition=Q(released_at__isnull=True),
                name="reservation_one_active_per_holder",
            )
        ]
        indexes = [models.Index(fields=["tenant"], condition=Q(released_at__isnull=True), name="reservation_active")]

    def __str__(self) -> str:
        return f"{self.holder_type} {self.holder_id}"


class SshKey(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="ssh_keys")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys")
    name = models.CharField(_("name"), max_length=100)
    public_key = models.TextField(_("public key"))
    key_type = models.CharField(max_length=32)
    bits = models.PositiveIntegerField()
    fingerprint = models.CharField(max_length=80)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "fingerprint"], name="ssh_key_unique_fingerprint"),
            models.UniqueConstraint(fields=["tenant", "name"], name="ssh_key_unique_name"),
        ]

    def __str__(self) -> str:
        return self.name


class ApiToken(models.Model):
    """A personal API token of one user in one tenant. Only its hash is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(_("name"), max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    token_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class AuditEvent(models.Model):
    """One state change. Append-only: the model refuses updates and deletes, and on
    PostgreSQL a trigger refuses them in the database too."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_label = models.CharField(max_length=254, help_text=_("Email of the actor, or 'system'."))
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events")
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    via = models.CharField(max_length=16, blank=True, help_text=_("web, api, console or system"))

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="audit_tenant_time")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise ValidationError("Audit events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValidationError("Audit events are append-only.")
