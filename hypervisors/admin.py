from django.contrib import admin, messages

from hypervisors import services
from hypervisors.models import Hypervisor, Image


@admin.register(Hypervisor)
class HypervisorAdmin(admin.ModelAdmin):
    list_display = ["name", "uri", "status", "arch", "cpus", "memory_mib", "detected_domain_type", "enabled", "last_seen"]
    list_filter = ["status", "enabled", "arch", "detected_domain_type"]
    search_fields = ["name", "uri", "hostname"]
    actions = ["sync_now"]
    fieldsets = [
        (None, {"fields": ["name", "uri", "console_address", "domain_type_override", "cpu_allocation_ratio", "enabled"]}),
        ("Status", {"fields": ["status", "status_error", "last_seen", "last_checked"]}),
        (
            "Capabilities (from the last sync)",
            {
                "classes": ["collapse"],
                "fields": [
                    "hostname", "arch", "cpu_model", "cpus", "memory_mib", "libvirt_version", "hypervisor_version",
                    "detected_domain_type", "domain_types", "guest_arches", "pools", "networks",
                    "unmanaged_domains", "managed_domain_count",
                ],
            },
        ),
    ]  # fmt: skip

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Hypervisor._meta.fields if f.name not in services.EDITABLE_FIELDS]

    def save_model(self, request, obj, form, change):
        data = {f: form.cleaned_data[f] for f in services.EDITABLE_FIELDS if f in form.cleaned_data}
        if change:
            services.hypervisor_update(hypervisor=obj, **data)
        else:
            obj.pk = services.hypervisor_create(**data).pk

    def delete_model(self, request, obj):
        services.hypervisor_delete(hypervisor=obj)

    @admin.action(description="Sync now (check the connection and refresh capabilities)")
    def sync_now(self, request, queryset):
        for hv in queryset:
            services.hypervisor_request_sync(hypervisor=hv)
        self.message_user(request, f"Queued a sync of {queryset.count()} hypervisor(s).", messages.SUCCESS)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "format", "os_name", "arch", "status", "virtual_size_bytes", "created"]
    list_filter = ["kind", "format", "status", "arch"]
    search_fields = ["name", "os_name", "sha256"]
    readonly_fields = ["status", "status_message", "file_name", "file_size_bytes", "virtual_size_bytes", "sha256",
                       "progress_bytes", "total_bytes", "source_url", "source_hypervisor", "source_pool",
                       "source_volume", "owner", "created"]  # fmt: skip

    def has_add_permission(self, request):
        return False  # uploads and imports go through the portal's image page or the API
