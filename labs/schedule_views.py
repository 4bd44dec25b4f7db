"""The Schedules card of the machine page and of the lab page (labs/schedules.py), and a lab's lease form.

The machine page loads its card from here (htmx), since machines import nothing from labs."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from labs import schedules, services
from labs.forms import ScheduleForm
from labs.models import Lab, ScheduledAction
from machines import access, leases, policy
from machines.access import machines_for
from machines.forms import LeaseForm
from machines.models import Machine
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest, is_partial

DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _target(request, kind: str, pk: int) -> Machine | Lab:
    visible = machines_for(request.user) if kind == "machine" else services.labs_for(request.user)
    return get_object_or_404(visible, pk=pk)


def _page(target: Machine | Lab) -> HttpResponse:
    return redirect(target) if isinstance(target, Machine) else redirect("labs:detail", target.pk)


def _may(user, target: Machine | Lab) -> bool:
    if isinstance(target, Machine):
        return not policy.refusal(user, target, "schedule")
    return access.allows(services.lab_level(user, target), access.OPERATE)


def _card(request, target: Machine | Lab, form: ScheduleForm) -> HttpResponse:
    kind = "machine" if isinstance(target, Machine) else "lab"
    rows = list(ScheduledAction.objects.filter(**{kind: target}).select_related("created_by"))
    for s in rows:  # for the template only, as an annotate() would add it
        s.days_text = (" on " + ", ".join(DAYS[d] for d in s.weekdays)) if s.weekdays else " every day"  # type: ignore[attr-defined]
    context = {
        "target": target,
        "kind": kind,
        "form": form,
        "time_zone": settings.TIME_ZONE,
        "schedules": rows,
        "may": _may(request.user, target),
        "post_url": f"/labs/machines/{target.pk}/schedules/" if kind == "machine" else f"/labs/{target.pk}/schedules/",
    }
    template = "labs/schedules.html" + ("#schedules-card" if is_partial(request) else "")
    return render(request, template, context)


@login_required
@require_http_methods(["GET", "POST"])
def schedules_card(request: HtmxHttpRequest, pk: int, kind: str = "machine") -> HttpResponse:
    """GET: the card (a whole page without htmx). POST: a new schedule; the card again, with why if refused."""
    target = _target(request, kind, pk)
    if request.method == "GET":
        return _card(request, target, ScheduleForm())
    form = ScheduleForm(request.POST)
    if form.is_valid():
        try:
            schedules.schedule_create(actor=request.user, **{kind: target}, **form.cleaned_data)
        except ValidationError as e:
            add_errors(form, e)
        except PermissionDenied as e:
            form.add_error(None, str(e) or "Your role does not allow this.")
        else:
            if not is_partial(request):
                return _page(target)
            form = ScheduleForm()
    return _card(request, target, form)


@login_required
@require_POST
def schedule_delete(request: HtmxHttpRequest, sid: int) -> HttpResponse:
    schedule = get_object_or_404(schedules.schedules_for(request.user), pk=sid)
    target: Machine | Lab = schedule.machine or schedule.lab  # type: ignore[assignment]
    schedules.schedule_delete(schedule=schedule, actor=request.user)  # a role too low: 403
    if is_partial(request):
        return _card(request, target, ScheduleForm())
    return _page(target)


@login_required
@require_POST
def lab_lease(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    lab = _target(request, "lab", pk)
    assert isinstance(lab, Lab)
    form = LeaseForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(str(m) for v in form.errors.values() for m in v))
        return _page(lab)
    try:
        services.lab_set_lease(lab=lab, actor=request.user, until=form.until())
    except leases.LeaseRefused as e:  # a role too low: 403
        messages.error(request, str(e))
    return _page(lab)
