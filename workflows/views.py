"""The workflow pages: the catalogue, a workflow, its registration, a run's form (from a machine, a lab or a
selection of machines), the runs, and a run's page with its output streaming in. Views read the database and
call workflows.services; the services decide."""

from __future__ import annotations

import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from labs.services import labs_for
from machines.access import machines_for
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest, is_partial
from workflows import access, services
from workflows.forms import EXAMPLE_VARIABLES, RunForm, WorkflowForm
from workflows.models import Workflow, WorkflowRun

EVENTS_PER_POLL = 500  # a poll brings at most this many new events; the next brings the rest


def _get_workflow_for_user(request, pk: int, *, write: bool = False) -> Workflow:
    workflow = access.workflows_for(request.user).filter(pk=pk).first()
    if workflow is None:
        raise Http404("No such workflow.")
    if write and not access.may_write(request.user, workflow.project):
        raise PermissionDenied("Only staff or the project's admins change this workflow.")
    return workflow


def _get_run_for_user(request, pk: int) -> WorkflowRun:
    run = access.runs_for(request.user).filter(pk=pk).first()
    if run is None:
        raise Http404("No such run.")
    return run


def _ids(values: list[str]) -> list[int]:
    return [int(v) for v in values if v.isdigit() and len(v) < 10]


@login_required
@require_GET
def workflow_list(request: HtmxHttpRequest) -> HttpResponse:
    workflows = access.workflows_for(request.user)
    context = {"workflows": workflows, "may_register": access.may_register(request.user)}
    return render(request, "workflows/list.html", context)


@login_required
@require_GET
def workflow_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    workflow = _get_workflow_for_user(request, pk)
    runs = access.runs_for(request.user).filter(workflow=workflow).prefetch_related("machines")[:20]
    context = {"workflow": workflow, "runs": runs, "may_write": access.may_write(request.user, workflow.project)}
    return render(request, "workflows/detail.html", context)


def _save(request, form: WorkflowForm, workflow: Workflow | None) -> Workflow | None:
    if not form.is_valid():
        return None
    kwargs = form.service_kwargs()
    try:
        if workflow is None:
            return services.workflow_register(actor=request.user, **kwargs)
        return services.workflow_update(
            workflow=workflow, actor=request.user, enabled=form.cleaned_data["enabled"], **kwargs
        )
    except ValidationError as e:
        add_errors(form, e)
    except (PermissionDenied, services.WorkflowRefused) as e:
        form.add_error(None, str(e))
    return None


@login_required
@require_http_methods(["GET", "POST"])
def workflow_create(request: HtmxHttpRequest) -> HttpResponse:
    if not access.may_register(request.user):
        raise PermissionDenied("Staff and project admins register workflows.")
    form = WorkflowForm(request.POST or None, initial={"variables": EXAMPLE_VARIABLES}, user=request.user)
    if request.method == "POST" and (saved := _save(request, form, None)):
        messages.success(request, f"Workflow {saved.name} registered.")
        return redirect("workflows:detail", pk=saved.pk)
    return render(request, "workflows/form.html", {"form": form, "workflow": None})


@login_required
@require_http_methods(["GET", "POST"])
def workflow_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    workflow = _get_workflow_for_user(request, pk, write=True)
    form = WorkflowForm.for_workflow(workflow, user=request.user, data=request.POST or None)
    if request.method == "POST" and (saved := _save(request, form, workflow)):
        messages.success(request, f"Workflow {saved.name} saved.")
        return redirect("workflows:detail", pk=saved.pk)
    return render(request, "workflows/form.html", {"form": form, "workflow": workflow})


@login_required
@require_http_methods(["GET", "POST"])
def run_start(request: HtmxHttpRequest) -> HttpResponse:
    """Where the run buttons lead: pick a workflow for these targets (?machine=…&lab=…). The machine list posts
    its selection here (its checkboxes are in a POST form), which is sent on as a plain GET."""
    source = request.POST if request.method == "POST" else request.GET
    machine_ids = _ids(source.getlist("machine") + source.getlist("ids"))
    lab_ids = _ids(source.getlist("lab"))[:1]
    query = urlencode({"machine": machine_ids, "lab": lab_ids}, doseq=True)
    if request.method == "POST":
        if not machine_ids:
            messages.error(request, "Select the machines to run a workflow on.")
            return redirect("machines:list")
        return redirect(f"{reverse('workflows:start')}?{query}")
    machines = machines_for(request.user).filter(pk__in=machine_ids).order_by("name")
    lab = labs_for(request.user).filter(pk__in=lab_ids).first()
    context = {"workflows": access.workflows_for(request.user).filter(enabled=True), "machines": machines}
    return render(request, "workflows/start.html", {**context, "lab": lab, "query": query})


@login_required
@require_http_methods(["GET", "POST"])
def run_create(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A run's form: targets pre-filled from where it was started (?machine=…&lab=…), a field per variable."""
    workflow = _get_workflow_for_user(request, pk)
    labs = _ids(request.GET.getlist("lab"))
    initial = {"machines": _ids(request.GET.getlist("machine")), "lab": labs[0] if labs else None}
    form = RunForm(request.POST or None, initial=initial, workflow=workflow, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.workflow_run_start(
                workflow=workflow,
                actor=request.user,
                machines=list(form.cleaned_data["machines"]),
                lab=form.cleaned_data["lab"],
                variables=form.variables(),
            )
        except ValidationError as e:
            add_errors(form, e, aliases=form.aliases())
        except (PermissionDenied, services.WorkflowRefused) as e:
            form.add_error(None, str(e))
        else:
            messages.success(request, f"Run {run.pk} of {workflow.name} queued.")
            return redirect("workflows:run-detail", pk=run.pk)
    return render(request, "workflows/run_form.html", {"workflow": workflow, "form": form})


@login_required
@require_GET
def run_list(request: HtmxHttpRequest) -> HttpResponse:
    runs = access.runs_for(request.user).prefetch_related("machines")
    project = request.GET.get("project", "")
    if project.isdigit() and len(project) < 10:
        runs = runs.filter(project_id=int(project))
    if request.GET.get("mine"):
        runs = runs.filter(created_by_id=request.user.pk)
    context = {"runs": runs[:200], "mine": bool(request.GET.get("mine")), "project": project}
    template = "workflows/runs.html" + ("#run-table" if is_partial(request) else "")
    return render(request, template, context)


def _summary_rows(run: WorkflowRun) -> list[dict]:
    """ansible-runner's per-host stats as the table's rows (its `failures` and `dark` named as the page says)."""
    rows = []
    for host, stats in (run.summary or {}).items() if isinstance(run.summary, dict) else ():
        s = stats if isinstance(stats, dict) else {}
        rows.append(
            {
                "host": host,
                "ok": s.get("ok", 0),
                "changed": s.get("changed", 0),
                "failed": s.get("failures", s.get("failed", 0)),
                "unreachable": s.get("dark", s.get("unreachable", 0)),
                "skipped": s.get("skipped", 0),
            }
        )
    return rows


def _after(request) -> int:
    """?after=<counter>: the events after it (-1: all of them)."""
    value = request.GET.get("after", "")
    return int(value) if re.fullmatch(r"-?\d{1,9}", value) else -1


@login_required
@require_GET
def run_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The run's page; with ?after=<counter> (htmx), only the events after it, the state and, once it has ended,
    the summary and the log."""
    run = _get_run_for_user(request, pk)
    after = _after(request)
    events = list(run.events.filter(counter__gt=after).order_by("counter")[:EVENTS_PER_POLL])
    last = events[-1].counter if events else after
    secret_names = (
        [str(v.get("name")) for v in run.workflow.variables if isinstance(v, dict) and v.get("secret")]
        if isinstance(run.workflow.variables, list)
        else []
    )
    context = {
        "run": run,
        "events": events,
        "last": last,
        # Keep polling while it runs, and until every event is in once it has ended.
        "polling": access.is_running(run) or len(events) == EVENTS_PER_POLL,
        "machines": run.machines.order_by("name"),
        "secret_names": secret_names,
        "summary": _summary_rows(run),
        "may_cancel": access.is_running(run) and access.may_operate(request.user, run),
    }
    template = "workflows/run_detail.html" + ("#run-update" if is_partial(request) and "after" in request.GET else "")
    return render(request, template, context)


@login_required
@require_POST
def run_cancel(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    run = _get_run_for_user(request, pk)
    if not access.may_operate(request.user, run):
        raise PermissionDenied("Cancelling a run takes the operator role on every machine it runs on.")
    try:
        services.workflow_run_cancel(run=run, actor=request.user)
    except (services.WorkflowRefused, PermissionDenied) as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"Run {run.pk}: cancelling.")
    return redirect("workflows:run-detail", pk=run.pk)
