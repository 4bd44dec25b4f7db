"""Domain XML from a DomainSpec, built with ElementTree: user text only ever lands escaped."""

from __future__ import annotations

import ipaddress
import secrets
import string
import xml.etree.ElementTree as ET

from hypervisors.drivers.base import PORTAL_METADATA_NS, DiskSpec, DomainSpec, NicSpec

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
VNC_EXPIRED_AT = "2000-01-01T00:00:00"  # a passwdValidTo in the past: QEMU starts with the password expired
VNC_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # libvirt's passwdValidTo, in UTC
_DEV_PREFIX = {"virtio": "vd", "ide": "hd", "sata": "sd", "scsi": "sd"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _target_names(disks: tuple[DiskSpec, ...]) -> list[str]:
    """vda, vdb, ... per bus; IDE and SATA/SCSI share nothing with virtio."""
    used: dict[str, int] = {}
    names = []
    for disk in disks:
        prefix = _DEV_PREFIX[disk.bus]
        index = used.get(prefix, 0)
        used[prefix] = index + 1
        names.append(prefix + "abcdefghijklmnopqrstuvwxyz"[index])
    return names


def _disk(devices: ET.Element, disk: DiskSpec, target: str, use_order: bool = True) -> None:
    el = _sub(devices, "disk", type="file", device=disk.device)
    driver = _sub(el, "driver", name="qemu", type=disk.format)
    if disk.cache:
        driver.set("cache", disk.cache)
    if disk.path:  # an empty CD-ROM drive has no source
        _sub(el, "source", file=disk.path)
    _sub(el, "target", dev=target, bus=disk.bus)
    if disk.device == "cdrom":
        _sub(el, "readonly")
    if disk.boot_order is not None and use_order:
        _sub(el, "boot", order=str(disk.boot_order))


def _nic(devices: ET.Element, nic: NicSpec, use_order: bool = True) -> None:
    el = _sub(devices, "interface", type=nic.type)
    _sub(el, "mac", address=nic.mac)
    if nic.type == "network":
        _sub(el, "source", network=nic.source)
    elif nic.type == "bridge":
        _sub(el, "source", bridge=nic.source)
    elif nic.type == "direct":
        _sub(el, "source", dev=nic.source, mode=nic.mode)
    if nic.vlan is not None:
        _sub(_sub(el, "vlan"), "tag", id=str(nic.vlan))
    _sub(el, "model", type=nic.model)
    if nic.guard:
        _sub(el, "filterref", filter=nic.guard)
    if nic.boot_order is not None and use_order:
        _sub(el, "boot", order=str(nic.boot_order))


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _hostdev(devices: ET.Element, dev: dict) -> None:
    """A PCI device by its address, or a USB device by vendor and product."""
    if dev["type"] == "pci":
        el = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
        _sub(
            _sub(el, "source"),
            "address",
            domain=f"0x{dev['domain']:04x}",
            bus=f"0x{dev['bus']:02x}",
            slot=f"0x{dev['slot']:02x}",
            function=f"0x{dev['function']:x}",
        )
    else:
        el = _sub(devices, "hostdev", mode="subsystem", type="usb", managed="yes")
        source = _sub(el, "source")
        _sub(source, "vendor", id=dev["vendor"])
        _sub(source, "product", id=dev["product"])


def parse_node_device(xml: str) -> dict | None:
    """A PCI or USB node device as plain data, or None for other kinds."""
    root = ET.fromstring(xml)
    cap = root.find("capability")
    if cap is None or cap.get("type") not in ("pci", "usb_device"):
        return None
    vendor, product = cap.find("vendor"), cap.find("product")
    dev: dict[str, str | int] = {
        "name": root.findtext("name", default=""),
        "type": "pci" if cap.get("type") == "pci" else "usb",
        "vendor": vendor.get("id", "") if vendor is not None else "",
        "product": product.get("id", "") if product is not None else "",
        "description": " ".join(
            t
            for t in (
                (vendor.text if vendor is not None else "") or "",
                (product.text if product is not None else "") or "",
            )
            if t
        ),
        "driver": root.findtext("driver/name", default=""),
    }
    if dev["type"] == "pci":
        dev.update({k: int(cap.findtext(k, default="0"), 0) for k in ("domain", "bus", "slot", "function")})
    else:  # where it is plugged now; the guest gets it by vendor and product, which survive re-plugging
        dev.update({k: int(cap.findtext(k, default="0"), 0) for k in ("bus", "device")})
    return dev


def _cpu(root: ET.Element, spec: DomainSpec) -> None:
    if not (spec.cpu_mode or spec.topology):
        return
    cpu = _sub(root, "cpu", mode=spec.cpu_mode or "host-model") if spec.cpu_mode else _sub(root, "cpu")
    if spec.cpu_mode == "custom":
        cpu.set("match", "exact")
        _sub(cpu, "model", spec.cpu_model, fallback="forbid")
    if spec.topology:
        sockets, cores, threads = spec.topology
        _sub(cpu, "topology", sockets=str(sockets), dies="1", cores=str(cores), threads=str(threads))


def build_domain_xml(spec: DomainSpec) -> str:
    root = ET.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    if spec.title:
        _sub(root, "title", spec.title)
    if spec.description:
        _sub(root, "description", spec.description)
    metadata = _sub(root, "metadata")
    ET.SubElement(metadata, f"{{{PORTAL_METADATA_NS}}}machine", {k: str(v) for k, v in spec.metadata.items()})
    # With maxima (chosen at create), <memory> is the most the balloon gives and <vcpu> the most vCPUs, so a
    # running guest can be grown up to them without a restart (machines.services.changes).
    _sub(root, "memory", str(max(spec.memory_mib, spec.max_memory_mib)), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    vcpu = _sub(root, "vcpu", str(max(spec.vcpus, spec.max_vcpus)), placement="static")
    if spec.max_vcpus > spec.vcpus:
        vcpu.set("current", str(spec.vcpus))
    os_el = _sub(root, "os")
    if spec.firmware:
        os_el.set("firmware", spec.firmware)
    _sub(os_el, "type", "hvm", arch=spec.arch, machine=spec.machine)
    if spec.firmware == "efi":
        fw = _sub(os_el, "firmware")
        _sub(fw, "feature", enabled="yes" if spec.secure_boot else "no", name="secure-boot")
        if spec.secure_boot:
            _sub(fw, "feature", enabled="yes", name="enrolled-keys")
    # The boot order lives either in <os> (what IPMI boot-device changes edit) or on devices, never both.
    for dev in spec.boot_devices:
        _sub(os_el, "boot", dev=dev)
    use_order = not spec.boot_devices
    if spec.bios_serial:
        _sub(os_el, "bios", useserial="yes")
    if spec.smbios:
        _sub(os_el, "smbios", mode="sysinfo")
        system = _sub(_sub(root, "sysinfo", type="smbios"), "system")
        for key, value in spec.smbios.items():
            _sub(system, "entry", str(value), name=key)
    _cpu(root, spec)
    features = _sub(root, "features")
    _sub(features, "acpi")
    if spec.arch in ("x86_64", "i686"):
        _sub(features, "apic")
    if spec.secure_boot:
        _sub(features, "smm", state="on")  # secure boot keeps its variables in SMM
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    for disk, target in zip(spec.disks, _target_names(spec.disks), strict=True):
        _disk(devices, disk, target, use_order)
    for nic in spec.nics:
        _nic(devices, nic, use_order)
    serial = _sub(devices, "serial", type="pty")
    if spec.serial_log:
        _sub(serial, "log", file=spec.serial_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    # For a QEMU guest agent, if the guest runs one: its addresses, and libvirt marks the channel connected.
    agent = _sub(devices, "channel", type="unix")
    _sub(agent, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    # VNC always asks for a password, expired from the start: the console proxy sets a fresh one for a few
    # seconds when a session starts (machines/console_proxy.py), so nobody else can ever pass it.
    graphics = _sub(
        devices,
        "graphics",
        type="vnc",
        port="-1",
        autoport="yes",
        listen=spec.vnc_listen,
        passwd=spec.vnc_password or new_vnc_password(),
        passwdValidTo=VNC_EXPIRED_AT,
    )
    _sub(graphics, "listen", type="address", address=spec.vnc_listen)
    video = _sub(devices, "video")
    _sub(video, "model", type=spec.video)
    if spec.arch not in ("x86_64", "i686"):
        _sub(devices, "controller", type="usb", model="qemu-xhci")  # libvirt adds none there; the tablet needs one
    _sub(devices, "input", type="tablet", bus="usb")
    for hostdev in spec.hostdevs:
        _hostdev(devices, hostdev)
    if spec.watchdog:
        _sub(devices, "watchdog", model="i6300esb", action="reset")
    if spec.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    # The balloon driver reports the guest's own memory figures every 10 s (the metrics' memory used; without
    # a period libvirt gives only QEMU's resident memory on the host).
    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period="10")
    if spec.qemu_args:
        cmdline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in spec.qemu_args:
            ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def volume_xml(*, name: str, capacity_bytes: int, fmt: str, backing_path: str = "", backing_format: str = "") -> str:
    root = ET.Element("volume")
    _sub(root, "name", name)
    _sub(root, "capacity", str(capacity_bytes), unit="bytes")
    _sub(root, "allocation", "0", unit="bytes")
    target = _sub(root, "target")
    _sub(target, "format", type=fmt)
    if backing_path:
        backing = _sub(root, "backingStore")
        _sub(backing, "path", backing_path)
        _sub(backing, "format", type=backing_format)
    return ET.tostring(root, encoding="unicode")


def target_names(disks: tuple[DiskSpec, ...]) -> list[str]:
    """The guest device names the disks get, in order (vda, hda, ...)."""
    return _target_names(disks)


def cdrom_xml(*, target: str, path: str) -> str:
    """A CD-ROM device for updateDeviceFlags: `path` inserted, or ejected when empty."""
    el = ET.Element("disk", type="file", device="cdrom")
    _sub(el, "driver", name="qemu", type="raw")
    if path:
        _sub(el, "source", file=path)
    _sub(el, "target", dev=target, bus="ide")
    _sub(el, "readonly")
    return ET.tostring(el, encoding="unicode")


HOT_PLUG_BUSES = frozenset({"virtio", "scsi"})  # disks QEMU takes into a running guest; IDE and SATA it does not


def free_disk_target(xml: str, bus: str) -> str:
    """The first guest device name on `bus` that no disk or CD-ROM of the domain XML uses (vdb after vda, ...)."""
    prefix = _DEV_PREFIX[bus]
    used = {t.get("dev", "") for t in ET.fromstring(xml).findall("devices/disk/target")}
    limit = 4 if bus == "ide" else 26  # an IDE controller has two buses of two drives
    for letter in "abcdefghijklmnopqrstuvwxyz"[:limit]:
        if prefix + letter not in used:
            return prefix + letter
    raise ValueError(f"no free {bus} target in the domain")


def disk_device_xml(disk: DiskSpec, target: str) -> str:
    """One disk (or CD-ROM drive) as attachDeviceFlags takes it, without a boot order."""
    holder = ET.Element("devices")
    _disk(holder, disk, target, use_order=False)
    return ET.tostring(holder[0], encoding="unicode")


def nic_device_xml(nic: NicSpec) -> str:
    """One NIC as attachDeviceFlags takes it, without a boot order."""
    holder = ET.Element("devices")
    _nic(holder, nic, use_order=False)
    return ET.tostring(holder[0], encoding="unicode")


def find_disk(xml: str, *, target: str = "", path: str = "") -> str | None:
    """The <disk> element (as XML) of the domain with that target or source file, or None."""
    for disk in ET.fromstring(xml).findall("devices/disk"):
        if (target and _attr(disk, "target", "dev") == target) or (path and _attr(disk, "source", "file") == path):
            return ET.tostring(disk, encoding="unicode")
    return None


def find_nic(xml: str, mac: str) -> str | None:
    """The <interface> element (as XML) of the domain with that MAC, or None."""
    for nic in ET.fromstring(xml).findall("devices/interface"):
        if _attr(nic, "mac", "address").lower() == mac.lower():
            return ET.tostring(nic, encoding="unicode")
    return None


def _attr(el: ET.Element, child: str, name: str) -> str:
    """Attribute `name` of the first `child` of `el`, or "" when either is missing."""
    found = el.find(child)
    return "" if found is None else found.get(name, "")


def with_boot_first(xml: str, target: str) -> str:
    """The domain XML with the disk `target` first in the boot order and the rest after it."""
    root = ET.fromstring(xml)
    booted = [d for d in root.findall("devices/disk") + root.findall("devices/interface") if d.find("boot") is not None]
    first = next((d for d in root.findall("devices/disk") if _attr(d, "target", "dev") == target), None)
    if first is None:
        raise ValueError(f"no disk {target} in the domain")
    ordered = [first] + sorted((d for d in booted if d is not first), key=lambda d: int(_attr(d, "boot", "order")))
    for order, dev in enumerate(ordered, start=1):
        boot = dev.find("boot")
        if boot is None:
            boot = ET.SubElement(dev, "boot")
        boot.set("order", str(order))
    return ET.tostring(root, encoding="unicode")


def portal_domain(xml: str) -> tuple[str, dict[str, str]] | None:
    """(name, the attributes of the portal's metadata element) of a domain the portal defined: its metadata in
    PORTAL_METADATA_NS and a name that ends in the first 8 hex digits of its UUID (`<host name>-<uuid8>`, as
    the portal names them), or a domain the portal adopted, which keeps its own name: its mark says `adopted` with
    the domain's own UUID. None for any other domain."""
    root = ET.fromstring(xml)
    mark = root.find(f"metadata/{{{PORTAL_METADATA_NS}}}machine")
    name, uuid = root.findtext("name") or "", (root.findtext("uuid") or "").replace("-", "").lower()
    if mark is None or len(uuid) != 32:
        return None
    adopted = mark.get("adopted", "").replace("-", "").lower() == uuid
    if not adopted and not name.endswith(f"-{uuid[:8]}"):
        return None
    return name, dict(mark.attrib)


def agent_connected(xml: str) -> bool:
    """Whether a running domain's guest agent answers on its channel (live XML), so asking it will not hang."""
    target = ET.fromstring(xml).find(f"devices/channel/target[@name='{GUEST_AGENT_CHANNEL}']")
    return target is not None and target.get("state") == "connected"


def merge_addresses(*reports: dict) -> dict[str, list[str]]:
    """MAC -> the guest's addresses, from libvirt interfaceAddresses() results (leases, agent, ARP),
    first report first. Loopback and link-local addresses are left out; an address one source gives
    with its prefix is not repeated bare by another (ARP has no prefix)."""
    found: dict[str, list[str]] = {}
    for report in reports:
        for iface in report.values():
            mac = (iface.get("hwaddr") or "").lower()
            if not mac or mac == "00:00:00:00:00:00":
                continue
            have = found.setdefault(mac, [])
            for a in iface.get("addrs") or []:
                try:
                    ip = ipaddress.ip_address(a.get("addr", ""))
                except ValueError:
                    continue
                if ip.is_loopback or ip.is_link_local or any(h.split("/")[0] == str(ip) for h in have):
                    continue
                prefix = a.get("prefix") or 0
                have.append(f"{ip}/{prefix}" if prefix else str(ip))
    return {mac: addrs for mac, addrs in found.items() if addrs}


def new_vnc_password() -> str:
    """A random VNC password: 8 characters, all VNC authentication uses."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def vnc_graphics(xml: str) -> ET.Element | None:
    """The VNC graphics element of a domain's XML, if any."""
    return ET.fromstring(xml).find("devices/graphics[@type='vnc']")


def vnc_protected(xml: str) -> bool:
    """Whether the domain's VNC server (if it has one) asks for a password. Needs XML read with
    VIR_DOMAIN_XML_SECURE: without it libvirt leaves the password out."""
    graphics = vnc_graphics(xml)
    return graphics is None or bool(graphics.get("passwd"))


def with_vnc_password(xml: str, password: str, valid_to: str, *, whole: bool = False) -> str | None:
    """The domain's VNC graphics element alone (for updateDeviceFlags), or the whole domain (`whole`, for a
    redefine), with this password valid until `valid_to` (UTC, libvirt's format); None without VNC."""
    root = ET.fromstring(xml)
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is None:
        return None
    graphics.set("passwd", password)
    graphics.set("passwdValidTo", valid_to)
    if whole:
        return ET.tostring(root, encoding="unicode")
    graphics.tail = None
    return ET.tostring(graphics, encoding="unicode")


def with_bridge_filters(xml: str, filters: dict[str, str]) -> str | None:
    """The whole domain with each NIC on a host bridge named in `filters` (bridge -> nwfilter) carrying
    that filter (for a domain defined before its NICs had one), or None when all already do."""
    root = ET.fromstring(xml)
    changed = False
    for nic in root.findall("devices/interface[@type='bridge']"):
        source = nic.find("source")
        wanted = filters.get(source.get("bridge", "") if source is not None else "")
        ref = nic.find("filterref")
        if not wanted or (ref is not None and ref.get("filter") == wanted):
            continue
        if ref is None:
            ref = _sub(nic, "filterref")
        ref.attrib = {"filter": wanted}
        changed = True
    return ET.tostring(root, encoding="unicode") if changed else None


def parse_vnc(xml: str) -> tuple[str, int] | None:
    """The live VNC listen address and port of a running domain's XML, if any."""
    graphics = ET.fromstring(xml).find("devices/graphics[@type='vnc']")
    if graphics is None or graphics.get("port", "-1") in ("-1", ""):
        return None
    return graphics.get("listen", "127.0.0.1"), int(graphics.get("port", "0"))


ET.register_namespace("portal", PORTAL_METADATA_NS)
ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")


def network_xml(
    *,
    name: str,
    mode: str,
    bridge: str = "",
    interface: str = "",
    address: str = "",
    prefix: int | None = None,
    dhcp_start: str = "",
    dhcp_end: str = "",
    tftp_root: str = "",
    boot_file: str = "",
    ipv6_address: str = "",
    ipv6_prefix: int | None = None,
    isolated_ports: bool = False,
) -> str:
    """A libvirt network: `nat` or `isolated` (a bridge libvirt makes, with DHCP and optional TFTP),
    `bridge` (an existing host bridge) or `macvtap` (direct on a host interface)."""
    root = ET.Element("network")
    _sub(root, "name", name)
    if mode == "nat":
        _sub(root, "forward", mode="nat")
    elif mode == "bridge":
        _sub(root, "forward", mode="bridge")
        _sub(root, "bridge", name=bridge)
        return ET.tostring(root, encoding="unicode")
    elif mode == "macvtap":
        forward = _sub(root, "forward", mode="bridge")
        _sub(forward, "interface", dev=interface)
        return ET.tostring(root, encoding="unicode")
    if bridge:
        _sub(root, "bridge", name=bridge, stp="on", delay="0")
    if isolated_ports:  # guests on it talk to the hypervisor's dnsmasq only, never to one another
        _sub(root, "port", isolated="yes")
    if address:
        ip = _sub(root, "ip", address=address, prefix=str(prefix))
        if tftp_root:
            _sub(ip, "tftp", root=tftp_root)
        if dhcp_start:
            dhcp = _sub(ip, "dhcp")
            _sub(dhcp, "range", start=dhcp_start, end=dhcp_end)
            if boot_file:
                _sub(dhcp, "bootp", file=boot_file)
    if ipv6_address:
        # Router advertisements on the network: iPXE otherwise waits ~16 s for IPv6 before booting.
        _sub(root, "ip", family="ipv6", address=ipv6_address, prefix=str(ipv6_prefix))
    return ET.tostring(root, encoding="unicode")


GUARD_PREFIX = "portal-guard-"
# Destinations a guest on a NAT network is kept from (besides its own subnet, which it may reach): the
# private, shared, loopback and link-local ranges, where a hypervisor's management addresses live.
GUARDED_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def guard_name(network: str) -> str:
    """The name of the traffic filter that keeps guests on `network` away from their hypervisor."""
    return GUARD_PREFIX + network


def _tftp_rules(gateway: str) -> tuple[tuple[str, str, dict[str, str]], ...]:
    # The second only for established flows, in either direction: the guest's acknowledgements answer a
    # flow the host began (dnsmasq sends each transfer from a new port), which libvirt's default match
    # (NEW or ESTABLISHED in the guest's direction) drops; a flow the guest starts there is dropped.
    return (
        ("accept", "udp", {"dstipaddr": gateway, "dstportstart": "69"}),
        (
            "accept",
            "udp",
            {"dstipaddr": gateway, "dstportstart": "32768", "dstportend": "60999", "state": "ESTABLISHED"},
        ),
    )


HOST_GUARD_PREFIX = "portal-hostguard-"
# Multicast frames as IPv4 and IPv6 address them (RFC 1112, RFC 2464): MAC prefix and mask, IP prefix.
IPV4_MULTICAST = {"dstmacaddr": "01:00:5e:00:00:00", "dstmacmask": "ff:ff:ff:80:00:00"}
IPV6_MULTICAST = {"dstmacaddr": "33:33:00:00:00:00", "dstmacmask": "ff:ff:00:00:00:00"}


def host_guard_name(bridge: str) -> str:
    """The name of the traffic filter that keeps guests on host bridge `bridge` away from their hypervisor."""
    return HOST_GUARD_PREFIX + bridge


def host_guard_xml(
    *, bridge: str, host_mac: str, host_addresses: tuple[str, ...] = (), host_addresses6: tuple[str, ...] = ()
) -> str:
    """A libvirt nwfilter for NICs on a host bridge the hypervisor may have its own address on (a LAN that
    staff publish): the guest is one more machine on that LAN, and the hypervisor is not on it for the guest.

    The guest sends under its own MAC only, no VLAN-tagged frame, and never
    claims an address of the hypervisor (ARP or a packet's source). To the bridge's own MAC (see below):
    DHCP (its server may be the hypervisor) and ARP pass, IPv4 passes only when it is for one of
    `host_addresses` (the hypervisor's addresses as the portal knows them), and everything else is
    dropped: IPv6, any other protocol, a packet the hypervisor would route on, a directed broadcast,
    loopback. Broadcast frames carry ARP and DHCP only (a UDP socket on 0.0.0.0 receives broadcasts); a
    multicast frame must be its family's and carry a multicast address (Linux takes a unicast packet in a
    multicast frame by default), and not the all-hosts groups. Packet by packet (iptables, with
    connection state): to `host_addresses`, DHCP renewals and replies to what the hypervisor began (so
    it can still reach its guests, e.g. SSH from the worker), which also covers them when the guest goes
    through the LAN's router; the same for its IPv6 addresses (`host_addresses6`). Other machines on the
    LAN stay reachable, multicast too. Without known addresses no IPv4 reaches the hypervisor's MAC at
    all, replies included."""
    root = ET.Element("filter", name=host_guard_name(bridge), chain="root")
    # The bridge's MAC as the sync saw it, and any MAC libvirt gives its tap devices (fe:...): a bridge
    # with no port of its own (no MAC set by hand) takes its lowest port's MAC, a guest's tap, which
    # changes as guests come and go. No guest is addressed by its tap's MAC (guests have 52:54:00:...).
    hypervisor = ({"dstmacaddr": host_mac}, {"dstmacaddr": "fe:00:00:00:00:00", "dstmacmask": "ff:00:00:00:00:00"})
    broadcast = {"dstmacaddr": "ff:ff:ff:ff:ff:ff"}
    dhcp = {"protocol": "udp", "srcportstart": "68", "dstportstart": "67"}
    rules: list[tuple[str, str, dict[str, str]]] = [
        # The guest's own MAC only (libvirt fills in $MAC, the NIC's): no frame under another's.
        ("drop", "mac", {"match": "no", "srcmacaddr": "$MAC"}),
        *(("drop", "mac", {"protocolid": tag}) for tag in ("0x8100", "0x88a8", "0x9100")),  # no VLAN of its own
        # Never claiming an address of the hypervisor: not in ARP, not as a packet's source (which would also
        # make conntrack take a forged flow for one the hypervisor began, and let its "reply" in).
        *(("drop", "arp", {"arpsrcipaddr": a}) for a in host_addresses),
        *(("drop", "all", {"srcipaddr": a}) for a in host_addresses),
        ("accept", "ip", dhcp),
        *(("accept", "mac", {**m, "protocolid": "arp"}) for m in hypervisor),
        *(("accept", "ip", {**m, "dstipaddr": a}) for a in host_addresses for m in hypervisor),
        *(("drop", "mac", m) for m in hypervisor),
        # Broadcast frames: ARP and DHCP only. Multicast frames: each family's own, with a multicast address
        # in them, and not the all-hosts groups every host (the hypervisor too) is in.
        ("drop", "ip", broadcast),
        ("drop", "ipv6", broadcast),
        ("drop", "ip", {"dstipaddr": "224.0.0.1"}),
        ("drop", "ipv6", {"dstipaddr": "ff02::1"}),
        ("accept", "ip", {**IPV4_MULTICAST, "dstipaddr": "224.0.0.0", "dstipmask": "4"}),
        ("drop", "ip", IPV4_MULTICAST),
        ("drop", "ip", IPV6_MULTICAST),
        ("accept", "ipv6", {**IPV6_MULTICAST, "dstipaddr": "ff00::", "dstipmask": "8"}),
        ("drop", "ipv6", IPV6_MULTICAST),
        ("drop", "ipv6", IPV4_MULTICAST),
    ]
    for a in host_addresses:  # DHCP renewals to it, then only replies to what it began (ICMP errors too)
        rules += [
            ("accept", "udp", {"dstipaddr": a, "srcportstart": "68", "dstportstart": "67"}),
            ("accept", "all", {"dstipaddr": a, "state": "ESTABLISHED,RELATED"}),
            ("drop", "all", {"dstipaddr": a}),
        ]
    for a in host_addresses6:  # its IPv6 addresses, reached through the LAN's router: the same, as source too
        rules += [
            ("drop", "all-ipv6", {"srcipaddr": a}),
            ("accept", "all-ipv6", {"dstipaddr": a, "state": "ESTABLISHED,RELATED"}),
            ("drop", "all-ipv6", {"dstipaddr": a}),
        ]
    _rules(root, rules)
    return ET.tostring(root, encoding="unicode")


def guard_xml(
    *, network: str, gateway: str, prefix: int, nat: bool, host_addresses: tuple[str, ...] = (), tftp: bool = False
) -> str:
    """A libvirt nwfilter for the NICs on a portal network: the guest reaches its own subnet (other guests),
    DHCP and DNS on the hypervisor's address there, and (NAT only) public destinations; nothing else of
    the hypervisor: not its address on the bridge, not the subnet broadcast, not its other addresses. It
    answers what the hypervisor begins (replies only), so the worker reaches a guest's SSH for a workflow.
    Rules are iptables-level, so libvirt applies them to traffic for the host itself and to forwarded
    traffic alike; IPv6 from the guest is dropped (portal networks are IPv4). With `tftp` (a PXE network)
    the guest may also reach the hypervisor's TFTP server: port 69, and, for flows dnsmasq began, the
    ephemeral ports (32768-60999, Linux's default range) it answers each transfer from."""
    net = ipaddress.ip_interface(f"{gateway}/{prefix}").network
    root = ET.Element("filter", name=guard_name(network), chain="root")
    rules: list[tuple[str, str, dict[str, str]]] = [
        ("accept", "udp", {"srcportstart": "68", "dstportstart": "67"}),  # DHCP (broadcast or to the gateway)
        ("accept", "udp", {"dstipaddr": gateway, "dstportstart": "53"}),  # DNS from libvirt's dnsmasq
        ("accept", "tcp", {"dstipaddr": gateway, "dstportstart": "53"}),
        *(_tftp_rules(gateway) if tftp else ()),
        # Replies to what the hypervisor began (the worker's SSH to a guest for a workflow, ICMP errors about
        # it): a flow the guest starts is NEW, never ESTABLISHED, and is dropped by the next rule.
        ("accept", "all", {"dstipaddr": gateway, "state": "ESTABLISHED,RELATED"}),
        ("drop", "all", {"dstipaddr": gateway}),
        ("drop", "all", {"dstipaddr": str(net.broadcast_address)}),
        ("drop", "all", {"dstipaddr": str(net.network_address)}),  # an old-style broadcast on some kernels
        ("drop", "all", {"dstipaddr": "224.0.0.0", "dstipmask": "4"}),
        *(("drop", "all", {"dstipaddr": a}) for a in host_addresses),
        ("accept", "all", {"dstipaddr": str(net.network_address), "dstipmask": str(net.prefixlen)}),
    ]
    if nat:
        for cidr in GUARDED_RANGES:
            address, mask = cidr.split("/")
            rules.append(("drop", "all", {"dstipaddr": address, "dstipmask": mask}))
        rules.append(("accept", "all", {}))
    else:
        rules.append(("drop", "all", {}))
    rules.append(("drop", "all-ipv6", {}))
    _rules(root, rules)
    return ET.tostring(root, encoding="unicode")


def _rules(root: ET.Element, rules: list[tuple[str, str, dict[str, str]]]) -> None:
    """The rules of a guard, in order, each for traffic from the guest."""
    for priority, (action, protocol, match) in enumerate(rules, start=1):
        rule = _sub(root, "rule", action=action, direction="out", priority=str(100 + 10 * priority))
        match = dict(match)
        if "statematch" in match:  # an attribute of the rule, not of its match
            rule.set("statematch", match.pop("statematch"))
        _sub(rule, protocol, **match)


def _mib(el: ET.Element | None) -> int:
    """A <memory> element in MiB, whatever its unit (libvirt gives KiB)."""
    if el is None or not (el.text or "").strip().isdigit():
        return 0
    scale = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
    scale |= {"gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40, "kb": 1000, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    return int(el.text or "0") * scale.get(el.get("unit", "KiB").lower(), 1 << 10) >> 20


def _order(el: ET.Element) -> int | None:
    boot = el.find("boot")
    order = boot.get("order", "") if boot is not None else ""
    return int(order) if order.isdigit() else None


def _foreign_disk(el: ET.Element) -> dict:
    source, target, driver = el.find("source"), el.find("target"), el.find("driver")
    src = source.attrib if source is not None else {}
    kind = el.get("type", "file")
    return {
        "target": target.get("dev", "") if target is not None else "",
        "bus": target.get("bus", "") if target is not None else "",
        "device": el.get("device", "disk"),
        "type": kind,
        # file: its path; volume: pool/volume; block: the device; network: protocol and name
        "path": src.get("file") or src.get("dev") or "",
        "pool": src.get("pool", "") if kind == "volume" else "",
        "volume": src.get("volume", "") if kind == "volume" else "",
        "source": src.get("name", "") if kind == "network" else "",
        "format": driver.get("type", "raw") if driver is not None else "raw",
        "boot_order": _order(el),
        "capacity_bytes": 0,  # filled in from the volume by the driver
    }


def _foreign_nic(el: ET.Element) -> dict:
    source, mac, model, tag = el.find("source"), el.find("mac"), el.find("model"), el.find("vlan/tag")
    src = source.attrib if source is not None else {}
    kind = el.get("type", "")
    return {
        "type": kind,
        "source": src.get("network") if kind == "network" else src.get("bridge") or src.get("dev") or "",
        "mode": src.get("mode", "bridge") if kind == "direct" else "bridge",
        "mac": (mac.get("address", "") if mac is not None else "").lower(),
        "model": model.get("type", "") if model is not None else "",
        "vlan": int(tag.get("id", "")) if tag is not None and tag.get("id", "").isdigit() else None,
        "boot_order": _order(el),
    }


def foreign_domain(xml: str) -> dict:
    """The shape of a domain the portal did not define, from its XML, as plain JSON-ready data: name, uuid,
    domain type, vCPUs, memory, arch, machine type, firmware (bios/uefi, secure boot), boot devices (<os><boot>),
    graphics types, disks (target, bus, device, type, path or pool/volume, format, boot order), NICs (type,
    source, mode, MAC, model, VLAN, boot order), host devices and whether it carries the portal's metadata."""
    root = ET.fromstring(xml)
    os_el = root.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    loader = os_el.find("loader") if os_el is not None else None
    efi = os_el is not None and (
        os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash")
    )
    secure = (loader is not None and loader.get("secure") == "yes") or (
        os_el is not None and os_el.find("firmware/feature[@name='secure-boot'][@enabled='yes']") is not None
    )
    vcpu = (root.findtext("vcpu") or "").strip()
    return {
        "name": root.findtext("name") or "",
        "uuid": root.findtext("uuid") or "",
        "title": root.findtext("title") or "",
        "domain_type": root.get("type", ""),
        "vcpus": int(vcpu) if vcpu.isdigit() else 0,
        "memory_mib": _mib(root.find("memory")),
        "arch": type_el.get("arch", "") if type_el is not None else "",
        "machine_type": type_el.get("machine", "") if type_el is not None else "",
        "firmware": "uefi" if efi else "bios",
        "secure_boot": bool(efi and secure),
        "boot": [b.get("dev", "") for b in os_el.findall("boot")] if os_el is not None else [],
        "graphics": [g.get("type", "") for g in root.findall("devices/graphics")],
        "disks": [_foreign_disk(d) for d in root.findall("devices/disk")],
        "nics": [_foreign_nic(n) for n in root.findall("devices/interface")],
        "hostdevs": len(root.findall("devices/hostdev")),
        "marked": root.find(f"metadata/{{{PORTAL_METADATA_NS}}}machine") is not None,
    }


# --- snapshots -------------------------------------------------------------------------------


def snapshot_xml(
    *, name: str, description: str = "", memory: bool = False, overlays: dict[str, str] | None = None
) -> str:
    """A <domainsnapshot>: internal (overlays None; with the running domain's memory when `memory`), or external
    disk-only, each disk target in `overlays` getting a new qcow2 overlay at its path, the others left out."""
    root = ET.Element("domainsnapshot")
    _sub(root, "name", name)
    if description:
        _sub(root, "description", description)
    if overlays is None:
        _sub(root, "memory", snapshot="internal" if memory else "no")
        return ET.tostring(root, encoding="unicode")
    _sub(root, "memory", snapshot="no")
    disks = _sub(root, "disks")
    for target, path in sorted(overlays.items()):
        disk = _sub(disks, "disk", name=target, snapshot="external")
        _sub(disk, "driver", type="qcow2")
        _sub(disk, "source", file=path)
    return ET.tostring(root, encoding="unicode")


def parse_snapshot(xml: str) -> dict:
    """What the portal reads from a snapshot's XML: name, parent, description, kind, memory, state, created and,
    for an external one, its overlays (target -> file)."""
    root = ET.fromstring(xml)
    overlays = {
        d.get("name", ""): (d.find("source").get("file", "") if d.find("source") is not None else "")  # type: ignore[union-attr]
        for d in root.findall("disks/disk")
        if d.get("snapshot") == "external"
    }
    memory = root.find("memory")
    return {
        "name": root.findtext("name", default=""),
        "parent": root.findtext("parent/name", default=""),
        "description": root.findtext("description", default=""),
        "kind": "external" if overlays else "internal",
        "memory": memory is not None and memory.get("snapshot") in ("internal", "external"),
        "state": root.findtext("state", default=""),
        "created": int(root.findtext("creationTime", default="0") or 0),
        "overlays": overlays,
    }


def disk_targets(xml: str) -> dict[str, str]:
    """A domain's writable file disks: target (vda) -> the file it writes now (CD-ROMs and read-only disks left out)."""
    found = {}
    for disk in ET.fromstring(xml).findall("devices/disk[@device='disk']"):
        source, target = disk.find("source"), disk.find("target")
        if source is None or target is None or disk.find("readonly") is not None or not source.get("file"):
            continue
        found[target.get("dev", "")] = source.get("file", "")
    return found


def domain_size_of(xml: str) -> tuple[int, int, int, int]:
    """(vCPUs, most vCPUs, memory MiB, most memory MiB) a domain's XML says: <vcpu current=>max</vcpu>, then
    <currentMemory> (the balloon) and <memory>."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    most = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    current = int(vcpu.get("current", most)) if vcpu is not None else most
    memory = _mib(root.find("memory"))
    balloon = root.find("currentMemory")
    return current, most, _mib(balloon) if balloon is not None else memory, memory
