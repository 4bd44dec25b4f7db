"""The machine page's lease form: set or extend the lease (machines.services.leases)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from machines import leases, services
from machines.forms import LeaseForm
from machines.views import _get_machine_for_user
from portal.htmx import HtmxHttpRequest


@login_required
@require_POST
def machine_lease(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    form = LeaseForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(str(m) for v in form.errors.values() for m in v))
        return redirect(machine)
    until = form.until()
    try:
        services.machine_extend_lease(machine=machine, actor=request.user, until=until)
    except leases.LeaseRefused as e:
        messages.error(request, str(e))
    else:
        messages.info(request, f"The lease of {machine.name} ends {until:%Y-%m-%d %H:%M}." if until else "No lease.")
    return redirect(machine)
