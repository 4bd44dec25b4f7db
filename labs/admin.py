"""The admin of labs, lab templates and AnsiStack inventory imports. Lab machines are made and removed by the
services (the lab pages and the API); here a lab's membership is read-only, a template's YAML is checked as the
service checks it, and an import's plan and report are read-only records."""

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError

from labs import schedules, specs
from labs.models import InventoryImport, Lab, LabMachine, LabTemplate, ScheduledAction
from portal import audit


class LabMachineInline(admin.TabularInline):
    model = LabMachine
    extra = 0
    readonly_fields = ("machine", "group")
    fields = readonly_fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Lab)
class LabAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "project", "source", "expires_at", "created")
    list_filter = ("project",)
    search_fields = ("name", "owner__username", "source")
    # The lease is set on the lab page or the API (labs.services.lab_set_lease), which sets its machines' too.
    readonly_fields = ("created", "expires_at")
    inlines = [LabMachineInline]

    def has_delete_permission(self, request, obj=None):
        # Deleting a lab's row would leave its machines running outside any lab: the lab page and the API
        # delete the machines with it (labs.services.lab_delete), with protection and roles checked.
        return bool(obj is not None and not obj.members.exists() and super().has_delete_permission(request, obj))


class LabTemplateForm(forms.ModelForm):
    class Meta:
        model = LabTemplate
        fields = ["name", "description", "owner", "project", "spec"]

    def clean_spec(self):
        spec = self.cleaned_data["spec"]
        try:
            specs.parse(spec)
        except specs.SpecError as e:
            raise forms.ValidationError(str(e)) from None
        return spec


@admin.register(LabTemplate)
class LabTemplateAdmin(admin.ModelAdmin):
    form = LabTemplateForm
    list_display = ("name", "project", "owner", "updated")
    list_filter = ("project",)
    search_fields = ("name", "description")
    readonly_fields = ("created", "updated")


@admin.register(InventoryImport)
class InventoryImportAdmin(admin.ModelAdmin):
    list_display = (
        "pk",
        "created_by",
        "owner",
        "project",
        "lab_name",
        "status",
        "done_steps",
        "total_steps",
        "created",
    )
    list_filter = ("status",)
    readonly_fields = (
        "created_by",
        "created",
        "files",
        "vars_file",
        "owner",
        "project",
        "lab_name",
        "plan",
        "status",
        "done_steps",
        "total_steps",
        "report",
        "finished",
    )

    def has_add_permission(self, request):
        return False  # an import is planned from its upload page or `manage.py import_ansistack`

    def has_change_permission(self, request, obj=None):
        return False


class ScheduledActionForm(forms.ModelForm):
    class Meta:
        model = ScheduledAction
        fields = ["machine", "lab", "action", "hour", "minute", "weekdays", "retention", "enabled"]

    def clean(self):
        data = super().clean() or {}
        if bool(data.get("machine")) == bool(data.get("lab")):
            raise forms.ValidationError("A schedule is on a machine or on a lab.")
        try:  # the service's own checks of the values (labs/schedules.py)
            data["weekdays"] = schedules._check_fields(
                data.get("action", ""),
                data.get("hour", -1),
                data.get("minute", -1),
                data.get("weekdays") if data.get("weekdays") is not None else [],
                data.get("retention", 0),
            )
        except ValidationError as e:
            raise forms.ValidationError(e.messages) from None
        return data


@admin.register(ScheduledAction)
class ScheduledActionAdmin(admin.ModelAdmin):
    """Staff see and change every schedule; each change is in the audit trail, each run in the machines' events."""

    form = ScheduledActionForm
    list_display = ("__str__", "action", "machine", "lab", "enabled", "last_run", "created_by")
    list_filter = ("action", "enabled")
    search_fields = ("machine__name", "lab__name", "created_by__username")
    readonly_fields = ("last_run", "last_result", "created_by", "created")

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)
        audit.record("schedule.update" if change else "schedule.create", obj, user=request.user)

    def delete_model(self, request, obj):
        audit.record("schedule.delete", obj, user=request.user)
        super().delete_model(request, obj)
