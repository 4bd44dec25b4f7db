"""The staff page for AnsiStack inventory imports: upload, the plan (nothing changed yet), apply, progress."""

from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from labs import ansistack
from labs.importer import inventory_import_apply, inventory_import_create
from labs.models import InventoryImport
from machines.access import project_choices
from machines.models import Project
from portal.decorators import staff_required
from portal.htmx import HtmxHttpRequest, is_partial
from portal.refusals import Refusal


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def clean(self, data, initial=None):
        items = data if isinstance(data, list | tuple) else [data] if data else []
        if not items and self.required:
            raise ValidationError(self.error_messages["required"], code="required")
        return [super(MultipleFileField, self).clean(d, initial) for d in items]


def _text(upload) -> dict:
    try:
        return {"name": upload.name, "text": upload.read().decode("utf-8")}
    except UnicodeDecodeError:
        raise ValidationError(f"{upload.name} is not UTF-8 text: an inventory is a YAML file.") from None


class ImportForm(forms.Form):
    inventory_files = MultipleFileField(
        widget=MultipleFileInput, label="Inventory files", help_text="inventory-phys.yaml, inventory-vms.yaml, ..."
    )
    vars_file = forms.FileField(
        required=False,
        label="Vars file",
        help_text="Optional: the vars file with vm_image_data (AnsiStack's "
        "infrastructure/vars/main.yml), for images by URL.",
    )
    owner = forms.ModelChoiceField(queryset=get_user_model().objects.filter(is_active=True).order_by("username"))
    project = forms.ModelChoiceField(queryset=Project.objects.all(), required=False)
    lab_name = forms.CharField(
        max_length=63, required=False, label="Lab", help_text="Empty: named after the machines' inventory file."
    )

    def clean_inventory_files(self) -> list[dict]:
        files = self.cleaned_data["inventory_files"]
        if not files:
            raise ValidationError("Choose at least one inventory file.")
        if len(files) > ansistack.MAX_FILES:
            raise ValidationError(f"At most {ansistack.MAX_FILES} files.")
        return [_text(f) for f in files]

    def clean_vars_file(self) -> dict | None:
        upload = self.cleaned_data.get("vars_file")
        return _text(upload) if upload else None

    def clean(self):
        data = super().clean() or {}
        owner, project = data.get("owner"), data.get("project")
        if owner is not None and project is not None and not project_choices(owner).filter(pk=project.pk).exists():
            self.add_error("project", f"{owner} is not an admin of project {project}.")
        return data


@staff_required
@require_http_methods(["GET", "POST"])
def import_upload(request: HtmxHttpRequest) -> HttpResponse:
    form = ImportForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            imp = inventory_import_create(
                actor=request.user,
                files=d["inventory_files"],
                vars_file=d["vars_file"],
                owner=d["owner"],
                project=d["project"],
                lab_name=d["lab_name"],
            )
        except ValidationError as e:
            form.add_error(None, e)  # a message per field lands on its field
        except Refusal as e:
            form.add_error(None, str(e))
        else:
            return redirect("imports:detail", imp.pk)
    recent = InventoryImport.objects.select_related("owner", "created_by")[:10]
    return render(request, "labs/import_upload.html", {"form": form, "recent": recent})


@staff_required
@require_GET
def import_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    imp = get_object_or_404(InventoryImport.objects.select_related("owner", "project"), pk=pk)
    template = "labs/import_detail.html"
    if is_partial(request):
        template += "#import-progress"
    context = {"imp": imp, "plan_lines": ansistack.report_lines(imp.plan), "steps": ansistack.count_steps(imp.plan)}
    return render(request, template, context)


@staff_required
@require_POST
def import_apply(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    imp = get_object_or_404(InventoryImport, pk=pk)
    try:
        inventory_import_apply(imp=imp, actor=request.user)
    except Refusal:
        pass  # applied already: its page shows how far it got
    return redirect("imports:detail", imp.pk)


app_name = "imports"
urlpatterns = [
    path("", import_upload, name="upload"),
    path("<int:pk>/", import_detail, name="detail"),
    path("<int:pk>/apply/", import_apply, name="apply"),
]
