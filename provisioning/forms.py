from django import forms
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy

from provisioning.models import BillingMode, Plan
from tenants.models import SshKey


class PlanChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, plan: Plan) -> str:
        return plan.name


class SshKeyChoiceField(forms.ModelMultipleChoiceField):
    def label_from_instance(self, key: SshKey) -> str:
        return f"{key.name} ({key.key_type}, {key.fingerprint})"


class VmOrderForm(forms.Form):
    """Field names match the service's arguments, so its refusals land on the right field."""

    plan = PlanChoiceField(label=_("Plan"), queryset=Plan.objects.none(), to_field_name="code", empty_label=None)
    name = forms.CharField(
        label=_("Name"),
        max_length=40,
        help_text=_("Lowercase letters, digits and hyphens, starting with a letter, e.g. train-01."),
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    billing_mode = forms.ChoiceField(
        label=pgettext_lazy("mode", "Billing"),
        choices=BillingMode.choices,
        initial=BillingMode.MONTHLY,
        widget=forms.RadioSelect,
    )
    ssh_key_ids = SshKeyChoiceField(
        label=_("SSH keys"),
        queryset=SshKey.objects.none(),
        required=False,  # the service says why none is not enough
        widget=forms.CheckboxSelectMultiple,
    )
    cloud_init_extra = forms.CharField(
        label=_("Cloud-init extras"),
        required=False,
        strip=False,
        widget=forms.Textarea(
            attrs={"rows": 4, "spellcheck": "false", "placeholder": "packages:\n  - htop\nruncmd:\n  - nvidia-smi"}
        ),
        help_text=_("Optional cloud-config YAML merged into the VM's setup: packages, runcmd, write_files."),
    )
    wait_if_full = forms.BooleanField(
        label=_("Wait in line if no GPU is free"),
        required=False,
        help_text=_("The VM starts by itself as soon as a GPU frees up. Without this, a full pool refuses the order."),
    )

    def __init__(self, *args, plans, ssh_keys, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["plan"].queryset = plans
        self.fields["ssh_key_ids"].queryset = ssh_keys


class ScaleUpForm(forms.Form):
    extra_gpus = forms.IntegerField(label=_("Extra GPUs"), min_value=0, max_value=16, initial=0)
    extra_vcpus = forms.IntegerField(label=_("Extra vCPUs"), min_value=0, max_value=256, initial=0)
    extra_memory_gib = forms.IntegerField(label=_("Extra memory (GiB)"), min_value=0, max_value=4096, initial=0)
    days = forms.IntegerField(label=_("Days"), min_value=1, max_value=365, initial=7)
