"""The machine page's Snapshots card: take, revert to and delete snapshots (machines.services.snapshots)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from machines import services
from machines.forms import SnapshotForm
from machines.models import MachineSnapshot
from machines.views import _act, _get_machine_for_user
from portal.htmx import HtmxHttpRequest


@login_required
@require_POST
def snapshot_take(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    form = SnapshotForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(f"{k}: {' '.join(str(m) for m in v)}" for k, v in form.errors.items()))
        return redirect(machine)
    data = form.cleaned_data
    return _act(
        request,
        machine,
        lambda: services.snapshot_create(
            machine=machine,
            name=data["name"],
            description=data["description"],
            memory=data["memory"],
            actor=request.user,
        ),
        f"Taking snapshot {data['name']} of {machine.name}.",
    )


def _snapshot(request, pk: int, sid: int):
    machine = _get_machine_for_user(request, pk)
    return machine, get_object_or_404(MachineSnapshot, pk=sid, machine=machine)


@login_required
@require_POST
def snapshot_revert(request: HtmxHttpRequest, pk: int, sid: int) -> HttpResponse:
    machine, snap = _snapshot(request, pk, sid)
    return _act(
        request,
        machine,
        lambda: services.snapshot_revert(machine=machine, snapshot=snap, actor=request.user),
        f"Reverting {machine.name} to snapshot {snap.name}.",
    )


@login_required
@require_POST
def snapshot_delete(request: HtmxHttpRequest, pk: int, sid: int) -> HttpResponse:
    machine, snap = _snapshot(request, pk, sid)
    return _act(
        request,
        machine,
        lambda: services.snapshot_delete(machine=machine, snapshot=snap, actor=request.user),
        f"Deleting snapshot {snap.name} of {machine.name}.",
    )
