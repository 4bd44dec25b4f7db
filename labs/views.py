"""The lab pages: labs, a lab's machines live, power and delete on the lab, its exports; templates and making
a lab from one. Views read the database and call labs.services; the services decide."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from labs import services, specs
from labs.forms import EXAMPLE_SPEC, InstantiateForm, LabEditForm, LabTemplateForm
from labs.models import Lab, LabTemplate
from machines import access, policy
from machines.access import machines_for
from machines.states import PowerAction
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest, is_partial

LAB_POWER: dict[str, str] = {
    str(a): PowerAction(a).label
    for a in (PowerAction.START, PowerAction.SHUTDOWN, PowerAction.POWEROFF, PowerAction.REBOOT)
}


def _get_lab_for_user(request, pk: int, need: str = access.VIEW) -> Lab:
    """The lab if the user may see it (else 404) and act on it as `need` says (else 403)."""
    lab = services.labs_for(request.user).filter(pk=pk).first()
    if lab is None:
        raise Http404("No such lab.")
    services.lab_require(request.user, lab, need)
    return lab


def _get_template_for_user(request, pk: int, *, write: bool = False) -> LabTemplate:
    template = services.templates_for(request.user).filter(pk=pk).first()
    if template is None:
        raise Http404("No such template.")
    if write and not services.may_write_template(request.user, template.project):
        raise PermissionDenied("Only staff or the project's admins change this template.")
    return template


@login_required
@require_GET
def lab_list(request: HtmxHttpRequest) -> HttpResponse:
    labs = list(services.labs_for(request.user)[:200])
    counts = dict(
        machines_for(request.user)
        .filter(lab_membership__lab__in=labs)
        .order_by()
        .values_list("lab_membership__lab")
        .annotate(n=Count("pk"))
    )
    rows = [(lab, counts.get(lab.pk, 0)) for lab in labs]
    templates = services.templates_for(request.user)[:200]
    return render(request, "labs/list.html", {"rows": rows, "templates": templates})


@login_required
@require_GET
def lab_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    lab = _get_lab_for_user(request, pk)
    machines = list(
        access.for_lists(services.lab_machines(lab, request.user))
        .select_related("lab_membership")
        .prefetch_related("nics")
    )
    level = services.lab_level(request.user, lab)
    template = "labs/detail.html"
    if is_partial(request):
        template += "#lab-machines"
    context = {
        "lab": lab,
        "machines": machines,
        "busy": any(m.is_busy for m in machines),
        "console_ready": {m.pk for m in machines if "console" not in policy.idle_actions(m)},
        "may_operate": access.allows(level, access.OPERATE),
        "may_delete": access.allows(level, access.ADMIN),
        "has_bmcs": any(m.has_bmc for m in machines),
        "power_actions": LAB_POWER,
    }
    return render(request, template, context)


@login_required
@require_POST
def lab_power(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    lab = _get_lab_for_user(request, pk)
    action = request.POST.get("action", "")
    try:
        result = services.lab_power(lab=lab, action=action, actor=request.user)
    except services.LabError as e:
        messages.error(request, str(e))
    else:
        label = LAB_POWER.get(action, action)
        if result.done:
            messages.success(request, f"{label}: {', '.join(result.done)}.")
        for line in result.refused:
            messages.error(request, line)
    return redirect("labs:detail", pk=lab.pk)


@login_required
@require_http_methods(["GET", "POST"])
def lab_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Rename the lab or change its description (its admins)."""
    lab = _get_lab_for_user(request, pk, access.ADMIN)
    form = LabEditForm(request.POST or None, initial={"name": lab.name, "description": lab.description})
    if request.method == "POST" and form.is_valid():
        try:
            services.lab_change(lab=lab, actor=request.user, **form.cleaned_data)
        except ValidationError as e:
            add_errors(form, e)
        else:
            messages.success(request, "Lab saved.")
            return redirect("labs:detail", pk=pk)
    return render(request, "labs/edit.html", {"lab": lab, "form": form})


@login_required
@require_http_methods(["GET", "POST"])
def lab_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    lab = _get_lab_for_user(request, pk, access.ADMIN)
    if request.method == "POST":
        try:
            names = services.lab_delete(lab=lab, actor=request.user)
        except services.LabError as e:
            messages.error(request, str(e))
            return redirect("labs:detail", pk=pk)
        messages.success(request, f"Deleting lab {lab.name}: {', '.join(names) or 'it had no machines'}.")
        return redirect("labs:list")
    machines = services.lab_machines(lab, request.user)
    return render(request, "labs/delete.html", {"lab": lab, "machines": machines})


@login_required
@require_POST
def lab_instackenv(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """instackenv.json of the lab's network-boot machines, as a download (holds BMC passwords; recorded)."""
    lab = _get_lab_for_user(request, pk)
    response = JsonResponse(services.lab_instackenv(lab=lab, user=request.user), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{lab.name}-instackenv.json"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def template_list(request: HtmxHttpRequest) -> HttpResponse:
    templates = services.templates_for(request.user)
    may_create = request.user.is_staff or services.template_projects(request.user).exists()
    return render(request, "labs/templates.html", {"templates": templates, "may_create": may_create})


def _save_template(request, form: LabTemplateForm, template: LabTemplate | None) -> LabTemplate | None:
    if not form.is_valid():
        return None
    try:
        return services.lab_template_save(
            actor=request.user,
            template=template,
            name=form.cleaned_data["name"],
            description=form.cleaned_data.get("description", ""),
            project=form.cleaned_data.get("project"),
            spec=form.cleaned_data["spec"],
        )
    except ValidationError as e:
        add_errors(form, e)
    except PermissionDenied as e:
        form.add_error("project", str(e))
    return None


@login_required
@require_http_methods(["GET", "POST"])
def template_create(request: HtmxHttpRequest) -> HttpResponse:
    if not (request.user.is_staff or services.template_projects(request.user).exists()):
        raise PermissionDenied("Staff and project admins make lab templates.")
    form = LabTemplateForm(request.POST or None, initial={"spec": EXAMPLE_SPEC}, user=request.user)
    if request.method == "POST" and (saved := _save_template(request, form, None)):
        messages.success(request, f"Template {saved.name} saved.")
        return redirect("labs:instantiate", pk=saved.pk)
    return render(request, "labs/template_form.html", {"form": form, "template": None})


@login_required
@require_http_methods(["GET", "POST"])
def template_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    template = _get_template_for_user(request, pk, write=True)
    form = LabTemplateForm.for_template(template, user=request.user, data=request.POST or None)
    if request.method == "POST" and (saved := _save_template(request, form, template)):
        messages.success(request, f"Template {saved.name} saved.")
        return redirect("labs:instantiate", pk=saved.pk)
    return render(request, "labs/template_form.html", {"form": form, "template": template})


@login_required
@require_POST
def template_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    template = _get_template_for_user(request, pk, write=True)
    services.lab_template_delete(template=template, actor=request.user)
    messages.success(request, f"Template {template.name} deleted; the labs made from it stay.")
    return redirect("labs:template-list")


@login_required
@require_http_methods(["GET", "POST"])
def lab_instantiate(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A template's page: its groups and what the portal does not use, and the form that makes a lab of it."""
    template = _get_template_for_user(request, pk)
    try:
        spec = specs.parse(template.spec)
    except specs.SpecError as e:  # saved before a rule tightened, say: shown, not a 500
        return render(request, "labs/instantiate.html", {"template": template, "spec_error": str(e)})
    form = InstantiateForm(request.POST or None, template=template, spec=spec, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            lab = services.lab_instantiate(template=template, actor=request.user, **form.service_kwargs())
        except ValidationError as e:
            add_errors(form, e)
        else:
            messages.success(request, f"Making lab {lab.name}: its machines are being provisioned.")
            return redirect("labs:detail", pk=lab.pk)
    may_write = services.may_write_template(request.user, template.project)
    context = {"template": template, "spec": spec, "form": form, "may_write": may_write}
    return render(request, "labs/instantiate.html", context)
