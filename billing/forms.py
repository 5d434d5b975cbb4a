from decimal import Decimal

from django import forms
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy

from billing.models import LedgerKind
from billing.selectors import GRANULARITIES


class LowBalanceForm(forms.Form):
    low_balance_threshold = forms.DecimalField(
        label=_("Warn me when my balance falls below (¥)"),
        required=False,
        min_value=Decimal("0"),
        max_digits=14,
        decimal_places=2,
        help_text=_("Cash plus package credit. Leave empty for no warning."),
    )


class TopUpForm(forms.Form):
    amount = forms.DecimalField(label=_("Amount (¥)"), min_value=Decimal("0.01"), max_digits=14, decimal_places=2)


class PackageBuyForm(forms.Form):
    validity_months = forms.IntegerField(label=_("Valid for (months)"), min_value=1, max_value=36, required=False)


class StatementForm(forms.Form):
    start = forms.DateField(label=pgettext_lazy("period", "From"), widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label=_("To (exclusive)"), widget=forms.DateInput(attrs={"type": "date"}))
    granularity = forms.ChoiceField(label=_("By"), choices=[(g, g) for g in GRANULARITIES], initial="day")


class AdjustmentForm(forms.Form):
    kind = forms.ChoiceField(
        label=_("Kind"),
        choices=[(LedgerKind.ADJUSTMENT, LedgerKind.ADJUSTMENT.label), (LedgerKind.REFUND, LedgerKind.REFUND.label)],
    )
    amount = forms.DecimalField(label=_("Amount (¥, negative takes money)"), max_digits=14, decimal_places=2)
    reason = forms.CharField(label=_("Reason"), max_length=500)


class CreditLimitForm(forms.Form):
    credit_limit = forms.DecimalField(
        label=_("Credit limit (¥)"), min_value=Decimal("0"), max_digits=14, decimal_places=2
    )
    reason = forms.CharField(label=_("Reason"), max_length=500)


class OneOffChargeForm(forms.Form):
    amount = forms.DecimalField(label=_("Amount (¥)"), min_value=Decimal("0.01"), max_digits=14, decimal_places=2)
    description = forms.CharField(label=_("Description"), max_length=200)
    reference = forms.CharField(label=_("Reference"), max_length=100)


class PriceVersionForm(forms.Form):
    effective_from = forms.DateTimeField(
        label=_("Takes effect at"), widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    note = forms.CharField(label=_("Note"), max_length=300, required=False)
    prices = forms.CharField(
        label=_("Changed prices"),
        widget=forms.Textarea(attrs={"rows": 4, "placeholder": "task_gpu_hour:H100 95.00"}),
        help_text=_("One per line: item code, a space, the new unit price. Items not listed keep their price."),
    )

    def clean_prices(self):
        prices = {}
        for number, line in enumerate(self.cleaned_data["prices"].splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise forms.ValidationError(_("Line %(n)s: write the code and the price.") % {"n": number})
            try:
                prices[parts[0]] = Decimal(parts[1])
            except ArithmeticError as exc:
                raise forms.ValidationError(_("Line %(n)s: the price is not a number.") % {"n": number}) from exc
        if not prices:
            raise forms.ValidationError(_("Change at least one price."))
        return prices
