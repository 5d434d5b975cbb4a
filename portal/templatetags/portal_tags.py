from django import forms, template

register = template.Library()


@register.inclusion_tag("portal/_field.html")
def field(bound_field):
    """Render one form field with Bootstrap classes, its errors and help text."""
    widget = bound_field.field.widget
    if isinstance(widget, forms.Select):
        css = "form-select"
    elif isinstance(widget, forms.CheckboxInput):
        css = "form-check-input"
    else:
        css = "form-control"
    if bound_field.errors:
        css += " is-invalid"
    attrs = {"class": css}
    if bound_field.help_text:
        attrs["aria-describedby"] = f"{bound_field.auto_id}_help"
    return {
        "field": bound_field,
        "widget": bound_field.as_widget(attrs=attrs),
        "checkbox": isinstance(widget, forms.CheckboxInput),
    }


@register.filter
def percent_class(percent: int) -> str:
    return "bg-danger" if percent >= 90 else "bg-warning" if percent >= 70 else "bg-success"
