"""Adopting a domain the portal did not make: staff pick one the sync found on a hypervisor, the portal records
it as a machine of an owner (and project), charges their quota, and from then on manages it like any other.

The request (machine_adopt) never talks to the hypervisor: it checks what the last sync recorded of the domain
(its shape, and hypervisors.services.adoption_problems over it), what only the rows know (its UUID, name and
MACs not the portal's already, the hypervisor not in maintenance), and the quotas; then it records the machine
(adopted, provisioning) with the domain's UUID, which makes it the row that owns the domain for the reconcile
and the sweeper, and queues the worker. The worker (machine_adopt_run) reads the domain's persistent XML again
(driver.domain_shape), checks it again, takes its hardware, disks and NICs into the rows, marks the domain with
the portal's metadata element (keeping its own name: the mark says `adopted`, see domxml.portal_domain), gives its
VNC console a password in its persistent config (the running server keeps what it has until its next cold
start; the reconcile reports it until then), and makes the machine active. A worker run that cannot adopt it
removes the row again and leaves the domain as it was.
"""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from huey.exceptions import RetryTask

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError, HypervisorUnavailable
from hypervisors.models import Hypervisor, HypervisorStatus
from hypervisors.offers import DISK_BUSES
from hypervisors.services import adoption_problems
from machines import tasks
from machines.access import project_choices
from machines.capacity import QuotaExceeded, check_quota
from machines.macs import normalise_mac
from machines.models import Machine, MachineNic, Project, hostname_validator
from machines.services.bmcs import bmc_assign
from machines.services.common import MachineError, _claim_attempt, _enqueue, _release_attempt
from machines.states import DeployType, PowerState, Status
from portal import audit
from portal.audit import audited

log = logging.getLogger(__name__)

GIB = 1 << 30
DOMAIN_NAME_MAX = 200  # what the row keeps of the domain's own name (Machine.own_domain_name)


class AdoptionRefused(MachineError):
    """The domain cannot be adopted: the message says why."""


def _gib(capacity_bytes: int) -> int:
    return -(-capacity_bytes // GIB)


def disks_gib(shape: dict) -> int:
    """What the domain's disks hold against the disk quota: each disk's capacity, in whole GiB."""
    return sum(_gib(d.get("capacity_bytes") or 0) for d in shape.get("disks", []) if d["device"] == "disk")


def _recorded(hypervisor: Hypervisor, domain_uuid: str) -> dict:
    """The domain as the last sync recorded it, or the refusal."""
    wanted = domain_uuid.strip().lower()
    found = next((d for d in hypervisor.unmanaged_domains if str(d.get("uuid", "")).lower() == wanted), None)
    if found is None:
        raise AdoptionRefused(
            f"No domain {domain_uuid} among those the last check of {hypervisor.name} found that the portal does "
            "not manage; check the hypervisor again and retry."
        )
    if "problems" not in found:
        raise AdoptionRefused(
            f"The last check of {hypervisor.name} did not read this domain's shape; check it again and retry."
        )
    return found


def _check_rows(hypervisor: Hypervisor, domain: dict, owner, name: str) -> None:
    """What only the portal's rows know: the hypervisor takes machines, and the UUID, name and MACs are free."""
    if not hypervisor.enabled or hypervisor.status != HypervisorStatus.ONLINE:
        raise AdoptionRefused(
            f"{hypervisor.name} is {hypervisor.get_status_display().lower()}: adopt when it is online."
        )
    if hypervisor.maintenance:
        raise AdoptionRefused(f"{hypervisor.name} is in maintenance: it takes no machines until that ends.")
    if domain["problems"]:
        raise AdoptionRefused(f"The portal cannot manage {domain['name']}: " + " ".join(domain["problems"]))
    if other := Machine.objects.filter(uuid=domain["uuid"]).first():
        raise AdoptionRefused(f"Domain {domain['uuid']} is machine {other.name}'s already.")
    if len(domain["name"]) > DOMAIN_NAME_MAX:
        raise AdoptionRefused(f"The domain's name is over {DOMAIN_NAME_MAX} characters; rename it with virsh first.")
    if Machine.objects.filter(owner=owner, name=name).exists():
        raise AdoptionRefused(f"{owner.get_username()} has a machine named {name} already: choose another name.")
    macs = [n["mac"] for n in domain.get("nics", []) if n.get("mac")]
    if taken := sorted(MachineNic.objects.filter(mac__in=macs).values_list("mac", flat=True)):
        raise AdoptionRefused(f"MAC address {', '.join(taken)} is another machine's already.")


def _name(domain: dict, name: str | None) -> str:
    chosen = (name or "").strip() or domain["name"]
    try:
        hostname_validator(chosen)
    except ValidationError:
        if name:
            raise AdoptionRefused(f"{chosen!r} is not a valid host name (letters, digits and hyphens).") from None
        raise AdoptionRefused(f"The domain's name {chosen!r} is not a valid host name: give the machine one.") from None
    if len(chosen) > 63:
        raise AdoptionRefused("A host name has at most 63 characters.")
    return chosen


def _hardware(shape: dict) -> dict:
    """The Machine fields a domain's shape gives."""
    disks = [d for d in shape.get("disks", []) if d["device"] == "disk"]
    first = disks[0] if disks else {}
    return {
        "vcpus": shape["vcpus"],
        "memory_mib": shape["memory_mib"],
        "disk_gib": disks_gib(shape),
        "pool": first.get("pool") or "default",
        "disk_bus": first["bus"] if first.get("bus") in DISK_BUSES else "virtio",
        "machine_type": (shape.get("machine_type") or "")[:40],
        "firmware": shape.get("firmware") or "bios",
        "secure_boot": bool(shape.get("secure_boot")),
        "autostart": bool(shape.get("autostart")),
    }


def _set_nics(machine: Machine, nics: list[dict]) -> None:
    """The machine's NIC rows, as the domain has them (in its order)."""
    MachineNic.objects.filter(machine=machine).delete()
    for i, nic in enumerate(nics):
        MachineNic.objects.create(
            machine=machine,
            index=i,
            type=nic["type"],
            source=nic.get("source") or "",
            mac=normalise_mac(nic["mac"]),
            model=nic.get("model") or "virtio",
            mode=nic.get("mode") or "bridge",
            vlan=nic.get("vlan"),
        )


@audited("machine.adopt")
@transaction.atomic
def machine_adopt(
    *,
    hypervisor: Hypervisor,
    domain_uuid: str,
    owner,
    project: Project | None = None,
    actor,
    name: str | None = None,
    bmc: bool = False,
) -> Machine:
    """Staff: record a domain the sync found on the hypervisor as a machine of `owner` (in `project`), charged
    to their quotas, and queue the worker that takes it over. AdoptionRefused with the reason, touching nothing."""
    if not getattr(actor, "is_staff", False):
        raise PermissionDenied("Only staff adopt domains.")
    hypervisor = Hypervisor.objects.get(pk=hypervisor.pk)  # what the last sync recorded, as it is now
    domain = _recorded(hypervisor, domain_uuid)
    name = _name(domain, name)
    _check_rows(hypervisor, domain, owner, name)
    if project is not None and not project_choices(owner).filter(pk=project.pk).exists():
        raise AdoptionRefused(f"{owner.get_username()} is not an admin of project {project.name}.")
    hardware = _hardware(domain)
    try:
        check_quota(
            owner,
            machines=1,
            vcpus=hardware["vcpus"],
            memory_mib=hardware["memory_mib"],
            disk_gib=hardware["disk_gib"],
            project=project,
        )
    except QuotaExceeded as e:
        raise AdoptionRefused("; ".join(e.messages)) from None
    machine = Machine(
        uuid=domain["uuid"],
        owner=owner,
        project=project,
        hypervisor=hypervisor,
        name=name,
        deploy_type=DeployType.NETWORK,  # no image: the portal never rebuilds it
        power_on_after_create=False,
        adopted=True,
        own_domain_name=domain["name"],
        **hardware,
    )
    try:
        machine.full_clean()
        machine.save()
        _set_nics(machine, domain.get("nics", []))  # the MACs are the machine's from now on
    except ValidationError as e:
        raise AdoptionRefused("; ".join(e.messages)) from None
    except IntegrityError:
        raise AdoptionRefused("Another request adopted this domain or took its name or a MAC meanwhile.") from None
    if bmc:
        try:
            bmc_assign(machine)
        except ValidationError as e:
            raise AdoptionRefused("; ".join(e.messages)) from None
    machine.log(
        "adopt", f"adoption of domain {domain['name']} on {hypervisor.name} requested by {actor.get_username()}"
    )
    machine.transition(Status.PROVISIONING, f"adopting domain {domain['name']}")
    _enqueue(tasks.machine_adopt_task, machine.pk)
    return machine


def _describe(shape: dict) -> list[str]:
    """What the machine took over, for its events: disks, NICs, boot order, firmware, graphics, machine type."""
    lines = []
    for d in shape.get("disks", []):
        where = f"{d['pool']}/{d['volume']}" if d.get("pool") else "empty"
        size = f", {_gib(d['capacity_bytes'])} GiB" if d.get("capacity_bytes") else ""
        order = f", boot order {d['boot_order']}" if d.get("boot_order") else ""
        lines.append(f"{d['device']} {d['target']} ({d['bus']}): {where}, {d['format']}{size}{order}")
    for n in shape.get("nics", []):
        lines.append(f"NIC {n['mac']} {n['type']} {n['source'] or ''} ({n['model'] or 'default model'})".rstrip())
    boot = ", ".join(shape.get("boot") or []) or "per device"
    lines.append(
        f"{shape['vcpus']} vCPUs, {shape['memory_mib']} MiB, machine type {shape.get('machine_type') or '?'}, "
        f"{shape.get('firmware')}{' with Secure Boot' if shape.get('secure_boot') else ''}, boot {boot}, "
        f"graphics {', '.join(shape.get('graphics') or []) or 'none'}"
    )
    return lines


def _give_up(machine: Machine, reason: str) -> None:
    """The worker cannot adopt it: the row goes (the domain stays as it was), and the audit says why."""
    audit.record("machine.adopt_run", machine.hypervisor, outcome="failed", detail=f"domain {machine.uuid}: {reason}")
    log.warning("adoption of domain %s on %s failed: %s", machine.uuid, machine.hypervisor.name, reason)
    machine.delete()


def machine_adopt_run(machine_id: int) -> None:
    """Worker: read the adopted domain again, take its hardware, disks and NICs into the rows, mark it as the
    portal's, protect its console, and make the machine active; a domain that is gone or cannot be managed now
    ends the adoption with the row removed and the domain untouched."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id, adopted=True).first()
    if machine is None or not _claim_attempt(machine, (Status.PROVISIONING,)):
        return
    uuid = str(machine.uuid)
    driver = get_driver(machine.hypervisor.uri)
    try:
        shape = driver.domain_shape(uuid)
        problems = ["The domain is no longer on the hypervisor."] if shape is None else adoption_problems(shape)
        if shape is not None and shape["name"] != machine.own_domain_name:
            problems.append(f"The domain was renamed to {shape['name']} meanwhile.")
        if problems:
            _give_up(machine, " ".join(problems))
            return
        assert shape is not None
        with transaction.atomic():
            Machine.objects.filter(pk=machine.pk).update(**_hardware(shape))
            _set_nics(machine, shape["nics"])
        for line in _describe(shape):
            machine.log("adopt", line)
        driver.domain_mark(
            uuid,
            {
                "id": str(machine.pk),
                "owner": str(machine.owner_id),
                "deploy-type": machine.deploy_type,
                "adopted": uuid,
            },
        )
        if driver.vnc_protect(uuid):
            machine.log(
                "console",
                "VNC password put in the domain's config; a running console asks for it from its next cold start",
            )
        state = driver.domain_state(uuid)
    except HypervisorUnavailable as e:
        machine.log("adopt", f"{e}; trying again", level="warning")
        _release_attempt(machine)
        raise RetryTask(delay=15) from None
    except (HypervisorError, IntegrityError, ValidationError) as e:
        _give_up(machine, str(e) if not isinstance(e, IntegrityError) else "a MAC address is another machine's")
        return
    Machine.objects.filter(pk=machine.pk).update(power_state=str(state or PowerState.UNKNOWN))
    machine.transition(Status.ACTIVE, "adopted")
    _release_attempt(machine)
    audit.record("machine.adopt_run", machine, detail=f"domain {shape['name']} ({uuid}) on {machine.hypervisor.name}")
