from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from provisioning.models import GpuModel
from tenants.models import Role, User
from tenants.services import QUOTA_FIELDS


def add_service_errors(form: forms.Form, exc: ValidationError) -> None:
    """Put a service's refusal on the form: field messages on their fields, the rest on top."""
    if hasattr(exc, "error_dict"):
        for field, errors in exc.error_dict.items():
            target = field if field in form.fields else None
            for error in errors:
                for message in error.messages:
                    form.add_error(target, message)
    else:
        for message in exc.messages:
            form.add_error(None, message)


class TenantCreateForm(forms.Form):
    name = forms.CharField(label=_("Organisation name"), max_length=100)


class TenantRenameForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)


class InvitationForm(forms.Form):
    email = forms.EmailField(label=_("Email"))
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices, initial=Role.MEMBER)

    def __init__(self, *args, assignable: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if assignable is not None:
            self.fields["role"].choices = [(v, label) for v, label in Role.choices if v in assignable]


class RoleForm(forms.Form):
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices)


class SshKeyForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)
    public_key = forms.CharField(
        label=_("Public key"),
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "ssh-ed25519 AAAA… you@laptop", "spellcheck": "false"}),
        help_text=_("The contents of your .pub file: ed25519, ECDSA, or RSA of at least 2048 bits."),
    )


class ApiTokenForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)
    expires_in_days = forms.IntegerField(
        label=_("Expires in (days)"),
        required=False,
        min_value=1,
        max_value=3650,
        help_text=_("Leave empty for a token that does not expire."),
    )


class ProfileForm(forms.ModelForm):
    class Meta:
        model = User
        fields = ["display_name", "language"]


class QuotaForm(forms.Form):
    """Staff edit of a tenant's limits, one field per limit and per GPU model."""

    vcpus = forms.IntegerField(label=_("vCPUs"), min_value=0, max_value=1_000_000)
    memory_gib = forms.IntegerField(label=_("Memory (GiB)"), min_value=0, max_value=1_000_000)
    hugepages_gib = forms.IntegerField(label=_("Hugepages (GiB)"), min_value=0, max_value=1_000_000)
    vms = forms.IntegerField(label=_("Virtual machines"), min_value=0, max_value=1_000_000)
    concurrent_tasks = forms.IntegerField(label=_("Concurrent tasks"), min_value=0, max_value=1_000_000)
    storage_gib = forms.IntegerField(label=_("Storage (GiB)"), min_value=0, max_value=1_000_000)

    def __init__(self, *args, gpu_models: list[GpuModel], **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu_codes = [m.code for m in gpu_models]
        for code in self.gpu_codes:
            self.fields[f"gpu_{code}"] = forms.IntegerField(
                label=_("%(model)s GPUs") % {"model": code}, min_value=0, max_value=1_000_000
            )

    def limits(self) -> dict[str, int]:
        return {f: self.cleaned_data[f] for f in QUOTA_FIELDS}

    def gpus(self) -> dict[str, int]:
        return {code: self.cleaned_data[f"gpu_{code}"] for code in self.gpu_codes}
