from django import template

from notifications.selectors import unread_count

register = template.Library()


@register.inclusion_tag("notifications/_bell.html", takes_context=True)
def notification_bell(context):
    """The navbar's bell with the signed-in user's unread count (one query)."""
    user = context["request"].user
    return {"unread": unread_count(user) if user.is_authenticated else 0}
