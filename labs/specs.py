"""A lab's shape, written in AnsiStack's inventory shape, read and checked into machine requests.

A template is an Ansible YAML inventory as AnsiStack writes `inventory-vms.yaml`: groups with `vars` and
`children` (optionally under `all:`), variables inherited from parent groups and replaced, never merged, by a
child's (Ansible's default). Each group without children is one group of lab machines, made `vm_count` times:

    all_vms:
      children:
        bootable_vms:                  # under bootable_vms: network boot, with a virtual BMC each
          vars:
            vm_networks:
              provisioning: {interface: eth0, dhcp: false, address: 192.168.24.10, netmask: 24}
          children:
            controllers:
              vars: {vm_count: 3, vm_cores: 2, vm_ram: 4096, vm_disk_size: 40}
        provisioned_vms:               # elsewhere: an image machine (vm_image_name) or ISO one (vm_bootable_iso)
          children:
            workers:
              vars: {vm_count: 2, vm_image_name: debian-12}

Names come from a pattern (`{lab}`, `{group}`, `{n}`; `{n:02d}` pads), static addresses from each network's
`address` plus the group's offset plus n. Nothing here touches the database but the image lookups in requests().
Bad input raises SpecError with a message for the person who wrote it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import ValidationError

from machines.models import hostname_validator
from machines.services import NicInput
from machines.states import DeployType
from portal.refusals import Refusal

MAX_SPEC_BYTES = 64 * 1024
MAX_DEPTH = 8  # group nesting
MAX_GROUPS = 50
MAX_COUNT = 50  # machines in one group
MAX_MACHINES = 100  # in one lab
DEFAULT_PATTERN = "{lab}-{group}-{n}"
NETWORK_BOOT_GROUP = "bootable_vms"  # AnsiStack's group of network-boot machines

_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # what Ansible takes without a warning
_PLACEHOLDER = re.compile(r"\{(lab|group|n)(?::(0[1-9])d)?\}")
_NET_KEYS = {"interface", "dhcp", "address", "netmask", "gateway", "router", "dns", "manager"}

# The machine variables a template may set, and what the portal does with those it reads but does not use.
KNOWN_VARS = {
    "vm_count",
    "vm_name_pattern",
    "vm_cores",
    "vm_ram",
    "vm_disk_size",
    "vm_image_name",
    "vm_bootable_iso",
    "vm_networks",
    "vm_address_offsets",
    "vm_protected",
}
NOTED_VARS = {
    "vm_vbmc_username": "the portal gives each network-boot machine its own BMC user and password",
    "vm_vbmc_password": "the portal gives each network-boot machine its own BMC user and password",
    "vm_vbmc_port": "the portal gives each network-boot machine its own BMC port",
    "vm_virt_host": "the portal places the lab across hypervisors (spread or pack)",
}


class SpecError(Refusal):
    """The template cannot be read or checked; the message says where and why."""


@dataclass(frozen=True)
class NetSpec:
    """One NIC of a group's machines: the libvirt network (vm_networks' key) and how its address is set."""

    network: str
    interface: str = ""
    dhcp: bool = True
    base: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None  # the address of n = 0, offset 0
    gateway: str = ""
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupSpec:
    name: str
    deploy_type: str
    count: int
    pattern: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    image_name: str = ""
    nets: tuple[NetSpec, ...] = ()
    offsets: Mapping[str, int] = field(default_factory=dict)
    protected: bool = False


@dataclass(frozen=True)
class Spec:
    groups: tuple[GroupSpec, ...]
    notes: tuple[str, ...] = ()  # what the portal read and does not use, said once each

    def group(self, name: str) -> GroupSpec | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass
class MachineRequest:
    """One machine of a lab as machine_create will be asked for it."""

    group: str
    name: str
    deploy_type: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    image_name: str = ""
    nics: list[NicInput] | None = None  # None: the portal's default NIC
    protected: bool = False


def parse(text: str) -> Spec:
    """Read a template's YAML (safe_load) and check it: SpecError with the reason otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("The template is empty: give its groups in AnsiStack's inventory shape.")
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"The template is over {MAX_SPEC_BYTES // 1024} KiB.")
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(f"The template is not valid YAML{where}: {e.problem or e.context}.") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise SpecError(f"The template is not valid YAML: {e}.") from None
    if not isinstance(doc, dict) or not doc:
        raise SpecError("The template is a mapping of groups (all:, all_vms:, bootable_vms:, ...).")
    leaves: list[tuple[str, list[str], dict]] = []
    notes: dict[str, None] = {}
    for name, body in doc.items():
        _walk(name, body, [], {}, leaves, notes, depth=0)
    if not leaves:
        raise SpecError("The template has no groups of machines.")
    groups = tuple(_group(name, path, hostvars, notes) for name, path, hostvars in leaves)
    if sum(g.count for g in groups) > MAX_MACHINES:
        raise SpecError(f"A lab has at most {MAX_MACHINES} machines.")
    return Spec(groups=groups, notes=tuple(notes))


def _walk(name, body, path: list[str], inherited: dict, leaves: list, notes: dict, *, depth: int) -> None:
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise SpecError(f"Group name {str(name)[:70]!r}: letters, digits and underscores, up to 63.")
    if depth >= MAX_DEPTH:
        raise SpecError(f"Group {name}: groups nest at most {MAX_DEPTH} deep.")
    if name in path or any(name == leaf[0] for leaf in leaves):
        raise SpecError(f"Group {name} appears twice.")
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise SpecError(f"Group {name}: a group is a mapping with vars and children.")
    unknown = set(body) - {"vars", "children", "hosts"}
    if unknown:
        raise SpecError(f"Group {name}: unknown key {sorted(map(str, unknown))[0]} (a group has vars and children).")
    if body.get("hosts"):
        raise SpecError(
            f"Group {name}: a template names no hosts; give the group a vm_count, and the names come from "
            "the name pattern."
        )
    own = body.get("vars") or {}
    if not isinstance(own, dict) or not all(isinstance(k, str) for k in own):
        raise SpecError(f"Group {name}: vars is a mapping of variable names to values.")
    hostvars = {**inherited, **own}  # a child's variable replaces its parent's, dicts too (Ansible's default)
    children = body.get("children") or {}
    if not isinstance(children, dict):
        raise SpecError(f"Group {name}: children is a mapping of groups.")
    if not children:
        if len(leaves) >= MAX_GROUPS:
            raise SpecError(f"A template has at most {MAX_GROUPS} groups of machines.")
        leaves.append((name, [*path, name], hostvars))
        return
    for child, child_body in children.items():
        _walk(child, child_body, [*path, name], hostvars, leaves, notes, depth=depth + 1)


def _int(group: str, var: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"Group {group}: {var} is a whole number from {low} to {high}.")
    return value


def _text(group: str, var: str, value: Any, limit: int = 100) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise SpecError(f"Group {group}: {var} is a name of up to {limit} characters.")
    if "{{" in value or "{%" in value:
        raise SpecError(f"Group {group}: {var} is a Jinja template; a lab template's values are plain.")
    return value.strip()


def _group(name: str, path: list[str], hostvars: dict, notes: dict) -> GroupSpec:
    for var in sorted(hostvars):
        if var in NOTED_VARS:
            notes[f"{var}: {NOTED_VARS[var]}."] = None
        elif var.startswith("vm_") and var not in KNOWN_VARS:
            raise SpecError(f"Group {name}: {var} is not supported in a lab template.")
        elif not var.startswith("vm_"):
            notes[f"{var}: not used by the portal (a variable for your playbooks)."] = None
    image = hostvars.get("vm_image_name")
    iso = hostvars.get("vm_bootable_iso")
    if NETWORK_BOOT_GROUP in path:
        deploy_type, image_name = DeployType.NETWORK, ""
    elif iso is not None:
        deploy_type, image_name = DeployType.ISO, _text(name, "vm_bootable_iso", iso)
    elif image is not None:
        deploy_type, image_name = DeployType.IMAGE, _text(name, "vm_image_name", image)
    else:
        raise SpecError(
            f"Group {name}: give vm_image_name (image machines) or vm_bootable_iso (ISO machines), or put the "
            f"group under {NETWORK_BOOT_GROUP} (network boot)."
        )
    pattern = hostvars.get("vm_name_pattern", DEFAULT_PATTERN)
    check_pattern(pattern, where=f"Group {name}: vm_name_pattern")
    offsets = check_offsets(hostvars.get("vm_address_offsets") or {}, where=f"Group {name}: vm_address_offsets")
    protected = hostvars.get("vm_protected", False)
    if not isinstance(protected, bool):
        raise SpecError(f"Group {name}: vm_protected is true or false.")
    nets = _nets(name, hostvars.get("vm_networks"))
    unknown = set(offsets) - {n.network for n in nets}
    if unknown:
        raise SpecError(f"Group {name}: vm_address_offsets names {sorted(unknown)[0]}, which is not in vm_networks.")
    if deploy_type == DeployType.NETWORK and hostvars.get("vm_networks") is not None and not nets:
        raise SpecError(f"Group {name}: a network-boot machine needs a network to boot from.")
    return GroupSpec(
        name=name,
        deploy_type=deploy_type,
        count=_int(name, "vm_count", hostvars.get("vm_count", 1), 0, MAX_COUNT),
        pattern=pattern,
        vcpus=_int(name, "vm_cores", hostvars.get("vm_cores", 1), 1, 64),
        memory_mib=_int(name, "vm_ram", hostvars.get("vm_ram", 1024), 128, 1 << 20),
        disk_gib=_int(name, "vm_disk_size", hostvars.get("vm_disk_size", 10), 1, 16384),
        image_name=image_name,
        nets=nets,
        offsets=offsets,
        protected=protected,
    )


def _nets(group: str, value: Any) -> tuple[NetSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise SpecError(f"Group {group}: vm_networks maps libvirt network names to their settings.")
    if len(value) > 8:
        raise SpecError(f"Group {group}: at most 8 networks.")
    nets = []
    for network, conf in value.items():
        where = f"Group {group}: network {str(network)[:70]}"
        if not isinstance(network, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", network):
            raise SpecError(f"{where}: a libvirt network name.")
        conf = {} if conf is None else conf
        if not isinstance(conf, dict):
            raise SpecError(f"{where}: its settings are a mapping (interface, dhcp, address, netmask, gateway).")
        if unknown := set(conf) - _NET_KEYS:
            raise SpecError(f"{where}: unknown setting {sorted(map(str, unknown))[0]}.")
        dhcp = conf.get("dhcp", "address" not in conf)
        if not isinstance(dhcp, bool):
            raise SpecError(f"{where}: dhcp is true or false.")
        base = None
        if conf.get("address") is not None:
            netmask = conf.get("netmask")
            text = str(conf["address"]) + (f"/{netmask}" if netmask is not None else "")
            try:
                base = ipaddress.ip_interface(text)
            except ValueError:
                raise SpecError(f"{where}: address {text[:60]!r} is not an address with its netmask.") from None
            if "/" not in text:
                raise SpecError(f"{where}: give the address's netmask (netmask: 24, or address: 10.0.0.10/24).")
        gateway = str(conf.get("gateway") or conf.get("router") or "")
        dns = conf.get("dns") or []
        if isinstance(dns, str):
            dns = [dns]
        try:
            if gateway:
                ipaddress.ip_address(gateway)
            for server in dns:
                ipaddress.ip_address(str(server))
        except ValueError as e:
            raise SpecError(f"{where}: {e}.") from None
        interface = conf.get("interface", "")
        if not isinstance(interface, str) or len(interface) > 15:
            raise SpecError(f"{where}: interface is a name such as eth0.")
        nets.append(NetSpec(network, interface, dhcp, base, gateway, tuple(str(s) for s in dns)))
    return tuple(nets)


def check_pattern(pattern: Any, *, where: str = "The name pattern") -> str:
    """A name pattern: text with {lab}, {group} and {n} (or {n:02d}) and no other braces."""
    if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > 100:
        raise SpecError(f"{where} is text of up to 100 characters, such as ctrl-{{n}}.")
    rest = _PLACEHOLDER.sub("", pattern)
    if "{" in rest or "}" in rest:
        raise SpecError(f"{where}: the only placeholders are {{lab}}, {{group}}, {{n}} and {{n:02d}}.")
    if "{n" not in pattern:
        raise SpecError(f"{where} needs {{n}}, the machine's number, so the names differ.")
    return pattern.strip()


def check_offsets(value: Any, *, where: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise SpecError(f"{where} maps network names to whole numbers.")
    out = {}
    for network, offset in value.items():
        if not isinstance(network, str) or isinstance(offset, bool) or not isinstance(offset, int):
            raise SpecError(f"{where} maps network names to whole numbers.")
        if not 0 <= offset <= 1 << 16:
            raise SpecError(f"{where}: {network}'s offset is from 0 to 65536.")
        out[network] = offset
    return out


def render_name(pattern: str, *, lab: str, group: str, n: int) -> str:
    values = {"lab": lab, "group": group.lower().replace("_", "-"), "n": str(n)}

    def one(m: re.Match) -> str:
        return str(n).zfill(int(m.group(2))) if m.group(1) == "n" and m.group(2) else values[m.group(1)]

    return _PLACEHOLDER.sub(one, pattern)


def _nic(net: NetSpec, *, n: int, offset: int, group: str, name: str) -> NicInput:
    if net.base is None:
        return NicInput(
            type="network",
            source=net.network,
            dhcp4=net.dhcp,
            gateway4="",
            nameservers=list(net.dns),
        )
    address = net.base.ip + offset + n
    network = net.base.network
    if address not in network or address in (network.network_address, getattr(network, "broadcast_address", None)):
        raise SpecError(
            f"{name}: {net.base.ip} + offset {offset} + {n} = {address} is outside {network} (group {group}, "
            f"network {net.network})."
        )
    v6 = address.version == 6
    return NicInput(
        type="network",
        source=net.network,
        dhcp4=False,
        addresses=[f"{address}/{network.prefixlen}"],
        gateway4="" if v6 else net.gateway,
        gateway6=net.gateway if v6 else "",
        nameservers=list(net.dns),
    )


def requests(
    spec: Spec,
    *,
    lab: str,
    counts: Mapping[str, int] | None = None,
    patterns: Mapping[str, str] | None = None,
    offsets: Mapping[str, Mapping[str, int]] | None = None,
    first: int = 0,
) -> list[MachineRequest]:
    """The lab's machines, group by group: counts, name patterns and address offsets (per group, per network)
    given here replace the template's. Names and addresses are checked; SpecError says which one is wrong."""
    counts, patterns, offsets = counts or {}, patterns or {}, offsets or {}
    for given in (counts, patterns, offsets):
        if unknown := set(given) - {g.name for g in spec.groups}:
            raise SpecError(f"The template has no group {sorted(unknown)[0]}.")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= 9999:
        raise SpecError("The first number is a whole number from 0 to 9999.")
    out: list[MachineRequest] = []
    seen: dict[str, str] = {}
    for g in spec.groups:
        count = _int(g.name, "the count", counts.get(g.name, g.count), 0, MAX_COUNT)
        pattern = check_pattern(patterns.get(g.name) or g.pattern, where=f"Group {g.name}: the name pattern")
        group_offsets = {**g.offsets, **check_offsets(offsets.get(g.name, {}), where=f"Group {g.name}: offsets")}
        if unknown := set(group_offsets) - {n.network for n in g.nets}:
            raise SpecError(f"Group {g.name}: offsets name {sorted(unknown)[0]}, which is not in its vm_networks.")
        if unset := set(group_offsets) & {n.network for n in g.nets if n.base is None}:
            raise SpecError(f"Group {g.name}: network {sorted(unset)[0]} has no address to count from (no offset).")
        for n in range(first, first + count):
            name = render_name(pattern, lab=lab, group=g.name, n=n)
            try:
                hostname_validator(name)
            except ValidationError:
                raise SpecError(
                    f"Group {g.name}: {name[:80]!r} is not a host name (lower-case letters, digits and hyphens, "
                    "up to 63)."
                ) from None
            if name in seen:
                raise SpecError(
                    f"{name} would be made twice (groups {seen[name]} and {g.name}): put {{group}} in the pattern "
                    "or give each group its own."
                )
            seen[name] = g.name
            nics = [_nic(net, n=n, offset=group_offsets.get(net.network, 0), group=g.name, name=name) for net in g.nets]
            out.append(
                MachineRequest(
                    group=g.name,
                    name=name,
                    deploy_type=g.deploy_type,
                    vcpus=g.vcpus,
                    memory_mib=g.memory_mib,
                    disk_gib=g.disk_gib,
                    image_name=g.image_name,
                    nics=nics or None,
                    protected=g.protected,
                )
            )
    if not out:
        raise SpecError("The lab would have no machines: give a group a count of at least 1.")
    if len(out) > MAX_MACHINES:
        raise SpecError(f"A lab has at most {MAX_MACHINES} machines.")
    return out
