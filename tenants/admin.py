from django.contrib import admin

from tenants.models import AuditEvent, Membership, Tenant, Tier, User


@admin.register(User)
class UserAdmin(admin.ModelAdmin):
    list_display = ["email", "display_name", "is_staff", "is_active", "date_joined"]
    search_fields = ["email", "display_name"]
    list_filter = ["is_staff", "is_active"]
    exclude = ["password", "user_permissions"]
    readonly_fields = ["last_login", "date_joined"]


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "kind", "tier", "created_at"]
    search_fields = ["name", "slug"]
    list_filter = ["tier", "kind"]
    inlines = [MembershipInline]
    readonly_fields = ["tier"]  # tier changes go through the tier service with a reason


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ["code", "rank", "name_en", "name_zh", "support_level"]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "actor_label", "tenant", "action", "target_repr", "source_ip"]
    list_filter = ["action", "via"]
    search_fields = ["actor_label", "action", "target_repr"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
