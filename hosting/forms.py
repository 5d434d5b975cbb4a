from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from hosting.models import Framework


def parse_env_lines(text: str) -> dict[str, str]:
    """KEY=VALUE per line into a mapping; blank lines and lines starting with # are skipped.

    Only the shape is checked here: which names may be set is the service's rule.
    """
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValidationError(_("Line %(line)s: write NAME=value."), params={"line": number})
        if name in env:
            raise ValidationError(_("Line %(line)s: %(name)s is set twice."), params={"line": number, "name": name})
        env[name] = value
    return env


class TaskForm(forms.Form):
    """Field names match the service's arguments, so its refusals land on the right field."""

    name = forms.CharField(
        label=_("Name"), max_length=100, widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"})
    )
    framework = forms.ChoiceField(label=_("Framework"), choices=Framework.choices, initial=Framework.PYTORCH)
    image = forms.CharField(
        label=_("Container image"),
        required=False,
        help_text=_("Leave empty for the framework's standard image; a custom task needs one."),
        widget=forms.TextInput(attrs={"spellcheck": "false", "placeholder": "registry.example.com/team/train:1.0"}),
    )
    command = forms.CharField(
        label=_("Command"),
        required=False,  # the service says why an empty one is not enough
        strip=False,
        widget=forms.Textarea(
            attrs={"rows": 4, "spellcheck": "false", "class": "font-monospace", "placeholder": "python train.py"}
        ),
        help_text=_("Print ##progress 42 to report progress and ##metric loss=0.31 to report a metric."),
    )
    env = forms.CharField(
        label=_("Environment variables"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "placeholder": "EPOCHS=10\nWANDB_MODE=offline"}),
        help_text=_("One NAME=value per line."),
    )
    input_url = forms.CharField(
        label=_("Input data URL"),
        required=False,
        widget=forms.TextInput(attrs={"spellcheck": "false", "placeholder": "s3://bucket/dataset/"}),
        help_text=_("An s3:// URL, or upload a file below."),
    )
    input_file = forms.FileField(label=_("Input file"), required=False)
    gpu_model = forms.ChoiceField(label=_("GPU model"), required=False)
    gpus = forms.IntegerField(label=_("Whole GPUs"), initial=0, help_text=_("0 to 8."))
    vgpu_slices = forms.IntegerField(
        label=_("vGPU slices"),
        initial=0,
        help_text=_("A share of one GPU on the general pool (T4, A10) instead of whole GPUs."),
    )
    vcpus = forms.IntegerField(label=_("vCPUs"), initial=2)
    memory_gib = forms.IntegerField(label=_("Memory (GiB)"), initial=8)
    max_runtime_seconds = forms.IntegerField(
        label=_("Time limit (seconds)"),
        initial=3600,
        help_text=_("Stopped when an attempt runs this long: 3600 is 1 h; at most 259200 (72 h)."),
    )
    max_retries = forms.IntegerField(label=_("Retries"), initial=0, help_text=_("After a failed attempt, 0 to 3."))
    priority = forms.IntegerField(
        label=_("Priority"), initial=5, help_text=_("0 to 9: which of your own tasks goes first.")
    )
    preemptible = forms.BooleanField(
        label=_("Preemptible"),
        required=False,
        help_text=_("A core (Diamond) task may stop it; it goes back in line in its place and the lost time is free."),
    )

    def __init__(self, *args, gpu_models, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["gpu_model"].choices = [("", _("None (CPU only)"))] + [
            (model.code, f"{model.code} — {model.name}") for model in gpu_models
        ]

    def clean_command(self) -> str:
        # Browsers submit a textarea's line breaks as CRLF, and bash reads the CR as part of the line
        # (`do\r` is a syntax error): a multi-line command typed here would never run.
        return self.cleaned_data["command"].replace("\r\n", "\n")

    def clean_env(self) -> dict[str, str]:
        return parse_env_lines(self.cleaned_data["env"])
