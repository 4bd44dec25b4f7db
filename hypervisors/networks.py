"""Libvirt networks that staff define on a hypervisor from the portal (incl. DHCP and PXE/TFTP)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError
from hypervisors.drivers.domxml import guard_name, guard_xml, network_xml
from hypervisors.models import Hypervisor
from portal import audit
from portal.audit import audited

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
DEV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # Linux interface names: at most 15 characters
BOOT_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
MODES = ("tenant", "nat", "isolated", "bridge", "macvtap")
GUARDED_MODES = ("tenant", "nat", "isolated")  # networks libvirt makes, where the hypervisor has an address
# The tenant network's defaults: an isolated /24 with DHCP, unlikely to clash with a site's own ranges.
TENANT_CIDR, TENANT_DHCP = "192.168.213.1/24", ("192.168.213.10", "192.168.213.250")


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    mode: str
    bridge: str = ""  # bridge libvirt creates (nat/isolated) or the host bridge to use (bridge)
    interface: str = ""  # host interface (macvtap)
    cidr: str = ""  # router address with prefix, e.g. 192.168.77.1/24 (nat/isolated)
    dhcp_start: str = ""
    dhcp_end: str = ""
    tftp_root: str = ""  # a directory on the hypervisor
    boot_file: str = ""  # e.g. boot.ipxe or pxelinux.0
    ipv6_cidr: str = ""  # optional, e.g. fd77::1/64

    def xml(self) -> str:
        iface = ipaddress.ip_interface(self.cidr) if self.cidr else None
        v6 = ipaddress.ip_interface(self.ipv6_cidr) if self.ipv6_cidr else None
        mode = "isolated" if self.mode == "tenant" else self.mode
        return network_xml(
            name=self.name,
            mode=mode,
            bridge=self.bridge,
            interface=self.interface,
            address=str(iface.ip) if iface else "",
            prefix=iface.network.prefixlen if iface else None,
            dhcp_start=self.dhcp_start,
            dhcp_end=self.dhcp_end,
            tftp_root=self.tftp_root,
            boot_file=self.boot_file,
            ipv6_address=str(v6.ip) if v6 else "",
            ipv6_prefix=v6.network.prefixlen if v6 else None,
            isolated_ports=self.mode == "tenant",
        )

    def guard(self, host_addresses: tuple[str, ...] = ()) -> str:
        """The traffic filter of the network's NICs (see domxml.guard_xml), or "" when it has no address
        of the hypervisor to guard (host bridges and macvtap: the hypervisor is not on them as a router)."""
        if self.mode not in GUARDED_MODES or not self.cidr:
            return ""
        iface = ipaddress.ip_interface(self.cidr)
        return guard_xml(
            network=self.name,
            gateway=str(iface.ip),
            prefix=iface.network.prefixlen,
            nat=self.mode == "nat",
            host_addresses=host_addresses,
            tftp=bool(self.tftp_root),
        )


def spec_from(data: dict) -> NetworkSpec:
    """A NetworkSpec from form or API input; the tenant network takes its name from the settings."""
    fields = {k: v or "" for k, v in data.items()}
    if fields.get("mode") == "tenant":
        return tenant_spec(**{k: v for k, v in fields.items() if k not in ("name", "mode")})
    return NetworkSpec(**fields)


def tenant_spec(**overrides) -> NetworkSpec:
    """The tenant network: isolated, with DHCP and DNS from the hypervisor and nothing else of it."""
    fields = {"cidr": TENANT_CIDR, "dhcp_start": TENANT_DHCP[0], "dhcp_end": TENANT_DHCP[1], **overrides}
    if not fields.get("cidr"):
        fields.update(cidr=TENANT_CIDR, dhcp_start=TENANT_DHCP[0], dhcp_end=TENANT_DHCP[1])
    return NetworkSpec(**{**fields, "name": settings.PORTAL_TENANT_NETWORK, "mode": "tenant"})


def validate(spec: NetworkSpec, hypervisor: Hypervisor) -> None:
    errors: dict[str, str] = {}
    if not NAME_RE.match(spec.name):
        errors["name"] = "Use letters, digits, '-', '_' and '.', at most 50."
    elif any(n["name"] == spec.name for n in hypervisor.networks):
        errors["name"] = f"{hypervisor.name} already has a network {spec.name}."
    if spec.mode not in MODES:
        errors["mode"] = f"Choose one of {', '.join(MODES)}."
    if spec.mode == "bridge" and not DEV_RE.match(spec.bridge):
        errors["bridge"] = "Name the host bridge (e.g. br0)."
    if spec.mode == "macvtap" and not DEV_RE.match(spec.interface):
        errors["interface"] = "Name the host interface (e.g. eno1)."
    if spec.mode != "tenant" and spec.name == settings.PORTAL_TENANT_NETWORK:
        errors["name"] = (
            f"{spec.name} is the tenant network's name: everyone may use it, so it must be the guarded one (mode tenant)."
        )
    if spec.mode == "tenant" and spec.name != settings.PORTAL_TENANT_NETWORK:
        errors["name"] = f"The tenant network is called {settings.PORTAL_TENANT_NETWORK} (PORTAL_TENANT_NETWORK)."
    if spec.mode == "tenant" and (spec.tftp_root or spec.boot_file or spec.ipv6_cidr or not spec.dhcp_start):
        errors["mode"] = (
            "The tenant network is IPv4 with DHCP, without TFTP or IPv6: use an isolated network for those."
        )
    if spec.mode in GUARDED_MODES:
        if spec.bridge and not DEV_RE.match(spec.bridge):
            errors["bridge"] = "A bridge name has at most 15 letters, digits, '-', '_' or '.'."
        errors.update(_validate_ip(spec))
    if errors:
        raise ValidationError(errors)


def _validate_ip(spec: NetworkSpec) -> dict[str, str]:
    if not spec.cidr:
        return (
            {"cidr": "Give the network's router address with its prefix, e.g. 192.168.77.1/24."}
            if (spec.dhcp_start or spec.tftp_root)
            else {}
        )
    try:
        iface = ipaddress.ip_interface(spec.cidr)
    except ValueError:
        return {"cidr": f"{spec.cidr!r} is not an address with a prefix."}
    if (
        iface.version != 4
        or iface.network.prefixlen > 30
        or iface.ip in (iface.network.network_address, iface.network.broadcast_address)
    ):
        return {"cidr": "Give an IPv4 host address in a /30 or larger network, e.g. 192.168.77.1/24."}
    errors = {}
    if bool(spec.dhcp_start) != bool(spec.dhcp_end):
        errors["dhcp_end"] = "Give both ends of the DHCP range."
    elif spec.dhcp_start:
        try:
            start, end = ipaddress.ip_address(spec.dhcp_start), ipaddress.ip_address(spec.dhcp_end)
            # Both in the (IPv4) network by the time they are compared, so comparing as numbers is the same.
            if (
                start not in iface.network
                or end not in iface.network
                or int(start) > int(end)
                or iface.ip in (start, end)
            ):
                errors["dhcp_end"] = (
                    f"The range must lie in {iface.network}, start before it ends, and leave out the router."
                )
        except ValueError:
            errors["dhcp_start"] = "The DHCP range takes two IPv4 addresses."
    if spec.ipv6_cidr:
        try:
            if ipaddress.ip_interface(spec.ipv6_cidr).version != 6:
                raise ValueError
        except ValueError:
            errors["ipv6_cidr"] = "An IPv6 address with a prefix, e.g. fd77::1/64."
    if spec.tftp_root and not spec.tftp_root.startswith("/"):
        errors["tftp_root"] = "An absolute directory on the hypervisor, e.g. /srv/tftp."
    if spec.boot_file and (not spec.dhcp_start or not BOOT_FILE_RE.match(spec.boot_file) or ".." in spec.boot_file):
        errors["boot_file"] = "A boot file needs a DHCP range, and a file name in the TFTP root (e.g. boot.ipxe)."
    return errors


@audited("hypervisor.network_create", obj_kwarg="hypervisor")
@transaction.atomic
def network_create(*, hypervisor: Hypervisor, spec: NetworkSpec) -> None:
    """Validate and queue the definition of a network on the hypervisor."""
    validate(spec, hypervisor)
    from hypervisors.tasks import network_create_task

    transaction.on_commit(lambda: network_create_task(hypervisor.pk, spec.__dict__))


def network_create_run(hypervisor_id: int, spec: dict) -> str:
    from hypervisors.services import hypervisor_sync

    hv = Hypervisor.objects.get(pk=hypervisor_id)
    network = NetworkSpec(**spec)
    try:
        driver = get_driver(hv.uri)
        guard = network.guard(host_addresses=host_addresses(hv))
        if guard:  # first: a NIC on the network must never start without its filter
            driver.define_guard(guard)
        driver.define_network(network.xml())
        result = "defined"
    except HypervisorError as e:
        result = f"failed: {e}"
        audit.record("hypervisor.network_create", hv, outcome="failed", detail=f"{spec['name']}: {e}")
    hypervisor_sync(hv.pk)
    return result


# Who still uses a network, asked before it is removed: higher apps register a check (the machines app:
# its NICs), so this app needs to know nothing of them. Each takes (hypervisor, network name) and returns
# why the network is in use, or "".
NETWORK_USERS: list[Callable[[Hypervisor, str], str]] = []
# Who the policy refuses once a publication is gone (asked after staff unpublish, to warn them): higher
# apps register a check that takes (kind, source) and returns the names of what now breaks the policy.
UNPUBLISHED_USERS: list[Callable[[str, str], list[str]]] = []


def stranded_by_unpublishing(kind: str, source: str) -> list[str]:
    """What the NIC policy refuses now that no publication of (kind, source) is left for it."""
    return [name for check in UNPUBLISHED_USERS for name in check(kind, source)]


@audited("hypervisor.network_delete", obj_kwarg="hypervisor")
def network_delete(*, hypervisor: Hypervisor, name: str) -> None:
    """Queue the removal of a network nothing of the portal uses."""
    for in_use in NETWORK_USERS:
        why = in_use(hypervisor, name)
        if why:
            raise ValidationError(why)
    from hypervisors.tasks import network_delete_task

    transaction.on_commit(lambda: network_delete_task(hypervisor.pk, name))


def host_addresses(hv: Hypervisor, version: int = 4) -> tuple[str, ...]:
    """The hypervisor's own addresses of one IP version as the portal knows them: the console address, the
    address of its URI, and the addresses its last sync found on its interfaces (a local hypervisor's;
    libvirt reports none for a remote one), without loopback (guards drop them all)."""
    from urllib.parse import urlsplit

    candidates = [hv.console_address, urlsplit(hv.uri).hostname or ""]
    candidates += [a for i in hv.interfaces for a in i.get("addresses", [])]
    found = []
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate.split("%")[0])
        except ValueError:
            continue
        if address.version == version and not address.is_loopback and not address.is_unspecified:
            found.append(str(address))
    return tuple(dict.fromkeys(found))


def network_delete_run(hypervisor_id: int, name: str) -> None:
    from hypervisors.services import hypervisor_sync

    hv = Hypervisor.objects.get(pk=hypervisor_id)
    driver = get_driver(hv.uri)
    driver.remove_network(name)
    driver.remove_guard(guard_name(name))
    hypervisor_sync(hv.pk)
