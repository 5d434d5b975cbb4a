"""Billing: the price book, the tamper-evident usage log, the ledger, invoices, payments, subscriptions.

Money is Decimal CNY with 2 places; quantities and unrounded amounts are exact decimals
(ExactDecimalField). Rounding to the fen happens once per invoice line (ROUND_HALF_UP), and the
ledger posts exactly the rounded line amounts, so invoice, ledger and statements agree to the fen.
"""

import uuid
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import get_language
from django.utils.translation import gettext_lazy as _

from billing.fields import ExactDecimalField

GENESIS_HASH = "0" * 64
QUANTITY_PLACES = 9
UNROUNDED_PLACES = 20


def _zh() -> bool:
    return (get_language() or "").startswith("zh")


class AppendOnlyModel(models.Model):
    """Rows are written once. PostgreSQL triggers refuse UPDATE and DELETE in the database too."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise ValidationError(f"{self._meta.verbose_name} rows are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValidationError(f"{self._meta.verbose_name} rows are append-only.")


# --- Price book --------------------------------------------------------------------------------


class PriceBookVersion(AppendOnlyModel):
    """One version of the price book. Prices change by adding a version with a later
    effective date; a version is never edited. The version in force at a moment is the
    latest whose effective_from is not after it."""

    effective_from = models.DateTimeField(unique=True)
    note = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-effective_from"]

    def __str__(self) -> str:
        return f"price book from {self.effective_from:%Y-%m-%d %H:%M}"


class PriceItem(AppendOnlyModel):
    """One rate of a price book version, e.g. task_gpu_hour:A100 at 50.00 per GPU-hour."""

    version = models.ForeignKey(PriceBookVersion, on_delete=models.PROTECT, related_name="items")
    code = models.CharField(max_length=64)
    unit = models.CharField(max_length=32)
    unit_price = models.DecimalField(max_digits=16, decimal_places=6)
    set_by_staff = models.BooleanField(
        default=False, help_text=_("Not a published list price: staff set it (e.g. H100 GPU-hours).")
    )
    label_en = models.CharField(max_length=120)
    label_zh = models.CharField(max_length=120)

    class Meta:
        ordering = ["version", "code"]
        constraints = [
            models.UniqueConstraint(fields=["version", "code"], name="price_item_unique_code"),
            models.CheckConstraint(condition=Q(unit_price__gte=0), name="price_item_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.code} {self.unit_price}"

    @property
    def label(self) -> str:
        return self.label_zh if _zh() else self.label_en


class VolumeBand(AppendOnlyModel):
    """A band of the month's task-hosting GPU-hours and its discount, graduated: only the hours
    inside the band get its discount."""

    version = models.ForeignKey(PriceBookVersion, on_delete=models.PROTECT, related_name="bands")
    from_hours = models.DecimalField(max_digits=14, decimal_places=3)
    to_hours = models.DecimalField(max_digits=14, decimal_places=3, null=True, blank=True)
    discount_percent = models.DecimalField(max_digits=5, decimal_places=2)

    class Meta:
        ordering = ["version", "from_hours"]
        constraints = [models.UniqueConstraint(fields=["version", "from_hours"], name="volume_band_unique_start")]

    def __str__(self) -> str:
        return f"{self.from_hours}–{self.to_hours or '∞'} h: {self.discount_percent}%"


class PackageOffer(AppendOnlyModel):
    """A compute package on sale in one price book version: pay `price`, get price + bonus credit,
    spendable on task hosting until it expires."""

    version = models.ForeignKey(PriceBookVersion, on_delete=models.PROTECT, related_name="packages")
    code = models.SlugField(max_length=32)
    name_en = models.CharField(max_length=100)
    name_zh = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=14, decimal_places=2)
    bonus_percent = models.DecimalField(max_digits=5, decimal_places=2)
    min_validity_months = models.PositiveSmallIntegerField(default=3)
    max_validity_months = models.PositiveSmallIntegerField(default=12)
    default_validity_months = models.PositiveSmallIntegerField(default=12)

    class Meta:
        ordering = ["version", "price"]
        constraints = [models.UniqueConstraint(fields=["version", "code"], name="package_offer_unique_code")]

    def __str__(self) -> str:
        return self.name_en

    @property
    def name(self) -> str:
        return self.name_zh if _zh() else self.name_en

    @property
    def bonus(self) -> Decimal:
        from billing.money import to_fen

        return to_fen(self.price * self.bonus_percent / 100)

    @property
    def credit(self) -> Decimal:
        return self.price + self.bonus


# --- Usage log ---------------------------------------------------------------------------------


class UsageSource(models.TextChoices):
    TASK = "task", _("Task hosting")
    VM = "vm", _("On-demand VM")
    STORAGE = "storage", _("Storage")
    SCALE_UP = "scale_up", _("Elastic scale-up")


class UsageChainHead(models.Model):
    """The end of one tenant's usage chain. Appending locks this row, so records of a tenant get
    consecutive sequence numbers and each carries the hash of the one before."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.PROTECT, related_name="usage_chain_head")
    last_sequence = models.BigIntegerField(default=0)
    last_hash = models.CharField(max_length=64, default=GENESIS_HASH)

    def __str__(self) -> str:
        return f"usage chain of {self.tenant_id} at {self.last_sequence}"


class UsageRecord(AppendOnlyModel):
    """One metered quantity of one resource over [period_start, period_end). Append-only and
    chained: `hash` is SHA-256 over the canonical serialisation of the fields and `prev_hash`
    (billing.hashing), so an edited, deleted or reordered record is detected."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="usage_records")
    sequence = models.BigIntegerField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    source = models.CharField(max_length=16, choices=UsageSource.choices)
    source_id = models.CharField(max_length=64)
    resource = models.CharField(max_length=64)
    unit = models.CharField(max_length=32)
    quantity = ExactDecimalField(max_digits=30, decimal_places=QUANTITY_PLACES)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    meta = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["tenant", "sequence"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "sequence"], name="usage_record_unique_sequence"),
        ]
        indexes = [models.Index(fields=["tenant", "period_start"], name="usage_tenant_period")]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.resource} {self.quantity}"


# --- Wallet, credit grants, ledger -------------------------------------------------------------


class Wallet(models.Model):
    """A tenant's money. Balances are sums of ledger entries; `cash_balance` is a cache kept in
    the same transaction as each entry (check_wallet_balances proves it). Every charge locks this
    row, so concurrent charges never overdraw or double-spend."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.PROTECT, related_name="wallet")
    cash_balance = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0.00"))
    credit_limit = models.DecimalField(
        max_digits=14,
        decimal_places=2,
        default=Decimal("0.00"),
        help_text=_("How far cash may go below zero for pay-as-you-go usage (staff set it)."),
    )
    low_balance_threshold = models.DecimalField(max_digits=14, decimal_places=2, null=True, blank=True)
    low_balance_warned_at = models.DateTimeField(null=True, blank=True)
    credit_exhausted_at = models.DateTimeField(null=True, blank=True)
    rated_sequence = models.BigIntegerField(default=0, help_text=_("Usage records up to here have been rated."))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(credit_limit__gte=0), name="wallet_credit_limit_not_negative")
        ]

    def __str__(self) -> str:
        return f"wallet of {self.tenant_id}"


class CreditGrant(models.Model):
    """Prepaid package credit (price + bonus) that expires. Spent on task hosting only, earliest
    expiry first; `remaining` is a cache of the sum of its ledger entries."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="credit_grants")
    payment = models.OneToOneField("Payment", null=True, blank=True, on_delete=models.PROTECT, related_name="grant")
    offer = models.ForeignKey(PackageOffer, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    name = models.CharField(max_length=100)
    granted = models.DecimalField(max_digits=14, decimal_places=2)
    remaining = models.DecimalField(max_digits=14, decimal_places=2)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)
    written_off_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["expires_at", "id"]
        constraints = [models.CheckConstraint(condition=Q(remaining__gte=0), name="credit_grant_not_negative")]
        indexes = [models.Index(fields=["tenant", "expires_at"], name="grant_tenant_expiry")]

    def __str__(self) -> str:
        return f"{self.name} ({self.remaining} left)"


class LedgerKind(models.TextChoices):
    TOP_UP = "top_up", _("Top-up")
    PACKAGE_GRANT = "package_grant", _("Package credit")
    BONUS = "bonus", _("Bonus credit")
    CHARGE = "charge", _("Charge")
    REFUND = "refund", _("Refund")
    EXPIRY_WRITE_OFF = "expiry_write_off", _("Expired credit written off")
    ADJUSTMENT = "adjustment", _("Staff adjustment")


class LedgerEntry(AppendOnlyModel):
    """One movement of money in one bucket: cash (grant is null) or one package grant."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="ledger_entries")
    kind = models.CharField(max_length=20, choices=LedgerKind.choices)
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    reason = models.TextField()
    reference = models.CharField(max_length=120)
    invoice_line = models.ForeignKey(
        "InvoiceLine", null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries"
    )
    payment = models.ForeignKey("Payment", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="ledger_tenant_time")]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount}"


# --- Invoices ----------------------------------------------------------------------------------


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft", _("Open (this month)")
    FINAL = "final", _("Final")


class Invoice(models.Model):
    """A tenant's charges of one calendar month in its time zone. Lines accumulate while it is a
    draft; once final (after the grace window) it never changes and late usage goes to the next."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="invoices")
    period_start = models.DateField(help_text=_("First day of the month."))
    period_end = models.DateField(help_text=_("First day of the next month (exclusive)."))
    time_zone = models.CharField(max_length=64)
    status = models.CharField(max_length=8, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT)
    number = models.CharField(max_length=32, blank=True)
    total = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0.00"))
    created_at = models.DateTimeField(default=timezone.now)
    finalised_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "period_start"], name="invoice_one_per_month"),
            models.UniqueConstraint(fields=["number"], condition=~Q(number=""), name="invoice_unique_number"),
        ]

    def __str__(self) -> str:
        return self.number or f"draft {self.period_start:%Y-%m} of {self.tenant_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            stored = Invoice.objects.filter(pk=self.pk).values_list("status", flat=True).first()
            if stored == InvoiceStatus.FINAL:
                raise ValidationError("A final invoice never changes.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValidationError("Invoices are never deleted.")

    @property
    def is_final(self) -> bool:
        return self.status == InvoiceStatus.FINAL


class LineKind(models.TextChoices):
    TASK = "task", _("Task hosting")
    VM_ON_DEMAND = "vm_on_demand", _("On-demand VM")
    SUBSCRIPTION = "subscription", _("VM subscription")
    SCALE_UP = "scale_up", _("Elastic scale-up")
    STORAGE = "storage", _("Storage")
    ONE_OFF = "one_off", _("One-off charge")


class InvoiceLine(models.Model):
    """One charge line: a resource at one unit price and discount. `amount` is the unrounded
    amount rounded once (ROUND_HALF_UP); the ledger posts exactly it."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="lines")
    key = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=LineKind.choices)
    resource = models.CharField(max_length=64)
    description_en = models.CharField(max_length=200)
    description_zh = models.CharField(max_length=200)
    unit = models.CharField(max_length=32, help_text=_("Unit the price is per, e.g. gpu_hour."))
    unit_price = models.DecimalField(max_digits=16, decimal_places=6)
    discount_percent = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal("0"))
    metered_unit = models.CharField(max_length=32, help_text=_("Unit of the quantity, e.g. gpu_second."))
    per_unit = models.PositiveIntegerField(default=1, help_text=_("Metered units in one priced unit, e.g. 3600."))
    quantity = ExactDecimalField(max_digits=30, decimal_places=QUANTITY_PLACES, default=Decimal("0"))
    amount_unrounded = ExactDecimalField(max_digits=40, decimal_places=UNROUNDED_PLACES, default=Decimal("0"))
    amount = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0.00"))
    package_eligible = models.BooleanField(default=False, help_text=_("Paid from package credit first."))

    class Meta:
        ordering = ["invoice", "kind", "resource", "id"]
        constraints = [models.UniqueConstraint(fields=["invoice", "key"], name="invoice_line_unique_key")]

    def __str__(self) -> str:
        return self.description_en

    def save(self, *args, **kwargs):
        status = Invoice.objects.filter(pk=self.invoice_id).values_list("status", flat=True).first()
        if status == InvoiceStatus.FINAL:
            raise ValidationError("A final invoice never changes.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValidationError("Invoice lines are never deleted.")

    @property
    def description(self) -> str:
        return self.description_zh if _zh() else self.description_en

    @property
    def billed_quantity(self) -> Decimal:
        """The quantity in the priced unit (e.g. GPU-hours), for display."""
        from billing.money import in_priced_units

        return in_priced_units(self.quantity, self.per_unit)

    def exact_amount(self, quantity: Decimal) -> Decimal:
        from billing.money import exact_amount

        return exact_amount(quantity, self.unit_price, self.discount_percent, self.per_unit)


class ChargeDay(models.Model):
    """What one invoice line accrued on one day (tenant's time zone): the statement's rows."""

    line = models.ForeignKey(InvoiceLine, on_delete=models.PROTECT, related_name="days")
    day = models.DateField()
    quantity = ExactDecimalField(max_digits=30, decimal_places=QUANTITY_PLACES, default=Decimal("0"))
    amount_unrounded = ExactDecimalField(max_digits=40, decimal_places=UNROUNDED_PLACES, default=Decimal("0"))

    class Meta:
        ordering = ["line", "day"]
        constraints = [models.UniqueConstraint(fields=["line", "day"], name="charge_day_unique")]

    def __str__(self) -> str:
        return f"{self.line_id} {self.day}"


# --- Payments ----------------------------------------------------------------------------------


class PaymentKind(models.TextChoices):
    PACKAGE = "package", _("Compute package")
    TOP_UP = "top_up", _("Top-up")


class PaymentStatus(models.TextChoices):
    PENDING = "pending", _("Waiting for payment")
    SUCCEEDED = "succeeded", _("Paid")
    CANCELLED = "cancelled", _("Cancelled")


class Payment(models.Model):
    """Money a tenant pays us through a provider (offline bank transfer, Stripe). Credited once,
    by payment_fulfil, whatever the number of times the provider reports it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    reference = models.CharField(max_length=20, unique=True, help_text=_("Quote this on a bank transfer."))
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="payments")
    kind = models.CharField(max_length=16, choices=PaymentKind.choices)
    offer = models.ForeignKey(PackageOffer, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    validity_months = models.PositiveSmallIntegerField(null=True, blank=True)
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    bonus_amount = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0.00"))
    provider = models.CharField(max_length=32)
    provider_reference = models.CharField(max_length=200, blank=True)
    checkout_url = models.URLField(max_length=1000, blank=True)
    instructions = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=PaymentStatus.choices, default=PaymentStatus.PENDING)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    fulfilled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "provider"], name="payment_status_provider")]

    def __str__(self) -> str:
        return f"{self.reference} {self.amount}"


class PaymentEvent(models.Model):
    """A provider's report that a payment succeeded. Unique per provider event id: a replayed
    webhook or a double-clicked confirmation is recorded once and credits nothing again."""

    provider = models.CharField(max_length=32)
    event_id = models.CharField(max_length=200)
    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="events")
    received_at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "event_id"], name="payment_event_unique")]

    def __str__(self) -> str:
        return f"{self.provider}:{self.event_id}"


# --- Subscriptions -----------------------------------------------------------------------------


class SubscriptionStatus(models.TextChoices):
    ACTIVE = "active", _("Active")
    PAST_DUE = "past_due", _("Renewal unpaid")
    ENDED = "ended", _("Ended")


class Subscription(models.Model):
    """A monthly or yearly VM, charged per period in advance at the plan price in force."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="subscriptions")
    vm = models.OneToOneField("provisioning.VirtualMachine", on_delete=models.PROTECT, related_name="subscription")
    plan = models.ForeignKey("provisioning.Plan", on_delete=models.PROTECT, related_name="+")
    billing_mode = models.CharField(max_length=16)
    status = models.CharField(max_length=16, choices=SubscriptionStatus.choices, default=SubscriptionStatus.ACTIVE)
    cancel_at_period_end = models.BooleanField(default=False)
    started_at = models.DateTimeField()
    current_period_start = models.DateTimeField()
    current_period_end = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["status", "current_period_end"], name="subscription_due")]

    def __str__(self) -> str:
        return f"{self.plan_id} {self.billing_mode} for {self.vm_id}"


class SubscriptionCharge(models.Model):
    """One paid period of a subscription; unique per period, so a period is charged once."""

    subscription = models.ForeignKey(Subscription, on_delete=models.PROTECT, related_name="charges")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    list_price = models.DecimalField(max_digits=14, decimal_places=2)
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    is_renewal = models.BooleanField(default=False)
    invoice_line = models.ForeignKey(InvoiceLine, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["subscription", "period_start"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "period_start"], name="subscription_charge_once")
        ]

    def __str__(self) -> str:
        return f"{self.subscription_id} {self.period_start:%Y-%m-%d}"
