from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.html import format_html
from django.views.decorators.clickjacking import xframe_options_deny
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from hypervisors.models import Hypervisor, HypervisorStatus, Image
from machines import access, cloudinit, consoles, policy, provisioning, services
from machines.access import machines_for
from machines.capacity import usage_report
from machines.forms import AdoptForm, GrowDiskForm, MachineForm, SnapshotForm
from machines.models import Machine
from machines.states import DeployType, PowerAction, PowerState, Status
from portal.decorators import staff_required
from portal.forms import add_errors
from portal.htmx import HtmxHttpRequest, is_partial
from portal.queue import queue_report


def _get_machine_for_user(request, pk: int, need: str = access.VIEW) -> Machine:
    """The machine if the user may see it (else 404) and act on it as `need` says (else 403). Views that call
    a machine service ask only for visibility: the service decides by machines.policy (PermissionDenied: 403)."""
    machine = machines_for(request.user).filter(pk=pk).first()
    if machine is None:
        raise Http404("No such machine.")
    access.require(request.user, machine, need)
    return machine


SORTS = {
    "name": "name",
    "-name": "-name",
    "created": "created",
    "-created": "-created",
    "status": "status",
    "hypervisor": "hypervisor__name",
    "owner": "owner__username",
}
LIST_SKIPS = ("user_data", "script", "ssh_authorized_keys", "packages", "bmc_password_encrypted")
BULK_ACTIONS = {"start": "Start", "shutdown": "Shut down", "poweroff": "Power off", "delete": "Delete"}


def _filtered_machines(request):
    machines = machines_for(request.user)
    q = {k: request.GET.get(k, "").strip() for k in ("q", "status", "type", "hypervisor", "owner", "sort", "tag")}
    if q["tag"]:
        machines = services.machines_tagged(machines, q["tag"])
    if q["q"]:
        machines = machines.filter(
            Q(name__icontains=q["q"]) | Q(uuid__icontains=q["q"]) | Q(nics__mac__icontains=q["q"])
        ).distinct()
    if q["status"]:
        machines = machines.filter(status=q["status"])
    if q["type"]:
        machines = machines.filter(deploy_type=q["type"])
    if q["hypervisor"]:
        machines = machines.filter(hypervisor__name=q["hypervisor"])
    if q["owner"] and request.user.is_staff:
        machines = machines.filter(owner__username=q["owner"])
    return machines.order_by(SORTS.get(q["sort"], "-created"), "pk"), q


@login_required
@require_GET
def machine_list(request: HtmxHttpRequest) -> HttpResponse:
    machines, q = _filtered_machines(request)
    # Leave out what the table does not show: the hypervisors' capabilities, the machines' cloud-init texts.
    machines = access.for_lists(machines).defer(*LIST_SKIPS)
    page = Paginator(machines, 25).get_page(request.GET.get("page"))
    template = "machines/list.html"
    if is_partial(request):
        template += "#machine-table"
    return render(
        request,
        template,
        {
            "page": page,
            "machines": page.object_list,
            "q": q,
            "busy": any(m.is_busy for m in page.object_list),
            # Everyone who sees a machine may open its console (machines.policy); it is offered while it runs.
            "console_ready": {m.pk for m in page.object_list if "console" not in policy.idle_actions(m)},
            "statuses": Status.choices,
            "types": DeployType.choices,
            "bulk_actions": BULK_ACTIONS,
            "hypervisors": Hypervisor.objects.values_list("name", flat=True),
        },
    )


@login_required
@require_POST
def machine_bulk(request: HtmxHttpRequest) -> HttpResponse:
    """Start, shut down, power off or delete the selected machines (each checked on its own)."""
    action = request.POST.get("action", "")
    ids = [int(i) for i in request.POST.getlist("ids") if i.isdigit()]
    if action not in BULK_ACTIONS or not ids:
        messages.error(request, "Select machines and an action.")
        return redirect("machines:list")
    done, failed = [], []
    for machine in machines_for(request.user).filter(pk__in=ids):
        try:
            if action == "delete":
                services.machine_delete(machine=machine, actor=request.user)
            else:
                services.machine_power(machine=machine, action=action, actor=request.user)
            done.append(machine.name)
        except PermissionDenied:
            failed.append(f"{machine.name}: your role does not allow this")
        except (services.MachineError, ValidationError) as e:
            failed.append(f"{machine.name}: {' '.join(getattr(e, 'messages', [str(e)]))}")
    if done:
        messages.success(request, f"{BULK_ACTIONS[action]}: {', '.join(done)}.")
    for message in failed:
        messages.error(request, message)
    return redirect("machines:list")


@login_required
@require_GET
def machine_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    fragment = request.GET.get("fragment")
    if fragment == "serial":
        if machine.power_state == PowerState.RUNNING or not machine.last_observed.serial_log:
            services.machine_serial_log_request(machine=machine)
        return render(request, "machines/detail.html#serial-log", {"machine": machine})
    template = "machines/detail.html"
    if is_partial(request):
        template += "#machine-state"
    events = machine.events.order_by("-created", "-pk")[:100]
    isos = Image.objects.filter(kind="iso", status="ready") if machine.cdroms.exists() else []
    if machine.power_state == PowerState.RUNNING and machine.last_observed.screenshot_taken is None:
        # The page shows the screen once there is one; asked at most once a minute while none comes.
        services.machine_screenshot_request(machine=machine, max_age=60)
    worker_down = machine.is_busy and not queue_report().worker_ok
    actions = policy.page_context(request.user, machine)
    # Where it may move: the other hypervisors that take machines (placement or the one named re-checks room).
    targets = (
        Hypervisor.objects.filter(enabled=True, maintenance=False, status=HypervisorStatus.ONLINE)
        .exclude(pk=machine.hypervisor_id)
        .order_by("name")
        .only("pk", "name")
        if "migrate" in actions["shown"]
        else []
    )
    return render(
        request,
        template,
        {
            "machine": machine,
            "migrate_targets": targets,
            "events": events,
            "grow_form": GrowDiskForm(),
            "snapshots": services.snapshot_tree(machine),
            "snapshot_method": services.method_text(machine),
            "snapshot_form": SnapshotForm(initial={"memory": machine.power_state == PowerState.RUNNING}),
            "power_actions": PowerAction.choices,
            "isos": isos,
            "worker_down": worker_down,
            **actions,
        },
    )


def _form_context(request, form: MachineForm) -> dict:
    return {"form": form, "usage": usage_report(request.user)}


@login_required
@require_http_methods(["GET", "POST"])
def machine_create(request: HtmxHttpRequest) -> HttpResponse:
    assert request.user.is_authenticated  # login_required
    # Every saved key; a source's keys are every line it last gave (none before its first fetch).
    saved_keys = "\n".join(k for k in request.user.ssh_keys.values_list("public_key", flat=True) if k.strip())
    form = MachineForm(request.POST or None, initial={"ssh_authorized_keys": saved_keys}, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            machine = services.machine_create(owner=request.user, **form.service_kwargs())
        except ValidationError as e:
            add_errors(form, e, aliases=MachineForm.SERVICE_FIELDS)
        else:
            messages.success(request, f"Creating {machine.name}; follow the steps below.")
            return redirect(machine)
    return render(request, "machines/form.html", _form_context(request, form))


@login_required
@require_POST
def machine_form_fields(request: HtmxHttpRequest) -> HttpResponse:
    """The create form again, its choices following the hypervisor just picked, with what was typed
    kept (htmx fragment; nothing is validated yet)."""
    multi = {"extra_isos", "hostdevs"}
    initial: dict[str, object] = {
        k: (request.POST.getlist(k) if k in multi else request.POST.get(k))
        for k in request.POST
        if k != "csrfmiddlewaretoken"
    }
    for name in ("deletion_protection", "autostart", "watchdog", "rng", "secure_boot", "power_on"):
        initial[name] = name in request.POST  # an unchecked box is absent, not False
    form = MachineForm(initial=initial, user=request.user)
    return render(request, "machines/form.html#form-body", _form_context(request, form))


@login_required
@require_POST
def machine_preview(request: HtmxHttpRequest) -> HttpResponse:
    """The cloud-init documents the form would produce (htmx fragment)."""
    form = MachineForm(request.POST)
    form.is_valid()  # partial data is fine for a preview
    data = form.cleaned_data
    machine = Machine(
        name=data.get("name") or "new-machine",
        image=data.get("image"),
        ssh_authorized_keys=data.get("ssh_authorized_keys", ""),
        packages=data.get("packages", ""),
        script=data.get("script", ""),
        user_data=data.get("user_data", ""),
        instance_id="i-preview",
    )
    try:
        spec = provisioning.seed_spec_from(machine, form.nic_inputs() if "nic" in data else [])
        documents, error = cloudinit.preview(spec), ""
    except cloudinit.CloudInitError as e:
        documents, error = {}, str(e)
    return render(request, "machines/form.html#preview", {"documents": documents, "preview_error": error})


def _act(request, machine: Machine, call, done: str = "") -> HttpResponse:
    """Run a machine service from a button: its refusal becomes a message; back to the machine."""
    try:
        call()
        if done:
            messages.info(request, done)
    except (services.MachineError, ValidationError, ValueError) as e:
        messages.error(request, " ".join(e.messages) if isinstance(e, ValidationError) else str(e))
    return redirect(machine)


@login_required
@require_POST
def machine_power(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    action = request.POST.get("action", "")
    machine = _get_machine_for_user(request, pk)
    return _act(request, machine, lambda: services.machine_power(machine=machine, action=action, actor=request.user))


@login_required
@require_POST
def machine_rebuild(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    return _act(
        request,
        machine,
        lambda: services.machine_rebuild(
            machine=machine, actor=request.user, snapshot=request.POST.get("snapshot") == "1"
        ),
        f"Rebuilding {machine.name} from {machine.image}.",
    )


@login_required
@require_POST
def machine_grow_disk(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    form = GrowDiskForm(request.POST)
    if not form.is_valid():
        messages.error(request, form.errors.as_text())
        return redirect(machine)
    size = form.cleaned_data["disk_gib"]
    return _act(
        request,
        machine,
        lambda: services.machine_grow_disk(machine=machine, disk_gib=size, actor=request.user),
        f"Growing the disk of {machine.name} to {size} GiB.",
    )


@login_required
@require_POST
def machine_protect(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    services.machine_set_protection(machine=machine, protected=request.POST.get("protected") == "1", actor=request.user)
    return redirect(machine)


@login_required
@require_POST
def machine_migrate(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Move the stopped machine to the hypervisor chosen (empty: placement picks), cold."""
    machine = _get_machine_for_user(request, pk)
    target_id = request.POST.get("hypervisor", "")
    target = Hypervisor.objects.filter(pk=int(target_id)).first() if target_id.isdigit() else None
    if target_id and target is None:
        messages.error(request, "No such hypervisor.")
        return redirect(machine)
    how = request.POST.get("how", "")  # a running machine: "live", or "restart" (shut down, moved, started)
    restart, live = how == "restart", how == "live"
    moved_to: list[str] = []

    def move() -> None:
        target_hv = services.machine_migrate(
            machine=machine, actor=request.user, hypervisor=target, restart=restart, live=live
        )
        moved_to.append(target_hv.name)

    response = _act(request, machine, move)
    if moved_to:
        messages.info(
            request, f"Moving {machine.name} to {moved_to[0]}: its disks are copied, then it is defined there."
        )
    return response


@login_required
@require_POST
def machine_migrate_cancel(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    return _act(
        request,
        machine,
        lambda: services.machine_migrate_cancel(machine=machine, actor=request.user),
        f"Cancelling the move of {machine.name}: it runs on where it is.",
    )


@staff_required
@require_POST
def hypervisor_maintenance(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Drain the hypervisor (no new machines or moves land there) or return it to service."""
    hv = get_object_or_404(Hypervisor, pk=pk)
    enabled = request.POST.get("maintenance") == "1"
    services.hypervisor_set_maintenance(hypervisor=hv, enabled=enabled, actor=request.user)
    messages.info(
        request,
        f"{hv.name} is in maintenance: nothing new is placed or moved there."
        if enabled
        else f"{hv.name} is back in service.",
    )
    return redirect(hv)


@staff_required
@require_POST
def hypervisor_evacuate(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Drain the hypervisor and move each of its machines where placement finds room (running ones only when
    asked to restart them: shut down, moved, started there)."""
    hv = get_object_or_404(Hypervisor, pk=pk)
    report = services.hypervisor_evacuate(hypervisor=hv, actor=request.user, restart=request.POST.get("restart") == "1")
    messages.info(request, f"Evacuating {hv.name}: " + ("; ".join(report) if report else "it has no machines."))
    return redirect(hv)


@login_required
@require_POST
def machine_autostart(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Whether the hypervisor starts the machine when it boots (set in libvirt by the worker)."""
    machine = _get_machine_for_user(request, pk)
    services.machine_set_autostart(machine=machine, enabled=request.POST.get("enabled") == "1", actor=request.user)
    return redirect(machine)


@login_required
@require_http_methods(["GET", "POST"])
def machine_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    if request.method == "POST":
        # an adopted machine's form says whether its disks stay (checked: they do); the others' have no choice
        keep_disks = request.POST.get("keep_disks") == "1" if machine.adopted else None
        try:
            services.machine_delete(machine=machine, actor=request.user, keep_disks=keep_disks)
        except services.MachineError as e:
            messages.error(request, str(e))
            return redirect(machine)
        what = "its domain is being removed, its disks stay" if keep_disks else "its domain and disks are being removed"
        messages.success(request, f"Deleting {machine.name}: {what}.")
        return redirect("machines:list")
    policy.require(request.user, machine, "delete")  # the confirmation is for those who may delete
    return render(request, "machines/delete.html", {"machine": machine, **policy.page_context(request.user, machine)})


# --- consoles and screenshots -----------------------------------------------------------


def console_config(request, machine_id: int | None, token_url: str = "", kind: str = "vnc") -> dict:
    """What the console page's script needs. Never a token: console_page_key() adds one where it may."""
    return {
        "machineId": machine_id,
        "kind": kind,
        "tokenUrl": token_url,
        "consoleUrl": settings.PORTAL_CONSOLE_URL,
        "consolePort": settings.PORTAL_CONSOLE_PORT,
    }


def console_page_key(request, machine: Machine, kind: str) -> dict | None:
    """A console token issued with the page itself (issue 18: no separate request before the websocket opens), for
    a top-level navigation from the portal itself or typed by the user (Sec-Fetch-Site same-origin or none): the
    same single-use, bound, short-lived token the page would have asked for by POST at once. Anything else gets no
    token with the page and asks by POST (CSRF-checked), as before: a request from another site (its response is
    unreadable there anyway, but it would still mint a token and an audit row), a frame, a prefetch or prerender
    (nobody would spend it), a browser that sends no Sec-Fetch headers. None also when the user may not have this
    kind of console (a viewer's serial): the page's POST then shows why."""
    headers = request.headers
    if (
        headers.get("Sec-Fetch-Mode") != "navigate"
        or headers.get("Sec-Fetch-Dest") != "document"
        or headers.get("Sec-Fetch-Site") not in ("same-origin", "none")
        or headers.get("Sec-Purpose")
        or headers.get("Purpose")
    ):
        return None
    try:
        raw, expires = consoles.console_token_issue(
            machine=machine, user=request.user, kind=kind, session_key=request.session.session_key or ""
        )
    except consoles.ConsoleDenied:
        return None
    return {
        "token": raw,
        "reconnect": consoles.console_reconnect_secret(raw),
        "expires_at": expires.isoformat(),
        "view_only": not access.can(request.user, machine, policy.need("console_input")),
    }


CONSOLE_KINDS = {"machines/console.html": "vnc", "machines/serial.html": "serial"}


def _console_page(request, pk: int, template: str) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    kind = CONSOLE_KINDS[template]
    config = console_config(request, machine.pk, reverse("machines:console-token", args=[machine.pk]), kind=kind)
    config["key"] = console_page_key(request, machine, kind)
    response = render(request, template, {"machine": machine, "config": config})
    response["Cache-Control"] = "no-store"  # it may carry a token: never kept, a reload or Back asks for a new one
    return response


@login_required
@require_GET
def machine_console(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The graphical console (noVNC through the console proxy)."""
    return _console_page(request, pk, "machines/console.html")


@login_required
@require_GET
def machine_serial(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The interactive serial console (xterm.js through the console proxy)."""
    return _console_page(request, pk, "machines/serial.html")


@login_required
@require_POST
def machine_console_token(request: HtmxHttpRequest, pk: int) -> JsonResponse:
    """A fresh single-use token for the console page (POST, CSRF-checked)."""
    machine = _get_machine_for_user(request, pk)
    kind = request.POST.get("kind", "vnc")
    if kind not in consoles.KINDS:
        return JsonResponse({"error": f"kind is one of {', '.join(consoles.KINDS)}"}, status=400)
    try:
        raw, expires = consoles.console_token_issue(
            machine=machine, user=request.user, kind=kind, session_key=request.session.session_key or ""
        )
    except consoles.ConsoleDenied as e:
        return JsonResponse({"error": str(e)}, status=403)
    view_only = not access.can(request.user, machine, policy.need("console_input"))
    # reconnect: the page keeps it in memory and offers it as a websocket subprotocol (never in a URL);
    # within the reconnect grace a spent token connects again only with it.
    body = {
        "token": raw,
        "reconnect": consoles.console_reconnect_secret(raw),
        "expires_at": expires.isoformat(),
        "view_only": view_only,
    }
    response = JsonResponse(body)
    response["Cache-Control"] = "no-store"
    return response


@xframe_options_deny
@require_GET
def console_standalone(request) -> HttpResponse:
    """The console page for a one-time URL from the API: the credential is in the URL's fragment,
    which browsers never send to the server, so it reaches no log."""
    response = render(request, "machines/console.html", {"machine": None, "config": console_config(request, None)})
    response["Referrer-Policy"] = "no-referrer"
    return response


@login_required
@require_GET
def machine_screenshot(request: HtmxHttpRequest, pk: int) -> HttpResponseBase:
    machine = _get_machine_for_user(request, pk)
    if machine.power_state == PowerState.RUNNING:
        services.machine_screenshot_request(machine=machine)
    path = services.screenshot_path(machine)
    if not path.exists():
        raise Http404("No screenshot yet.")
    response = FileResponse(open(path, "rb"), content_type="image/png")
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def machine_media(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Insert an ISO into a CD-ROM drive, or eject it (empty image)."""
    machine = _get_machine_for_user(request, pk)
    image_id = request.POST.get("image") or None
    image = Image.objects.filter(pk=image_id).first() if image_id else None
    if image_id and image is None:
        messages.error(request, "No such ISO.")
        return redirect(machine)
    return _act(
        request,
        machine,
        lambda: services.machine_change_media(
            machine=machine, slot=int(request.POST.get("slot", "0")), image=image, actor=request.user
        ),
    )


@login_required
@require_POST
def machine_boot_cdrom(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    return _act(
        request,
        machine,
        lambda: services.machine_boot_cdrom_once(machine=machine, actor=request.user),
        f"{machine.name} is restarting from its CD-ROM.",
    )


@login_required
@require_POST
def machine_bmc_reveal(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The BMC password, shown once in the page (htmx); the reveal is recorded."""
    machine = _get_machine_for_user(request, pk)
    try:
        data = services.machine_bmc_reveal(machine=machine, actor=request.user)
    except services.MachineError as e:
        raise Http404(str(e)) from None
    response = HttpResponse(format_html("<code>{}</code>", data["password"]))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def machine_boot_device(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    machine = _get_machine_for_user(request, pk)
    return _act(
        request,
        machine,
        lambda: services.machine_set_boot_device(
            machine=machine,
            device=request.POST.get("device", ""),
            persistent=request.POST.get("persistent") == "1",
            actor=request.user,
        ),
        "Boot device set through the BMC; it takes effect at the next cold start.",
    )


@login_required
@require_POST
def machines_instackenv(request: HtmxHttpRequest) -> HttpResponse:
    """instackenv.json of the user's network-boot machines, as a download (holds BMC passwords; recorded)."""
    machines = [
        m
        for m in machines_for(request.user).filter(bmc_port__isnull=False)
        if access.can(request.user, m, policy.need("reveal_bmc"))
    ]  # they hold BMC passwords
    response = JsonResponse(services.instackenv(machines, user=request.user), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = 'attachment; filename="instackenv.json"'
    response["Cache-Control"] = "no-store"
    return response


@staff_required
@require_http_methods(["GET", "POST"])
def hypervisor_adopt(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Adopt one of the hypervisor's domains that the portal does not manage (`domain_uuid`, as the last sync
    recorded it): the form, then the service (machines/services/adoption.py); a refusal is shown on the form."""
    hv = get_object_or_404(Hypervisor, pk=pk)
    form = AdoptForm(request.POST or None, initial={"domain_uuid": request.GET.get("domain", "")})
    wanted = (form.data.get("domain_uuid") if form.is_bound else request.GET.get("domain", "")) or ""
    domain = next((d for d in hv.unmanaged_domains if str(d.get("uuid", "")).lower() == wanted.lower()), None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            machine = services.machine_adopt(
                hypervisor=hv,
                domain_uuid=str(data["domain_uuid"]),
                owner=data["owner"],
                project=data["project"],
                actor=request.user,
                name=data["name"] or None,
                bmc=data["bmc"],
            )
        except services.MachineError as e:
            form.add_error(None, str(e))
        else:
            messages.success(request, f"Adopting {domain['name'] if domain else machine.name} as {machine.name}.")
            return redirect(machine)
    return render(request, "machines/adopt.html", {"hv": hv, "form": form, "domain": domain})


@staff_required
@require_POST
def hypervisor_orphans_remove(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Remove what the portal left on the hypervisor that no machine owns: the items named `key`, or all of them
    (`all=1`). The worker checks each again before it acts."""
    hv = get_object_or_404(Hypervisor, pk=pk)
    keys = None if request.POST.get("all") == "1" else request.POST.getlist("key")
    try:
        queued = services.hypervisor_orphans_remove(hypervisor=hv, actor=request.user, keys=keys)
    except services.MachineError as e:
        messages.error(request, str(e))
    else:
        messages.info(
            request,
            f"Removing {len(queued)} item{'s' if len(queued) != 1 else ''} left on {hv.name}: each one only if no "
            "machine owns it by then (the audit records each).",
        )
    return redirect(hv)
