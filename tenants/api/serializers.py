from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tenants.models import ApiToken, Invitation, Membership, Role, SshKey, Tenant, Tier


class TierSerializer(serializers.ModelSerializer):
    name = serializers.CharField(read_only=True, help_text="Tier name in the request's language.")
    benefits = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="What the tier gives, one line each, in the request's language.",
    )
    upgrade_rule = serializers.CharField(read_only=True, help_text="How a tenant reaches this tier.")

    class Meta:
        model = Tier
        fields = [
            "code",
            "name",
            "rank",
            "benefits",
            "upgrade_rule",
            "support_level",
            "account_manager_kind",
            "usage_review_months",
            "storage_discount_percent",
            "free_storage_gib",
            "yearly_renewal_percent",
        ]
        extra_kwargs = {
            "code": {"help_text": "standard, gold or diamond."},
            "rank": {"help_text": "Scheduling rank: higher runs first."},
            "support_level": {"help_text": "Support hours included, e.g. 5x8 or 7x24."},
            "account_manager_kind": {"help_text": "dedicated, specialist or empty."},
            "usage_review_months": {"help_text": "Months between usage reviews; null for none."},
            "storage_discount_percent": {"help_text": "Discount on storage, percent."},
            "free_storage_gib": {"help_text": "Storage included free, GiB."},
            "yearly_renewal_percent": {"help_text": "Yearly renewal price as a percent of list."},
        }


class QuotaLineSerializer(serializers.Serializer):
    key = serializers.CharField(
        help_text="vcpus, memory_gib, hugepages_gib, vms, concurrent_tasks, storage_gib, "
        "or gpu:<MODEL> for GPUs of one model."
    )
    label = serializers.CharField(help_text="Human-readable name of the limit.")
    used = serializers.IntegerField(help_text="Held now by running or starting VMs and tasks.")
    limit = serializers.IntegerField(help_text="The tenant's limit.")
    free = serializers.IntegerField(help_text="limit − used, never below 0.")


class TenantSerializer(serializers.ModelSerializer):
    tier = TierSerializer(read_only=True)
    role = serializers.SerializerMethodField(help_text="Your role in this tenant.")
    quotas = serializers.SerializerMethodField(help_text="Each limit with its current use.")

    class Meta:
        model = Tenant
        fields = ["slug", "name", "kind", "time_zone", "created_at", "role", "tier", "quotas"]
        read_only_fields = ["slug", "kind", "time_zone", "created_at"]
        extra_kwargs = {
            "slug": {"help_text": "Stable identifier of the tenant."},
            "name": {"help_text": "Display name; owners and admins may change it."},
            "kind": {"help_text": "personal (created at sign-up) or organisation."},
            "time_zone": {"help_text": "Time zone for billing periods."},
            "created_at": {"help_text": "When the tenant was created."},
        }

    def get_role(self, tenant) -> str:
        return self.context["membership"].role

    @extend_schema_field(QuotaLineSerializer(many=True))
    def get_quotas(self, tenant) -> list[dict]:
        return QuotaLineSerializer(self.context["quota_lines"], many=True).data


class MemberUserSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="User id.")
    email = serializers.EmailField(help_text="The member's login email.")
    display_name = serializers.CharField(help_text="Name shown in the portal, may be empty.")


class MembershipSerializer(serializers.ModelSerializer):
    user = MemberUserSerializer(read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "user", "role", "created_at"]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {
            "id": {"help_text": "Membership id, for changing the role or removing the member."},
            "role": {"help_text": "owner, admin, member, billing or viewer."},
            "created_at": {"help_text": "When the person joined."},
        }


class MembershipRoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices, help_text="The new role.")


class InvitationSerializer(serializers.ModelSerializer):
    invited_by = serializers.EmailField(source="invited_by.email", read_only=True, help_text="Who sent it.")

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "status", "invited_by", "created_at", "expires_at"]
        read_only_fields = ["id", "status", "created_at", "expires_at"]
        extra_kwargs = {
            "id": {"help_text": "Invitation id, for withdrawing it."},
            "created_at": {"help_text": "When it was sent."},
            "email": {"help_text": "Address the invitation is emailed to; only that verified address can accept."},
            "role": {"help_text": "Role the person gets on accepting."},
            "status": {"help_text": "pending, accepted or revoked."},
            "expires_at": {"help_text": "After this the link no longer works."},
        }


class InvitationCreateSerializer(serializers.Serializer):
    email = serializers.EmailField(help_text="Address to invite.")
    role = serializers.ChoiceField(choices=Role.choices, help_text="Role the person gets on accepting.")


class SshKeySerializer(serializers.ModelSerializer):
    owner = serializers.EmailField(source="owner.email", read_only=True, help_text="Who added the key.")

    class Meta:
        model = SshKey
        fields = ["id", "name", "public_key", "key_type", "bits", "fingerprint", "owner", "created_at"]
        read_only_fields = ["id", "key_type", "bits", "fingerprint", "created_at"]
        extra_kwargs = {
            "id": {"help_text": "Key id, for picking it when ordering a VM."},
            "created_at": {"help_text": "When it was added."},
            "name": {"help_text": "A name to pick the key by, unique in the tenant."},
            "public_key": {"help_text": "One OpenSSH public key line: ed25519, ECDSA, or RSA of at least 2048 bits."},
            "key_type": {"help_text": "e.g. ssh-ed25519."},
            "bits": {"help_text": "Key size in bits."},
            "fingerprint": {"help_text": "SHA256 fingerprint as printed by ssh-keygen -l."},
        }


class SshKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, help_text="A name to pick the key by, unique in the tenant.")
    public_key = serializers.CharField(help_text="One OpenSSH public key line.")


class ApiTokenSerializer(serializers.ModelSerializer):
    user = serializers.EmailField(source="user.email", read_only=True, help_text="Whose token it is.")
    is_active = serializers.BooleanField(read_only=True, help_text="False once revoked or expired.")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "user", "created_at", "expires_at", "last_used_at", "revoked_at", "is_active"]
        read_only_fields = fields
        extra_kwargs = {
            "id": {"help_text": "Token id, for revoking it."},
            "name": {"help_text": "What the token is for."},
            "created_at": {"help_text": "When it was created."},
            "prefix": {"help_text": "First part of the token, to recognise it; the secret is never shown again."},
            "last_used_at": {"help_text": "Last time the token authenticated a request (to the minute)."},
            "revoked_at": {"help_text": "When it was revoked, or null."},
            "expires_at": {"help_text": "When it stops working, or null for never."},
        }


class ApiTokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, help_text="What the token is for, e.g. ci-pipeline.")
    expires_in_days = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=3650, help_text="Days until it expires; omit for never."
    )


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="The secret. Shown only in this response: store it now.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]
        read_only_fields = fields
