"""The machine's clone page: "Clone" (one by name, or several by a pattern; linked or full) and "Save as image"
(machines.services.clones). A refusal is shown on the page with the form as it was sent."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect, render

from machines import policy, services
from machines.forms import CloneForm, SaveImageForm
from machines.models import Machine
from machines.views import _get_machine_for_user
from portal.htmx import HtmxHttpRequest


def _page(request, machine: Machine, clone_form: CloneForm, image_form: SaveImageForm) -> HttpResponse:
    context = {
        "machine": machine,
        "form": clone_form,
        "image_form": image_form,
        **policy.page_context(request.user, machine),
    }
    return render(request, "machines/clone.html", context)


def _refused(form, e: Exception) -> None:
    if isinstance(e, ValidationError) and hasattr(e, "error_dict"):
        for field, errors in e.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, " ".join(e.messages) if isinstance(e, ValidationError) else str(e))


@login_required
def machine_clone(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    policy.require(request.user, machine, "clone")
    if request.method != "POST":
        form = CloneForm(initial={"name": f"{machine.name}-clone"[:63]}, machine=machine)
        return _page(request, machine, form, SaveImageForm())
    form = CloneForm(request.POST, machine=machine)
    if form.is_valid():
        data = form.cleaned_data
        try:
            made = services.machine_clone(
                machine=machine,
                actor=request.user,
                name=data["name"],
                count=data["count"],
                name_pattern=data["name_pattern"] or None,
                linked=data["linked"],
                snapshot=data.get("snapshot"),
            )
        except (services.MachineError, ValidationError) as e:
            _refused(form, e)
        else:
            messages.success(request, f"Cloning {machine.name} into {', '.join(m.name for m in made)}.")
            return redirect(made[0] if len(made) == 1 else machine)
    return _page(request, machine, form, SaveImageForm())


@login_required
def machine_save_image(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    policy.require(request.user, machine, "save_image")
    if request.method != "POST":
        return redirect("machines:clone", pk=machine.pk)
    form = SaveImageForm(request.POST)
    if form.is_valid():
        try:
            image = services.image_from_machine(
                machine=machine,
                actor=request.user,
                name=form.cleaned_data["name"],
                os_name=form.cleaned_data["os_name"],
            )
        except (services.MachineError, ValidationError) as e:
            _refused(form, e)
        else:
            messages.success(request, f"Saving {machine.name}'s disk as image {image.name}.")
            return redirect(machine)
    return _page(request, machine, CloneForm(initial={"name": f"{machine.name}-clone"[:63]}, machine=machine), form)
