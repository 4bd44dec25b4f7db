from django.contrib import admin

from portal.models import ApiToken, AuditEvent


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "prefix", "read_only", "expires_at", "created", "last_used"]
    search_fields = ["user__username", "name", "prefix"]
    readonly_fields = ["prefix", "read_only", "created", "last_used"]
    fields = ["user", "name", "prefix", "read_only", "expires_at", "created", "last_used"]

    def has_add_permission(self, request):
        # The raw key is shown only once, by the UI or `manage.py create_api_token`.
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["created", "username", "address", "action", "object_type", "object_repr", "outcome"]
    list_filter = ["outcome", "action", "object_type"]
    search_fields = ["username", "object_repr", "detail", "address"]
    date_hierarchy = "created"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # append-only

    def has_delete_permission(self, request, obj=None):
        return False
