from rest_framework import serializers

from billing.hashing import HASHED_FIELDS
from billing.models import (
    Invoice,
    InvoiceLine,
    LedgerEntry,
    PackageOffer,
    Payment,
    PriceItem,
    Subscription,
    UsageRecord,
    VolumeBand,
)
from billing.selectors import GRANULARITIES

MONEY = {"max_digits": 14, "decimal_places": 2, "coerce_to_string": True}


class PriceItemSerializer(serializers.ModelSerializer):
    label = serializers.CharField(read_only=True, help_text="What the price is for, in the request's language.")

    class Meta:
        model = PriceItem
        fields = ["code", "label", "unit", "unit_price", "set_by_staff"]
        extra_kwargs = {
            "code": {"help_text": "Stable code, e.g. task_gpu_hour:A100, storage_gib_day, scale_up_cpu_core_day."},
            "unit": {
                "help_text": "What one unit is: gpu_hour, core_hour, gib_hour, gpu_day, core_day, gib_day, month."
            },
            "unit_price": {"help_text": "CNY per unit (may have more than 2 places; amounts round per line)."},
            "set_by_staff": {"help_text": "True where staff set the price instead of the published list (e.g. H100)."},
        }


class VolumeBandSerializer(serializers.ModelSerializer):
    class Meta:
        model = VolumeBand
        fields = ["from_hours", "to_hours", "discount_percent"]
        extra_kwargs = {
            "from_hours": {"help_text": "Band start in the calendar month's task GPU-hours (inclusive)."},
            "to_hours": {"help_text": "Band end (exclusive); null for no upper end."},
            "discount_percent": {"help_text": "Discount on the GPU-hours inside this band only (graduated)."},
        }


class PackageOfferSerializer(serializers.ModelSerializer):
    name = serializers.CharField(read_only=True, help_text="Package name in the request's language.")
    bonus = serializers.DecimalField(read_only=True, **MONEY, help_text="Bonus credit added on top of the price, CNY.")
    credit = serializers.DecimalField(read_only=True, **MONEY, help_text="Credit you get: price + bonus, CNY.")

    class Meta:
        model = PackageOffer
        fields = [
            "id",
            "code",
            "name",
            "price",
            "bonus_percent",
            "bonus",
            "credit",
            "min_validity_months",
            "max_validity_months",
            "default_validity_months",
        ]
        extra_kwargs = {
            "id": {"help_text": "Package id, for purchase."},
            "code": {"help_text": "Stable code, e.g. pkg-5000."},
            "price": {"help_text": "What you pay, CNY."},
            "bonus_percent": {"help_text": "Bonus credit as a percent of the price."},
            "min_validity_months": {"help_text": "Shortest validity you may choose."},
            "max_validity_months": {"help_text": "Longest validity you may choose."},
            "default_validity_months": {"help_text": "Validity when you do not choose."},
        }


class PriceBookPlanSerializer(serializers.Serializer):
    plan = serializers.CharField(help_text="Plan code (see plans/).")
    name = serializers.CharField(help_text="Plan name.")
    monthly = serializers.DecimalField(**MONEY, help_text="Monthly subscription, CNY per month.")
    yearly = serializers.DecimalField(**MONEY, help_text="Yearly subscription, CNY per year (list price).")
    hourly = serializers.DecimalField(
        max_digits=16, decimal_places=4, coerce_to_string=True, help_text="On-demand, CNY per hour, billed per second."
    )


class PriceBookSerializer(serializers.Serializer):
    effective_from = serializers.DateTimeField(help_text="When this version of the price book took effect.")
    items = PriceItemSerializer(many=True, help_text="Unit prices: task hosting, scale-ups, storage, support.")
    bands = VolumeBandSerializer(many=True, help_text="Volume discount bands on the month's task GPU-hours.")
    packages = PackageOfferSerializer(many=True, help_text="Compute packages on sale.")
    plans = PriceBookPlanSerializer(many=True, help_text="VM plan prices in force (provisioning's plan prices).")


class PurchaseSerializer(serializers.Serializer):
    validity_months = serializers.IntegerField(
        required=False, min_value=1, max_value=36, help_text="Months the credit stays valid (3–12; default 12)."
    )


class TopUpSerializer(serializers.Serializer):
    amount = serializers.DecimalField(max_digits=14, decimal_places=2, help_text="CNY to add to your balance.")


class PaymentSerializer(serializers.ModelSerializer):
    package = serializers.CharField(
        source="offer.code", default=None, read_only=True, help_text="Package code, for package payments."
    )

    class Meta:
        model = Payment
        fields = [
            "id",
            "reference",
            "kind",
            "package",
            "validity_months",
            "amount",
            "bonus_amount",
            "provider",
            "status",
            "checkout_url",
            "instructions",
            "created_at",
            "fulfilled_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Payment id."},
            "reference": {"help_text": "Quote this reference on a bank transfer."},
            "kind": {"help_text": "package or top_up."},
            "validity_months": {"help_text": "Package validity chosen, months."},
            "amount": {"help_text": "What to pay, CNY."},
            "bonus_amount": {"help_text": "Bonus credit granted with the package, CNY."},
            "provider": {"help_text": "offline (bank transfer confirmed by staff) or stripe."},
            "status": {"help_text": "pending, succeeded or cancelled."},
            "checkout_url": {
                "help_text": "Hosted checkout to pay at (card/Alipay/WeChat providers); empty for bank transfer."
            },
            "instructions": {
                "help_text": "Bank transfer details: account_name, bank_name, account_number, amount, reference."
            },
            "created_at": {"help_text": "When it was ordered."},
            "fulfilled_at": {"help_text": "When the money arrived and was credited."},
        }


class PackageBalanceSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="Package credit id.")
    name = serializers.CharField(help_text="Package name.")
    granted = serializers.DecimalField(**MONEY, help_text="Credit granted (price + bonus), CNY.")
    remaining = serializers.DecimalField(**MONEY, help_text="Credit left, CNY.")
    expires_at = serializers.DateTimeField(help_text="After this what is left is written off.")


class WalletSerializer(serializers.Serializer):
    cash_balance = serializers.DecimalField(**MONEY, help_text="Cash balance, CNY; negative when credit is in use.")
    credit_limit = serializers.DecimalField(**MONEY, help_text="How far cash may go below zero (pay-as-you-go).")
    package_balance = serializers.DecimalField(**MONEY, help_text="Package credit left, all packages, CNY.")
    packages = PackageBalanceSerializer(
        many=True, help_text="Each unexpired package with credit left, earliest expiry first."
    )
    balance = serializers.DecimalField(**MONEY, help_text="Cash + package credit, CNY.")
    available_for_tasks = serializers.DecimalField(
        **MONEY, help_text="What task hosting may still spend: package credit + cash + credit limit."
    )
    available_for_vms = serializers.DecimalField(**MONEY, help_text="What VMs may still spend: cash + credit limit.")
    reserved = serializers.DecimalField(
        **MONEY,
        help_text="Estimate held by running tasks and on-demand VMs: used but not billed yet, plus the next hour.",
    )
    daily_burn = serializers.DecimalField(**MONEY, help_text="Average charges per day over the last 7 days, CNY.")
    days_left = serializers.IntegerField(
        allow_null=True, help_text="At the last 7 days' rate, days until credit runs out; null without spending."
    )
    low_balance_threshold = serializers.DecimalField(
        allow_null=True,
        **MONEY,
        help_text="You are warned (email, dashboard) when balance falls below it; null for never.",
    )
    low_balance = serializers.BooleanField(help_text="True while the balance is below the threshold.")
    credit_exhausted = serializers.BooleanField(
        help_text="True when cash + credit limit is used up: on-demand VMs stop."
    )


class WalletUpdateSerializer(serializers.Serializer):
    low_balance_threshold = serializers.DecimalField(
        max_digits=14, decimal_places=2, allow_null=True, help_text="CNY; null to turn the warning off."
    )


class LedgerEntrySerializer(serializers.ModelSerializer):
    package = serializers.IntegerField(
        source="grant_id", allow_null=True, read_only=True, help_text="Package credit id, or null for cash."
    )
    invoice = serializers.IntegerField(
        source="invoice_line.invoice_id", default=None, read_only=True, help_text="Invoice the charge is on."
    )

    class Meta:
        model = LedgerEntry
        fields = ["id", "created_at", "kind", "amount", "package", "reason", "reference", "invoice"]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Entry id."},
            "created_at": {"help_text": "When the money moved."},
            "kind": {"help_text": "top_up, package_grant, bonus, charge, refund, expiry_write_off or adjustment."},
            "amount": {"help_text": "Signed CNY: positive adds, negative takes."},
            "reason": {"help_text": "Why the money moved."},
            "reference": {"help_text": "What it refers to, e.g. invoice-line:12 or payment:GP-…"},
        }


class InvoiceLineSerializer(serializers.ModelSerializer):
    description = serializers.CharField(read_only=True, help_text="What the line charges, in the request's language.")
    billed_quantity = serializers.DecimalField(
        max_digits=30,
        decimal_places=6,
        coerce_to_string=True,
        read_only=True,
        help_text="quantity in the priced unit (e.g. GPU-hours), for reading; amounts use the exact quantity.",
    )

    class Meta:
        model = InvoiceLine
        fields = [
            "id",
            "kind",
            "resource",
            "description",
            "unit",
            "unit_price",
            "discount_percent",
            "metered_unit",
            "per_unit",
            "quantity",
            "billed_quantity",
            "amount_unrounded",
            "amount",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Line id."},
            "metered_unit": {"help_text": "Unit of quantity, e.g. gpu_second (usage is metered per second)."},
            "per_unit": {"help_text": "Metered units in one priced unit, e.g. 3600 GPU-seconds in a GPU-hour."},
            "kind": {"help_text": "task, vm_on_demand, subscription, scale_up, storage or one_off."},
            "resource": {"help_text": "Metered resource, e.g. gpu:A100."},
            "unit": {"help_text": "Unit the price is per, e.g. gpu_hour."},
            "unit_price": {"help_text": "CNY per unit."},
            "discount_percent": {"help_text": "Discount applied to this line (volume band or tier)."},
            "quantity": {"help_text": "Quantity charged, in metered units."},
            "amount_unrounded": {
                "help_text": "Exact amount before rounding: quantity × unit_price × (1 − discount) ÷ per_unit."
            },
            "amount": {"help_text": "amount_unrounded rounded half up to the fen, once."},
        }


class InvoiceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Invoice
        fields = ["id", "number", "period_start", "period_end", "time_zone", "status", "total", "finalised_at"]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Invoice id."},
            "number": {"help_text": "Invoice number; empty while the month is open."},
            "period_start": {"help_text": "First day of the month."},
            "period_end": {"help_text": "First day of the next month (exclusive)."},
            "time_zone": {"help_text": "Time zone the month is counted in."},
            "status": {"help_text": "draft while the month (and its grace window) is open, then final."},
            "total": {"help_text": "Sum of the lines' amounts, CNY."},
            "finalised_at": {"help_text": "When it became final; it never changes after."},
        }


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True, help_text="The charge lines.")
    paid_from_packages = serializers.DecimalField(
        read_only=True, **MONEY, help_text="Part paid from package credit, CNY."
    )
    paid_from_balance = serializers.DecimalField(
        read_only=True, **MONEY, help_text="Part paid from cash (and credit), CNY."
    )

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines", "paid_from_packages", "paid_from_balance"]
        read_only_fields = fields


class SubscriptionSerializer(serializers.ModelSerializer):
    vm = serializers.UUIDField(source="vm_id", read_only=True, help_text="The VM (see vms/).")
    vm_name = serializers.CharField(source="vm.name", read_only=True, help_text="The VM's name.")
    plan = serializers.CharField(source="plan.code", read_only=True, help_text="Plan code.")

    class Meta:
        model = Subscription
        fields = [
            "id",
            "vm",
            "vm_name",
            "plan",
            "billing_mode",
            "status",
            "cancel_at_period_end",
            "started_at",
            "current_period_start",
            "current_period_end",
            "ended_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Subscription id."},
            "billing_mode": {"help_text": "monthly or yearly."},
            "status": {"help_text": "active, past_due (renewal unpaid: the VM is stopped) or ended."},
            "cancel_at_period_end": {"help_text": "True: it ends (and the VM is released) when the paid period ends."},
            "started_at": {"help_text": "When the VM first ran."},
            "current_period_start": {"help_text": "Start of the paid period."},
            "current_period_end": {"help_text": "End of the paid period: renewal or end."},
            "ended_at": {"help_text": "When it ended."},
        }


class StatementQuerySerializer(serializers.Serializer):
    start = serializers.DateField(help_text="First day (inclusive), YYYY-MM-DD, in the tenant's time zone.")
    end = serializers.DateField(help_text="Last day (exclusive).")
    granularity = serializers.ChoiceField(choices=GRANULARITIES, default="day", help_text="day, week or month.")

    def validate(self, attrs):
        if attrs["end"] <= attrs["start"]:
            raise serializers.ValidationError({"to": ["Choose a 'to' date after 'from'."]})
        if (attrs["end"] - attrs["start"]).days > 3 * 366:
            raise serializers.ValidationError({"to": ["Ask for at most three years at a time."]})
        return attrs


class StatementRowSerializer(serializers.Serializer):
    period_start = serializers.DateField(help_text="Start of the day, week (Monday) or month.")
    period_end = serializers.DateField(help_text="End of the period (exclusive).")
    invoice_id = serializers.IntegerField(help_text="Invoice the charge is on.")
    invoice_month = serializers.DateField(help_text="The invoice's month.")
    kind = serializers.CharField(help_text="Line kind: task, vm_on_demand, subscription, scale_up, storage, one_off.")
    resource = serializers.CharField(help_text="Metered resource.")
    description = serializers.CharField(help_text="The invoice line's description.")
    unit = serializers.CharField(help_text="Unit of the quantity.")
    unit_price = serializers.DecimalField(
        max_digits=16, decimal_places=6, coerce_to_string=True, help_text="CNY per unit."
    )
    discount_percent = serializers.DecimalField(
        max_digits=5, decimal_places=2, coerce_to_string=True, help_text="Discount."
    )
    metered_unit = serializers.CharField(help_text="Unit of quantity, e.g. gpu_second.")
    quantity = serializers.DecimalField(
        max_digits=30, decimal_places=9, coerce_to_string=True, help_text="Quantity in the period, in metered units."
    )
    billed_quantity = serializers.DecimalField(
        max_digits=30,
        decimal_places=6,
        coerce_to_string=True,
        help_text="The same in the priced unit (e.g. GPU-hours).",
    )
    amount_unrounded = serializers.DecimalField(
        max_digits=40, decimal_places=20, coerce_to_string=True, help_text="Exact amount in the period."
    )
    amount = serializers.DecimalField(
        **MONEY,
        help_text="Charged in the period: the change of the line's rounded running total, so periods add up to the "
        "invoice line to the fen.",
    )


class StatementSerializer(serializers.Serializer):
    start = serializers.DateField(help_text="From (inclusive).")
    end = serializers.DateField(help_text="To (exclusive).")
    granularity = serializers.CharField(help_text="day, week or month.")
    total = serializers.DecimalField(**MONEY, help_text="Sum of the rows' amounts.")
    rows = StatementRowSerializer(many=True, help_text="Charges per period and invoice line.")


class UsageRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = UsageRecord
        fields = [*HASHED_FIELDS, "hash"]
        read_only_fields = fields
        extra_kwargs = {
            "sequence": {"help_text": "Position in your chain, from 1 without gaps."},
            "idempotency_key": {"help_text": "Unique key of the measured event: a replay is counted once."},
            "source": {"help_text": "task, vm, storage or scale_up."},
            "source_id": {"help_text": "Id of the task run, VM, day or scale-up measured."},
            "resource": {
                "help_text": "What was used: gpu:<model>, cpu, memory, vm_on_demand:<plan>, storage, scale_up_…"
            },
            "unit": {"help_text": "Unit of the quantity: gpu_second, core_second, gib_second, second, gpu_day …"},
            "quantity": {"help_text": "Quantity used in [period_start, period_end), written with 9 decimal places."},
            "period_start": {"help_text": "Start (inclusive)."},
            "period_end": {"help_text": "End (exclusive)."},
            "meta": {"help_text": "Details (strings), part of the hash."},
            "created_at": {"help_text": "When the record was appended."},
            "prev_hash": {"help_text": "hash of the record before (64 zeros for the first)."},
            "hash": {"help_text": "SHA-256 of the canonical JSON of these fields (see docs/billing.md)."},
        }

    def get_fields(self):
        fields = super().get_fields()
        fields["tenant_id"] = serializers.IntegerField(read_only=True, help_text="Your tenant's id (part of the hash).")
        return fields
