from django import forms
from django.contrib import admin, messages

from hypervisors import networks, services
from hypervisors.models import PUBLISHABLE_MODES, Hypervisor, Image, PublishedNetwork
from portal import audit


@admin.register(Hypervisor)
class HypervisorAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "uri",
        "status",
        "arch",
        "cpus",
        "memory_mib",
        "detected_domain_type",
        "enabled",
        "maintenance",
        "last_seen",
    ]
    list_filter = ["status", "enabled", "maintenance", "arch", "detected_domain_type"]
    search_fields = ["name", "uri", "hostname"]
    actions = ["sync_now"]
    fieldsets = [
        (
            None,
            {"fields": ["name", "uri", "console_address", "domain_type_override", "cpu_allocation_ratio", "enabled"]},
        ),
        ("Status", {"fields": ["status", "status_error", "maintenance", "last_seen", "last_checked"]}),
        (
            "Capabilities (from the last sync)",
            {
                "classes": ["collapse"],
                "fields": [
                    "hostname",
                    "arch",
                    "cpu_model",
                    "cpus",
                    "memory_mib",
                    "libvirt_version",
                    "hypervisor_version",
                    "detected_domain_type",
                    "domain_types",
                    "guest_arches",
                    "pools",
                    "networks",
                    "unmanaged_domains",
                    "managed_domain_count",
                ],
            },
        ),
        # Removal is on the hypervisor's page (it checks each item again in the worker); here only what was seen.
        ("Left behind by the portal (the sweeper)", {"classes": ["collapse"], "fields": ["orphans", "orphans_swept"]}),
    ]

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
    readonly_fields = [
        "status",
        "status_message",
        "file_name",
        "file_size_bytes",
        "virtual_size_bytes",
        "sha256",
        "progress_bytes",
        "total_bytes",
        "source_url",
        "source_hypervisor",
        "source_pool",
        "source_volume",
        "owner",
        "created",
    ]

    def has_add_permission(self, request):
        return False  # uploads and imports go through the portal's image page or the API


class PublishedNetworkForm(forms.ModelForm):
    """macvtap modes as boxes (passthrough is not among them) and VLAN tags as a list of numbers."""

    modes = forms.MultipleChoiceField(
        label="macvtap modes",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=[(m, m) for m in PUBLISHABLE_MODES],
        help_text="Host interfaces only. passthrough hands the host's interface to one "
        "guest: it stays staff-only and cannot be published.",
    )
    vlans = forms.CharField(
        label="VLAN tags",
        required=False,
        help_text="Host bridges and interfaces only: tags users may set, separated by spaces or "
        "commas (e.g. 100 101). Empty: none.",
    )

    class Meta:
        model = PublishedNetwork
        fields = ["hypervisor", "kind", "source", "modes", "vlans", "untagged", "everyone", "projects", "note"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["vlans"] = " ".join(str(v) for v in self.instance.vlans)

    def clean_vlans(self) -> list[int]:
        words = self.cleaned_data["vlans"].replace(",", " ").split()
        if not all(w.isdigit() for w in words):
            raise forms.ValidationError("Give VLAN tags as whole numbers from 1 to 4094, e.g. 100 101.")
        return [int(w) for w in words]

    def clean(self):
        super().clean()
        data = self.cleaned_data  # what Form.clean() returns, typed as never None
        if data.get("everyone") and data.get("projects"):
            self.add_error("projects", "Published to everyone already includes every project; choose one of the two.")
        elif not data.get("everyone") and not data.get("projects"):
            self.add_error("everyone", "Publish it to everyone or to some projects; otherwise nobody may use it.")
        return data


@admin.register(PublishedNetwork)
class PublishedNetworkAdmin(admin.ModelAdmin):
    """Host networks opened to users who are not staff (machines.nic_policy applies them)."""

    form = PublishedNetworkForm
    list_display = [
        "source",
        "kind",
        "hypervisor",
        "modes",
        "vlans",
        "untagged",
        "everyone",
        "project_names",
        "updated",
    ]
    list_filter = ["kind", "hypervisor", "everyone", "projects"]
    search_fields = ["source", "note", "hypervisor__name", "projects__name"]
    filter_horizontal = ["projects"]

    @admin.display(description="projects")
    def project_names(self, obj) -> str:
        return ", ".join(p.name for p in obj.projects.all()) or "–"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("hypervisor").prefetch_related("projects")

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)  # the projects are saved here, after the row
        obj = form.instance
        changes = ", ".join(f"{f}={_shown(form.cleaned_data.get(f))}" for f in form.changed_data)
        audit.record("network.publish_update" if change else "network.publish", obj, request=request, detail=changes)

    def delete_model(self, request, obj):
        audit.record("network.unpublish", obj, request=request, detail=str(obj))
        super().delete_model(request, obj)
        self._warn_stranded(request, [obj])

    def delete_queryset(self, request, queryset):
        rows = list(queryset)
        for obj in rows:
            audit.record("network.unpublish", obj, request=request, detail=str(obj))
        super().delete_queryset(request, queryset)
        self._warn_stranded(request, rows)

    def _warn_stranded(self, request, rows) -> None:
        """Say which machines the policy now refuses: they keep running, but are not started or rebuilt."""
        for kind, source in sorted({(r.kind, r.source) for r in rows}):
            stranded = networks.stranded_by_unpublishing(kind, source)
            if stranded:
                shown = ", ".join(stranded[:10]) + (f" and {len(stranded) - 10} more" if len(stranded) > 10 else "")
                self.message_user(
                    request,
                    f"Unpublished {source}: the network policy now refuses it to {len(stranded)} "
                    f"machine(s) on it: {shown}. They keep running but will not be started or rebuilt until it is "
                    f"published again or their NIC changes (manage.py nic_policy_report).",
                    level=messages.WARNING,
                )


def _shown(value) -> str:
    if hasattr(value, "all"):  # the projects
        return "[" + ", ".join(str(p) for p in value.all()) + "]"
    return str(value)
