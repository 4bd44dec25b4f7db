"""Everything that changes machines. Views, the API, the admin and tasks call these."""

from __future__ import annotations

import logging
import re
import secrets
import socket
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from huey.exceptions import RetryTask

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError, HypervisorFatalError, HypervisorUnavailable
from hypervisors.drivers.base import PowerState as DomainState  # what the driver reports, not the model's field
from hypervisors.models import Hypervisor, Image
from machines import bmc, cloudinit, crypto, nic_policy, provisioning, screenshots, tasks
from machines.access import project_choices
from machines.capacity import check_quota, claim_room, held, held_by, lock_quotas
from machines.models import Machine, MachineCdrom, MachineNic, Project
from machines.policy import RULES, has_ready_image, statuses_text
from machines.states import BUSY, DeployType, InvalidTransition, PowerAction, PowerState, Status
from portal import audit
from portal.audit import audited
from portal.refusals import Refusal

log = logging.getLogger(__name__)


class MachineError(Refusal):
    """The request cannot be done now; the message is for the user."""


@dataclass
class NicInput:
    type: str = MachineNic.Type.NETWORK
    source: str = ""
    mac: str = ""
    dhcp4: bool = True
    dhcp6: bool = False
    addresses: list[str] = field(default_factory=list)
    gateway4: str = ""
    gateway6: str = ""
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    model: str = "virtio"
    mode: str = "bridge"
    vlan: int | None = None


def generate_mac() -> str:
    """A random MAC under PORTAL_MAC_PREFIX, unused in the portal."""
    prefix = settings.PORTAL_MAC_PREFIX.lower().strip(":")
    for _ in range(50):
        tail = ":".join(f"{b:02x}" for b in secrets.token_bytes(6 - len(prefix.split(":"))))
        mac = f"{prefix}:{tail}"
        if not MachineNic.objects.filter(mac=mac).exists():
            return mac
    raise MachineError("could not find a free MAC address under the configured prefix")


def _validate_nics(hypervisor: Hypervisor, nics: list[NicInput], *, owner, project: Project | None = None) -> None:
    """NIC sources must exist on the hypervisor, and the owner may use them there (machines.nic_policy:
    staff anything; others the tenant network and what was published to them or to the machine's
    project). Addresses are checked by the cloud-init builder."""
    networks = {n["name"] for n in hypervisor.networks}
    if len(nics) > MAX_NICS:
        raise ValidationError({"nics": f"At most {MAX_NICS} NICs."})
    for i, nic in enumerate(nics, start=1):
        if nic.type not in MachineNic.Type.values:
            raise ValidationError({"nics": f"NIC {i}: type must be one of {', '.join(MachineNic.Type.values)}."})
        # The policy first: someone who may not use the host's networks is not told which it has.
        refused = nic_policy.refusal(owner, nic, index=i, hypervisor=hypervisor, project=project)
        if refused:
            raise ValidationError({"nics": refused})
        if nic.type == MachineNic.Type.NETWORK and nic.source not in networks:
            have = ", ".join(sorted(networks)) or "none"
            raise ValidationError(
                {"nics": f"NIC {i}: network {nic.source!r} does not exist on {hypervisor.name} (it has: {have})."}
            )
        if nic.type == MachineNic.Type.BRIDGE and not nic.source:
            raise ValidationError({"nics": f"NIC {i}: name the host bridge."})
        known = {x["name"]: x["type"] for x in hypervisor.interfaces}
        if nic.type == MachineNic.Type.BRIDGE and known and known.get(nic.source) != "bridge":
            have = ", ".join(n for n, t in known.items() if t == "bridge") or "none"
            raise ValidationError(
                {"nics": f"NIC {i}: {hypervisor.name} has no bridge {nic.source!r} (bridges: {have})."}
            )
        if nic.type == MachineNic.Type.DIRECT and (not nic.source or (known and nic.source not in known)):
            raise ValidationError({"nics": f"NIC {i}: name a host interface of {hypervisor.name} for macvtap"
                                           f"{' (' + ', '.join(known) + ')' if known else ''}."})  # fmt: skip
        if nic.mode not in ("bridge", "vepa", "private", "passthrough"):
            raise ValidationError({"nics": f"NIC {i}: macvtap mode is bridge, vepa, private or passthrough."})
        if nic.model not in ("virtio", "e1000", "e1000e", "rtl8139"):
            raise ValidationError({"nics": f"NIC {i}: model is virtio, e1000, e1000e or rtl8139."})
        if nic.vlan is not None and not (1 <= nic.vlan <= 4094 and nic.type in ("bridge", "direct")):
            raise ValidationError(
                {"nics": f"NIC {i}: a VLAN tag is 1 to 4094, on a bridge (Open vSwitch) or macvtap NIC."}
            )


MAX_NICS = 8  # PCI slots are finite, and so is the guest's patience at boot


def _default_nics(owner, hypervisor: Hypervisor, project: Project | None, deploy_type: str) -> list[NicInput]:
    """NICs left out (the API without `nics`): the tenant network where the hypervisor has it, else for
    those who are not staff the first network published to them, else none (refused for network boot)."""
    choice = nic_policy.default_choice(owner, [hypervisor], project)
    if choice is None:
        if deploy_type == DeployType.NETWORK:
            why = "" if owner.is_staff else " " + nic_policy.no_network_message(hypervisor)
            raise ValidationError({"nics": f"A network-boot machine needs at least one NIC to boot from.{why}"})
        return []
    return [NicInput(type=choice.kind, source=choice.source, mode=choice.modes[0] if choice.modes else "bridge",
                     vlan=None if choice.untagged or not choice.vlans else choice.vlans[0])]  # fmt: skip


MAX_CDROMS = 4  # IDE has four places; the disk is virtio
HARDWARE_FIELDS = {"machine_type", "cpu_mode", "cpu_model", "cpu_topology", "smbios", "watchdog", "rng", "disk_bus",
                   "disk_cache", "extra_disks", "qemu_args", "firmware", "secure_boot", "hostdevs", "hostdev_match"}  # fmt: skip
SMBIOS_KEYS = {"manufacturer", "product", "version", "serial", "sku", "family", "uuid"}


def _validate_hardware_input(owner, deploy_type: str, vcpus: int, hardware: dict, project=None) -> dict:
    """Checks that need no hypervisor: shapes, limits, and who may pass raw QEMU arguments. A machine in a
    project is operated by its members, so it gets only what they may have, whoever creates it."""
    unknown = set(hardware) - HARDWARE_FIELDS
    if unknown:
        raise TypeError(f"unknown machine options: {', '.join(sorted(unknown))}")
    hw = {k: v for k, v in hardware.items() if v not in (None, "")}
    topology = hw.get("cpu_topology") or []
    if topology:
        if len(topology) != 3 or not all(isinstance(n, int) and n > 0 for n in topology):
            raise ValidationError({"cpu_topology": "Give [sockets, cores, threads], three positive whole numbers."})
        if topology[0] * topology[1] * topology[2] != vcpus:
            raise ValidationError({"cpu_topology": f"Sockets × cores × threads must equal the {vcpus} vCPUs."})
    smbios = hw.get("smbios") or {}
    if (
        not isinstance(smbios, dict)
        or set(smbios) - SMBIOS_KEYS
        or any(not isinstance(v, str) or len(v) > 64 for v in smbios.values())
    ):
        raise ValidationError(
            {"smbios": f"Use the keys {', '.join(sorted(SMBIOS_KEYS))}, with text of at most 64 characters."}
        )
    if "extra_disks" in hw:
        hw["extra_disks"] = _normalise_extra_disks(hw["extra_disks"], deploy_type)
    if hw.get("disk_bus", "virtio") not in ("virtio", "sata", "scsi", "ide"):
        raise ValidationError({"disk_bus": "Choose virtio, sata, scsi or ide."})
    if deploy_type == DeployType.ISO and hw.get("disk_bus", "virtio") != "virtio":
        raise ValidationError({"disk_bus": "ISO machines keep the IDE or SATA places for their CD-ROMs; use virtio."})
    if hw.get("disk_cache", "") not in ("", "none", "writeback", "writethrough", "directsync", "unsafe"):
        raise ValidationError({"disk_cache": "Choose none, writeback, writethrough, directsync or unsafe."})
    if hw.get("firmware", "bios") not in ("bios", "uefi"):
        raise ValidationError({"firmware": "Choose bios or uefi."})
    if hw.get("secure_boot") and hw.get("firmware") != "uefi":
        raise ValidationError({"secure_boot": "Secure Boot needs UEFI firmware."})
    if hw.get("secure_boot") and not str(hw.get("machine_type", "")).startswith(("q35", "pc-q35")):
        raise ValidationError({"secure_boot": "Secure Boot needs machine type q35 (it keeps its variables in SMM)."})
    if (
        (hw.get("hostdevs") or hw.get("hostdev_match"))
        and project is not None
        and settings.PORTAL_HOST_DEVICES_FOR != "everyone"
    ):
        raise ValidationError({"hostdevs": f"A machine in project {project.name} is operated by its members: host devices "
                                           "are for machines that only staff operate (PORTAL_HOST_DEVICES_FOR)."})  # fmt: skip
    if (hw.get("hostdevs") or hw.get("hostdev_match")) and not may_take_host_devices(owner):
        raise ValidationError({"hostdevs": "Only staff may pass host devices through: a device taken from the host can "
                                           "cut it off its network or disks. Ask an administrator."})  # fmt: skip
    args = hw.get("qemu_args") or []
    if args and not owner.is_staff:
        raise ValidationError({"qemu_args": "Only staff may pass extra QEMU arguments: they bypass every check."})
    if args and project is not None:
        raise ValidationError({"qemu_args": f"A machine in project {project.name} is operated by its members: extra QEMU "
                                            "arguments bypass every check, so they are for machines only staff operate."})  # fmt: skip
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise ValidationError({"qemu_args": 'Give a list of arguments, e.g. ["-device", "pvpanic"].'})
    return hw


def _hexid(value: str) -> str:
    """0x8086 -> 8086, as lspci -n shows vendor and product ids."""
    return value[2:] if value.startswith("0x") else value


def may_take_host_devices(user) -> bool:
    return user.is_staff or settings.PORTAL_HOST_DEVICES_FOR == "everyone"


def taken_hostdevs(hypervisor: Hypervisor) -> set[str]:
    """Node devices of the hypervisor already given to a machine."""
    return {n for m in Machine.objects.filter(hypervisor=hypervisor).only("hostdevs") for n in (m.hostdevs or [])}


def _claim_hostdevs(hypervisor: Hypervisor, hw: dict) -> dict:
    """Resolve host devices (by name, or the first free one matching `hostdev_match`) and make sure none is
    already given to another machine. Runs in the create transaction with the hypervisor row locked."""
    names = list(hw.get("hostdevs") or [])
    pattern = hw.pop("hostdev_match", "")
    if not names and not pattern:
        return hw
    Hypervisor.objects.select_for_update().filter(pk=hypervisor.pk).first()
    taken = taken_hostdevs(hypervisor)
    devices = {d["name"]: d for d in hypervisor.devices}
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValidationError({"hostdev_match": f"Not a regular expression: {e}."}) from None
        free = [n for n, d in devices.items() if n not in taken and n not in names
                and regex.search(f"{n} {_hexid(d['vendor'])}:{_hexid(d['product'])} {d['description']}")]  # fmt: skip
        if not free:
            raise ValidationError({"hostdev_match": f"No free device on {hypervisor.name} matches {pattern!r}."})
        names.append(free[0])
    for name in names:
        if name not in devices:
            raise ValidationError({"hostdevs": f"{hypervisor.name} has no PCI or USB device {name!r}."})
        if name in taken:
            raise ValidationError({"hostdevs": f"{name} is already given to another machine."})
    if len(set(names)) != len(names):
        raise ValidationError({"hostdevs": "A device can be given once."})
    return {**hw, "hostdevs": names}


def _normalise_extra_disks(entries, deploy_type: str) -> list[dict]:
    """Each extra disk as {"size_gib", "image", "boot_order"}: a number is a blank disk of that size;
    an image makes it a copy-on-write overlay of that image; a boot order puts it before the main disk."""
    if not isinstance(entries, list) or len(entries) > 4:
        raise ValidationError({"extra_disks": "Up to four extra disks."})
    disks, orders = [], []
    for n, entry in enumerate(entries, start=1):
        entry = {"size_gib": entry} if isinstance(entry, int) else entry
        if not isinstance(entry, dict) or set(entry) - {"size_gib", "image", "boot_order"}:
            raise ValidationError({"extra_disks": f"Disk {n}: a size in GiB, or {{size_gib, image, boot_order}}."})
        size, image_id, order = entry.get("size_gib"), entry.get("image"), entry.get("boot_order")
        if not isinstance(size, int) or not 1 <= size <= 16384:
            raise ValidationError({"extra_disks": f"Disk {n}: a size of 1 to 16384 GiB."})
        if image_id is not None:
            image = (
                Image.objects.filter(pk=image_id, kind="disk", status="ready").first()
                if isinstance(image_id, int)
                else None
            )
            if image is None:
                raise ValidationError({"extra_disks": f"Disk {n}: {image_id!r} is not a ready disk image."})
            if image.virtual_size_bytes > size << 30:
                raise ValidationError({"extra_disks": f"Disk {n}: image {image.name} needs at least "
                                                      f"{-(-image.virtual_size_bytes // (1 << 30))} GiB."})  # fmt: skip
        if order is not None:
            if deploy_type == DeployType.NETWORK:
                raise ValidationError(
                    {"extra_disks": "Network-boot machines boot from the network, then their first disk."}
                )
            if not isinstance(order, int) or order < 1 or order in orders:
                raise ValidationError({"extra_disks": f"Disk {n}: boot orders are distinct positive numbers."})
            orders.append(order)
        disks.append({"size_gib": size, "image": image_id, "boot_order": order})
    return disks


def _validate_hardware_against(hypervisor: Hypervisor, hw: dict, image: Image | None = None) -> None:
    """What the hypervisor really offers: architectures, firmware, machine types, CPU modes and models."""
    arch = image.arch if image is not None and image.arch else hypervisor.arch
    if image is not None and hypervisor.guest_arches and arch not in hypervisor.guest_arches:
        raise ValidationError({"image": f"{hypervisor.name} cannot run {arch} guests (it offers "
                                        f"{', '.join(hypervisor.guest_arches)})."})  # fmt: skip
    if arch != hypervisor.arch:
        return  # the host's capabilities describe its own architecture; emulated ones take their defaults
    if hw.get("firmware") == "uefi" and hypervisor.firmwares and "efi" not in hypervisor.firmwares:
        raise ValidationError({"firmware": f"{hypervisor.name} has no UEFI firmware (install OVMF there)."})
    machine_type = hw.get("machine_type")
    if machine_type and hypervisor.machine_types and machine_type not in hypervisor.machine_types:
        some = ", ".join(t for t in hypervisor.machine_types if "." not in t or t.endswith(("7.2", "8.0")))[:200]
        raise ValidationError(
            {"machine_type": f"{hypervisor.name} has no machine type {machine_type!r} (it has e.g. {some})."}
        )
    mode = hw.get("cpu_mode")
    if mode and hypervisor.cpu_modes and mode not in hypervisor.cpu_modes:
        raise ValidationError(
            {"cpu_mode": f"{hypervisor.name} supports CPU modes {', '.join(hypervisor.cpu_modes)}, not {mode}."}
        )
    if mode == "custom":
        model = hw.get("cpu_model", "")
        if not model:
            raise ValidationError({"cpu_model": "Name the CPU model for CPU mode custom."})
        if hypervisor.cpu_models and model not in hypervisor.cpu_models:
            raise ValidationError({"cpu_model": f"{model!r} is not a usable CPU model on {hypervisor.name}."})
    elif hw.get("cpu_model"):
        raise ValidationError({"cpu_model": "A CPU model goes with CPU mode custom."})


def _validate_iso_request(extra_isos: list[Image], *cloud_init_fields: str) -> None:
    if any(f.strip() for f in cloud_init_fields):
        raise ValidationError({"deploy_type": "SSH keys, packages, a script and user-data apply to image machines; "
                                              "an ISO machine is installed through its console."})  # fmt: skip
    if len(extra_isos) > MAX_CDROMS - 1:
        raise ValidationError({"extra_isos": f"At most {MAX_CDROMS - 1} extra ISOs."})
    for iso in extra_isos:
        if iso.kind != "iso" or not iso.is_ready:
            raise ValidationError({"extra_isos": f"{iso.name} is not a ready ISO."})


def _validate_network_request(image, nics, extra_isos, *cloud_init_fields: str) -> None:
    if image is not None or extra_isos:
        raise ValidationError({"image": "A network-boot machine has no image: it boots from the network."})
    if any(f.strip() for f in cloud_init_fields):
        raise ValidationError({"deploy_type": "SSH keys, packages, a script and user-data apply to image machines; "
                                              "a network-boot machine gets its OS from the network."})  # fmt: skip
    if nics is not None and not nics:  # None: the default NIC, resolved once the hypervisor is known
        raise ValidationError({"nics": "A network-boot machine needs at least one NIC to boot from."})


def _validate_cloud_init(machine: Machine) -> None:
    try:
        for key in machine.key_list:
            cloudinit.validate_ssh_key(key)
        cloudinit.validate_user_data(machine.user_data)
        cloudinit.build_seed_iso(provisioning.seed_spec(machine))
    except cloudinit.CloudInitError as e:
        raise ValidationError(str(e)) from None


def _check_named_hypervisor(hypervisor: Hypervisor, pool: str) -> None:
    if not hypervisor.enabled or not hypervisor.is_online:
        raise ValidationError(
            {"hypervisor": f"Hypervisor {hypervisor.name} is {hypervisor.get_status_display().lower()}."}
        )
    if pool not in {p["name"] for p in hypervisor.pools if p.get("active")}:
        raise ValidationError({"pool": f"Storage pool {pool!r} is not active on {hypervisor.name}."})


@audited("machine.create")
@transaction.atomic
def machine_create(*, owner, hypervisor: Hypervisor | None, name: str, deploy_type: str = DeployType.IMAGE,
                   image: Image | None = None, vcpus: int = 1, memory_mib: int = 1024, disk_gib: int = 10,
                   nics: list[NicInput] | None = None, ssh_authorized_keys: str = "", packages: str = "",
                   script: str = "", user_data: str = "", pool: str = "default", deletion_protection: bool = False,
                   autostart: bool = True, extra_isos: list[Image] | None = None,
                   power_on: bool | None = None, project: Project | None = None, override_capacity: bool = False,
                   **hardware) -> Machine:  # fmt: skip
    """Validate, save, and queue provisioning. Raises ValidationError with a message per field.
    override_capacity (staff, with a named hypervisor): create it even where the host has no room."""
    if deploy_type not in DeployType.values:
        raise ValidationError({"deploy_type": f"Choose one of {', '.join(DeployType.values)}."})
    extra_isos = extra_isos or []
    if deploy_type == DeployType.ISO:
        _validate_iso_request(extra_isos, ssh_authorized_keys, packages, script, user_data)
    elif deploy_type == DeployType.NETWORK:
        _validate_network_request(image, nics, extra_isos, ssh_authorized_keys, packages, script, user_data)
        power_on = bool(power_on)
    elif extra_isos:
        raise ValidationError({"extra_isos": "Extra ISOs are for ISO machines."})
    if project is not None and not project_choices(owner).filter(pk=project.pk).exists():
        raise ValidationError({"project": f"You are not an admin of project {project.name}."})
    hardware = _validate_hardware_input(owner, deploy_type, vcpus, hardware, project)
    # What the machine will hold (capacity.held: main disk, extra disks, ...), checked against the quotas and
    # the host under the locks every allocating path takes in this order: project, user's quota, hypervisor.
    need = held({"vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib,
                 "extra_disks": hardware.get("extra_disks")})  # fmt: skip
    check_quota(owner, **need, project=project)
    if hypervisor is not None:
        _check_named_hypervisor(hypervisor, pool)
    # "Any hypervisor" places where the NICs' networks exist, preferring the tenant network for default NICs.
    networks = tuple(dict.fromkeys(n.source for n in nics or [] if n.type == MachineNic.Type.NETWORK))
    prefer = settings.PORTAL_TENANT_NETWORK if nics is None else ""
    room = claim_room(hypervisor, need=need, pool=pool, image=image, user=owner, override=override_capacity,
                      networks=networks, prefer_network=prefer)  # fmt: skip
    hypervisor = room.hypervisor
    nics = _default_nics(owner, hypervisor, project, deploy_type) if nics is None else nics
    _validate_nics(hypervisor, nics, owner=owner, project=project)
    _validate_hardware_against(hypervisor, hardware, image)
    hardware = _claim_hostdevs(hypervisor, hardware)
    script, user_data = script.replace("\r\n", "\n"), user_data.replace("\r\n", "\n")  # browsers send CRLF
    if len(script.encode()) > cloudinit.USER_DATA_MAX_BYTES:
        raise ValidationError({"script": "The script is over 64 KiB."})
    machine = Machine(owner=owner, project=project, hypervisor=hypervisor, name=name, deploy_type=deploy_type, image=image, vcpus=vcpus,
                      memory_mib=memory_mib, disk_gib=disk_gib, ssh_authorized_keys=ssh_authorized_keys.strip(),
                      packages=packages.strip(), script=script, user_data=user_data, pool=pool,
                      deletion_protection=deletion_protection, autostart=autostart,
                      power_on_after_create=True if power_on is None else power_on, **hardware,
                      instance_id=f"i-{uuidlib.uuid4().hex}")  # fmt: skip
    machine.full_clean()
    machine.save()
    if deploy_type == DeployType.NETWORK:
        bmc_assign(machine)
    try:
        for i, nic in enumerate(nics):
            MachineNic.objects.create(machine=machine, index=i, type=nic.type, source=nic.source,
                                      mac=(nic.mac or generate_mac()).lower(), dhcp4=nic.dhcp4, dhcp6=nic.dhcp6,
                                      addresses=nic.addresses, gateway4=nic.gateway4, gateway6=nic.gateway6,
                                      nameservers=nic.nameservers, search=nic.search, model=nic.model,
                                      mode=nic.mode, vlan=nic.vlan)  # fmt: skip
    except IntegrityError:
        raise ValidationError({"nics": "That MAC address is already used by another machine."}) from None
    if deploy_type == DeployType.ISO:
        for slot, iso in enumerate([image, *extra_isos]):
            MachineCdrom.objects.create(machine=machine, slot=slot, image=iso)
    elif deploy_type == DeployType.IMAGE:
        _validate_cloud_init(machine)
    machine.log("create", f"requested by {owner.get_username()} on {hypervisor.name}")
    if room.placement is not None:
        machine.log("placement", room.placement.reason())
    if room.over_capacity:
        note = f"created over capacity on {hypervisor.name} by staff ({owner.get_username()}): {room.over_capacity}"
        machine.log("placement", note, level="warning")
        audit.record("machine.capacity_override", machine, user=owner, detail=note)
    machine.transition(Status.PROVISIONING)
    _enqueue(tasks.machine_provision_task, machine.pk)
    return machine


def _enqueue(task: Callable, *args) -> None:
    """Queue the task once the transaction that asked for it commits (a rolled-back request queues nothing)."""
    transaction.on_commit(lambda: task(*args))


def _cleanup(machine: Machine, driver) -> None:
    """Remove what a failed attempt made; failures here are recorded, not raised."""
    try:
        removed = provisioning.deprovision(machine, driver)
        machine.log("cleanup", "removed " + (", ".join(removed) if removed else "nothing (nothing was made)"))
    except HypervisorError as e:
        machine.log("cleanup", f"could not clean up: {e}", level="error")


def machine_provision_run(machine_id: int) -> None:
    """Worker: run the pipeline for a machine in PROVISIONING or REBUILDING."""
    machine = Machine.objects.select_related("hypervisor", "image", "owner").get(pk=machine_id)
    if machine.status not in (Status.PROVISIONING, Status.REBUILDING):
        return  # a duplicate or stale delivery
    Machine.objects.filter(pk=machine.pk).update(attempts=machine.attempts + 1)
    driver = get_driver(machine.hypervisor.uri)
    try:
        provisioning.provision(machine, driver)
    except HypervisorUnavailable as e:
        if machine.attempts < settings.PORTAL_PROVISION_RETRIES:
            delay = 5 * 2**machine.attempts
            machine.log("retry", f"{e}; trying again in {delay} s", level="warning")
            raise RetryTask(delay=delay) from None
        _cleanup(machine, driver)
        machine.transition(Status.ERROR, f"hypervisor unavailable: {e}")
        return
    except (HypervisorFatalError, cloudinit.CloudInitError, NotImplementedError) as e:
        _cleanup(machine, driver)
        machine.transition(Status.ERROR, str(e))
        return
    try:
        state = driver.domain_state(str(machine.uuid))
    except HypervisorError:
        state = None
    Machine.objects.filter(pk=machine.pk).update(attempts=0, power_state=str(state or PowerState.UNKNOWN),
                                                 power_checked=timezone.now())  # fmt: skip
    machine.transition(Status.ACTIVE)


@audited("machine.delete", obj_kwarg="machine")
@transaction.atomic
def machine_delete(*, machine: Machine) -> None:
    """Queue the removal of the domain and its volumes. Refused with protection, touching nothing."""
    machine = Machine.objects.select_for_update().get(pk=machine.pk)
    if machine.deletion_protection:
        raise MachineError(f"{machine.name} is protected from deletion; clear the protection first.")
    if machine.status not in RULES["delete"].statuses:
        raise MachineError(
            f"{machine.name} is busy ({machine.get_status_display().lower()}); try again when it is done."
        )
    machine.transition(Status.DELETING)
    _enqueue(tasks.machine_delete_task, machine.pk)


def machine_delete_run(machine_id: int) -> None:
    """Worker: destroy, undefine, remove volumes, then forget the machine."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None or machine.status != Status.DELETING:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        removed = provisioning.deprovision(machine, driver)
    except HypervisorUnavailable as e:
        machine.log("delete", f"{e}; trying again", level="warning")
        raise RetryTask(delay=15) from None
    except HypervisorFatalError as e:
        machine.transition(Status.ERROR, f"delete failed: {e}")
        return
    log.info("machine %s deleted: %s", machine.pk, ", ".join(removed))
    screenshot_path(machine).unlink(missing_ok=True)
    machine.delete()  # its console tokens and sessions go with it


def _refuse_against_policy(machine: Machine, doing: str) -> None:
    """A machine whose NICs the network policy refuses (made before it, or left on a network since
    unpublished) is not started or rebuilt until staff publish its network or change its NIC."""
    for index, nic in enumerate(machine.nics.all(), start=1):
        reason = nic_policy.refusal(machine.owner, nic, index=index, hypervisor=machine.hypervisor,
                                    project=machine.project)  # fmt: skip
        if reason:
            raise MachineError(f"{machine.name} cannot be {doing}: {reason}")


@audited("machine.power", obj_kwarg="machine")
@transaction.atomic
def machine_power(*, machine: Machine, action: str) -> None:
    """Queue a power action; one operation at a time per machine. A start (of a machine that is off) is
    refused while its NICs break the network policy."""
    if action not in PowerAction.values:
        raise MachineError(f"Unknown action {action!r}; use one of {', '.join(PowerAction.values)}.")
    if action == PowerAction.START:
        _refuse_against_policy(machine, "started")
    _claim_operation(machine, action)
    machine.log("power", f"{PowerAction(action).label} requested")
    _enqueue(tasks.machine_power_task, machine.pk, action)


IPMI_ACTIONS = {PowerAction.START: "on", PowerAction.SHUTDOWN: "soft", PowerAction.POWEROFF: "off",
                PowerAction.REBOOT: "cycle", PowerAction.RESET: "reset"}  # fmt: skip


def machine_power_run(machine_id: int, action: str) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if machine.has_bmc:
        return _power_through_bmc(machine, action)
    uuid = str(machine.uuid)
    try:
        driver = get_driver(machine.hypervisor.uri)
        if action == PowerAction.START:
            provisioning.ensure_host_guards(machine, driver, defined=True)  # current: the MAC may have changed
        {
            PowerAction.START: driver.start,
            PowerAction.SHUTDOWN: driver.shutdown,
            PowerAction.POWEROFF: driver.power_off,
            PowerAction.REBOOT: driver.reboot,
            PowerAction.RESET: driver.reset,
        }[PowerAction(action)](uuid)
        state = driver.domain_state(uuid)
        machine.log("power", f"{PowerAction(action).label} done; the domain is {state or 'missing'}")
    except HypervisorError as e:
        state = None
        machine.log("power", f"{PowerAction(action).label} failed: {e}", level="error")
    finally:
        _release_operation(machine)
    if state is not None:
        Machine.objects.filter(pk=machine.pk).update(power_state=str(state), power_checked=timezone.now())


@audited("machine.rebuild", obj_kwarg="machine")
@transaction.atomic
def machine_rebuild(*, machine: Machine) -> None:
    """Recreate the disk from the image and a fresh seed (new instance-id): the guest starts over.
    It allocates nothing new: the disks come back at the sizes the machine holds (capacity.held), so no
    quota or capacity check is needed, and the locks are taken in the allocating paths' order all the same."""
    machine = _lock_for_allocation(machine)
    if machine.deletion_protection:
        raise MachineError(f"{machine.name} is protected; clear the protection to rebuild it (its disk is replaced).")
    if machine.status not in RULES["rebuild"].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; rebuild needs it active or failed."
        )
    if not has_ready_image(machine):
        raise MachineError("The machine's image is not available any more.")
    _refuse_against_policy(machine, "rebuilt")
    Machine.objects.filter(pk=machine.pk).update(instance_id=f"i-{uuidlib.uuid4().hex}", attempts=0)
    machine.transition(Status.REBUILDING)
    _enqueue(tasks.machine_rebuild_task, machine.pk)


def machine_rebuild_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if machine.status != Status.REBUILDING or machine.attempts:
        return machine_provision_run(machine_id)  # a retry only needs the pipeline
    try:
        driver = get_driver(machine.hypervisor.uri)
        removed = provisioning.deprovision(machine, driver)
        machine.log("rebuild", "removed " + ", ".join(removed or ["nothing"]))
    except HypervisorError as e:
        machine.transition(Status.ERROR, f"rebuild failed: {e}")
        return
    return machine_provision_run(machine_id)


def _lock_for_allocation(machine: Machine) -> Machine:
    """The machine's row locked after its project's and owner's quota rows (lock_quotas: the order every
    allocating path takes). Refused if the machine changed hands between reading and locking."""
    current = Machine.objects.select_related("owner", "project").get(pk=machine.pk)
    lock_quotas(current.owner, current.project)
    locked = Machine.objects.select_for_update().get(pk=machine.pk)
    if (locked.owner_id, locked.project_id) != (current.owner_id, current.project_id):
        raise MachineError(f"{machine.name} changed owner or project meanwhile; try again.")
    return locked


@audited("machine.grow_disk", obj_kwarg="machine")
@transaction.atomic
def machine_grow_disk(*, machine: Machine, disk_gib: int) -> None:
    """Grow the disk (never shrink). A running guest sees the new size at once."""
    machine = _lock_for_allocation(machine)
    if machine.status not in RULES["grow_disk"].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; growing the disk needs it "
            f"{statuses_text('grow_disk')}."
        )
    if disk_gib <= machine.disk_gib:
        raise ValidationError(
            {"disk_gib": f"The disk is {machine.disk_gib} GiB; give a larger size (disks only grow)."}
        )
    if disk_gib > 16384:
        raise ValidationError({"disk_gib": "At most 16384 GiB."})
    before, after = held_by(machine), held_by(machine, disk_gib=disk_gib)
    check_quota(machine.owner, **{k: after[k] - before[k] for k in after}, project=machine.project)
    # The host's pool must hold the larger disk, as a create's would (the disk is thin, but so is a create's).
    hv = Hypervisor.objects.select_for_update().get(pk=machine.hypervisor_id)
    pool = next((p for p in hv.pools if p["name"] == machine.pool and p.get("active")), None)
    free = (pool.get("available_bytes") or 0) >> 30 if pool else None
    if free is not None and disk_gib - machine.disk_gib > free:
        raise ValidationError({"disk_gib": f"Hypervisor {hv.name} has {free} GiB free in pool {machine.pool}; growing by "
                                           f"{disk_gib - machine.disk_gib} GiB does not fit."})  # fmt: skip
    old = machine.disk_gib
    machine.transition(Status.RESIZING, f"{old} GiB to {disk_gib} GiB")
    Machine.objects.filter(pk=machine.pk).update(disk_gib=disk_gib)
    _enqueue(tasks.machine_grow_disk_task, machine.pk)


def machine_grow_disk_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if machine.status != Status.RESIZING:
        return
    size = machine.disk_gib << 30
    try:
        driver = get_driver(machine.hypervisor.uri)
        if driver.domain_state(str(machine.uuid)) == DomainState.RUNNING:
            info = driver.volume_info(pool=machine.pool, name=machine.disk_volume)
            assert info is not None  # the running domain uses it
            path = info.path
            driver.block_resize(str(machine.uuid), path=path, capacity_bytes=size)
        else:
            driver.resize_volume(pool=machine.pool, name=machine.disk_volume, capacity_bytes=size)
    except HypervisorUnavailable as e:
        machine.log("resize", f"{e}; trying again", level="warning")
        raise RetryTask(delay=15) from None
    except HypervisorFatalError as e:
        machine.transition(Status.ERROR, f"growing the disk failed: {e}")
        return
    machine.log("resize", f"disk is now {machine.disk_gib} GiB")
    machine.transition(Status.ACTIVE)


def machine_serial_log_request(*, machine: Machine, max_age: float = 3.0) -> None:
    """Queue a fetch of the serial log unless a recent one is on file (pages poll this)."""
    fetched = machine.serial_log_fetched
    if fetched is None or (timezone.now() - fetched).total_seconds() > max_age:
        Machine.objects.filter(pk=machine.pk).update(serial_log_fetched=timezone.now())
        from machines.tasks import machine_serial_log_task

        machine_serial_log_task(machine.pk)


def machine_serial_log_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        text = provisioning.fetch_serial_log(machine, driver)
    except HypervisorError as e:
        log.info("serial log of machine %s: %s", machine_id, e)
        return
    Machine.objects.filter(pk=machine.pk).update(serial_log=text, serial_log_fetched=timezone.now())


def machines_reconcile() -> None:
    """Periodic: fail machines stuck busy past the deadline; make power states true to the hypervisors."""
    now = timezone.now()
    deadline = now - timedelta(seconds=settings.PORTAL_PROVISION_TIMEOUT)
    for machine in Machine.objects.filter(status__in=BUSY, status_changed__lt=deadline):
        try:
            machine.transition(Status.ERROR, f"timed out after {settings.PORTAL_PROVISION_TIMEOUT} s "
                                             f"({machine.get_status_display().lower()}); the worker may have stopped")  # fmt: skip
        except InvalidTransition:
            continue  # it moved on meanwhile: nothing to fail
    Machine.objects.filter(operation_started__lt=now - timedelta(minutes=5)).update(
        operation="", operation_started=None
    )
    for hv in Hypervisor.objects.filter(enabled=True, status="online", machines__isnull=False).distinct():
        _reconcile_power(hv)
    # Keep the screens on machine pages current even when nobody has the page open: a batch a minute,
    # the stalest first, so a large installation takes its screenshots in turn instead of all at once.
    # (By when they were last asked for: one that fails is not asked again and again ahead of the rest.)
    stalest = Machine.objects.filter(power_state=PowerState.RUNNING, hypervisor__enabled=True,
                                     hypervisor__status="online").order_by(F("screenshot_requested").asc(nulls_first=True), "pk")  # fmt: skip
    for machine in stalest[: settings.PORTAL_SCREENSHOTS_PER_MINUTE]:
        machine_screenshot_request(machine=machine, max_age=50)


def machines_sync(*, machines) -> None:
    """Refresh the power state of these machines from their hypervisors now (queued)."""
    for hv_id in {m.hypervisor_id for m in machines}:
        _enqueue(tasks.hypervisor_reconcile_task, hv_id)


def hypervisor_reconcile_run(hypervisor_id: int) -> None:
    hv = Hypervisor.objects.filter(pk=hypervisor_id).first()
    if hv is not None:
        _reconcile_power(hv)


def _guard_bridge_nics(machine: Machine, driver) -> None:
    """A domain defined before its NICs on host bridges named the host guard gets it in its config, so its
    next start carries it whoever starts it (the portal, its BMC, libvirt's autostart)."""
    try:
        provisioning.name_host_guards(machine, driver, step="reconcile")
    except HypervisorFatalError as e:  # no domain (vanished, or a failed machine)
        log.info("host guard of %s: %s", machine.name, e)


def _reconcile_power(hv: Hypervisor) -> None:
    """Power states of the hypervisor's machines, the addresses of those that run, and which run a VNC
    server that asks no password (defined before the portal set them): those get one in their config,
    which takes effect at their next cold start, however they are started."""
    machines = list(hv.machines.exclude(status__in=[Status.NEW, Status.PROVISIONING, Status.DELETING]))
    addresses = {}
    try:
        driver = get_driver(hv.uri)
        states = driver.domain_states()
        unprotected = driver.vnc_unprotected()
        for machine in machines:
            if str(machine.uuid) in unprotected:
                # Its config gets a password now, so the next start asks for one whoever starts it
                # (the portal, the machine's BMC, libvirt's autostart); a no-op once it has one.
                try:
                    driver.vnc_protect(str(machine.uuid))
                except HypervisorFatalError as e:
                    log.info("VNC password of %s: %s", machine.name, e)
            _guard_bridge_nics(machine, driver)
            if states.get(str(machine.uuid)) != DomainState.RUNNING:
                continue
            try:
                addresses[machine.pk] = driver.domain_addresses(str(machine.uuid))
            except HypervisorFatalError as e:  # e.g. undefined meanwhile: the others still count
                log.info("addresses of %s: %s", machine.name, e)
                addresses[machine.pk] = machine.guest_addresses  # what was known stays until the next try
    except HypervisorError as e:
        log.info("reconcile %s: %s", hv.name, e)
        return
    now = timezone.now()
    for machine in machines:
        state = states.get(str(machine.uuid))
        new = PowerState.MISSING if state is None else str(state)
        mine = Machine.objects.filter(pk=machine.pk)
        if new != machine.power_state:
            # Only over the state read above: a power action that ended meanwhile wrote a newer one.
            if mine.filter(power_state=machine.power_state).update(power_state=new) and new == PowerState.MISSING:
                machine.log("reconcile", "the domain vanished from the hypervisor", level="warning")
        open_console = str(machine.uuid) in unprotected
        if open_console and not machine.console_unprotected:
            machine.log("reconcile", "its VNC server asks no password (the machine was started before the portal "
                        "set them); it gets one at its next cold start", level="warning")  # fmt: skip
        mine.update(power_checked=now, guest_addresses=addresses.get(machine.pk, {}), console_unprotected=open_console)
    running = sum(states.get(str(m.uuid)) == DomainState.RUNNING for m in machines)
    without = sum(str(m.uuid) in unprotected for m in machines)
    (log.warning if without else log.info)("reconcile %s: %d machines, %d running, %d with a console that asks no "
                                           "password", hv.name, len(machines), running, without)  # fmt: skip


def console_auth_upgrade() -> list[Hypervisor]:
    """Queue, for every machine, a VNC password in its domain's persistent config (machines defined before
    the portal set them). Running ones keep what they started with until their next cold start."""
    hypervisors = list(Hypervisor.objects.filter(machines__isnull=False).distinct())
    for hv in hypervisors:
        _enqueue(tasks.console_auth_upgrade_task, hv.pk)
    return hypervisors


def console_auth_upgrade_run(hypervisor_id: int) -> dict[str, int]:
    """Worker: give every machine of the hypervisor a VNC password for its next start, then reconcile
    (which records those still running without one). Returns counts: added, had one, missing, running
    without one until their next cold start."""
    hv = Hypervisor.objects.get(pk=hypervisor_id)
    counts = {"added": 0, "had": 0, "missing": 0, "running_unprotected": 0}
    machines = list(hv.machines.exclude(status__in=[Status.NEW, Status.PROVISIONING, Status.DELETING]))
    driver = get_driver(hv.uri)
    unprotected = driver.vnc_unprotected()
    for machine in machines:
        try:
            added = driver.vnc_protect(str(machine.uuid))
        except HypervisorFatalError:  # no domain (vanished, or a failed machine)
            counts["missing"] += 1
            continue
        counts["added" if added else "had"] += 1
        if added:
            machine.log("console", "VNC password added to the domain's config; it takes effect at the next cold start")
        if str(machine.uuid) in unprotected:
            counts["running_unprotected"] += 1
    log.info("console auth upgrade on %s: %s", hv.name, ", ".join(f"{k} {v}" for k, v in counts.items()))
    _reconcile_power(hv)
    return counts


@audited("machine.protection", obj_kwarg="machine")
def machine_set_protection(*, machine: Machine, protected: bool) -> None:
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=protected)
    machine.deletion_protection = protected
    machine.log("protection", "deletion protection on" if protected else "deletion protection off")


@audited("machine.autostart", obj_kwarg="machine")
@transaction.atomic
def machine_set_autostart(*, machine: Machine, enabled: bool) -> None:
    """Whether the hypervisor starts the machine when it boots: recorded here, then set in libvirt by the
    worker (a machine not defined yet gets it at its define)."""
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


def _claim_operation(machine: Machine, operation: str, action: str = "") -> None:
    """One operation at a time per machine: claim it or raise. `action` names its rule in machines.policy
    (left out: the operation's name is the action's)."""
    action = action or operation
    if machine.status not in RULES[action].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; this needs it {statuses_text(action)}."
        )
    n = Machine.objects.filter(pk=machine.pk, operation="", status__in=RULES[action].statuses).update(
        operation=operation, operation_started=timezone.now()
    )
    if n != 1:
        raise MachineError(f"{machine.name} is busy with another operation; try again when it is done.")
    machine.operation = operation


def _release_operation(machine: Machine) -> None:
    """The other half of _claim_operation: the machine takes the next operation."""
    Machine.objects.filter(pk=machine.pk).update(operation="", operation_started=None)


@audited("machine.media", obj_kwarg="machine")
@transaction.atomic
def machine_change_media(*, machine: Machine, slot: int, image: Image | None) -> None:
    """Insert an ISO into a CD-ROM drive of an ISO machine, or eject it (image None)."""
    cdrom = machine.cdroms.filter(slot=slot).first()
    if machine.deploy_type != DeployType.ISO or cdrom is None:
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
def machine_boot_cdrom_once(*, machine: Machine) -> None:
    """Cold-start from the installer CD-ROM once (the disk stays first for later starts)."""
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


def screenshot_path(machine: Machine) -> Path:
    return Path(settings.DATA_DIR) / "screenshots" / f"{machine.uuid}.png"


def machine_screenshot_request(*, machine: Machine, max_age: float = 5.0) -> None:
    """Queue a new screenshot unless one was asked for moments ago (pages poll this)."""
    asked = machine.screenshot_requested
    if asked is None or (timezone.now() - asked).total_seconds() > max_age:
        Machine.objects.filter(pk=machine.pk).update(screenshot_requested=timezone.now())
        from machines.tasks import machine_screenshot_task

        machine_screenshot_task(machine.pk)


def machine_screenshot_run(machine_id: int) -> None:
    """Worker: take the screen through libvirt and keep it as a small PNG."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        data = driver.screenshot(str(machine.uuid))
        if data is None:
            return
        png = screenshots.to_png(data)
    except (HypervisorError, screenshots.BadImage) as e:
        log.info("screenshot of machine %s: %s", machine_id, e)
        return
    path = screenshot_path(machine)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    Machine.objects.filter(pk=machine.pk).update(screenshot_taken=timezone.now())


# --- virtual BMCs ----------------------------------------------------------------------


def _port_range() -> range:
    low, _, high = settings.PORTAL_BMC_PORT_RANGE.partition("-")
    return range(int(low), int(high or low) + 1)


def _udp_port_free(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def bmc_assign(machine: Machine) -> None:
    """A free port in the range on the BMC address, and random credentials (stored encrypted)."""
    address = settings.PORTAL_BMC_ADDRESS
    used = set(Machine.objects.filter(bmc_address=address, bmc_port__isnull=False).values_list("bmc_port", flat=True))
    for port in _port_range():
        if port in used or not _udp_port_free(address, port):
            continue
        try:
            with transaction.atomic():
                Machine.objects.filter(pk=machine.pk).update(
                    bmc_address=address, bmc_port=port, bmc_username=f"bmc-{secrets.token_hex(3)}",
                    # IPMI 2.0 passwords are at most 20 bytes: 20 random URL-safe characters.
                    bmc_password_encrypted=crypto.encrypt(secrets.token_urlsafe(15)))  # fmt: skip
        except IntegrityError:
            continue  # taken by a concurrent create
        machine.refresh_from_db()
        machine.log("bmc", f"virtual BMC on {address}:{port}")
        return
    raise ValidationError({"deploy_type": f"No free BMC port left in {settings.PORTAL_BMC_PORT_RANGE} on {address}."})


def bmc_target(machine: Machine) -> bmc.BmcTarget:
    assert machine.bmc_address is not None and machine.bmc_port is not None  # only machines with a BMC get here
    return bmc.BmcTarget(address=machine.bmc_address, port=machine.bmc_port, username=machine.bmc_username,
                         password=crypto.decrypt(machine.bmc_password_encrypted))  # fmt: skip


@audited("machine.bmc_reveal", obj_kwarg="machine")
def machine_bmc_reveal(*, machine: Machine, user) -> dict:
    """The BMC credentials, for the owner (or staff); every reveal is recorded."""
    if not machine.has_bmc:
        raise MachineError(f"{machine.name} has no virtual BMC.")
    target = bmc_target(machine)
    machine.log("bmc", f"credentials revealed to {user.get_username()}")
    return {"address": target.address, "port": target.port, "username": target.username, "password": target.password}


def _power_through_bmc(machine: Machine, action: str) -> None:
    """Power a network-boot machine exactly as an outside tool would: IPMI to its own BMC (after a current
    host guard, for a start)."""
    try:
        if action == PowerAction.START:
            provisioning.ensure_host_guards(machine, get_driver(machine.hypervisor.uri), defined=True)
        state = bmc.get_client().power(bmc_target(machine), IPMI_ACTIONS[PowerAction(action)])
        machine.log("power", f"{PowerAction(action).label} through the BMC done; power is {state}")
        Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING if state == "on" else PowerState.OFF,
                                                     power_checked=timezone.now())  # fmt: skip
    except (bmc.BmcError, HypervisorError) as e:
        machine.log("power", f"{PowerAction(action).label} through the BMC failed: {e}", level="error")
    finally:
        _release_operation(machine)


@audited("machine.boot_device", obj_kwarg="machine")
@transaction.atomic
def machine_set_boot_device(*, machine: Machine, device: str, persistent: bool) -> None:
    """PXE, disk or CD-ROM through the BMC; it takes effect at the next cold start (off, then on)."""
    if not machine.has_bmc:
        raise MachineError("Boot devices are set through the BMC of network-boot machines.")
    if device not in bmc.BOOT_DEVICES:
        raise MachineError(f"Unknown boot device {device!r}; use {', '.join(bmc.BOOT_DEVICES)}.")
    _claim_operation(machine, "boot-device", action="boot_device")
    _enqueue(tasks.machine_boot_device_task, machine.pk, device, persistent)


def machine_set_boot_device_run(machine_id: int, device: str, persistent: bool) -> None:
    machine = Machine.objects.get(pk=machine_id)
    try:
        bmc.get_client().set_boot_device(bmc_target(machine), device, persistent=persistent)
        machine.log("bmc", f"boot device {device} ({'persistent' if persistent else 'next boot only'}); "
                           "takes effect at the next cold start")  # fmt: skip
    except bmc.BmcError as e:
        machine.log("bmc", f"setting the boot device failed: {e}", level="error")
    finally:
        _release_operation(machine)


def instackenv(machines, *, user) -> dict:
    """Ironic / TripleO instackenv.json for network-boot machines with a BMC. It holds their BMC
    passwords, so each export is recorded on the machine and in the audit trail."""
    nodes = []
    for machine in machines:
        if not machine.has_bmc:
            continue
        target = bmc_target(machine)
        machine.log("bmc", f"credentials exported to instackenv by {user.get_username()}")
        audit.record("machine.bmc_export", machine, user=user)
        nodes.append({
            "name": machine.name,
            "pm_type": "ipmi",
            "pm_addr": target.address,
            "pm_port": str(target.port),
            "pm_user": target.username,
            "pm_password": target.password,
            "mac": [n.mac for n in machine.nics.all()],
            "cpu": str(machine.vcpus),
            "memory": str(machine.memory_mib),
            "disk": str(machine.disk_gib),
            "arch": machine.hypervisor.arch or "x86_64",
        })  # fmt: skip
    return {"nodes": nodes}
