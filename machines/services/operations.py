"""What users do to a running machine: power, protection, autostart, CD-ROM media and booting from it once."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError, HypervisorFatalError
from hypervisors.drivers.base import PowerState as DomainState
from hypervisors.models import Image
from machines import policy, provisioning, tasks
from machines.models import Machine, MachineCdrom
from machines.services.bmcs import _power_through_bmc
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from machines.services.validation import _refuse_against_policy
from machines.states import DeployType, PowerAction
from portal.audit import audited


@audited("machine.power", obj_kwarg="machine")
@transaction.atomic
def machine_power(*, machine: Machine, action: str, actor) -> None:
    """Queue a power action; one operation at a time per machine. A start (of a machine that is off) is
    refused while its NICs break the network policy."""
    policy.require(actor, machine, action if action in PowerAction.values else PowerAction.START)
    if action not in PowerAction.values:
        raise MachineError(f"Unknown action {action!r}; use one of {', '.join(PowerAction.values)}.")
    if action == PowerAction.START:
        _refuse_against_policy(machine, "started")
    _claim_operation(machine, action)
    machine.log("power", f"{PowerAction(action).label} requested")
    _enqueue(tasks.machine_power_task, machine.pk, action)


def machine_power_run(machine_id: int, action: str) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if machine.has_bmc:
        return _power_through_bmc(machine, action)
    uuid = str(machine.uuid)
    try:
        driver = get_driver(machine.hypervisor.uri)
        if action == PowerAction.START:
            provisioning.ensure_host_guards(machine, driver, defined=True)  # current: the MAC may have changed
        # Changes waiting for a cold start (machines.services.changes): is this one? A reboot or reset of a
        # running domain keeps its QEMU, so only a start of a domain that is off counts.
        cold = bool(machine.pending) and driver.domain_state(uuid) != DomainState.RUNNING
        {
            PowerAction.START: driver.start,
            PowerAction.SHUTDOWN: driver.shutdown,
            PowerAction.POWEROFF: driver.power_off,
            PowerAction.REBOOT: driver.reboot,
            PowerAction.RESET: driver.reset,
        }[PowerAction(action)](uuid)
        state = driver.domain_state(uuid)
        machine.log("power", f"{PowerAction(action).label} done; the domain is {state or 'missing'}")
        if cold and state == DomainState.RUNNING:
            from machines.services.changes import pending_applied  # changes builds on this module

            pending_applied(machine, driver)
    except HypervisorError as e:
        state = None
        machine.log("power", f"{PowerAction(action).label} failed: {e}", level="error")
    finally:
        _release_operation(machine)
    if state is not None:
        Machine.objects.filter(pk=machine.pk).update(power_state=str(state), power_checked=timezone.now())


@audited("machine.protection", obj_kwarg="machine")
def machine_set_protection(*, machine: Machine, protected: bool, actor) -> None:
    policy.require(actor, machine, "protect")
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=protected)
    machine.deletion_protection = protected
    machine.log("protection", "deletion protection on" if protected else "deletion protection off")


@audited("machine.autostart", obj_kwarg="machine")
@transaction.atomic
def machine_set_autostart(*, machine: Machine, enabled: bool, actor) -> None:
    """Whether the hypervisor starts the machine when it boots: recorded here, then set in libvirt by the
    worker (a machine not defined yet gets it at its define)."""
    policy.require(actor, machine, "autostart")
    Machine.objects.filter(pk=machine.pk).update(autostart=enabled)
    machine.autostart = enabled
    machine.log("autostart", f"autostart {'on' if enabled else 'off'} requested")
    _enqueue(tasks.machine_autostart_task, machine.pk)


def machine_set_autostart_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    try:
        driver = get_driver(machine.hypervisor.uri)
        driver.set_autostart(str(machine.uuid), machine.autostart)  # the value now, if it changed meanwhile
        machine.log("autostart", f"autostart {'on' if machine.autostart else 'off'} on {machine.hypervisor.name}")
    except HypervisorFatalError as e:  # no domain (yet, or any more): its define sets it
        machine.log("autostart", f"autostart not set on the hypervisor: {e}", level="warning")
    except HypervisorError as e:
        machine.log("autostart", f"autostart not set on the hypervisor: {e}", level="error")


@audited("machine.media", obj_kwarg="machine")
@transaction.atomic
def machine_change_media(*, machine: Machine, slot: int, image: Image | None, actor) -> None:
    """Insert an ISO into a CD-ROM drive of the machine (an ISO machine's, or one added after create), or eject
    it (image None)."""
    policy.require(actor, machine, "media")
    cdrom = machine.cdroms.filter(slot=slot).first()
    if cdrom is None:
        raise MachineError(f"{machine.name} has no CD-ROM drive {slot}.")
    if image is not None and (image.kind != "iso" or not image.is_ready):
        raise MachineError(f"{image.name} is not a ready ISO.")
    _claim_operation(machine, "media")
    machine.log("media", f"drive {slot}: {'insert ' + image.name if image else 'eject'} requested")
    _enqueue(tasks.machine_change_media_task, machine.pk, slot, image.pk if image else None)


def machine_change_media_run(machine_id: int, slot: int, image_id: int | None) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    image = Image.objects.filter(pk=image_id).first() if image_id else None
    try:
        driver = get_driver(machine.hypervisor.uri)
        path = provisioning.ensure_image(machine, driver, image) if image else ""
        driver.change_media(str(machine.uuid), target=provisioning.cdrom_target(machine, slot), path=path)
        MachineCdrom.objects.filter(machine=machine, slot=slot).update(image=image)
        machine.log("media", f"drive {slot}: {'inserted ' + image.name if image else 'ejected'}")
    except HypervisorError as e:
        machine.log("media", f"drive {slot}: failed: {e}", level="error")
    finally:
        _release_operation(machine)


@audited("machine.boot_cdrom", obj_kwarg="machine")
@transaction.atomic
def machine_boot_cdrom_once(*, machine: Machine, actor) -> None:
    """Cold-start from the installer CD-ROM once (the disk stays first for later starts)."""
    policy.require(actor, machine, "boot_cdrom")
    if machine.deploy_type != DeployType.ISO:
        raise MachineError("Booting from CD-ROM is for ISO machines.")
    _claim_operation(machine, "boot-cdrom", action="boot_cdrom")
    machine.log("power", "boot once from CD-ROM requested")
    _enqueue(tasks.machine_boot_cdrom_task, machine.pk)


def machine_boot_cdrom_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    try:
        driver = get_driver(machine.hypervisor.uri)
        driver.boot_once(str(machine.uuid), target=provisioning.cdrom_target(machine, 0))
        state = driver.domain_state(str(machine.uuid))
        machine.log("power", "started from the CD-ROM; later starts boot from disk first")
        Machine.objects.filter(pk=machine.pk).update(power_state=str(state), power_checked=timezone.now())
    except HypervisorError as e:
        machine.log("power", f"boot from CD-ROM failed: {e}", level="error")
    finally:
        _release_operation(machine)
