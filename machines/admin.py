from typing import cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.template.response import TemplateResponse
from django.utils.html import format_html

from hypervisors.admin import HypervisorAdmin
from machines import capacity, leases, services
from machines.models import Machine, MachineEvent, MachineNic, MachineSnapshot, Membership, Project, Quota
from machines.states import PowerAction
from portal import audit


class NicInline(admin.TabularInline):
    model = MachineNic
    extra = 0
    readonly_fields = ("index", "type", "source", "mac", "dhcp4", "addresses", "gateway4", "nameservers")
    fields = readonly_fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class EventInline(admin.TabularInline):
    model = MachineEvent
    extra = 0
    readonly_fields = ("created", "step", "level", "message")
    fields = readonly_fields
    can_delete = False
    ordering = ["-created", "-pk"]

    def has_add_permission(self, request, obj=None):
        return False


class SnapshotInline(admin.TabularInline):
    """The machine's snapshots, read-only: they are taken, reverted to and deleted through the services (page, API),
    which hold the machine's one operation and reach its hypervisor."""

    model = MachineSnapshot
    fk_name = "machine"
    extra = 0
    readonly_fields = ("name", "kind", "memory", "quiesced", "automatic", "status", "size_bytes", "parent", "created")
    fields = readonly_fields
    can_delete = False
    verbose_name_plural = "Snapshots"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


def _each(modeladmin, request, queryset, fn, label: str) -> None:
    done, failed = 0, []
    for machine in queryset:
        try:
            fn(machine)
            done += 1
        except (services.MachineError, Exception) as e:  # noqa: BLE001 - reported to the admin user
            failed.append(f"{machine.name}: {e}")
    if done:
        modeladmin.message_user(request, f"{label}: queued for {done} machine(s).", messages.SUCCESS)
    for message in failed:
        modeladmin.message_user(request, message, messages.ERROR)


def _power_action(action: str):
    def run(modeladmin, request, queryset):
        _each(
            modeladmin,
            request,
            queryset,
            lambda m: services.machine_power(machine=m, action=action, actor=request.user),
            PowerAction(action).label,
        )

    run.__name__ = f"power_{action}"
    return admin.action(description=f"Power: {PowerAction(action).label.lower()}")(run)


@admin.register(Machine)
class MachineAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "owner",
        "project",
        "hypervisor",
        "deploy_type",
        "status",
        "power_state",
        "vcpus",
        "memory_mib",
        "disk_gib",
        "deletion_protection",
        "created",
    ]
    list_filter = ["status", "power_state", "deploy_type", "hypervisor", "project", "deletion_protection"]
    search_fields = ["name", "uuid", "owner__username", "nics__mac"]
    readonly_fields = [
        "uuid",
        "owner",
        "hypervisor",
        "pool",
        "deploy_type",
        "image",
        "vcpus",
        "memory_mib",
        "disk_gib",
        "status",
        "status_message",
        "status_changed",
        "power_state",
        "power_checked",
        "guest_addresses",
        "operation",
        "instance_id",
        "machine_type",
        "cpu_mode",
        "cpu_model",
        "cpu_topology",
        "smbios",
        "watchdog",
        "rng",
        "disk_bus",
        "disk_cache",
        "extra_disks",
        "cdrom_drives",
        "qemu_args",
        "firmware",
        "secure_boot",
        "created",
        "updated",
        "expiry_warned",
        "expired_off",
    ]
    fields = [*readonly_fields[:10], "deletion_protection", "autostart", "expires_at", *readonly_fields[10:]]
    inlines = [NicInline, SnapshotInline, EventInline]
    actions = [
        *(_power_action(a) for a in PowerAction.values),
        "grow_disk",
        "rebuild",
        "migrate",
        "clone",
        "delete_machines",
        "sync",
    ]

    def has_add_permission(self, request):
        return False  # machines are created through the portal or the API, which run the pipeline

    @admin.display(description="guest addresses")
    def guest_addresses(self, obj: Machine) -> dict:
        return obj.last_observed.guest_addresses

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deleting rows would orphan domains and disks
        return actions

    def has_delete_permission(self, request, obj=None):
        return False

    # Changed through machines.services.changes, as the Edit page and PATCH do (quota, room, the hypervisor).
    CHANGED_BY_SERVICE = ("name", "vcpus", "memory_mib", "description", "tags", "max_vcpus", "max_memory_mib")

    def get_fields(self, request, obj=None):
        return [*self.CHANGED_BY_SERVICE[:1], *super().get_fields(request, obj), *self.CHANGED_BY_SERVICE[3:]]

    @admin.display(description="CD-ROM drives")
    def cdrom_drives(self, obj) -> str:
        """Read-only: drives are added, removed and changed through the services (the Devices page, the API)."""
        drives = [f"{c.slot}: {c.image.name if c.image else '(empty)'}" for c in obj.cdroms.select_related("image")]
        return ", ".join(drives) or "none"

    def get_readonly_fields(self, request, obj=None):
        return [f for f in super().get_readonly_fields(request, obj) if f not in self.CHANGED_BY_SERVICE]

    def save_model(self, request, obj, form, change):
        """The editable fields go through the services, like the portal's own pages: recorded in the
        audit trail and the machine's events, and autostart set in libvirt by the worker."""
        asked = {k: getattr(obj, k) for k in self.CHANGED_BY_SERVICE if k in form.changed_data}
        if asked:  # compared with the machine as stored (obj holds the form's values already)
            try:
                services.machine_change(machine=Machine.objects.get(pk=obj.pk), actor=request.user, **asked)
            except (ValidationError, services.MachineError, PermissionDenied) as e:
                text = "; ".join(getattr(e, "messages", None) or [str(e)])
                self.message_user(request, f"{', '.join(asked)} unchanged: {text}", messages.ERROR)
        if "deletion_protection" in form.changed_data:
            services.machine_set_protection(machine=obj, protected=obj.deletion_protection, actor=request.user)
        if "autostart" in form.changed_data:
            services.machine_set_autostart(machine=obj, enabled=obj.autostart, actor=request.user)
        if "expires_at" in form.changed_data:  # the lease, through its service (audited, an event)
            try:
                services.machine_extend_lease(machine=obj, actor=request.user, until=obj.expires_at)
            except leases.LeaseRefused as e:
                self.message_user(request, f"The lease is unchanged: {e}", messages.ERROR)

    @admin.action(description="Sync power state from the hypervisor")
    def sync(self, request, queryset):
        from django.db import transaction

        with transaction.atomic():
            services.machines_sync(machines=list(queryset))
        self.message_user(request, f"Queued a power-state sync of {queryset.count()} machine(s).", messages.SUCCESS)

    @admin.action(description="Grow disk by 10 GiB")
    def grow_disk(self, request, queryset):
        _each(
            self,
            request,
            queryset,
            lambda m: services.machine_grow_disk(machine=m, disk_gib=m.disk_gib + 10, actor=request.user),
            "Grow disk",
        )

    @admin.action(description="Clone (linked, one each, named <name>-clone; stopped machines only)")
    def clone(self, request, queryset):
        _each(
            self,
            request,
            queryset,
            lambda m: services.machine_clone(machine=m, actor=request.user, name=f"{m.name[:57]}-clone"),
            "Clone",
        )

    @admin.action(description="Move to another hypervisor (cold; placement picks)")
    def migrate(self, request, queryset):
        _each(self, request, queryset, lambda m: services.machine_migrate(machine=m, actor=request.user), "Move")

    @admin.action(description="Rebuild from the image")
    def rebuild(self, request, queryset):
        _each(self, request, queryset, lambda m: services.machine_rebuild(machine=m, actor=request.user), "Rebuild")

    @admin.action(description="Delete (domain, disks and seed)")
    def delete_machines(self, request, queryset):
        _each(self, request, queryset, lambda m: services.machine_delete(machine=m, actor=request.user), "Delete")


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "machines", "vcpus", "memory_mib", "disk_gib", "usage", "updated"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]
    readonly_fields = ["usage"]

    @admin.display(description="in use (all disks counted)")
    def usage(self, obj) -> str:
        if obj.pk is None:
            return "–"
        return capacity.usage_text(capacity.usage(obj.user), None if obj.user.is_staff else obj.limits())

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        changes = ", ".join(f"{f}={form.cleaned_data[f]}" for f in form.changed_data)
        audit.record("quota.update" if change else "quota.create", obj, request=request, detail=changes)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "machines_quota", "vcpus_quota", "memory_mib_quota", "disk_gib_quota", "usage", "created"]
    search_fields = ["name", "memberships__user__username"]
    inlines = [MembershipInline]
    readonly_fields = ["usage", "ssh_key"]

    @admin.display(description="SSH public key")
    def ssh_key(self, obj) -> str:
        if obj.pk is None or not obj.ssh_public_key:
            return "None yet: made when the project's first image machine is created."
        return format_html(
            "<code>{}</code><br><small>The portal's key for this project: it goes on every image machine created "
            "in the project, so the project's workflows reach them (the private key is kept encrypted).</small>",
            obj.ssh_public_key,
        )

    @admin.display(description="in use (all disks counted)")
    def usage(self, obj) -> str:
        return capacity.usage_text(capacity.project_usage(obj), obj.limits()) if obj.pk is not None else "–"

    # Projects and memberships are recorded from their models (machines.apps: audit.track), whatever saves them.


# The hypervisor's admin gets its maintenance actions from here: they move machines, which the hypervisors app
# does not know (it may not import machines).
@admin.action(description="Drain: in maintenance (nothing new is placed or moved there)")
def drain(modeladmin, request, queryset):
    for hv in queryset:
        services.hypervisor_set_maintenance(hypervisor=hv, enabled=True, actor=request.user)
        modeladmin.message_user(request, f"{hv.name} is in maintenance.", messages.SUCCESS)


@admin.action(description="Return to service")
def return_to_service(modeladmin, request, queryset):
    for hv in queryset:
        services.hypervisor_set_maintenance(hypervisor=hv, enabled=False, actor=request.user)
        modeladmin.message_user(request, f"{hv.name} is back in service.", messages.SUCCESS)


@admin.action(description="Evacuate: drain, then move each stopped machine where placement finds room")
def evacuate(modeladmin, request, queryset):
    for hv in queryset:
        report = services.hypervisor_evacuate(hypervisor=hv, actor=request.user)
        modeladmin.message_user(
            request, f"Evacuating {hv.name}: " + ("; ".join(report) or "it has no machines."), messages.INFO
        )


@admin.action(description="Adopt domains the portal does not manage…")
def adopt_domains(modeladmin, request, queryset):
    """An intermediate page: the selected hypervisors' adoptable domains, ticked ones adopted for one owner (and
    project), each under its own name (machines/services/adoption.py; refusals listed, each audited)."""
    hvs = list(queryset)
    form = AdoptDomainsForm(request.POST if "apply" in request.POST else None, hypervisors=hvs)
    if form.is_bound and form.is_valid():
        data = form.cleaned_data
        by_uuid = {d["uuid"]: hv for hv in hvs for d in hv.unmanaged_domains}
        for uuid in data["domains"]:
            try:
                machine = services.machine_adopt(
                    hypervisor=by_uuid[uuid],
                    domain_uuid=uuid,
                    owner=data["owner"],
                    project=data["project"],
                    actor=request.user,
                    bmc=data["bmc"],
                )
            except (services.MachineError, PermissionDenied) as e:
                modeladmin.message_user(request, f"{uuid}: {e}", messages.ERROR)
            else:
                modeladmin.message_user(request, f"Adopting {machine.domain_name} as {machine.name}.", messages.SUCCESS)
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Adopt domains",
        "form": form,
        "hypervisors": hvs,
        "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
        "action": "adopt_domains",
        "opts": modeladmin.model._meta,
    }
    return TemplateResponse(request, "admin/machines/adopt_domains.html", context)


class AdoptDomainsForm(forms.Form):
    domains = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, help_text="Adoptable domains only.")
    owner = forms.ModelChoiceField(queryset=get_user_model().objects.filter(is_active=True).order_by("username"))
    project = forms.ModelChoiceField(queryset=Project.objects.order_by("name"), required=False)
    bmc = forms.BooleanField(label="Virtual BMC for each", required=False)

    def __init__(self, *args, hypervisors, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        choices = [
            (d["uuid"], f"{hv.name}: {d['name']} ({d.get('vcpus', '?')} vCPUs, {d.get('memory_mib', '?')} MiB)")
            for hv in hypervisors
            for d in hv.unmanaged_domains
            if d.get("adoptable")
        ]
        cast(forms.MultipleChoiceField, self.fields["domains"]).choices = choices


HypervisorAdmin.actions = [*HypervisorAdmin.actions, drain, return_to_service, evacuate, adopt_domains]
