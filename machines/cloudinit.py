"""cloud-init NoCloud seed for a machine: plain data in, YAML documents and an ISO out.

Standard library, PyYAML and pycdlib only. Every document is dumped from data with
PyYAML's safe dumper, never templated, and is checked to load back to that data.

User-supplied user-data (a ``#cloud-config`` document, at most 64 KiB) is merged
with what the portal generates, key by key:

1. ``hostname`` and ``fqdn`` belong to the portal: user-data that sets them is refused.
2. ``packages``, ``runcmd``, ``write_files`` and ``bootcmd`` are lists and are
   concatenated, generated items first; duplicate ``packages`` are dropped.
3. ``users``: the generated default user comes first and the user's entries follow.
   The string ``"default"`` (and a bare string naming the default user) is dropped.
   A mapping with the default user's name is merged into the generated entry: its
   keys override, except ``ssh_authorized_keys``, which are appended (no duplicates).
4. Top-level ``ssh_authorized_keys`` are appended to the default user's keys (no
   duplicates): the portal replaces the distro's default user, which is where
   cloud-init would otherwise put them.
5. Any other key: the user's value wins over the generated one, e.g. ``timezone``,
   ``growpart`` or ``ssh_pwauth`` (which must then be a boolean).

``package_update: true`` is added when the merged ``packages`` is not empty, unless
user-data sets ``package_update`` itself. The portal never generates a password.
"""

from __future__ import annotations

import io
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import pycdlib
import yaml

from machines import macs
from portal import sshkeys

USER_DATA_MAX_BYTES = 64 * 1024
SEED_ISO_MAX_BYTES = 1024 * 1024
SCRIPT_PATH = "/var/lib/cloud/scripts/portal-first-boot"

_LIST_KEYS = ("packages", "runcmd", "write_files", "bootcmd")
_OWNED_KEYS = ("hostname", "fqdn")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A leading "-" would reach apt/dnf as an option, so a name starts with a letter or digit.
_PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_:~=-]{0,199}")


@dataclass(frozen=True)
class NicConfig:
    mac: str  # "52:54:00:12:34:56", lower-case
    dhcp4: bool = True
    dhcp6: bool = False
    addresses: tuple[str, ...] = ()  # CIDR interfaces, IPv4 and/or IPv6
    gateway4: str = ""
    gateway6: str = ""
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeedSpec:
    instance_id: str  # fresh per (re)build, so cloud-init runs again
    hostname: str
    fqdn: str = ""
    default_user: str = "cloud"
    ssh_authorized_keys: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    script: str = ""  # first-boot script, run once
    user_data: str = ""  # the user's own #cloud-config, merged as the module docstring says
    nics: tuple[NicConfig, ...] = ()
    grow_root: bool = True


class CloudInitError(ValueError):
    """Bad input; the message is shown to the user as is."""


# --- user input ---------------------------------------------------------------------------------


# How deep user-data may nest (a mapping or a list inside another). Real cloud-config goes 5 or 6 levels deep;
# PyYAML composes, and the merge and the dump walk, by recursion, so `a: [[[[...]]]]` thousands deep would
# exhaust Python's stack long before the 64 KiB limit.
USER_DATA_MAX_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases ("billion laughs" user-data cannot blow up later passes) and nesting
    deeper than USER_DATA_MAX_DEPTH (checked as each node opens, before the recursion goes any deeper)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise CloudInitError("user-data uses a YAML alias (*name); write the value out in full.")
        self._depth += 1
        try:
            if self._depth > USER_DATA_MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise CloudInitError(
                    f"user-data nests deeper than {USER_DATA_MAX_DEPTH} levels (line {mark.line + 1}); "
                    "cloud-config never needs that."
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def validate_user_data(text: str) -> dict:
    """Parse the user's #cloud-config; {} when empty. CloudInitError with a readable message otherwise."""
    if not text.strip():
        return {}
    size = len(text.encode("utf-8"))
    if size > USER_DATA_MAX_BYTES:
        raise CloudInitError(f"user-data is {size:,} bytes; the limit is 64 KiB ({USER_DATA_MAX_BYTES:,} bytes).")
    if text.splitlines()[0].rstrip() != "#cloud-config":
        raise CloudInitError("user-data must be a cloud-config document: its first line must be #cloud-config.")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        detail = e.problem or e.context or "syntax error"
        if detail.startswith("but") and e.context:  # "expected a single document ... but found another"
            detail = f"{e.context} {detail}"
        raise CloudInitError(f"user-data is not valid YAML{where}: {detail}.") from None
    except yaml.YAMLError as e:
        raise CloudInitError(f"user-data is not valid YAML: {e}") from None
    except CloudInitError:
        raise
    except (ValueError, OverflowError) as e:
        # A scalar YAML resolves but Python cannot build: a date like 2001-13-01, an integer over Python's
        # 4,300-digit limit.
        why = "an integer of more than 4,300 digits" if "digits" in str(e) else str(e)[:200]
        raise CloudInitError(f"user-data has a value that cannot be read: {why}.") from None
    except (RecursionError, MemoryError):  # the depth check's backstop
        raise CloudInitError("user-data is too deeply nested or too large to read.") from None
    if data is None:  # only the header and comments
        return {}
    if not isinstance(data, dict):
        raise CloudInitError(f"user-data must be a mapping of cloud-config keys, not a {_yaml_kind(data)}.")
    _check_user_keys(data)
    return data


def _yaml_kind(value: Any) -> str:
    names: dict[type, str] = {list: "list", dict: "mapping", str: "string"}
    return names.get(type(value), type(value).__name__)


def _check_user_keys(data: dict) -> None:
    for key in _OWNED_KEYS:
        if key in data:
            raise CloudInitError(f"user-data may not set {key}: the portal sets it from the machine's name.")
    for key in (*_LIST_KEYS, "users", "ssh_authorized_keys"):
        if key in data and not isinstance(data[key], list):
            raise CloudInitError(f"user-data: {key} must be a list, not a {_yaml_kind(data[key])}.")
    if "ssh_pwauth" in data and not isinstance(data["ssh_pwauth"], bool):
        raise CloudInitError("user-data: ssh_pwauth must be true or false.")
    for key in data.get("ssh_authorized_keys", []):
        _check_key_item(key)
    for n, entry in enumerate(data.get("users", []), 1):
        if isinstance(entry, str):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise CloudInitError(f"user-data: users entry {n} must be a mapping with a name, or a user name.")
        if not isinstance(entry.get("ssh_authorized_keys", []), list):
            raise CloudInitError(f"user-data: ssh_authorized_keys of user {entry['name']} must be a list.")
        for key in entry.get("ssh_authorized_keys", []):
            _check_key_item(key)


def _check_key_item(key: Any) -> None:
    if not isinstance(key, str):
        raise CloudInitError(f"user-data: an SSH key must be a string, not a {_yaml_kind(key)}.")
    validate_ssh_key(key)


def validate_ssh_key(line: str) -> str:
    """One OpenSSH public key line ("type base64 [comment]"); returns it normalised (portal.sshkeys)."""
    try:
        return sshkeys.validate_ssh_key(line)
    except sshkeys.InvalidSSHKey as e:
        raise CloudInitError(str(e)) from None


def validate_hostname(hostname: str) -> str:
    """An RFC 1123 label: 1-63 letters, digits and hyphens, no hyphen at either end."""
    if not _LABEL_RE.fullmatch(hostname):
        raise CloudInitError(
            f"Hostname {hostname[:70]!r} is not valid: use 1-63 letters, digits and hyphens, "
            "not starting or ending with a hyphen."
        )
    return hostname


def validate_fqdn(fqdn: str) -> str:
    """Dot-separated RFC 1123 labels, at most 253 characters."""
    if len(fqdn) > 253 or not all(_LABEL_RE.fullmatch(label) for label in fqdn.split(".")):
        raise CloudInitError(
            f"{fqdn[:70]!r} is not a valid domain name: use labels of 1-63 letters, digits and hyphens "
            "separated by dots, at most 253 characters in all."
        )
    return fqdn


def _check_spec(spec: SeedSpec) -> None:
    validate_hostname(spec.hostname)
    if spec.fqdn:
        validate_fqdn(spec.fqdn)
    if not _USER_RE.fullmatch(spec.default_user) or spec.default_user == "root":
        raise CloudInitError(
            f"Login user {spec.default_user[:40]!r} is not valid: use a lower-case Linux user name other than root."
        )
    for name in spec.packages:
        if not _PACKAGE_RE.fullmatch(name):
            raise CloudInitError(f"Package name {name[:70]!r} is not valid.")
    if len(spec.script) >= SEED_ISO_MAX_BYTES:  # fail before spending seconds dumping what cannot fit
        raise CloudInitError("The first-boot script is over 1 MiB, more than the cloud-init seed can hold.")


# --- user-data ----------------------------------------------------------------------------------


def build_user_data(spec: SeedSpec) -> str:
    """The final user-data: the generated cloud-config merged with the user's (module docstring)."""
    _check_spec(spec)
    merged = merge_user_data(_generated(spec), validate_user_data(spec.user_data), spec.default_user)
    return "#cloud-config\n" + _dump(merged)


def _generated(spec: SeedSpec) -> dict:
    data: dict[str, Any] = {"hostname": spec.hostname}
    if spec.fqdn:
        data["fqdn"] = spec.fqdn
    data["preserve_hostname"] = False
    data["users"] = [
        {
            "name": spec.default_user,
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "ssh_authorized_keys": _unique(validate_ssh_key(k) for k in spec.ssh_authorized_keys),
        }
    ]
    data["ssh_pwauth"] = False
    data["disable_root"] = True
    if spec.packages:
        data["package_update"] = True
        data["packages"] = _unique(spec.packages)
    if spec.grow_root:
        data["growpart"] = {"mode": "auto", "devices": ["/"]}
        data["resize_rootfs"] = True
    if spec.script:
        # A file plus an exec-style runcmd keeps the script byte for byte; runcmd runs once per instance.
        script = spec.script if spec.script.startswith("#!") else "#!/bin/sh\n" + spec.script
        data["write_files"] = [{"path": SCRIPT_PATH, "permissions": "0755", "content": script}]
        data["runcmd"] = [[SCRIPT_PATH]]
    return data


def merge_user_data(generated: dict, user: dict, default_user: str) -> dict:
    """Merge validated user-data into the generated dict by the rules in the module docstring."""
    merged = dict(generated)
    default = merged["users"][0]
    for key, value in user.items():
        if key in _LIST_KEYS:
            items = [*merged.get(key, []), *value]
            merged[key] = _unique(items) if key == "packages" else items
        elif key == "users":
            merged["users"] = [default, *_merge_users(default, value, default_user)]
        elif key == "ssh_authorized_keys":
            default["ssh_authorized_keys"] = _merge_keys(default["ssh_authorized_keys"], value)
        else:
            merged[key] = value
    if merged.get("packages"):
        merged.setdefault("package_update", True)
    return merged


def _merge_users(default: dict, entries: list, default_user: str) -> list:
    """Fold the default user's entries into `default`; return the other entries."""
    others = []
    for entry in entries:
        if entry in ("default", default_user):
            continue
        if isinstance(entry, dict) and entry["name"] == default_user:
            for k, v in entry.items():
                if k == "ssh_authorized_keys":
                    default[k] = _merge_keys(default[k], v)
                elif k != "name":
                    default[k] = v
        else:
            others.append(entry)
    return others


def _merge_keys(keys: list[str], more: list[str]) -> list[str]:
    return _unique([*keys, *(validate_ssh_key(k) for k in more)])


def _unique(items: Any) -> list:
    seen: set[str] = set()
    out = []
    for item in items:
        marker = repr(item)  # package entries may be [name, version] lists, which do not hash
        if marker not in seen:
            seen.add(marker)
            out.append(item)
    return out


class _ReadableDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as literal blocks, so a script reads as a script."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted style by itself when a block cannot hold the string exactly.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ReadableDumper.add_representer(str, _represent_str)


def _dump(data: dict) -> str:
    """YAML for `data`, guaranteed to load back equal to it."""
    # A wide width keeps SSH keys on one line.
    options: dict[str, Any] = {"sort_keys": False, "default_flow_style": False, "width": 1 << 16}
    text = yaml.dump(data, Dumper=_ReadableDumper, allow_unicode=True, **options)
    try:
        text.encode("utf-8")
        if yaml.safe_load(text) == data:
            return text
    except (yaml.YAMLError, UnicodeEncodeError):
        pass
    # Some characters (NEL, U+2028, lone surrogates) only survive as escapes in ASCII quoted style.
    return yaml.safe_dump(data, allow_unicode=False, **options)


# --- meta-data and network-config ---------------------------------------------------------------


def build_meta_data(spec: SeedSpec) -> str:
    """instance-id (cloud-init re-runs when it changes) and local-hostname."""
    if not _INSTANCE_ID_RE.fullmatch(spec.instance_id):
        raise CloudInitError(f"Instance id {spec.instance_id[:70]!r} is not valid: use letters, digits, '.', '_', '-'.")
    validate_hostname(spec.hostname)
    return _dump({"instance-id": spec.instance_id, "local-hostname": spec.hostname})


def build_network_config(spec: SeedSpec) -> str | None:
    """Network config version 2 matching each NIC by MAC; None when there are no NICs (the image's default)."""
    if not spec.nics:
        return None
    seen: set[str] = set()
    ethernets = {}
    for index, nic in enumerate(spec.nics):
        mac = _check_mac(index + 1, nic.mac, seen)
        ethernets[f"nic{index}"] = _ethernet(index, nic, mac)
    return _dump({"version": 2, "ethernets": ethernets})


def _check_mac(n: int, mac: str, seen: set[str]) -> str:
    """The portal's MAC rule (machines.macs), on the form it stores: what libvirt gets is what is matched."""
    try:
        normal = macs.normalise_mac(mac)
    except macs.InvalidMac as e:
        raise CloudInitError(f"NIC {n}: MAC address {e}") from None
    if normal != mac.lower():
        raise CloudInitError(f"NIC {n}: MAC address {mac[:40]!r} is not valid: the portal keeps it as {normal}.")
    mac = normal
    if mac in seen:
        raise CloudInitError(f"NIC {n}: MAC address {mac} is used by another NIC.")
    seen.add(mac)
    return mac


def _ethernet(index: int, nic: NicConfig, mac: str) -> dict:
    n = index + 1
    ifaces = [_interface(n, a) for a in nic.addresses]
    if not (nic.dhcp4 or nic.dhcp6 or ifaces):
        raise CloudInitError(f"NIC {n}: without DHCP it needs at least one static address.")
    eth: dict[str, Any] = {
        "match": {"macaddress": mac},
        "set-name": f"eth{index}",
        "dhcp4": nic.dhcp4,
        "dhcp6": nic.dhcp6,
    }
    if ifaces:
        eth["addresses"] = [str(i) for i in ifaces]
    # Written for cloud-init 22.4 (Debian 12) as much as for netplan: there "to: default" fails the whole
    # config ("Address default is not a valid ip address") and "to: ::/0" comes out as ::/64 (fixed in
    # 23.1, canonical/cloud-init#1973). So IPv4 gets a 0.0.0.0/0 route and IPv6 the gateway6 key,
    # which every version renders right (netplan only warns that it is deprecated).
    if nic.gateway4:
        eth["routes"] = [{"to": "0.0.0.0/0", "via": str(_gateway(n, nic.gateway4, 4, ifaces))}]
    if nic.gateway6:
        eth["gateway6"] = str(_gateway(n, nic.gateway6, 6, ifaces))
    nameservers = _nameservers(n, nic)
    if nameservers:
        eth["nameservers"] = nameservers
    return eth


def _interface(n: int, text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        iface = None
    if iface is None or "/" not in text:
        raise CloudInitError(f"NIC {n}: {text[:60]!r} is not an address with a prefix, e.g. 192.0.2.10/24.")
    ip, net = iface.ip, iface.network
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise CloudInitError(f"NIC {n}: {iface} is not a usable host address.")
    if ip.version == 4 and net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
        raise CloudInitError(f"NIC {n}: {iface} is the network or broadcast address of {net}.")
    return iface


def _gateway(n: int, text: str, version: int, ifaces: list) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        gw = ipaddress.ip_address(text)
    except ValueError:
        gw = None
    if gw is None or gw.version != version:
        raise CloudInitError(f"NIC {n}: gateway {text[:60]!r} is not an IPv{version} address.")
    if version == 6 and gw.is_link_local:  # routers usually advertise fe80::1, outside every prefix
        return gw
    nets = [i.network for i in ifaces if i.version == version]
    if not nets:
        raise CloudInitError(f"NIC {n}: gateway {gw} needs a static IPv{version} address in its subnet.")
    if not any(gw in net for net in nets):
        raise CloudInitError(f"NIC {n}: gateway {gw} is not in {', '.join(map(str, nets))}.")
    if any(gw == i.ip for i in ifaces):
        raise CloudInitError(f"NIC {n}: gateway {gw} is the NIC's own address.")
    return gw


def _nameservers(n: int, nic: NicConfig) -> dict:
    out: dict[str, list[str]] = {}
    for text in nic.nameservers:
        try:
            out.setdefault("addresses", []).append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise CloudInitError(f"NIC {n}: name server {text[:60]!r} is not an IP address.") from None
    for domain in nic.search:
        try:
            out.setdefault("search", []).append(validate_fqdn(domain))
        except CloudInitError:
            raise CloudInitError(f"NIC {n}: search domain {domain[:60]!r} is not a valid domain name.") from None
    return out


# --- the seed -----------------------------------------------------------------------------------

# NoCloud file name -> ISO 9660 name. cloud-init reads the Joliet/Rock Ridge names.
_ISO_NAMES = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1", "network-config": "/NETWORKCONFIG.;1"}


def preview(spec: SeedSpec) -> dict[str, str]:
    """The seed's files exactly as they go in the ISO; "network-config" only when there are NICs."""
    docs = {"user-data": build_user_data(spec), "meta-data": build_meta_data(spec)}
    network = build_network_config(spec)
    if network is not None:
        docs["network-config"] = network
    return docs


def build_seed_iso(spec: SeedSpec) -> bytes:
    """A NoCloud seed ISO (volume id "cidata", Joliet and Rock Ridge), built in memory."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in preview(spec).items():
        data = text.encode("utf-8")
        iso.add_fp(io.BytesIO(data), len(data), _ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    image = out.getvalue()
    if len(image) >= SEED_ISO_MAX_BYTES:
        raise CloudInitError(
            f"The cloud-init seed would be {len(image):,} bytes; the limit is 1 MiB. Shorten the script."
        )
    return image
