"""Checking a machine request before anything is made: NICs (and who may put one where), hardware
against what the hypervisor offers, host devices, extra disks, ISOs, cloud-init, the named hypervisor."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeGuard

from django.conf import settings
from django.core.exceptions import ValidationError

from hypervisors.models import Hypervisor, Image
from hypervisors.offers import (
    DISK_BUSES,
    DISK_CACHES,
    FIRMWARES,
    MACVTAP_MODES,
    NIC_MODELS,
    SMBIOS_KEYS,
    either,
    offers_for,
)
from machines import cloudinit, macs, nic_policy, provisioning
from machines.models import Machine, MachineNic, Project
from machines.services.common import MachineError
from machines.states import DeployType


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

    def row(self, machine: Machine, index: int) -> MachineNic:
        """The machine's NIC row for it (not saved yet), with a fresh MAC where none was asked for."""
        fields = {**asdict(self), "mac": (self.mac or generate_mac()).lower()}
        return MachineNic(machine=machine, index=index, **fields)


def generate_mac() -> str:
    """A random MAC under PORTAL_MAC_PREFIX, unused in the portal."""
    prefix = settings.PORTAL_MAC_PREFIX.lower().strip(":")
    for _ in range(50):
        tail = ":".join(f"{b:02x}" for b in secrets.token_bytes(6 - len(prefix.split(":"))))
        mac = f"{prefix}:{tail}"
        if not MachineNic.objects.filter(mac=mac).exists():
            return mac
    raise MachineError("could not find a free MAC address under the configured prefix")


def _validate_nics(
    hypervisor: Hypervisor, nics: Sequence[NicInput | MachineNic], *, owner, project: Project | None = None
) -> None:
    """NIC sources must exist on the hypervisor, and the owner may use them there (machines.nic_policy:
    staff anything; others the tenant network and what was published to them or to the machine's
    project). Addresses are checked by the cloud-init builder."""
    offer = offers_for(hypervisor)
    if len(nics) > MAX_NICS:
        raise ValidationError({"nics": f"At most {MAX_NICS} NICs."})
    _validate_macs(nics)
    for i, nic in enumerate(nics, start=1):
        if nic.type not in MachineNic.Type.values:
            raise ValidationError({"nics": f"NIC {i}: type must be one of {', '.join(MachineNic.Type.values)}."})
        # The policy first: someone who may not use the host's networks is not told which it has.
        refused = nic_policy.refusal(owner, nic, index=i, hypervisor=hypervisor, project=project)
        if refused:
            raise ValidationError({"nics": refused})
        if nic.type == MachineNic.Type.NETWORK and (why := offer.refuse_network(nic.source)):
            raise ValidationError({"nics": f"NIC {i}: {why}"})
        if nic.type == MachineNic.Type.BRIDGE and not nic.source:
            raise ValidationError({"nics": f"NIC {i}: name the host bridge."})
        if nic.type == MachineNic.Type.BRIDGE and (why := offer.refuse_bridge(nic.source)):
            raise ValidationError({"nics": f"NIC {i}: {why}"})
        if nic.type == MachineNic.Type.DIRECT and (why := offer.refuse_macvtap(nic.source)):
            raise ValidationError({"nics": f"NIC {i}: {why}"})
        if nic.mode not in MACVTAP_MODES:
            raise ValidationError({"nics": f"NIC {i}: macvtap mode is {either(MACVTAP_MODES)}."})
        if nic.model not in NIC_MODELS:
            raise ValidationError({"nics": f"NIC {i}: model is {either(NIC_MODELS)}."})
        if nic.vlan is not None and not (1 <= nic.vlan <= 4094 and nic.type in ("bridge", "direct")):
            raise ValidationError(
                {"nics": f"NIC {i}: a VLAN tag is 1 to 4094, on a bridge (Open vSwitch) or macvtap NIC."}
            )


MAX_NICS = 8  # PCI slots are finite, and so is the guest's patience at boot


def _validate_macs(nics: Sequence[NicInput | MachineNic]) -> None:
    """The MAC rule (machines.macs) for every deploy type and entry point: each asked-for MAC well-formed,
    unicast, normalised in place ("52:54:00:ab:cd:ef"), and unique in the request and in the portal.
    (An existing machine's NICs are its own: not checked against themselves.)"""
    asked: dict[str, int] = {}
    for i, nic in enumerate(nics, start=1):
        if not isinstance(nic, NicInput) or not nic.mac:
            continue
        if not isinstance(nic.mac, str):
            raise ValidationError({"nics": f"NIC {i}: a MAC address is text, like 52:54:00:12:34:56."})
        try:
            nic.mac = macs.normalise_mac(nic.mac)
        except macs.InvalidMac as e:
            raise ValidationError({"nics": f"NIC {i}: MAC address {e}"}) from None
        if nic.mac in asked:
            raise ValidationError({"nics": f"NIC {i}: MAC address {nic.mac} is also NIC {asked[nic.mac]}'s."})
        asked[nic.mac] = i
    taken = MachineNic.objects.filter(mac__in=list(asked)).values_list("mac", flat=True).first()
    if taken is not None:
        raise ValidationError({"nics": f"NIC {asked[taken]}: MAC address {taken} is already used by another machine."})


def _default_nics(owner, hypervisor: Hypervisor, project: Project | None, deploy_type: str) -> list[NicInput]:
    """NICs left out (the API without `nics`): the tenant network where the hypervisor has it, else for
    those who are not staff the first network published to them, else none (refused for network boot)."""
    choice = nic_policy.default_choice(owner, [hypervisor], project)
    if choice is None:
        if deploy_type == DeployType.NETWORK:
            why = "" if owner.is_staff else " " + nic_policy.no_network_message(hypervisor)
            raise ValidationError({"nics": f"A network-boot machine needs at least one NIC to boot from.{why}"})
        return []
    return [
        NicInput(
            type=choice.kind,
            source=choice.source,
            mode=choice.modes[0] if choice.modes else "bridge",
            vlan=None if choice.untagged or not choice.vlans else choice.vlans[0],
        )
    ]


MAX_CDROMS = 4  # IDE has four places; the disk is virtio


HARDWARE_FIELDS = {
    "machine_type",
    "cpu_mode",
    "cpu_model",
    "cpu_topology",
    "smbios",
    "watchdog",
    "rng",
    "disk_bus",
    "disk_cache",
    "extra_disks",
    "qemu_args",
    "firmware",
    "secure_boot",
    "hostdevs",
    "hostdev_match",
}


def _validate_hardware_input(owner, deploy_type: str, vcpus: int, hardware: dict, project=None) -> dict:
    """Checks that need no hypervisor: shapes, limits, and who may pass raw QEMU arguments. A machine in a
    project is operated by its members, so it gets only what they may have, whoever creates it."""
    unknown = set(hardware) - HARDWARE_FIELDS
    if unknown:
        raise TypeError(f"unknown machine options: {', '.join(sorted(unknown))}")
    hw = {k: v for k, v in hardware.items() if v not in (None, "")}
    _check_hardware_shapes(hw)
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
    if hw.get("disk_bus", "virtio") not in DISK_BUSES:
        raise ValidationError({"disk_bus": f"Choose {either(DISK_BUSES)}."})
    if deploy_type == DeployType.ISO and hw.get("disk_bus", "virtio") != "virtio":
        raise ValidationError({"disk_bus": "ISO machines keep the IDE or SATA places for their CD-ROMs; use virtio."})
    if hw.get("disk_cache", "") not in ("", *DISK_CACHES):
        raise ValidationError({"disk_cache": f"Choose {either(DISK_CACHES)}."})
    if hw.get("firmware", "bios") not in FIRMWARES:
        raise ValidationError({"firmware": f"Choose {either(FIRMWARES)}."})
    if hw.get("secure_boot") and hw.get("firmware") != "uefi":
        raise ValidationError({"secure_boot": "Secure Boot needs UEFI firmware."})
    if hw.get("secure_boot") and not str(hw.get("machine_type", "")).startswith(("q35", "pc-q35")):
        raise ValidationError({"secure_boot": "Secure Boot needs machine type q35 (it keeps its variables in SMM)."})
    if (
        (hw.get("hostdevs") or hw.get("hostdev_match"))
        and project is not None
        and settings.PORTAL_HOST_DEVICES_FOR != "everyone"
    ):
        raise ValidationError(
            {
                "hostdevs": f"A machine in project {project.name} is operated by its members: host devices "
                "are for machines that only staff operate (PORTAL_HOST_DEVICES_FOR)."
            }
        )
    if (hw.get("hostdevs") or hw.get("hostdev_match")) and not may_take_host_devices(owner):
        raise ValidationError(
            {
                "hostdevs": "Only staff may pass host devices through: a device taken from the host can "
                "cut it off its network or disks. Ask an administrator."
            }
        )
    args = hw.get("qemu_args") or []
    if args and not owner.is_staff:
        raise ValidationError({"qemu_args": "Only staff may pass extra QEMU arguments: they bypass every check."})
    if args and project is not None:
        raise ValidationError(
            {
                "qemu_args": f"A machine in project {project.name} is operated by its members: extra QEMU "
                "arguments bypass every check, so they are for machines only staff operate."
            }
        )
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise ValidationError({"qemu_args": 'Give a list of arguments, e.g. ["-device", "pvpanic"].'})
    return hw


# The JSON columns' shapes (the API takes any JSON for them): checked before anything walks them.
_HARDWARE_SHAPES: dict[str, tuple[type, str]] = {
    "cpu_topology": (list, "a list [sockets, cores, threads]"),
    "smbios": (dict, "an object of key: text"),
    "extra_disks": (list, "a list of sizes in GiB or {size_gib, image, boot_order}"),
    "qemu_args": (list, 'a list of arguments, e.g. ["-device", "pvpanic"]'),
    "hostdevs": (list, "a list of device names"),
    "hostdev_match": (str, "a text pattern"),
}


def _check_hardware_shapes(hw: dict) -> None:
    for name, (kind, what) in _HARDWARE_SHAPES.items():
        if name in hw and not isinstance(hw[name], kind):
            raise ValidationError({name: f"Give {what}."})
    if not all(isinstance(d, str) and d for d in hw.get("hostdevs") or []):
        raise ValidationError({"hostdevs": "Give a list of device names."})


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
    offer = offers_for(hypervisor)
    if pattern:
        found, why = offer.match_device(pattern, taken | set(names))
        if why:
            raise ValidationError({"hostdev_match": why})
        names.append(found)
    for name in names:
        if why := offer.refuse_device(name, taken):
            raise ValidationError({"hostdevs": why})
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
        if not _whole(size) or not 1 <= size <= 16384:
            raise ValidationError({"extra_disks": f"Disk {n}: a size of 1 to 16384 GiB."})
        if image_id is not None:
            # An id past the database's integer range is no image (and would not reach the query).
            image = (
                Image.objects.filter(pk=image_id, kind="disk", status="ready").first()
                if _whole(image_id) and 0 < image_id < 2**63
                else None
            )
            if image is None:
                raise ValidationError({"extra_disks": f"Disk {n}: {image_id!r} is not a ready disk image."})
            if image.virtual_size_bytes > size << 30:
                raise ValidationError(
                    {
                        "extra_disks": f"Disk {n}: image {image.name} needs at least "
                        f"{-(-image.virtual_size_bytes // (1 << 30))} GiB."
                    }
                )
        if order is not None:
            if deploy_type == DeployType.NETWORK:
                raise ValidationError(
                    {"extra_disks": "Network-boot machines boot from the network, then their first disk."}
                )
            if not _whole(order) or not 1 <= order <= 64 or order in orders:
                raise ValidationError({"extra_disks": f"Disk {n}: boot orders are distinct positive numbers."})
            orders.append(order)
        disks.append({"size_gib": size, "image": image_id, "boot_order": order})
    return disks


def _whole(value: object) -> TypeGuard[int]:
    """A JSON whole number (true and false are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_hardware_against(hypervisor: Hypervisor, hw: dict, image: Image | None = None) -> None:
    """What the hypervisor really offers: architectures, firmware, machine types, CPU modes and models."""
    offer = offers_for(hypervisor)
    arch = image.arch if image is not None and image.arch else hypervisor.arch
    if image is not None and (why := offer.refuse_guest_arch(arch)):
        raise ValidationError({"image": why})
    if arch != hypervisor.arch:
        return  # the host's capabilities describe its own architecture; emulated ones take their defaults
    if why := offer.refuse_firmware(hw.get("firmware", "")):
        raise ValidationError({"firmware": why})
    machine_type = hw.get("machine_type")
    if machine_type and (why := offer.refuse_machine_type(machine_type)):
        raise ValidationError({"machine_type": why})
    mode = hw.get("cpu_mode")
    if mode and (why := offer.refuse_cpu_mode(mode)):
        raise ValidationError({"cpu_mode": why})
    if mode == "custom":
        model = hw.get("cpu_model", "")
        if not model:
            raise ValidationError({"cpu_model": "Name the CPU model for CPU mode custom."})
        if why := offer.refuse_cpu_model(model):
            raise ValidationError({"cpu_model": why})
    elif hw.get("cpu_model"):
        raise ValidationError({"cpu_model": "A CPU model goes with CPU mode custom."})


def _validate_iso_request(extra_isos: list[Image], *cloud_init_fields: str) -> None:
    if any(f.strip() for f in cloud_init_fields):
        raise ValidationError(
            {
                "deploy_type": "SSH keys, packages, a script and user-data apply to image machines; "
                "an ISO machine is installed through its console."
            }
        )
    if len(extra_isos) > MAX_CDROMS - 1:
        raise ValidationError({"extra_isos": f"At most {MAX_CDROMS - 1} extra ISOs."})
    for iso in extra_isos:
        if iso.kind != "iso" or not iso.is_ready:
            raise ValidationError({"extra_isos": f"{iso.name} is not a ready ISO."})


def _validate_network_request(image, nics, extra_isos, *cloud_init_fields: str) -> None:
    if image is not None or extra_isos:
        raise ValidationError({"image": "A network-boot machine has no image: it boots from the network."})
    if any(f.strip() for f in cloud_init_fields):
        raise ValidationError(
            {
                "deploy_type": "SSH keys, packages, a script and user-data apply to image machines; "
                "a network-boot machine gets its OS from the network."
            }
        )
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
    if why := offers_for(hypervisor).refuse_pool(pool):
        raise ValidationError({"pool": why})


def _refuse_against_policy(machine: Machine, doing: str) -> None:
    """A machine whose NICs the network policy refuses (made before it, or left on a network since
    unpublished) is not started or rebuilt until staff publish its network or change its NIC."""
    for index, nic in enumerate(machine.nics.all(), start=1):
        reason = nic_policy.refusal(
            machine.owner, nic, index=index, hypervisor=machine.hypervisor, project=machine.project
        )
        if reason:
            raise MachineError(f"{machine.name} cannot be {doing}: {reason}")
