from rest_framework import serializers

from notifications.models import Notification, NotificationKind


class NotificationSerializer(serializers.ModelSerializer):
    id = serializers.IntegerField(read_only=True, help_text="Identifier, for marking it read.")
    kind = serializers.ChoiceField(
        choices=NotificationKind.choices, read_only=True, help_text="What happened, as a stable code."
    )
    title = serializers.CharField(read_only=True, help_text="One line, in the caller's language.")
    body = serializers.CharField(read_only=True, help_text="The details, in the caller's language.")
    url = serializers.CharField(
        read_only=True, help_text="Path of the portal page it is about (e.g. /tasks/…/), or empty."
    )
    tenant = serializers.IntegerField(
        source="tenant_id", read_only=True, allow_null=True, help_text="Id of the tenant it is about, or null."
    )
    tenant_name = serializers.CharField(
        source="tenant.name", read_only=True, allow_null=True, default=None, help_text="Name of that tenant."
    )
    created_at = serializers.DateTimeField(read_only=True, help_text="When it was sent.")
    read_at = serializers.DateTimeField(read_only=True, allow_null=True, help_text="When it was read; null if unread.")
    unread = serializers.BooleanField(source="is_unread", read_only=True, help_text="True until it is marked read.")

    class Meta:
        model = Notification
        fields = ["id", "kind", "title", "body", "url", "tenant", "tenant_name", "created_at", "read_at", "unread"]


class NotificationReadSerializer(serializers.Serializer):
    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        required=False,
        max_length=1000,
        help_text="Notifications to mark read. Ids that are not yours or already read are ignored.",
    )
    all = serializers.BooleanField(default=False, help_text="Mark every notification you can see here read.")

    def validate(self, data):
        if not data.get("all") and not data.get("ids"):
            raise serializers.ValidationError({"ids": ["Give the ids to mark read, or all: true."]})
        return data


class NotificationReadResultSerializer(serializers.Serializer):
    marked = serializers.IntegerField(help_text="How many notifications this call marked read.")
    unread = serializers.IntegerField(help_text="How many are still unread.")
