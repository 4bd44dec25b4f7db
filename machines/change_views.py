"""The machine's Edit page (machines.services.changes): vCPUs, memory, name, description, tags, deletion
protection and autostart. Only what was changed goes to the service; a refusal is shown with the form as sent."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from machines import access, policy, services
from machines.forms import MachineEditForm
from machines.views import _get_machine_for_user
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest


@login_required
@require_http_methods(["GET", "POST"])
def machine_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk, access.OPERATE)  # operators label; admins all
    form = MachineEditForm(request.POST or None, machine=machine)
    if request.method == "POST" and form.is_valid():
        changes = form.changes()
        if not changes:
            messages.info(request, "Nothing was changed.")
            return redirect(machine)
        try:
            services.machine_change(machine=machine, actor=request.user, **changes)
        except ValidationError as e:
            add_errors(form, e)
        except (services.MachineError, PermissionDenied) as e:
            form.add_error(None, str(e))
        else:
            messages.success(request, f"Changing {', '.join(changes)} of {machine.name}; follow the events below.")
            return redirect(machine)
    context = {"machine": machine, "form": form, **policy.page_context(request.user, machine)}
    return render(request, "machines/edit.html", context)
