"""The admin of workflows and their runs. A workflow is editable here, its variables' schema checked as the pages
check it; runs are records: read-only, their events inline, their secrets never shown (not even encrypted)."""

from django import forms
from django.contrib import admin

from workflows.models import Workflow, WorkflowEvent, WorkflowRun


class WorkflowAdminForm(forms.ModelForm):
    class Meta:
        model = Workflow
        fields = [
            "name",
            "description",
            "project",
            "source",
            "directory",
            "git_url",
            "git_ref",
            "playbook",
            "variables",
            "groups",
            "enabled",
        ]

    def clean_variables(self):
        from workflows.variables import validate_schema

        return validate_schema(self.cleaned_data["variables"])  # checked, normalised; errors on the field

    def clean_groups(self):
        groups = self.cleaned_data["groups"]
        if groups is None:
            return []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise forms.ValidationError("A list of group names.")
        return groups


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowAdminForm
    list_display = ("name", "project", "source", "playbook", "enabled", "updated")
    list_filter = ("enabled", "source", "project")
    search_fields = ("name", "description", "directory", "git_url")
    readonly_fields = ("created_by", "created", "updated")

    def save_model(self, request, obj, form, change):
        if not change and obj.created_by_id is None:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


class WorkflowEventInline(admin.TabularInline):
    model = WorkflowEvent
    extra = 0
    fields = ("counter", "created", "event", "host", "task", "status", "stdout")
    readonly_fields = fields
    can_delete = False
    ordering = ("counter",)
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False


# Every field but the secrets (encrypted or not, they stay off every page).
RUN_FIELDS = WorkflowRun.SHOWN_FIELDS


@admin.register(WorkflowRun)
class WorkflowRunAdmin(admin.ModelAdmin):
    list_display = ("pk", "workflow", "status", "created_by", "project", "created", "finished")
    list_filter = ("status", "workflow")
    search_fields = ("workflow__name", "created_by__username")
    fields = RUN_FIELDS
    readonly_fields = RUN_FIELDS
    inlines = [WorkflowEventInline]

    def has_add_permission(self, request):
        return False  # a run is started through the service, which checks roles and variables

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
