"""An AnsiStack inventory import: made (planned, nothing changed), then applied as a job with progress.

Applying goes through the services everyone else uses (hypervisor registration, network definition, image
imports, machine_create with its quotas, placement rules and audit), in four phases, each planned again from
what the portal has by then: hypervisors, networks, images, machines. What exists already is left alone, so a
second run changes nothing (machines are matched by name and hypervisor).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from hypervisors import images as image_services
from hypervisors import networks as network_services
from hypervisors import services as hypervisor_services
from hypervisors.models import Hypervisor, Image, ImageKind, ImageStatus
from labs import ansistack
from labs.models import InventoryImport, Lab, LabMachine
from labs.services import lab_add_machine, lab_get_or_create
from machines import attempts
from machines import services as machine_services
from machines.access import project_choices
from machines.models import Machine, Project
from machines.services import NicInput
from portal import audit
from portal.audit import audited
from portal.refusals import Refusal

log = logging.getLogger(__name__)
IMAGE_WAIT_POLL = 1.0


class ImportRefused(Refusal):
    """An import the portal will not make or apply (too many or too large files, applied already)."""


def _messages(e: Exception) -> str:
    return "; ".join(getattr(e, "messages", None) or [str(e)])


@audited("lab.import_plan")
@transaction.atomic
def inventory_import_create(
    *,
    actor,
    files: list[dict],
    owner,
    vars_file: dict | None = None,
    project: Project | None = None,
    lab_name: str = "",
) -> InventoryImport:
    """Keep the uploaded texts and the plan made from them; nothing else changes."""
    if not files:
        raise ImportRefused("Give at least one inventory file.")
    if len(files) > ansistack.MAX_FILES:
        raise ImportRefused(f"At most {ansistack.MAX_FILES} inventory files at once.")
    for f in [*files, vars_file or {"name": "", "text": ""}]:
        if len(str(f["text"]).encode()) > ansistack.MAX_FILE_BYTES:
            raise ImportRefused(f"{f['name']} is over {ansistack.MAX_FILE_BYTES // 1024} KiB.")
    if project is not None and not project_choices(owner).filter(pk=project.pk).exists():
        raise ValidationError({"project": f"{owner.get_username()} is not an admin of project {project.name}."})
    if lab_name and ansistack._lab_name(lab_name) != lab_name:
        raise ValidationError({"lab_name": "A lab name is lower-case letters, digits and hyphens."})
    plan = ansistack.plan_inventory(files, vars_file=vars_file, owner=owner, lab=lab_name, project=project)
    imp = InventoryImport.objects.create(
        created_by=actor,
        files=files,
        vars_file=vars_file or {},
        owner=owner,
        project=project,
        lab_name=plan.lab,
        plan=plan.as_dict(),
        total_steps=ansistack.count_steps(plan.as_dict()),
    )
    return imp


@audited("lab.import_apply", obj_kwarg="imp")
@transaction.atomic
def inventory_import_apply(*, imp: InventoryImport, actor) -> None:
    """Queue the apply once; a running or finished import is not applied again (make a new one: it will find
    everything there and change nothing)."""
    n = InventoryImport.objects.filter(pk=imp.pk, status=InventoryImport.Status.PLANNED).update(
        status=InventoryImport.Status.APPLYING
    )
    if n != 1:
        raise ImportRefused(f"Import {imp.pk} is {imp.get_status_display().lower()} already.")
    imp.status = InventoryImport.Status.APPLYING
    from labs.tasks import inventory_import_apply_task

    transaction.on_commit(lambda: inventory_import_apply_task(imp.pk))


class _Run:
    """One apply: the import row, its progress and its report."""

    def __init__(self, imp: InventoryImport) -> None:
        self.imp = imp
        self.report: list[str] = list(imp.report)  # a resumed apply goes on from what the dead one said
        self.done = 0

    def plan(self) -> dict:
        imp = self.imp
        plan = ansistack.plan_inventory(
            imp.files, vars_file=imp.vars_file or None, owner=imp.owner, lab=imp.lab_name, project=imp.project
        )
        return plan.as_dict()

    def say(self, line: str, *, step: bool = False) -> None:
        self.report.append(line)
        if step:
            self.done += 1
        total = max(self.imp.total_steps, self.done)
        InventoryImport.objects.filter(pk=self.imp.pk).update(
            report=self.report, done_steps=self.done, total_steps=total
        )


def inventory_import_apply_run(import_id: int) -> None:
    """Worker (or the command): apply the import's plan, phase by phase, recording each step."""
    imp = InventoryImport.objects.select_related("owner", "project", "created_by").get(pk=import_id)
    # Claimed by this process while it applies, so a worker that starts after this one died resumes it.
    InventoryImport.objects.filter(pk=imp.pk).update(attempt_id=attempts.new_id())
    run = _Run(imp)
    try:
        _apply(run)
    except Exception as e:
        log.exception("inventory import %s failed", imp.pk)
        run.say(f"failed: {e}")
        _finish(run, InventoryImport.Status.FAILED)
        audit.record("lab.import", imp, outcome="failed", user=imp.created_by, detail=str(e))
        raise
    _finish(run, InventoryImport.Status.DONE)
    audit.record("lab.import", imp, user=imp.created_by, detail=f"{run.done} steps; lab {imp.lab_name}")


def _finish(run: _Run, status: str) -> None:
    InventoryImport.objects.filter(pk=run.imp.pk).update(
        status=status, report=run.report, done_steps=run.done, finished=timezone.now(), attempt_id=""
    )


def inventory_imports_resume_dead() -> list[int]:
    """Queue again every import whose applying worker process is gone (found when a worker starts). Each
    is taken from the dead attempt by a compare-and-swap first, so one starting worker resumes it; its apply
    plans again and skips what the dead one made."""
    from labs.tasks import inventory_import_apply_task

    resumed = []
    for imp in InventoryImport.objects.filter(status=InventoryImport.Status.APPLYING).exclude(attempt_id=""):
        owner = attempts.owner_of(imp.attempt_id)
        if owner is None or owner.alive():
            continue
        if InventoryImport.objects.filter(pk=imp.pk, attempt_id=imp.attempt_id).update(
            attempt_id="", report=[*imp.report, f"the worker applying it stopped (pid {owner.pid}); resumed"]
        ):
            inventory_import_apply_task(imp.pk)
            resumed.append(imp.pk)
    for pk in resumed:
        log.warning("resumed inventory import %s after its worker died", pk)
    return resumed


def _apply(run: _Run) -> None:
    plan = run.plan()
    InventoryImport.objects.filter(pk=run.imp.pk).update(total_steps=ansistack.count_steps(plan), plan=plan)
    run.imp.total_steps = ansistack.count_steps(plan)
    for p in plan["problems"]:
        run.say(ansistack.Problem(**p).text())
    _apply_hypervisors(run, plan)
    plan = run.plan()  # what the registrations and syncs found
    _apply_networks(run, plan)
    plan = run.plan()
    _apply_images(run, plan)
    plan = run.plan()
    lab = lab_get_or_create(name=plan["lab"], owner=run.imp.owner, project=run.imp.project, source=_source(run))
    _apply_machines(run, plan, lab)
    InventoryImport.objects.filter(pk=run.imp.pk).update(plan=plan)


def _source(run: _Run) -> str:
    return ", ".join(str(f["name"]) for f in run.imp.files)[:200]


def _console_address(entry: dict) -> str:
    """Where the new hypervisor's consoles listen: its address (resolved here, in the worker), or loopback for
    this machine's own libvirt."""
    if entry.get("connection") == "local":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(entry["address"]))
    except ValueError:
        return str(socket.getaddrinfo(entry["address"], None, proto=socket.IPPROTO_TCP)[0][4][0])


def _apply_hypervisors(run: _Run, plan: dict) -> None:
    for entry in plan["hypervisors"]:
        if entry["action"] == "registered":
            hv = Hypervisor.objects.get(pk=entry["hypervisor_id"])
            run.say(f"hypervisor {hv.name}: already registered ({hv.uri})")
            if hv.enabled and not hv.is_online:
                _check(run, hv)  # fresh: is it back?
            continue
        if entry["action"] != "register":
            run.say(f"hypervisor {entry['name']}: not registered")
            continue
        try:
            hv = hypervisor_services.hypervisor_create(
                name=entry["name"], uri=entry["uri"], console_address=_console_address(entry)
            )
        except (ValidationError, Refusal, OSError) as e:
            run.say(f"hypervisor {entry['name']} ({entry['uri']}): not registered: {_messages(e)}", step=True)
            continue
        run.say(f"hypervisor {hv.name}: registered ({hv.uri})", step=True)
        _check(run, hv)


def _check(run: _Run, hv: Hypervisor) -> None:
    """Contact it now (this is the worker): its networks and domains are what the next phases plan from."""
    status = hypervisor_services.hypervisor_sync(hv.pk)
    hv.refresh_from_db()
    if status != "online":
        run.say(
            f"hypervisor {hv.name}: the portal cannot reach it ({hv.status_error or status}); its networks and "
            f"machines are left for a later run"
        )


def _apply_networks(run: _Run, plan: dict) -> None:
    for n in plan["networks"]:
        if n["action"] != "define":
            continue
        hv = Hypervisor.objects.filter(name=n["hypervisor"]).first()
        if hv is None or not hv.is_online:
            run.say(f"network {n['name']} on {n['hypervisor']}: not defined (hypervisor not reachable)", step=True)
            continue
        spec = network_services.NetworkSpec(
            name=n["name"], mode=n["mode"], interface=n.get("interface", ""), bridge=n.get("bridge", "")
        )
        try:
            network_services.validate(spec, hv)
        except ValidationError as e:
            run.say(f"network {n['name']} on {hv.name}: not defined: {_messages(e)}", step=True)
            continue
        # The worker defines it now (network_create would queue it), so the machines below find it.
        result = network_services.network_create_run(hv.pk, spec.__dict__)
        if result == "defined":
            audit.record("hypervisor.network_create", hv, user=run.imp.created_by, detail=f"{spec.name} (import)")
        run.say(f"network {n['name']} on {hv.name}: {result}", step=True)


def _apply_images(run: _Run, plan: dict) -> None:
    started: list[Image] = []
    for i in plan["images"]:
        if i["action"] != "import":
            continue
        try:
            image = image_services.image_create_from_url(
                name=i["name"],
                kind=ImageKind.DISK,
                fmt=i["format"],
                source_url=i["url"],
                default_user=i.get("default_user", ""),
                owner=run.imp.created_by,
            )
        except (ValidationError, Refusal) as e:
            run.say(f"image {i['name']}: not imported: {_messages(e)}", step=True)
            continue
        started.append(image)
    deadline = time.monotonic() + settings.PORTAL_IMPORT_TIMEOUT + 60
    for image in started:
        while (image := Image.objects.get(pk=image.pk)).status == ImageStatus.IMPORTING:
            if time.monotonic() > deadline:
                break
            time.sleep(IMAGE_WAIT_POLL)
        outcome = "imported" if image.is_ready else f"{image.status}: {image.status_message}"
        run.say(f"image {image.name}: {outcome} from {image.source_url}", step=True)


def _apply_machines(run: _Run, plan: dict, lab: Lab) -> None:
    for m in plan["machines"]:
        if m["action"] == "exists":
            machine = Machine.objects.get(pk=m["machine_id"])
            if not LabMachine.objects.filter(machine=machine, lab=lab, group=m["group"]).exists():
                lab_add_machine(lab=lab, machine=machine, group=m["group"])
                run.say(f"machine {m['name']}: already there; put in lab {lab.name}")
            else:
                run.say(f"machine {m['name']}: already there")
        elif m["action"] == "skip":
            run.say(f"machine {m['name']}: not created ({'; '.join(m['reasons'])})")
        elif m["action"] == "adopt":
            _adopt(run, m, lab)
        elif m["action"] == "create":
            _create(run, m, lab, plan["images"])


def _create(run: _Run, m: dict, lab: Lab, images: list[dict]) -> None:
    hv = Hypervisor.objects.get(pk=m["hypervisor_id"]) if m.get("hypervisor_id") else None
    if hv is None or not hv.is_online:
        run.say(f"machine {m['name']}: not created (hypervisor {m['hypervisor']} not reachable)", step=True)
        return
    image, extra = None, []
    if m["deploy_type"] == "image":
        entry = next(i for i in images if i["name"] == m["image"])
        image = Image.objects.filter(pk=entry["image_id"]).first() if entry.get("image_id") else None
        if image is None or not image.is_ready:
            run.say(f"machine {m['name']}: not created (image {m['image']} is not ready)", step=True)
            return
    elif m["deploy_type"] == "iso":
        isos = [Image.objects.get(name=n, kind=ImageKind.ISO) for n in m["isos"]]
        image, extra = isos[0], isos[1:]
    try:
        machine = machine_services.machine_create(
            owner=run.imp.owner,
            hypervisor=hv,
            name=m["name"],
            deploy_type=m["deploy_type"],
            image=image,
            extra_isos=extra,
            vcpus=m["vcpus"],
            memory_mib=m["memory_mib"],
            disk_gib=m["disk_gib"],
            nics=_nic_inputs(m) or None,
            project=run.imp.project,
            deletion_protection=m["deletion_protection"],
            **m["hardware"],
        )
    except (ValidationError, Refusal) as e:
        run.say(f"machine {m['name']}: not created: {_messages(e)}", step=True)
        return
    lab_add_machine(lab=lab, machine=machine, group=m["group"])
    run.say(f"machine {machine.name}: created on {hv.name} ({m['deploy_type']}), in lab {lab.name}", step=True)


def _nic_inputs(m: dict) -> list[NicInput]:
    """vm_networks as NICs; static addresses only for image machines (cloud-init configures them)."""
    nics = []
    for n in m["nics"]:
        static = m["deploy_type"] == "image" and bool(n["addresses"])
        nics.append(
            NicInput(
                source=n["source"],
                mac=n["mac"],
                dhcp4=n["dhcp4"] if m["deploy_type"] == "image" else True,
                addresses=n["addresses"] if static else [],
                gateway4=n["gateway4"] if static else "",
                nameservers=n["nameservers"] if m["deploy_type"] == "image" else [],
            )
        )
    return nics


def _adoption() -> Callable | None:
    """machines.services.machine_adopt, where the portal has it."""
    return getattr(machine_services, "machine_adopt", None)


def _adopt(run: _Run, m: dict, lab: Lab) -> None:
    adopt = _adoption()
    if adopt is None:
        run.say(f"machine {m['name']}: adopt (not applied: adoption unavailable)", step=True)
        return
    hv = Hypervisor.objects.get(pk=m["hypervisor_id"])
    try:
        machine = adopt(
            hypervisor=hv,
            domain_uuid=m["domain_uuid"],
            owner=run.imp.owner,
            project=run.imp.project,
            actor=run.imp.created_by,
            name=m["name"],
        )
    except (ValidationError, Refusal) as e:
        run.say(f"machine {m['name']}: not adopted: {_messages(e)}", step=True)
        return
    lab_add_machine(lab=lab, machine=machine, group=m["group"])
    run.say(f"machine {machine.name}: adopted on {hv.name}, in lab {lab.name}", step=True)
