import uuid as uuidlib

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from hypervisors import images, networks, services
from hypervisors.forms import HypervisorForm, ImageForm, NetworkForm
from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageStatus
from hypervisors.uploads import spools_large_uploads
from portal.decorators import staff_required
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest, is_partial

# What a sync stores that the list does not show (it shows pools, unmanaged domains and the error): kilobytes
# of JSON per host.
LIST_SKIPS = (
    "domain_types",
    "guest_arches",
    "machine_types",
    "cpu_modes",
    "cpu_models",
    "firmwares",
    "interfaces",
    "devices",
    "networks",
)


@login_required
@require_GET
def hypervisor_list(request: HtmxHttpRequest) -> HttpResponse:
    hypervisors = list(Hypervisor.objects.defer(*LIST_SKIPS))
    template = "hypervisors/list.html"
    if is_partial(request):
        template += "#hypervisor-table"
    checking = any(h.status == HypervisorStatus.PENDING for h in hypervisors)
    return render(request, template, {"hypervisors": hypervisors, "checking": checking})


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


@login_required
@require_GET
def hypervisor_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    template = "hypervisors/detail.html"
    if is_partial(request):
        template += "#hypervisor-facts"
    tenant = settings.PORTAL_TENANT_NETWORK
    has_tenant = any(n["name"] == tenant for n in hv.networks)
    context = {"hv": hv, "network_form": NetworkForm(), "tenant_network": tenant, "has_tenant_network": has_tenant}
    if hv.uses_ssh and request.user.is_staff:
        context["worker_ssh_key"] = services.worker_ssh_public_key()  # a local file, made on first need
    if request.user.is_staff:
        # a domain being adopted is still listed until the next sync sees the portal's mark on it: say whose it is
        uuids = [u for d in hv.unmanaged_domains if _is_uuid(u := str(d.get("uuid", "")))]
        claimed = {str(u): name for u, name in hv.machines.filter(uuid__in=uuids).values_list("uuid", "name")}
        context["unmanaged"] = [
            {**d, "machine": claimed.get(str(d.get("uuid", "")).lower())} for d in hv.unmanaged_domains
        ]
    return render(request, template, context)


def _save_form(form: HypervisorForm, save) -> Hypervisor | None:
    """Run a service with the form's data; put its ValidationError back on the form."""
    if not form.is_valid():
        return None
    try:
        return save(form.cleaned_data)
    except ValidationError as e:
        add_errors(form, e)
        return None


@staff_required
@require_http_methods(["GET", "POST"])
def hypervisor_create(request: HtmxHttpRequest) -> HttpResponse:
    form = HypervisorForm(request.POST or None)
    if request.method == "POST":
        hv = _save_form(form, lambda data: services.hypervisor_create(**data))
        if hv:
            messages.success(request, f"Hypervisor {hv.name} added; checking the connection now.")
            return redirect(hv)
    return render(request, "hypervisors/form.html", {"form": form, "hv": None})


@staff_required
@require_http_methods(["GET", "POST"])
def hypervisor_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    form = HypervisorForm(request.POST or None, instance=Hypervisor.objects.get(pk=pk))
    if request.method == "POST":
        saved = _save_form(form, lambda data: services.hypervisor_update(hypervisor=hv, **data))
        if saved:
            messages.success(request, f"Hypervisor {saved.name} saved.")
            return redirect(saved)
    return render(request, "hypervisors/form.html", {"form": form, "hv": hv})


@staff_required
@require_POST
def hypervisor_sync(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    services.hypervisor_request_sync(hypervisor=hv)
    messages.info(request, f"Checking {hv.name} now; the page updates when the answer arrives.")
    return redirect(hv)


@staff_required
@require_POST
def hypervisor_trust_host_key(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    try:
        services.hypervisor_trust_host_keys(hypervisor=hv, fingerprints=request.POST.getlist("fingerprint"))
    except services.HostKeyNotOffered as e:
        messages.error(request, str(e))
        return redirect(hv)
    messages.success(request, f"{hv.name}'s SSH host key is trusted; checking it now.")
    return redirect(hv)


@staff_required
@require_http_methods(["GET", "POST"])
def hypervisor_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    if request.method == "POST":
        try:
            services.hypervisor_delete(hypervisor=hv)
        except services.HypervisorInUse as e:
            messages.error(request, str(e))
            return redirect(hv)
        messages.success(request, f"Hypervisor {hv.name} removed from the portal; nothing on it was touched.")
        return redirect("hypervisors:list")
    return render(request, "hypervisors/delete.html", {"hv": hv})


# --- images -------------------------------------------------------------------------


@login_required
@require_GET
def image_list(request: HtmxHttpRequest) -> HttpResponse:
    images = list(Image.objects.all())
    template = "hypervisors/image_list.html"
    if is_partial(request):
        template += "#image-table"
    busy = any(i.status == ImageStatus.IMPORTING for i in images)
    return render(request, template, {"images": images, "busy": busy})


@login_required
@require_GET
def image_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(Image, pk=pk)
    template = "hypervisors/image_detail.html"
    if is_partial(request):
        template += "#image-facts"
    return render(request, template, {"image": image, "copies": image.copies.select_related("hypervisor")})


def _create_image(request, form: ImageForm) -> Image:
    data = form.cleaned_data
    common = {
        "name": data["name"],
        "kind": data["kind"],
        "fmt": data["format"],
        "owner": request.user,
        "os_name": data["os_name"],
        "default_user": data["default_user"],
        "arch": data["arch"],
    }
    if data["source"] == "upload":
        return images.image_create_from_upload(uploaded=data["file"], **common)
    if data["source"] == "url":
        return images.image_create_from_url(
            source_url=data["source_url"], expected_sha256=data["expected_sha256"], **common
        )
    return images.image_register_volume(
        hypervisor=data["hypervisor"], pool=data["pool"], volume=data["volume"], **common
    )


@staff_required
@require_http_methods(["GET", "POST"])
@spools_large_uploads
def image_create(request: HtmxHttpRequest) -> HttpResponse:
    form = ImageForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            image = _create_image(request, form)
        except ValidationError as e:
            add_errors(form, e)
        else:
            messages.success(request, f"Image {image.name} added; it is checked before use.")
            if request.htmx:
                return HttpResponseClientRedirect(image.get_absolute_url())
            return redirect(image)
    return render(request, "hypervisors/image_form.html", {"form": form})


@staff_required
@require_http_methods(["GET", "POST"])
def image_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(Image, pk=pk)
    if request.method == "POST":
        try:
            images.image_delete(image=image)
        except images.ImageInUse as e:
            messages.error(request, str(e))
            return redirect(image)
        messages.success(request, f"Image {image.name} deleted.")
        return redirect("hypervisors:image-list")
    return render(request, "hypervisors/image_delete.html", {"image": image})


@staff_required
@require_POST
def network_create(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    form = NetworkForm(request.POST)
    if form.is_valid():
        data = {k: (v or "") for k, v in form.cleaned_data.items()}
        try:
            spec = networks.spec_from(data)
            networks.network_create(hypervisor=hv, spec=spec)
            messages.success(request, f"Defining network {spec.name} on {hv.name}; it appears below once made.")
            return redirect(hv)
        except ValidationError as e:
            add_errors(form, e)
    messages.error(
        request,
        "The network was not defined: " + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in form.errors.items()),
    )
    return redirect(hv)


@staff_required
@require_POST
def network_delete(request: HtmxHttpRequest, pk: int, name: str) -> HttpResponse:
    hv = get_object_or_404(Hypervisor, pk=pk)
    try:
        networks.network_delete(hypervisor=hv, name=name)
        messages.success(request, f"Removing network {name} from {hv.name}.")
    except ValidationError as e:
        messages.error(request, " ".join(e.messages))
    return redirect(hv)
