from django.contrib import admin

from portal.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "prefix", "created", "last_used"]
    search_fields = ["user__username", "name", "prefix"]
    readonly_fields = ["prefix", "created", "last_used"]
    fields = ["user", "name", "prefix", "created", "last_used"]

    def has_add_permission(self, request):
        # The raw key is shown only once, by the UI or `manage.py create_api_token`.
        return False
