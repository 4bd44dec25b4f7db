"""Disks, NICs and CD-ROM drives after create, for every deployment type.

Each request (machine_attach_disk, machine_detach_disk, machine_attach_nic, machine_detach_nic, machine_add_cdrom,
machine_remove_cdrom) is checked and recorded under the locks a create takes (the project, the owner's quota, the
machine, then the hypervisor's row): a disk's GiB against the quotas (user and project) and the pool's free space,
a NIC against the network policy a create applies (machines.nic_policy, through the same validation). It claims the
machine's one operation (`devices`) and queues one worker run (machine_devices_run), whose outcome is an event.

The hypervisor's side (hypervisors.drivers: attach_disk, detach_disk, attach_nic, detach_nic) writes the domain's
persistent config and, while it runs, the running guest: virtio and scsi disks and every NIC are hot-plugged; a
SATA or IDE disk and any CD-ROM drive cannot be, so those changes are refused while the machine is not seen off.
A live detach waits for the guest to let the device go (ACPI hot-unplug); a guest that does not leaves it attached
and the event says so.

What the portal keeps: Machine.extra_disks gets an entry {"size_gib", "image"?, "n"} (n: its volume's number,
Machine.extra_disk_volume, never reused while a kept volume has it); MachineNic and MachineCdrom rows. A disk is
recorded at the request (so the quota counts it at once) and dropped again if the worker fails to attach it; a
detached one is dropped once the worker has detached it. An image machine's NoCloud seed is rewritten with the new
network-config when its NICs change; cloud-init applies network config at a new instance only (its default update
policy), so the running guest configures a NIC added now itself, and a rebuild or a clone gets it from the seed.

Snapshots hold the domain's devices as they were (a revert brings their XML back) and are named per disk index
(MachineSnapshot.volume), so none of these changes is made while the machine has snapshots.
"""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import DiskSpec, HypervisorError
from hypervisors.drivers.domxml import HOT_PLUG_BUSES
from hypervisors.models import Hypervisor, Image
from machines import policy, provisioning, tasks
from machines.capacity import check_quota
from machines.models import Machine, MachineCdrom, MachineNic
from machines.services.changes import _lock
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from machines.services.validation import MAX_NICS, NicInput, _validate_cloud_init, _validate_nics
from machines.states import DeployType, PowerState, Status
from portal import audit

log = logging.getLogger(__name__)

MAX_EXTRA_DISKS = 4  # as a create allows
MAX_DISK_GIB = 16384
IDE_DRIVES = 4  # an IDE controller's two buses of two drives (an image machine's seed takes one)

DISK_ATTACH, DISK_DETACH = "disk_attach", "disk_detach"
NIC_ATTACH, NIC_DETACH = "nic_attach", "nic_detach"
CDROM_ADD, CDROM_REMOVE = "cdrom_add", "cdrom_remove"


def _entries(machine: Machine) -> list[dict]:
    """The extra disks as entries that each name their volume's number (a create's have none: theirs is their
    position + 1, which a detach before them would change), so what is written back keeps every volume's name."""
    entries = provisioning.extra_disk_entries(machine)
    return [{**e, "n": int(e.get("n") or i + 1)} for i, e in enumerate(entries)]


def _number(entries: list[dict], i: int) -> int:
    return int(entries[i].get("n") or i + 1)


def _requested(machine: Machine, actor, what: str, fn):
    """Run the request `fn(locked machine)` with the checks every device change shares; audited as
    machine.devices (done, or refused and why)."""
    try:
        with transaction.atomic():
            policy.require(actor, machine, "devices")
            locked = _lock(machine)
            if locked.status != Status.ACTIVE:
                raise MachineError(f"{locked.name} is {locked.get_status_display().lower()}; this needs it active.")
            if locked.operation:
                raise MachineError(f"{locked.name} is busy with another operation; try again when it is done.")
            if locked.adopted:
                raise MachineError(
                    f"{locked.name} was adopted: its devices are the domain's own, which the portal does not change."
                )
            if locked.snapshots.exists():
                raise MachineError(
                    f"{locked.name} has snapshots, which hold its devices as they were (a revert brings them back): "
                    "delete them before changing its disks, NICs or CD-ROM drives."
                )
            result = fn(locked)
    except Exception as e:
        if isinstance(e, ValidationError | MachineError) or e.__class__.__name__ == "PermissionDenied":
            detail = f"{what}: " + "; ".join(getattr(e, "messages", None) or [str(e)])
            audit.record("machine.devices", machine, outcome="refused", detail=detail, user=actor)
        raise
    audit.record("machine.devices", machine, detail=f"{what} requested", user=actor)
    return result


def _refuse_while_running(machine: Machine, what: str) -> None:
    if machine.power_state != PowerState.OFF:
        raise MachineError(
            f"{machine.name} is {machine.get_power_state_display().lower()}: {what} cannot be hot-plugged, so it is "
            "changed only while the machine is off. Shut it down first."
        )


def _queue(machine: Machine, op: str, arg: dict, message: str) -> None:
    _claim_operation(machine, "devices")
    machine.log("devices", message)
    _enqueue(tasks.machine_devices_task, machine.pk, op, arg)


# --- disks ------------------------------------------------------------------------------------------------------


def machine_attach_disk(*, machine: Machine, actor, size_gib, image: Image | None = None) -> None:
    """Attach a new disk: blank (thin qcow2) or a copy-on-write overlay of a disk image, on the machine's disk bus."""
    if isinstance(size_gib, bool) or not isinstance(size_gib, int) or not 1 <= size_gib <= MAX_DISK_GIB:
        raise ValidationError({"size_gib": f"A whole number of GiB from 1 to {MAX_DISK_GIB}."})
    if image is not None:
        if image.kind != "disk" or not image.is_ready:
            raise ValidationError({"image": f"{image.name} is not a ready disk image."})
        if image.virtual_size_bytes > size_gib << 30:
            need = -(-image.virtual_size_bytes // (1 << 30))
            raise ValidationError({"size_gib": f"Image {image.name} needs at least {need} GiB."})
    what = f"attach a {size_gib} GiB disk" + (f" over image {image.name}" if image else "")

    def request(m: Machine) -> None:
        entries = _entries(m)
        if len(entries) >= MAX_EXTRA_DISKS:
            raise MachineError(f"{m.name} has {len(entries)} extra disks, the most a machine may have.")
        if m.disk_bus not in HOT_PLUG_BUSES:
            _refuse_while_running(m, f"a {m.disk_bus} disk")
        check_quota(m.owner, disk_gib=size_gib, project=m.project)
        hv = Hypervisor.objects.select_for_update().get(pk=m.hypervisor_id)
        pool = next((p for p in hv.pools if p["name"] == m.pool and p.get("active")), None)
        free = (pool.get("available_bytes") or 0) >> 30 if pool else None
        if free is not None and size_gib > free:
            raise ValidationError(
                {"size_gib": f"Hypervisor {hv.name} has {free} GiB free in pool {m.pool}; {size_gib} GiB does not fit."}
            )
        n = max([_number(entries, i) for i in range(len(entries))] + [0]) + 1
        entry = {"size_gib": size_gib, "n": n, **({"image": image.pk} if image else {})}
        Machine.objects.filter(pk=m.pk).update(extra_disks=[*entries, entry])
        _queue(m, DISK_ATTACH, {"n": n}, f"{what} requested (disk {len(entries) + 1})")

    _requested(machine, actor, what, request)


def machine_detach_disk(*, machine: Machine, actor, disk: int, keep_volume: bool = False) -> None:
    """Detach extra disk `disk` (1: the first extra disk; the main disk stays) and delete its volume, unless
    keep_volume (then it stays in the pool, named as it was, for staff to take or the sweeper to report)."""
    what = f"detach disk {disk}" + (" (keep its volume)" if keep_volume else "")

    def request(m: Machine) -> None:
        entries = _entries(m)
        if isinstance(disk, bool) or not isinstance(disk, int) or not 1 <= disk <= len(entries):
            raise ValidationError(
                {"disk": f"{m.name} has no extra disk {disk}; it has {len(entries)} (numbered from 1)."}
            )
        if m.disk_bus not in HOT_PLUG_BUSES:
            _refuse_while_running(m, f"a {m.disk_bus} disk")
        n = _number(entries, disk - 1)
        _queue(m, DISK_DETACH, {"n": n, "keep": bool(keep_volume)}, f"{what} requested")

    _requested(machine, actor, what, request)


def _disk_index(machine: Machine, n: int) -> int | None:
    entries = _entries(machine)
    return next((i for i in range(len(entries)) if _number(entries, i) == n), None)


def _attach_disk(machine: Machine, driver, n: int) -> str:
    i = _disk_index(machine, n)
    if i is None:
        return "nothing to attach: the disk is no longer listed"
    entries = _entries(machine)
    machine.extra_disks = entries
    # A kept volume of an earlier disk with this number is not this disk: take the next free number.
    while driver.volume_info(pool=machine.pool, name=machine.extra_disk_volume(i)) is not None:
        entries[i] = {**entries[i], "n": entries[i]["n"] + 1}
    Machine.objects.filter(pk=machine.pk).update(extra_disks=entries)
    made = machine.extra_disk_volume(i)
    try:
        disk, done = provisioning.extra_disk(machine, driver, i, entries[i])
        target = driver.attach_disk(str(machine.uuid), disk)
    except Exception:
        driver.delete_volume(pool=machine.pool, name=made)
        _drop_disk(machine, entries[i]["n"])
        raise
    live = driver.domain_state(str(machine.uuid)) == PowerState.RUNNING
    return f"{done} attached as {target}" + (" (the running guest has it now)" if live else "")


def _drop_disk(machine: Machine, n: int) -> None:
    """Remove the entry numbered n from the machine's extra disks (under its row lock)."""
    with transaction.atomic():
        m = Machine.objects.select_for_update().get(pk=machine.pk)
        entries = _entries(m)
        Machine.objects.filter(pk=m.pk).update(
            extra_disks=[e for i, e in enumerate(entries) if _number(entries, i) != n]
        )


def _detach_disk(machine: Machine, driver, n: int, keep: bool) -> str:
    i = _disk_index(machine, n)
    if i is None:
        return "nothing to detach: the disk is no longer listed"
    name = machine.extra_disk_volume(i)
    info = driver.volume_info(pool=machine.pool, name=name)
    path = info.path if info else f"{driver.pool_path(machine.pool)}/{name}"
    detached = driver.detach_disk(str(machine.uuid), path=path)
    _drop_disk(machine, n)
    if keep:
        gone = f"its volume {name} kept in pool {machine.pool}"
    else:
        gone = f"its volume {name} deleted" if driver.delete_volume(pool=machine.pool, name=name) else "no volume"
    return f"disk {i + 1} {'detached' if detached else 'was not attached'}; {gone}"


# --- NICs -------------------------------------------------------------------------------------------------------


def machine_attach_nic(*, machine: Machine, actor, nic: NicInput) -> None:
    """Attach a NIC (a MAC given, or generated under PORTAL_MAC_PREFIX), on a network the create's policy lets the
    actor (and the owner) use on this hypervisor; hot-plugged into a running machine."""
    what = f"attach a NIC on {nic.type} {nic.source or '(user-mode)'}"

    def request(m: Machine) -> None:
        existing = list(m.nics.all())
        if len(existing) >= MAX_NICS:
            raise MachineError(f"{m.name} has {len(existing)} NICs, the most a machine may have.")
        hv = Hypervisor.objects.select_for_update().get(pk=m.hypervisor_id)
        # The create's checks over all the NICs it would have, for whoever asks and for the owner.
        _validate_nics(hv, [*existing, nic], owner=actor, project=m.project)
        if not getattr(actor, "is_staff", False) and actor != m.owner:
            _validate_nics(hv, [*existing, nic], owner=m.owner, project=m.project)
        index = max([n.index for n in existing] + [-1]) + 1
        try:
            with transaction.atomic():
                row = nic.row(m, index)
                row.save()
        except IntegrityError:
            raise ValidationError({"mac": "That MAC address is already used by another machine."}) from None
        if m.deploy_type == DeployType.IMAGE:
            _validate_cloud_init(m)  # the addresses, as network-config says them
        _queue(m, NIC_ATTACH, {"mac": row.mac}, f"{what} requested (NIC {len(existing) + 1}, {row.mac})")

    _requested(machine, actor, what, request)


def machine_detach_nic(*, machine: Machine, actor, nic: int) -> None:
    """Detach NIC `nic` (1: the first, as the machine page lists them)."""
    what = f"detach NIC {nic}"

    def request(m: Machine) -> None:
        existing = list(m.nics.all())
        if isinstance(nic, bool) or not isinstance(nic, int) or not 1 <= nic <= len(existing):
            raise ValidationError({"nic": f"{m.name} has no NIC {nic}; it has {len(existing)} (numbered from 1)."})
        if m.deploy_type == DeployType.NETWORK and len(existing) == 1:
            raise MachineError(f"{m.name} boots from the network: it keeps at least one NIC.")
        row = existing[nic - 1]
        _queue(m, NIC_DETACH, {"mac": row.mac}, f"{what} requested ({row.mac})")

    _requested(machine, actor, what, request)


def _reseed(machine: Machine, driver) -> str:
    """An image machine's seed rewritten with its NICs now (and put back in its drive while it runs)."""
    if machine.deploy_type != DeployType.IMAGE:
        return ""
    path = provisioning.ensure_seed(machine, driver)
    if driver.domain_state(str(machine.uuid)) == PowerState.RUNNING:
        target = provisioning.cdrom_target(machine, -1)  # the seed's drive, before the added ones
        driver.change_media(str(machine.uuid), target=target, path="")
        driver.change_media(str(machine.uuid), target=target, path=path)
    return (
        "; the seed's network-config lists it (cloud-init applies network config at a new instance: a rebuild or "
        "a clone; the running guest configures it itself)"
    )


def _attach_nic(machine: Machine, driver, mac: str) -> str:
    row = machine.nics.filter(mac=mac).first()
    if row is None:
        return "nothing to attach: the NIC is no longer listed"
    try:
        provisioning.ensure_host_guards(machine, driver)  # a NIC on a host bridge never runs without its guard
        driver.attach_nic(str(machine.uuid), provisioning.nic_spec(machine, row))
    except Exception:
        row.delete()
        raise
    return f"NIC {mac} on {row.type} {row.source or '(user-mode)'} attached" + _reseed(machine, driver)


def _detach_nic(machine: Machine, driver, mac: str) -> str:
    detached = driver.detach_nic(str(machine.uuid), mac=mac)
    MachineNic.objects.filter(machine=machine, mac=mac).delete()
    return f"NIC {mac} {'detached' if detached else 'was not attached'}" + _reseed(machine, driver)


# --- CD-ROM drives ----------------------------------------------------------------------------------------------


def machine_add_cdrom(*, machine: Machine, actor, image: Image | None = None) -> None:
    """Add a CD-ROM drive (empty, or with an ISO in it) to a machine of any deployment type; IDE and SATA drives
    are not hot-plugged, so the machine must be off. Media change in it afterwards as in an ISO machine's."""
    if image is not None and (image.kind != "iso" or not image.is_ready):
        raise ValidationError({"image": f"{image.name} is not a ready ISO."})
    what = "add a CD-ROM drive" + (f" with {image.name}" if image else "")

    def request(m: Machine) -> None:
        slots = list(m.cdroms.values_list("slot", flat=True))
        room = IDE_DRIVES - (1 if m.deploy_type == DeployType.IMAGE else 0)
        if len(slots) >= room:
            raise MachineError(f"{m.name} has {len(slots)} CD-ROM drives, the most it may have ({room}).")
        _refuse_while_running(m, "a CD-ROM drive")
        slot = max(slots + [-1]) + 1
        MachineCdrom.objects.create(machine=m, slot=slot, image=image)
        _queue(m, CDROM_ADD, {"slot": slot}, f"{what} requested (drive {slot + 1})")

    _requested(machine, actor, what, request)


def machine_remove_cdrom(*, machine: Machine, actor, slot: int) -> None:
    """Remove the last CD-ROM drive (slot numbers, and so the drives' guest devices, stay in a row); an ISO
    machine keeps its installer's drive (slot 0)."""
    what = f"remove CD-ROM drive {slot + 1 if isinstance(slot, int) else slot}"

    def request(m: Machine) -> None:
        slots = list(m.cdroms.values_list("slot", flat=True))
        if isinstance(slot, bool) or not isinstance(slot, int) or slot not in slots:
            raise ValidationError({"slot": f"{m.name} has no CD-ROM drive in slot {slot}."})
        if slot != max(slots):
            raise ValidationError({"slot": f"Remove the last drive first (slot {max(slots)})."})
        if m.deploy_type == DeployType.ISO and slot == 0:
            raise ValidationError({"slot": "An ISO machine keeps its installer's drive (slot 0); eject it instead."})
        _refuse_while_running(m, "a CD-ROM drive")
        _queue(m, CDROM_REMOVE, {"slot": slot}, f"{what} requested")

    _requested(machine, actor, what, request)


def _add_cdrom(machine: Machine, driver, slot: int) -> str:
    row = machine.cdroms.select_related("image").filter(slot=slot).first()
    if row is None:
        return "nothing to add: the drive is no longer listed"
    try:
        path = provisioning.ensure_image(machine, driver, row.image) if row.image else ""
        disk = DiskSpec(path=path, device="cdrom", format="raw", bus=provisioning.cdrom_bus(machine))
        target = driver.attach_disk(str(machine.uuid), disk)
    except Exception:
        row.delete()
        raise
    return f"CD-ROM drive {slot + 1} added as {target}" + (f" with {row.image.name}" if row.image else " (empty)")


def _remove_cdrom(machine: Machine, driver, slot: int) -> str:
    removed = driver.detach_disk(str(machine.uuid), target=provisioning.cdrom_target(machine, slot))
    MachineCdrom.objects.filter(machine=machine, slot=slot).delete()
    return f"CD-ROM drive {slot + 1} {'removed' if removed else 'was not there'}"


# --- the worker -------------------------------------------------------------------------------------------------

RUNS = {
    DISK_ATTACH: lambda m, d, a: _attach_disk(m, d, a["n"]),
    DISK_DETACH: lambda m, d, a: _detach_disk(m, d, a["n"], a.get("keep", False)),
    NIC_ATTACH: lambda m, d, a: _attach_nic(m, d, a["mac"]),
    NIC_DETACH: lambda m, d, a: _detach_nic(m, d, a["mac"]),
    CDROM_ADD: lambda m, d, a: _add_cdrom(m, d, a["slot"]),
    CDROM_REMOVE: lambda m, d, a: _remove_cdrom(m, d, a["slot"]),
}


def machine_devices_run(machine_id: int, op: str, arg: dict) -> None:
    """Worker: the device change on the hypervisor; its outcome an event (a failed attach takes the disk, NIC or
    drive off the machine again). The operation is released."""
    machine = Machine.objects.select_related("hypervisor", "owner", "project").filter(pk=machine_id).first()
    if machine is None or op not in RUNS:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        machine.log("devices", RUNS[op](machine, driver, arg))
    except HypervisorError as e:
        machine.log("devices", f"{op.replace('_', ' ')} failed: {e}", level="error")
    except Exception as e:  # noqa: BLE001 - any failure ends the run, with the reason
        log.exception("machine %s: %s failed", machine.pk, op)
        machine.log("devices", f"{op.replace('_', ' ')} failed: {type(e).__name__}: {e}", level="error")
    finally:
        _release_operation(machine)
