"""The machine's Devices page (machines.services.devices): its extra disks, NICs and CD-ROM drives, each with a
remove button, and forms that add one. Every button posts here with an `op`; a refusal is a message on the page."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from hypervisors.drivers.domxml import HOT_PLUG_BUSES
from hypervisors.models import Image
from hypervisors.offers import NIC_MODELS
from machines import nic_policy, policy, provisioning, services
from machines.models import Machine
from machines.views import _get_machine_for_user
from portal.htmx import HtmxHttpRequest


def _network_choices(user, machine: Machine) -> list[tuple[str, str]]:
    """The networks a NIC may go on, as a create's form offers them: the policy's choices; staff also every
    libvirt network of the hypervisor and user-mode NAT."""
    out = {c.value: c.label for c in nic_policy.choices_for(user, [machine.hypervisor], machine.project)}
    if user.is_staff:
        for net in machine.hypervisor.networks:
            out.setdefault(f"network:{net['name']}", net["name"])
        out.setdefault("user:", "user-mode NAT (inside QEMU)")
    return list(out.items())


def _number(text: str) -> int:
    if not text.strip().isdigit() or len(text.strip()) > 6:
        raise ValidationError("Give a whole number.")
    return int(text)


def _image(request, kind: str) -> Image | None:
    pk = request.POST.get("image", "")
    if not pk:
        return None
    image = Image.objects.filter(pk=pk, kind=kind).first() if pk.isdigit() else None
    if image is None:
        raise ValidationError(f"No such {'ISO' if kind == 'iso' else 'disk image'}.")
    return image


def _call(request, machine: Machine):
    """The service behind the posted `op`, with the form's values."""
    op, post, me = request.POST.get("op", ""), request.POST, request.user
    if op == "attach-disk":
        return services.machine_attach_disk(
            machine=machine, actor=me, size_gib=_number(post.get("size_gib", "")), image=_image(request, "disk")
        )
    if op == "detach-disk":
        keep = post.get("keep_volume") == "on"
        return services.machine_detach_disk(
            machine=machine, actor=me, disk=_number(post.get("disk", "")), keep_volume=keep
        )
    if op == "attach-nic":
        kind, _, source = post.get("network", "").partition(":")
        nic = services.NicInput(
            type=kind, source=source, mac=post.get("mac", "").strip(), model=post.get("model", "virtio")
        )
        return services.machine_attach_nic(machine=machine, actor=me, nic=nic)
    if op == "detach-nic":
        return services.machine_detach_nic(machine=machine, actor=me, nic=_number(post.get("nic", "")))
    if op == "add-cdrom":
        return services.machine_add_cdrom(machine=machine, actor=me, image=_image(request, "iso"))
    if op == "remove-cdrom":
        return services.machine_remove_cdrom(machine=machine, actor=me, slot=_number(post.get("slot", "")))
    raise ValidationError("Unknown change.")


@login_required
@require_http_methods(["GET", "POST"])
def machine_devices(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    if request.method == "POST":
        try:
            _call(request, machine)
        except ValidationError as e:
            messages.error(request, " ".join(e.messages))
        except services.MachineError as e:
            messages.error(request, str(e))
        else:
            messages.success(request, f"Changing the devices of {machine.name}; follow the events on its page.")
        return redirect(reverse("machines:devices", args=[machine.pk]))
    entries = provisioning.extra_disk_entries(machine)
    images = {i.pk: i for i in Image.objects.filter(pk__in=[e["image"] for e in entries if e.get("image")])}
    disks = [
        {
            "number": i + 1,
            "size_gib": e["size_gib"],
            "image": images.get(e.get("image") or 0),
            "volume": machine.extra_disk_volume(i),
        }
        for i, e in enumerate(entries)
    ]
    context = {
        "machine": machine,
        "disks": disks,
        "nics": list(machine.nics.all()),
        "cdroms": list(machine.cdroms.select_related("image")),
        "disk_images": Image.objects.filter(kind="disk", status="ready"),
        "isos": Image.objects.filter(kind="iso", status="ready"),
        "networks": _network_choices(request.user, machine),
        "models": NIC_MODELS,
        "hot_bus": machine.disk_bus in HOT_PLUG_BUSES,
        **policy.page_context(request.user, machine),
    }
    return render(request, "machines/devices.html", context)
