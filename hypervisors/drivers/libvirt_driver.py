"""The libvirt driver: HypervisorDriver on libvirt-python. With connections.py (the connections) and
serial_stream.py (the serial console's pump), the only modules in the portal that import libvirt.

Every libvirtError is turned into a HypervisorUnavailable (retry later) or HypervisorFatalError
(connections.translate); what a host offers is parsed in capabilities.py, XML is built in domxml.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import BinaryIO
from urllib.parse import urlsplit

import libvirt

from hypervisors.drivers.base import (
    PORTAL_METADATA_NS,
    DiskSpec,
    DomainCounters,
    DomainInfo,
    DomainInspected,
    DomainObserved,
    DomainSize,
    DomainSpec,
    HostCountersRead,
    HostInfo,
    HostObserved,
    HypervisorDriver,
    HypervisorFatalError,
    HypervisorUnavailable,
    MigrationAborted,
    MigrationProgress,
    MigrationResult,
    NetworkInfo,
    NicSpec,
    PoolInfo,
    PowerState,
    SnapshotInfo,
    VolumeInfo,
    remote_host,
)
from hypervisors.drivers.capabilities import parse_capabilities, parse_domain_capabilities
from hypervisors.drivers.connections import (
    CONNECT_TIMEOUT,
    abort_quietly,
    close_quietly,
    connect,
    drop_connection,
    take_connection,
    translate,
)
from hypervisors.drivers.domxml import (
    GUARD_PREFIX,
    HOT_PLUG_BUSES,
    VNC_EXPIRED_AT,
    VNC_TIME_FORMAT,
    agent_connected,
    build_domain_xml,
    cdrom_xml,
    disk_device_xml,
    disk_targets,
    domain_size_of,
    find_disk,
    find_nic,
    foreign_domain,
    free_disk_target,
    guard_name,
    merge_addresses,
    new_vnc_password,
    nic_device_xml,
    parse_node_device,
    parse_snapshot,
    parse_vnc,
    snapshot_xml,
    vnc_protected,
    volume_xml,
    with_boot_first,
    with_bridge_filters,
    with_vnc_password,
)
from hypervisors.drivers.migration_xml import copied_disks, retarget
from hypervisors.drivers.serial_stream import ConsoleBridge

log = logging.getLogger(__name__)

VNC_PASSWORD_VALID_FOR = 15.0  # seconds a console session's VNC password works (the proxy uses it at once)

# A live migration as the portal makes it: the worker holds both connections and drives the phases (managed,
# not peer-to-peer: no credentials between the hosts); the writable disks' own data copied over NBD while the
# guest runs (not their backing images, which the target holds); defined on the target, undefined on the source
# only once the target runs it; soft I/O errors abort it.
MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)  # change protection is implied (QEMU's migration protocol 3)
MIGRATION_POLL = 0.5  # seconds between looks at a migration's progress
MIGRATION_ABORT_WAIT = 60.0  # seconds libvirt gets to wind a migration down after an abort

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.OFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
}


def _version(number: int) -> str:
    major, rest = divmod(number, 1_000_000)
    minor, release = divmod(rest, 1_000)
    return f"{major}.{minor}.{release}"


def _interfaces(conn: libvirt.virConnect, addresses: dict[str, list[str]]) -> list[dict]:
    """The host's network interfaces and bridges, for NICs on a bridge or macvtap: name, type, whether
    up, MAC (a host bridge's guard drops frames to it) and, where known, the IPv4 addresses on it."""
    try:
        found = conn.listAllInterfaces(0)
    except libvirt.libvirtError:
        return []  # drivers without an interface backend
    result = []
    for iface in found:
        try:
            kind = ET.fromstring(iface.XMLDesc(0)).get("type", "")
            # MACString, not the XML: the udev backend leaves a bridge's MAC out of its XML.
            result.append(
                {
                    "name": iface.name(),
                    "type": kind,
                    "active": bool(iface.isActive()),
                    "mac": iface.MACString() or "",
                    "addresses": addresses.get(iface.name(), []),
                }
            )
        except libvirt.libvirtError:
            continue
    return sorted(result, key=lambda i: i["name"])


def local_addresses(uri: str) -> dict[str, list[str]]:
    """The IPv4 and IPv6 addresses of each interface, read on this machine, when `uri` is a libvirtd on this very
    machine (base.remote_host: no host of another machine; and no socket, which may be another namespace's): libvirt's udev interface backend reports no
    addresses, and a remote host's are for its own transport to find (empty here)."""
    if remote_host(uri) or urlsplit(uri).query:  # another machine, or a socket that may be another namespace's
        return {}
    try:
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
    return {link["ifname"]: [a["local"] for a in link.get("addr_info", []) if a.get("local")] for link in links}


def _devices(conn: libvirt.virConnect) -> list[dict]:
    """PCI and USB devices of the host, for passthrough."""
    try:
        found = conn.listAllDevices(0)
    except libvirt.libvirtError:
        return []
    devices = []
    for dev in found:
        try:
            parsed = parse_node_device(dev.XMLDesc(0))
        except libvirt.libvirtError:
            continue
        if parsed:
            devices.append(parsed)
    return sorted(devices, key=lambda d: d["name"])


def _pool_info(pool: libvirt.virStoragePool) -> PoolInfo:
    _state, capacity, allocation, available = pool.info()
    root = ET.fromstring(pool.XMLDesc(0))
    return PoolInfo(
        name=pool.name(),
        active=bool(pool.isActive()),
        type=root.get("type", ""),
        path=root.findtext("target/path", default=""),
        capacity_bytes=capacity,
        allocation_bytes=allocation,
        available_bytes=available,
    )


def _guards(conn: libvirt.virConnect) -> set[str]:
    """Names of the portal's traffic filters on the host (none where libvirt has no nwfilter driver)."""
    try:
        return {f.name() for f in conn.listAllNWFilters(0) if f.name().startswith(GUARD_PREFIX)}
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return set()
        raise


def _network_info(net: libvirt.virNetwork, guards: set[str]) -> NetworkInfo:
    root = ET.fromstring(net.XMLDesc(0))
    forward = root.find("forward")
    mode = "isolated" if forward is None else forward.get("mode", "nat")
    bridge = root.find("bridge")
    return NetworkInfo(
        name=net.name(),
        active=bool(net.isActive()),
        forward_mode=mode,
        bridge="" if bridge is None else bridge.get("name", ""),
        guard=guard_name(net.name()) if guard_name(net.name()) in guards else "",
    )


def _is_managed(dom: libvirt.virDomain) -> bool:
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, PORTAL_METADATA_NS, 0)
    except libvirt.libvirtError:
        return False
    return True


def _domain_info(dom: libvirt.virDomain, *, shape: bool = False) -> DomainInfo:
    state = dom.state()[0]
    managed = _is_managed(dom)
    return DomainInfo(
        uuid=dom.UUIDString(),
        name=dom.name(),
        state=_STATES.get(state, PowerState.UNKNOWN),
        managed=managed,
        shape=_shape_or_none(dom) if shape and not managed else None,
    )


def _shape_or_none(dom: libvirt.virDomain) -> dict | None:
    """A sync's look at a foreign domain: one undefined meanwhile, or that libvirt cannot describe, is left
    without a shape (it cannot be adopted until a later sync reads it) rather than failing the whole sync."""
    try:
        return _shape(dom)
    except libvirt.libvirtError as e:
        if isinstance(translate(e), HypervisorUnavailable):
            raise
        log.info("domain %s: no shape: %s", dom.name(), e.get_error_message())
        return None


def _copy_volume_bytes(conn: libvirt.virConnect, source: libvirt.virStorageVol, target: libvirt.virStorageVol) -> None:
    """The bytes of `source`'s file written into `target`'s, a MiB at a time through two streams."""
    down, up = conn.newStream(0), conn.newStream(0)
    try:
        source.download(down, 0, 0, 0)
        target.upload(up, 0, 0, 0)
        while data := down.recv(1 << 20):  # a blocking stream: b"" at its end
            while data:
                sent = up.send(data)
                data = data[sent:]
        down.finish()
        up.finish()
    except BaseException:
        abort_quietly(down)
        abort_quietly(up)
        raise


def _volume_by_path(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol | None:
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _shape(dom: libvirt.virDomain) -> dict:
    """domain_shape of a domain: its persistent XML read, each disk's file looked up as a volume of a pool."""
    conn = dom.connect()
    shape = foreign_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    shape["persistent"] = bool(dom.isPersistent())
    shape["autostart"] = bool(dom.autostart())
    for disk in shape["disks"]:
        vol = None
        if disk["type"] == "file" and disk["path"]:
            vol = _volume_by_path(conn, disk["path"])
        elif disk["type"] == "volume" and disk["pool"]:
            try:
                vol = conn.storagePoolLookupByName(disk["pool"]).storageVolLookupByName(disk["volume"])
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                    raise
        if vol is not None:  # a volume of a pool (an inactive pool's volumes are not found: no pool)
            disk["pool"], disk["volume"] = vol.storagePoolLookupByVolume().name(), vol.name()
            disk["path"], disk["capacity_bytes"] = vol.path(), vol.info()[1]
        else:
            disk["pool"] = ""
    return shape


# What the reconcile's bulk read asks of every domain, in its one getAllDomainStats call.
_OBSERVED_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_BLOCK
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
)


def _summed(stats: dict, group: str, key: str) -> int | None:
    """A counter summed over a group's entries (block.<n>.rd.bytes, net.<n>.rx.bytes); None when none tells it."""
    values = [stats.get(f"{group}.{n}.{key}") for n in range(int(stats.get(f"{group}.count", 0) or 0))]
    told = [int(v) for v in values if v is not None]
    return sum(told) if told else None


def _int(value) -> int | None:
    return None if value is None else int(value)


def _domain_counters(stats: dict) -> DomainCounters | None:
    """A running domain's counters from its getAllDomainStats record; None when it has none of them (the
    test driver)."""
    counters = DomainCounters(
        cpu_time_ns=_int(stats.get("cpu.time")),
        vcpus=_int(stats.get("vcpu.current")),
        memory_current_kib=_int(stats.get("balloon.current")),
        memory_available_kib=_int(stats.get("balloon.available")),
        memory_unused_kib=_int(stats.get("balloon.unused")),
        memory_rss_kib=_int(stats.get("balloon.rss")),
        disk_read_bytes=_summed(stats, "block", "rd.bytes"),
        disk_write_bytes=_summed(stats, "block", "wr.bytes"),
        disk_read_reqs=_summed(stats, "block", "rd.reqs"),
        disk_write_reqs=_summed(stats, "block", "wr.reqs"),
        net_rx_bytes=_summed(stats, "net", "rx.bytes"),
        net_tx_bytes=_summed(stats, "net", "tx.bytes"),
    )
    return None if counters == DomainCounters() else counters


def _unsupported(e: libvirt.libvirtError) -> bool:
    """A call the driver does not have (the test driver's node memory): not an unreachable host."""
    return not isinstance(translate(e), HypervisorUnavailable)


def _host_counters(conn: libvirt.virConnect) -> HostCountersRead | None:
    """The host's CPU times and memory, three calls; what the driver does not tell stays None."""
    cpus = cpu = memory = None
    try:
        cpus = int(conn.getInfo()[2])
    except libvirt.libvirtError as e:
        if not _unsupported(e):
            raise
    try:
        cpu = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
    except libvirt.libvirtError as e:
        if not _unsupported(e):
            raise
    try:
        memory = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except libvirt.libvirtError as e:
        if not _unsupported(e):
            raise
    cpu, memory = cpu or {}, memory or {}
    busy = [cpu[k] for k in ("kernel", "user") if k in cpu]
    idle = [cpu[k] for k in ("idle", "iowait") if k in cpu]
    counters = HostCountersRead(
        cpus=cpus,
        cpu_busy_ns=int(sum(busy)) if busy else None,
        cpu_idle_ns=int(sum(idle)) if idle else None,
        memory_total_kib=_int(memory.get("total")),
        memory_free_kib=_int(memory.get("free")),
        memory_buffers_kib=_int(memory.get("buffers")),
        memory_cached_kib=_int(memory.get("cached")),
    )
    return None if counters == HostCountersRead() else counters


class LibvirtDriver(HypervisorDriver):
    """One hypervisor reached by a libvirt URI. Local and remote alike."""

    def __init__(self, uri: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(uri)
        self.connect_timeout = connect_timeout

    @property
    def conn(self) -> libvirt.virConnect:
        return connect(self.uri, self.connect_timeout)

    def _call(self, fn, *args):
        """Run fn(conn, *args), translating libvirt errors; drop a broken connection."""
        try:
            return fn(self.conn, *args)
        except libvirt.libvirtError as e:
            err = translate(e)
            if isinstance(err, HypervisorUnavailable):
                drop_connection(self.uri)
            raise err from None

    def host_info(self) -> HostInfo:
        addresses = local_addresses(self.uri)
        return self._call(lambda conn: self._host_info(conn, addresses))

    @staticmethod
    def _host_info(conn: libvirt.virConnect, addresses: dict[str, list[str]]) -> HostInfo:
        caps = parse_capabilities(conn.getCapabilities())
        _model, memory_mib, cpus, *_ = conn.getInfo()
        try:
            domcaps = parse_domain_capabilities(
                conn.getDomainCapabilities(None, caps["arch"], None, caps["domain_type"], 0)
            )
        except libvirt.libvirtError:
            domcaps = {
                "cpu_modes": [],
                "cpu_models": [],
                "firmwares": [],
            }  # drivers without domain capabilities (test://)
        try:
            hypervisor_version = _version(conn.getVersion())
        except libvirt.libvirtError:
            hypervisor_version = ""
        guards = _guards(conn)
        return HostInfo(
            hostname=conn.getHostname(),
            arch=caps["arch"],
            cpus=cpus,
            memory_mib=memory_mib,
            cpu_model=caps["cpu_model"],
            libvirt_version=_version(conn.getLibVersion()),
            hypervisor_version=hypervisor_version,
            domain_type=caps["domain_type"],
            domain_types=caps["domain_types"],
            guest_arches=caps["guest_arches"],
            machine_types=caps["machine_types"],
            cpu_modes=domcaps["cpu_modes"],
            cpu_models=domcaps["cpu_models"],
            firmwares=domcaps["firmwares"],
            interfaces=_interfaces(conn, addresses),
            devices=_devices(conn),
            pools=sorted((_pool_info(p) for p in conn.listAllStoragePools(0)), key=lambda p: p.name),
            networks=sorted((_network_info(n, guards) for n in conn.listAllNetworks(0)), key=lambda n: n.name),
            domains=sorted((_domain_info(d, shape=True) for d in conn.listAllDomains(0)), key=lambda d: d.name),
        )

    def list_domains(self) -> list[DomainInfo]:
        return self._call(lambda conn: [_domain_info(d) for d in conn.listAllDomains(0)])

    # --- storage -----------------------------------------------------------------

    @staticmethod
    def _pool(conn: libvirt.virConnect, pool: str) -> libvirt.virStoragePool:
        try:
            p = conn.storagePoolLookupByName(pool)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise HypervisorFatalError(f"storage pool {pool!r} does not exist on this hypervisor") from None
            raise
        if not p.isActive():
            raise HypervisorFatalError(f"storage pool {pool!r} is not active")
        return p

    @staticmethod
    def _vol(p: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        try:
            return p.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    @staticmethod
    def _vol_info(vol: libvirt.virStorageVol) -> VolumeInfo:
        root = ET.fromstring(vol.XMLDesc(0))
        fmt = root.find("target/format")
        return VolumeInfo(
            name=vol.name(),
            path=vol.path(),
            format="" if fmt is None else fmt.get("type", ""),
            capacity_bytes=int(root.findtext("capacity", default="0")),
            allocation_bytes=int(root.findtext("allocation", default="0")),
            backing_path=root.findtext("backingStore/path", default=""),
        )

    def pool_path(self, pool: str) -> str:
        def run(conn):
            return ET.fromstring(self._pool(conn, pool).XMLDesc(0)).findtext("target/path", default="")

        return self._call(run)

    def volume_info(self, *, pool: str, name: str) -> VolumeInfo | None:
        """The volume, or None if absent."""

        def run(conn):
            vol = self._vol(self._pool(conn, pool), name)
            return None if vol is None else self._vol_info(vol)

        return self._call(run)

    def create_volume(
        self, *, pool: str, name: str, fmt: str, capacity_bytes: int, backing_path: str = "", backing_format: str = ""
    ) -> VolumeInfo:
        """Create the volume unless it exists (then return the existing one)."""

        def run(conn):
            p = self._pool(conn, pool)
            vol = self._vol(p, name)
            if vol is None:
                xml = volume_xml(
                    name=name,
                    capacity_bytes=capacity_bytes,
                    fmt=fmt,
                    backing_path=backing_path,
                    backing_format=backing_format,
                )
                vol = p.createXML(xml, 0)
            return self._vol_info(vol)

        return self._call(run)

    def upload_volume(self, *, pool: str, name: str, source: BinaryIO, length: int) -> None:
        """Write `length` bytes from `source` into an existing volume through a libvirt stream."""

        def run(conn):
            vol = self._vol(self._pool(conn, pool), name)
            if vol is None:
                raise HypervisorFatalError(f"volume {name!r} vanished before upload")
            stream = conn.newStream(0)
            try:
                vol.upload(stream, 0, length, 0)
                stream.sendAll(lambda _s, nbytes, fh: fh.read(nbytes), source)
                stream.finish()
            except BaseException:
                abort_quietly(stream)
                raise

        self._call(run)

    def download_volume(
        self, *, pool: str, name: str, sink: Callable[[bytes], None], offset: int = 0, length: int = 0
    ) -> None:
        """Stream a volume's bytes (length 0: to its end) to sink()."""

        def run(conn):
            vol = self._vol(self._pool(conn, pool), name)
            if vol is None:
                raise HypervisorFatalError(f"volume {name!r} does not exist")
            stream = conn.newStream(0)
            try:
                vol.download(stream, offset, length, 0)

                def receive(_s, data: bytes, _opaque) -> int:
                    sink(data)
                    return len(data)

                stream.recvAll(receive, None)
                stream.finish()
            except BaseException:
                abort_quietly(stream)
                raise

        self._call(run)

    def delete_volume(self, *, pool: str, name: str) -> bool:
        """Delete the volume; no-op (False) if absent."""

        def run(conn):
            vol = self._vol(self._pool(conn, pool), name)
            if vol is None:
                return False
            vol.delete(0)
            return True

        return self._call(run)

    def clone_volume(
        self, *, pool: str, name: str, new_name: str, backing_path: str = "", backing_format: str = ""
    ) -> VolumeInfo:
        def run(conn):
            p = self._pool(conn, pool)
            there = self._vol(p, new_name)
            if there is not None:
                return self._vol_info(there)
            source = self._vol(p, name)
            if source is None:
                raise HypervisorFatalError(f"volume {name!r} does not exist in pool {pool!r}")
            info = self._vol_info(source)
            if backing_path and backing_path != info.backing_path:
                raise HypervisorFatalError(
                    f"volume {name!r} stands on {info.backing_path or 'no backing file'}, not {backing_path}"
                )
            if not backing_path:
                xml = volume_xml(name=new_name, capacity_bytes=info.capacity_bytes, fmt=info.format or "qcow2")
                return self._vol_info(p.createXMLFrom(xml, source, 0))  # qemu-img convert: the chain flattened
            # The volume's own layer only: its qcow2 file copied as it is (its header names the same backing file),
            # stream to stream on this connection. (createXMLFrom with a backing store copies the whole chain.)
            xml = volume_xml(
                name=new_name,
                capacity_bytes=info.capacity_bytes,
                fmt="qcow2",
                backing_path=backing_path,
                backing_format=backing_format or "qcow2",
            )
            copy = p.createXML(xml, 0)
            try:
                _copy_volume_bytes(conn, source, copy)
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    copy.delete(0)
                raise
            return self._vol_info(copy)

        return self._call(run)

    def resize_volume(self, *, pool: str, name: str, capacity_bytes: int) -> None:
        """Grow a volume; never shrinks."""

        def run(conn):
            vol = self._vol(self._pool(conn, pool), name)
            if vol is None:
                raise HypervisorFatalError(f"volume {name!r} does not exist")
            if self._vol_info(vol).capacity_bytes < capacity_bytes:
                vol.resize(capacity_bytes, 0)

        self._call(run)

    def refresh_pool(self, pool: str) -> None:
        self._call(lambda conn: self._pool(conn, pool).refresh(0))

    def volume_names(self, pool: str) -> list[str]:
        return self._call(lambda conn: sorted(self._pool(conn, pool).listVolumes()))

    # --- domains -----------------------------------------------------------------

    @staticmethod
    def _dom(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
        try:
            return conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _with_dom(self, uuid: str, fn):
        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
            return fn(dom)

        return self._call(run)

    def define_domain(self, spec: DomainSpec) -> bool:
        """Define the domain unless one with spec.uuid exists. True if it was defined now."""

        def run(conn):
            if self._dom(conn, spec.uuid) is not None:
                return False
            conn.defineXML(build_domain_xml(spec))
            return True

        return self._call(run)

    def domain_state(self, uuid: str) -> PowerState | None:
        """The power state, or None if the domain does not exist."""

        def run(conn):
            dom = self._dom(conn, uuid)
            return None if dom is None else _STATES.get(dom.state()[0], PowerState.UNKNOWN)

        return self._call(run)

    def domain_states(self) -> dict[str, PowerState]:
        """uuid -> power state of every domain on the hypervisor."""
        return self._call(
            lambda conn: {d.UUIDString(): _STATES.get(d.state()[0], PowerState.UNKNOWN) for d in conn.listAllDomains(0)}
        )

    def domains_observed(self) -> HostObserved:
        """State, run (domain id) and counters (CPU time, vCPUs, balloon, disks, NICs) of every domain from one
        getAllDomainStats, the host's CPU and memory counters, and the DHCP leases of the active networks:
        5 + (networks) calls however many domains there are."""

        def run(conn):
            domains = {}
            for dom, stats in conn.getAllDomainStats(_OBSERVED_STATS):
                state = _STATES.get(stats.get("state.state", -1), PowerState.UNKNOWN)
                counters = _domain_counters(stats) if state == PowerState.RUNNING else None
                domains[dom.UUIDString()] = DomainObserved(state=state, run=dom.ID(), counters=counters)
            return HostObserved(domains=domains, leases=self._leases(conn), counters=_host_counters(conn))

        return self._call(run)

    @staticmethod
    def _leases(conn: libvirt.virConnect) -> dict[str, list[str]]:
        """MAC -> addresses from the DHCP leases of every active network (none where the driver has none)."""
        report: dict[str, dict] = {}
        for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
            try:
                leases = net.DHCPLeases()
            except libvirt.libvirtError as e:
                if isinstance(translate(e), HypervisorUnavailable):
                    raise
                continue  # e.g. the test driver: not supported
            for i, lease in enumerate(leases or []):
                mac = (lease.get("mac") or "").lower()
                entry = {"addr": lease.get("ipaddr", ""), "prefix": lease.get("prefix") or 0}
                report[f"{net.name()}-{i}"] = {"hwaddr": mac, "addrs": [entry]}
        return merge_addresses(report)

    def domain_inspect(self, uuid: str, *, leases: dict[str, list[str]] | None = None) -> DomainInspected | None:
        """One lookup and the live XML (read with VIR_DOMAIN_XML_SECURE, for the VNC password and whether the
        guest agent is connected); then the guest agent when it is, and the ARP table. The leases come from
        `leases` when given (domains_observed read them for all domains), else from the domain's own call.
        A domain without NICs costs no address call."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                return None
            if dom.ID() < 0:  # not running (the id comes with the lookup: no call)
                return DomainInspected(console_unprotected=False, addresses={})
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            macs = [m.get("address", "").lower() for m in ET.fromstring(xml).findall("devices/interface/mac")]
            return DomainInspected(
                console_unprotected=not vnc_protected(xml), addresses=self._inspect_addresses(dom, xml, macs, leases)
            )

        return self._call(run)

    @staticmethod
    def _inspect_addresses(
        dom: libvirt.virDomain, xml: str, macs: list[str], leases: dict[str, list[str]] | None
    ) -> dict[str, list[str]]:
        if not macs:
            return {}
        reports: list[dict] = []
        sources = []
        if leases is None:
            sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
        else:
            reports.append(
                {
                    f"lease-{mac}": {
                        "hwaddr": mac,
                        "addrs": [{"addr": a.split("/")[0], "prefix": int(a.partition("/")[2] or 0)} for a in found],
                    }
                    for mac in macs
                    if (found := leases.get(mac))
                }
            )
        if agent_connected(xml):
            sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
        sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)
        for source in sources:
            try:
                reports.append(dom.interfaceAddresses(source, 0) or {})
            except libvirt.libvirtError as e:
                if isinstance(translate(e), HypervisorUnavailable):
                    raise
                log.debug("addresses of %s from source %s: %s", dom.UUIDString(), source, e)  # e.g. no lease file
        return merge_addresses(*reports)

    def domain_xml(self, uuid: str, *, inactive: bool = False, secure: bool = False) -> str:
        """The domain's XML; `secure` includes secrets such as the VNC password (never show or log it)."""
        flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
        return self._with_dom(uuid, lambda dom: dom.XMLDesc(flags))

    def domain_shape(self, uuid: str) -> dict | None:
        """The domain's persistent shape with its disks' pools and volumes; None if absent."""

        def run(conn):
            dom = self._dom(conn, uuid)
            return None if dom is None else _shape(dom)

        return self._call(run)

    def domain_mark(self, uuid: str, attributes: dict[str, str]) -> bool:
        """Set the portal's metadata element (persistent, and live while running); False if it is there already."""
        element = ET.Element(f"{{{PORTAL_METADATA_NS}}}machine", {k: str(v) for k, v in attributes.items()})

        def run(dom: libvirt.virDomain) -> bool:
            try:
                have = dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, PORTAL_METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG
                )
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    raise
                have = ""
            if have and dict(ET.fromstring(have).attrib) == dict(element.attrib):
                return False
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
            # libvirt wants the element without its namespace declaration: it adds the one given with its key
            body = ET.tostring(ET.Element("machine", dict(element.attrib)), encoding="unicode")
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, body, "portal", PORTAL_METADATA_NS, flags)
            log.info("domain %s: the portal's metadata set (%s)", dom.UUIDString(), ", ".join(sorted(attributes)))
            return True

        return self._with_dom(uuid, run)

    def _cold_start(self, dom: libvirt.virDomain) -> None:
        """Start a domain that is off; one defined before the portal set VNC passwords gets one first."""
        self._vnc_protect(dom)
        dom.create()

    def start(self, uuid: str) -> None:
        """Start the domain; no-op if it runs."""
        self._with_dom(uuid, lambda dom: None if dom.isActive() else self._cold_start(dom))

    def shutdown(self, uuid: str) -> None:
        """Ask the guest to shut down (ACPI); no-op if off."""
        self._with_dom(uuid, lambda dom: dom.shutdown() if dom.isActive() else None)

    def power_off(self, uuid: str) -> None:
        """Pull the plug; no-op if off."""
        self._with_dom(uuid, lambda dom: dom.destroy() if dom.isActive() else None)

    def reboot(self, uuid: str) -> None:
        """Ask the guest to reboot (ACPI)."""
        self._with_dom(uuid, lambda dom: dom.reboot(0) if dom.isActive() else self._cold_start(dom))

    def reset(self, uuid: str) -> None:
        """Press the reset button."""
        self._with_dom(uuid, lambda dom: dom.reset(0) if dom.isActive() else self._cold_start(dom))

    def set_autostart(self, uuid: str, enabled: bool) -> None:
        self._with_dom(uuid, lambda dom: dom.setAutostart(1 if enabled else 0))

    def block_resize(self, uuid: str, *, path: str, capacity_bytes: int) -> None:
        """Grow a disk of a running domain so the guest sees the new size at once."""
        self._with_dom(uuid, lambda dom: dom.blockResize(path, capacity_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES))

    def domain_size(self, uuid: str) -> DomainSize:
        """vCPUs and memory from the domain's XML: the persistent config's and, when it runs, the live one's."""

        def read(dom):
            config = domain_size_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            running = bool(dom.isActive())
            live = domain_size_of(dom.XMLDesc(0)) if running else (0, 0, 0, 0)
            return DomainSize(running, *config, *live)

        return self._with_dom(uuid, read)

    def set_vcpus(self, uuid: str, count: int, *, maximum: int, live: bool) -> None:
        """The running domain first (hot-plugged vCPUs, within its maximum), then the config (setVcpusFlags with
        VCPU_MAXIMUM raises or lowers the most it boots with: raised before the count, lowered after)."""
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        maximum = max(maximum, count)

        def apply(dom):
            if live:
                _, live_max, _, _ = domain_size_of(dom.XMLDesc(0))
                if not dom.isActive() or count > live_max:
                    raise HypervisorFatalError(f"the running domain takes at most {live_max} vCPUs without a restart")
                dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            _, most, _, _ = domain_size_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if maximum > most:
                dom.setVcpusFlags(maximum, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
            dom.setVcpusFlags(count, config)
            if maximum < most:
                dom.setVcpusFlags(maximum, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)

        self._with_dom(uuid, apply)

    def set_memory(self, uuid: str, memory_mib: int, *, maximum: int, live: bool) -> None:
        """The running domain's balloon first (within its <memory>), then the config's <memory> (MEM_MAXIMUM;
        lowering it lowers the balloon with it) and <currentMemory>."""
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        maximum = max(maximum, memory_mib)

        def apply(dom):
            if live:
                _, _, _, live_max = domain_size_of(dom.XMLDesc(0))
                if not dom.isActive() or memory_mib > live_max:
                    raise HypervisorFatalError(f"the running domain takes at most {live_max} MiB without a restart")
                dom.setMemoryFlags(memory_mib << 10, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            _, _, _, most = domain_size_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if maximum != most:
                dom.setMemoryFlags(maximum << 10, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
            dom.setMemoryFlags(memory_mib << 10, config)

        self._with_dom(uuid, apply)

    def rename_domain(self, uuid: str, name: str, *, title: str = "") -> bool:
        """virDomainRename, which libvirt allows only on an inactive domain (and, on QEMU, one without
        snapshots); then the title."""

        def apply(dom):
            if dom.isActive():
                raise HypervisorFatalError(f"domain {dom.name()} is running: libvirt renames only shut-off domains")
            renamed = dom.name() != name
            if renamed:
                dom.rename(name, 0)
            if title:
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, title, None, None, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return renamed

        return self._with_dom(uuid, apply)

    def undefine(self, uuid: str) -> bool:
        """Stop and undefine the domain; no-op (False) if absent. Storage is left to the caller."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                return False
            if dom.isActive():
                dom.destroy()
            flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            try:
                dom.undefineFlags(flags | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                dom.undefineFlags(flags)  # drivers without NVRAM support refuse the flag
            return True

        return self._call(run)

    def define_network(self, xml: str) -> bool:
        """Define, start and autostart a network unless one of that name exists. True if made now."""

        def run(conn):
            name = ET.fromstring(xml).findtext("name")
            try:
                conn.networkLookupByName(name)
                return False
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise
            net = conn.networkDefineXML(xml)
            try:
                net.create()
                net.setAutostart(1)
            except libvirt.libvirtError:
                net.undefine()  # do not leave a half-made network behind
                raise
            return True

        return self._call(run)

    def define_guard(self, xml: str) -> None:
        """Define (or update in place) a portal traffic filter; NICs that use it get the change live."""

        def define(conn):
            root = ET.fromstring(xml)
            try:
                existing = conn.nwfilterLookupByName(root.get("name"))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                    raise
            else:
                # libvirt refuses a filter of an existing name under another UUID, and XML without one gets a
                # random UUID: an update must carry the existing filter's.
                if root.find("uuid") is None:
                    ET.SubElement(root, "uuid").text = existing.UUIDString()
            conn.nwfilterDefineXML(ET.tostring(root, encoding="unicode"))

        def run(conn):
            try:
                define(conn)
            except libvirt.libvirtError as e:
                if "already exists" not in str(e):
                    raise
                define(conn)  # another worker defined it meanwhile (two machines on one bridge): now an update

        self._call(run)

    def remove_guard(self, name: str) -> bool:
        """Undefine the traffic filter `name` (a network's guard_name, a host bridge's host_guard_name); no-op
        (False) if absent, or while a running domain still uses it."""

        def run(conn):
            try:
                conn.nwfilterLookupByName(name).undefine()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER:
                    return False
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and "in use" in str(e):
                    return False  # a running domain's NIC still names it: it stays
                raise
            return True

        return self._call(run)

    def remove_network(self, name: str) -> bool:
        """Stop and undefine a network; no-op (False) if absent."""

        def run(conn):
            try:
                net = conn.networkLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                    return False
                raise
            if net.isActive():
                net.destroy()
            net.undefine()
            return True

        return self._call(run)

    def change_media(self, uuid: str, *, target: str, path: str) -> None:
        """Insert `path` into the CD-ROM `target`, or eject it when path is empty; live and persistent."""

        def apply(dom):
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.updateDeviceFlags(cdrom_xml(target=target, path=path), flags)

        self._with_dom(uuid, apply)

    # Devices after create: the persistent config always, the running guest too when it runs. A live detach is a
    # request the guest answers (ACPI hot-unplug): it is done when the device leaves the live XML.
    DETACH_WAIT = 15.0  # seconds a guest is given to let a device go

    def attach_disk(self, uuid: str, disk: DiskSpec) -> str:
        def apply(dom):
            config = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            if disk.path and (have := find_disk(config, path=disk.path)):
                return ET.fromstring(have).find("target").get("dev", "")  # type: ignore[union-attr]
            live = bool(dom.isActive())
            if live and (disk.device != "disk" or disk.bus not in HOT_PLUG_BUSES):
                raise HypervisorFatalError(
                    f"a {disk.bus} {disk.device} cannot be added to a running domain; shut it down first"
                )
            try:
                target = free_disk_target(dom.XMLDesc(0) if live else config, disk.bus)
            except ValueError as e:
                raise HypervisorFatalError(str(e)) from None
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
            dom.attachDeviceFlags(disk_device_xml(disk, target), flags)
            return target

        return self._with_dom(uuid, apply)

    def _detach(self, dom, find) -> bool:
        """Detach what find(xml) picks: live first (waiting until it is gone), then from the config."""
        found = False
        if dom.isActive() and (live_xml := find(dom.XMLDesc(0))):
            found = True
            dom.detachDeviceFlags(live_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + self.DETACH_WAIT
            while find(dom.XMLDesc(0)):
                if time.monotonic() > deadline:
                    raise HypervisorFatalError(
                        f"the guest did not let the device go within {self.DETACH_WAIT:.0f} s (does it handle "
                        "hot-unplug?); try again, or shut it down first"
                    )
                time.sleep(0.2)
        if config_xml := find(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            found = True
            dom.detachDeviceFlags(config_xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return found

    def detach_disk(self, uuid: str, *, target: str = "", path: str = "") -> bool:
        return self._with_dom(uuid, lambda dom: self._detach(dom, lambda xml: find_disk(xml, target=target, path=path)))

    def attach_nic(self, uuid: str, nic: NicSpec) -> bool:
        def apply(dom):
            if find_nic(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), nic.mac):
                return False
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
            dom.attachDeviceFlags(nic_device_xml(nic), flags)
            return True

        return self._with_dom(uuid, apply)

    def detach_nic(self, uuid: str, *, mac: str) -> bool:
        return self._with_dom(uuid, lambda dom: self._detach(dom, lambda xml: find_nic(xml, mac)))

    def boot_once(self, uuid: str, *, target: str) -> None:
        """Cold-start the domain from disk `target` once; later starts use the usual order again."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
            self._vnc_protect(dom)  # a cold start: one without a VNC password gets one (SECURE keeps it below)
            original = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            conn.defineXML(with_boot_first(original, target))
            try:
                if dom.isActive():
                    dom.destroy()
                dom.create()
            finally:
                conn.defineXML(original)  # the running instance keeps the order it started with

        self._call(run)

    def vnc_address(self, uuid: str) -> tuple[str, int] | None:
        """Where the running domain's VNC server listens now, or None (off, or no VNC)."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None or not dom.isActive():
                return None
            return parse_vnc(dom.XMLDesc(0))

        return self._call(run)

    def vnc_open(self, uuid: str, *, valid_for: float = VNC_PASSWORD_VALID_FOR) -> tuple[str, int, str] | None:
        """Give the running domain's VNC server a fresh random password, valid for `valid_for` seconds, and
        return (host, port, password); None when off or without VNC. The previous password stops working at
        once; sessions already authenticated go on. A domain whose VNC server has no password (defined before
        the portal set them; QEMU cannot add one live) gives an empty password."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None or not dom.isActive():
                return None
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
            address = parse_vnc(xml)
            if address is None:
                return None
            if not vnc_protected(xml):
                return (*address, "")
            password = new_vnc_password()
            valid_to = (datetime.now(UTC) + timedelta(seconds=valid_for)).strftime(VNC_TIME_FORMAT)
            dom.updateDeviceFlags(with_vnc_password(xml, password, valid_to), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return (*address, password)

        return self._call(run)

    def vnc_protect(self, uuid: str) -> bool:
        """Give the domain's persistent config a VNC password (expired: the console proxy sets its own) if it
        has none, so the next cold start asks for one. True if it was added now; a running VNC server keeps
        what it started with until then. No-op (False) when it has one already, or no VNC."""
        return self._with_dom(uuid, self._vnc_protect)

    @staticmethod
    def _vnc_protect(dom: libvirt.virDomain) -> bool:
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        if vnc_protected(xml):
            return False
        password = new_vnc_password()
        try:
            dom.updateDeviceFlags(with_vnc_password(xml, password, VNC_EXPIRED_AT), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                raise
            # Drivers that cannot update a device (test://): redefine, from the XML read with SECURE.
            dom.connect().defineXML(with_vnc_password(xml, password, VNC_EXPIRED_AT, whole=True))
        log.info("domain %s: VNC password added to its persistent config", dom.UUIDString())
        return True

    def filter_bridge_nics(self, uuid: str, filters: dict[str, str]) -> bool:
        """Make the domain's persistent config name `filters` (host bridge -> nwfilter) on its NICs on those
        bridges, for domains defined before they had one; True if it was redefined. Read and written with
        VIR_DOMAIN_XML_SECURE, so the VNC password stays. A running domain keeps its NICs until it restarts."""

        def run(dom: libvirt.virDomain) -> bool:
            xml = with_bridge_filters(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE), filters
            )
            if xml is None:
                return False
            dom.connect().defineXML(xml)
            log.info("domain %s: host guard added to its NICs on %s", dom.UUIDString(), ", ".join(sorted(filters)))
            return True

        return self._with_dom(uuid, run)

    def vnc_unprotected(self) -> set[str]:
        """UUIDs of the running domains whose VNC server accepts clients without a password."""

        def run(conn):
            found = set()
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    if not vnc_protected(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)):
                        found.add(dom.UUIDString())
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # stopped or undefined meanwhile
                        raise
            return found

        return self._call(run)

    def serial_console(self, uuid: str, *, take_over: bool = False) -> socket.socket:
        """A socket joined to the running domain's serial console, until either end closes. It has its own
        connection to the hypervisor (with keepalive), closed with it. libvirt gives a console to one client
        at a time: a second one (another tab, `virsh console`) is refused with HypervisorFatalError, unless
        `take_over`, which disconnects the one that has it."""
        conn = take_connection(self.uri, self.connect_timeout)  # the stream's callbacks run on the event loop too
        stream = None
        try:
            dom = self._dom(conn, uuid)
            if dom is None or not dom.isActive():
                raise HypervisorFatalError("the machine is not running")
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if take_over else 0)
            ours, theirs = socket.socketpair()
            ConsoleBridge(conn, stream, ours).start()
        except BaseException as e:
            if stream is not None:
                abort_quietly(stream)
            close_quietly(conn)
            if isinstance(e, libvirt.libvirtError):
                raise translate(e) from None
            raise
        return theirs

    def domain_addresses(self, uuid: str) -> dict[str, list[str]]:
        """MAC -> addresses the running guest has, as far as the hypervisor can tell: the DHCP leases of
        libvirt networks, the guest agent when one answers, and the host's ARP table (guests the host
        talks to; not macvtap ones, which the host itself cannot reach). Empty when off."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None or not dom.isActive():
                return {}
            sources = [libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE]
            if agent_connected(dom.XMLDesc(0)):
                sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
            sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)
            reports = []
            for source in sources:
                try:
                    reports.append(dom.interfaceAddresses(source, 0) or {})
                except libvirt.libvirtError as e:
                    if not conn.isAlive():
                        raise
                    log.debug("addresses of %s from source %s: %s", uuid, source, e)  # e.g. no lease file
            return merge_addresses(*reports)

        return self._call(run)

    def screenshot(self, uuid: str) -> bytes | None:
        """The running domain's screen as the hypervisor sends it (PPM for QEMU), or None when off."""

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None or not dom.isActive():
                return None
            stream = conn.newStream(0)
            chunks: list[bytes] = []

            def receive(_s, data: bytes, _opaque) -> int:
                chunks.append(data)
                return len(data)

            try:
                dom.screenshot(stream, 0, 0)
                stream.recvAll(receive, None)
                stream.finish()
            except BaseException:
                abort_quietly(stream)
                raise
            return b"".join(chunks)

        return self._call(run)

    # --- live migration ---------------------------------------------------------------------------------

    def migrate_live(
        self,
        uuid: str,
        *,
        target: HypervisorDriver,
        address: str,
        paths: dict[str, str],
        vnc_listen: str,
        max_downtime_ms: int = 300,
        bandwidth_mib_s: int = 0,
        timeout: float = 600.0,
        progress: Callable[[MigrationProgress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> MigrationResult:
        """virDomainMigrate3 from this connection to the target's (managed direct migration: the memory and the
        NBD disk streams go from the source's QEMU to `address`, where the target's QEMU listens, on a port of
        its libvirtd's migration range, 49152-49215 by default), in a thread of its own; this thread polls the
        job's statistics, sets the downtime bound once the job runs (libvirt 9.0 takes it only on a running
        job), reports progress, and aborts the job (virDomainAbortJob) on cancel or timeout."""
        started = time.monotonic()
        if not isinstance(target, LibvirtDriver):
            raise HypervisorFatalError("a live migration runs between two libvirt hypervisors")
        if target.uri == self.uri:
            raise HypervisorFatalError("the machine is on that hypervisor already")
        if max_downtime_ms <= 0 or bandwidth_mib_s < 0 or timeout <= 0:
            raise HypervisorFatalError(
                "the downtime bound and the timeout must be positive, the bandwidth not negative"
            )

        def prepare(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
            if not dom.isActive():
                raise HypervisorFatalError("the machine is not running: a live migration moves a running one")
            flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
            return dom, dom.XMLDesc(flags), dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_INACTIVE)

        dom, live, config = self._call(prepare)
        params: dict = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://[{address}]" if ":" in address else f"tcp://{address}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: address,  # the target's QEMU listens there only
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: retarget(live, paths=paths, vnc_listen=vnc_listen),
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: retarget(config, paths=paths, vnc_listen=vnc_listen),
        }
        disks = copied_disks(live)
        flags = MIGRATE_FLAGS
        if disks:
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = disks
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
        if bandwidth_mib_s:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
        if target.domain_state(uuid) is not None:  # the same libvirtd under another URI, or a stale copy
            raise HypervisorFatalError("the target has a domain with this UUID already")
        dconn = target.conn

        outcome: dict = {}

        def run() -> None:
            try:
                outcome["domain"] = dom.migrate3(dconn, params, flags)
            except libvirt.libvirtError as e:
                outcome["error"] = e

        worker = threading.Thread(target=run, name=f"migrate-{uuid[:8]}", daemon=True)
        worker.start()
        applied, reports, last = 0, 0, {}
        aborting: tuple[str, str] | None = None
        abort_sent = False
        failure: BaseException | None = None
        while True:
            worker.join(MIGRATION_POLL)
            if not worker.is_alive():
                break
            stats = _job_stats(dom)
            running = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
            if running:
                last = stats
                if not applied:
                    applied = _set_max_downtime(dom, max_downtime_ms)
            try:
                if aborting is None and cancelled is not None and cancelled():
                    aborting = ("cancelled", "the live migration was cancelled")
                if aborting is None and progress is not None and running:
                    progress(_progress(stats, time.monotonic() - started, applied))
                    reports += 1
            except Exception as e:  # noqa: BLE001 - the caller's callback: stop the migration, then re-raise
                failure, aborting = e, aborting or ("cancelled", f"the progress callback failed: {e}")
            if aborting is None and time.monotonic() - started > timeout:
                aborting = ("timeout", f"the live migration did not finish within {timeout:g} s")
            if aborting is not None and not abort_sent:
                abort_sent = _abort(dom)  # refused until the job has begun: tried again at the next look
            if aborting is not None and time.monotonic() - started > timeout + MIGRATION_ABORT_WAIT:
                raise HypervisorUnavailable(
                    f"libvirt did not end the migration {MIGRATION_ABORT_WAIT:g} s after it was aborted"
                )
        if failure is not None and "domain" not in outcome:
            raise failure
        if "error" in outcome:
            error: libvirt.libvirtError = outcome["error"]
            if aborting is not None and error.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED:
                raise MigrationAborted(aborting[1], reason=aborting[0]) from None
            err = translate(error)
            if isinstance(err, HypervisorUnavailable):
                drop_connection(self.uri)
                drop_connection(target.uri)
            raise err from None
        # Done: the source's domain is gone (undefined); the target keeps the completed job's statistics.
        done = _job_stats(outcome["domain"], libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) or last
        return MigrationResult(
            seconds=time.monotonic() - started,
            memory_bytes=done.get("memory_processed", 0),
            disk_bytes=done.get("disk_processed", 0),
            downtime_ms=done.get("downtime"),
            max_downtime_ms=applied,
            disks=tuple(disks),
            progress_reports=reports,
        )

    # --- snapshots ---------------------------------------------------------------------------------

    @staticmethod
    def _snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise

    @staticmethod
    def _refresh_pools_of(conn: libvirt.virConnect, paths) -> None:
        """Rescan the active pools whose directory holds one of `paths` (files libvirt or QEMU made there, such
        as a snapshot's overlays, are volumes only after that)."""
        dirs = {p.rsplit("/", 1)[0] for p in paths}
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path", default="")
            if target.rstrip("/") in dirs:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.refresh(0)

    @classmethod
    def _allocation(cls, conn: libvirt.virConnect, paths) -> dict[str, int]:
        """Allocation of each path that is a pool volume (the pools refreshed first, for files QEMU wrote)."""
        paths = list(paths)
        cls._refresh_pools_of(conn, paths)
        found = {}
        for path in paths:
            vol = _volume_by_path(conn, path)
            if vol is not None:
                found[path] = vol.info()[2]
        return found

    def _snapshot_info(self, conn: libvirt.virConnect, snap: libvirt.virDomainSnapshot, **extra) -> SnapshotInfo:
        data = parse_snapshot(snap.getXMLDesc(0))
        overlays = tuple(p for p in data["overlays"].values() if p)
        size = sum(self._allocation(conn, overlays).values()) if overlays else 0
        return SnapshotInfo(
            name=data["name"],
            parent=data["parent"],
            kind=data["kind"],
            memory=data["memory"],
            state=data["state"],
            created=data["created"],
            current=bool(snap.isCurrent(0)),
            description=data["description"],
            overlays=overlays,
            size_bytes=extra.pop("size_bytes", size),
            **extra,
        )

    def snapshot_create(
        self,
        uuid: str,
        *,
        name: str,
        description: str = "",
        memory: bool = False,
        overlays: dict[str, str] | None = None,
    ) -> SnapshotInfo:
        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
            if self._snapshot(dom, name) is not None:
                raise HypervisorFatalError(f"domain {uuid} has a snapshot named {name!r} already")
            running = bool(dom.isActive())
            xml = snapshot_xml(name=name, description=description, memory=memory and running, overlays=overlays)
            if overlays is None:
                if running and not memory:
                    raise HypervisorFatalError("an internal snapshot of a running domain holds its memory: ask for it")
                disks = disk_targets(dom.XMLDesc(0)).values()
                before = self._allocation(conn, disks)
                snap = dom.snapshotCreateXML(xml, 0)
                after = self._allocation(conn, disks)
                grown = sum(max(0, after[p] - before.get(p, 0)) for p in after)
                return self._snapshot_info(conn, snap, size_bytes=grown)
            if memory:
                raise HypervisorFatalError("an external disk-only snapshot holds no memory")
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            if running and agent_connected(dom.XMLDesc(0)):
                try:
                    snap = dom.snapshotCreateXML(xml, flags | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE)
                    return self._snapshot_info(conn, snap, quiesced=True)
                except libvirt.libvirtError as e:  # the agent did not answer: taken without freezing
                    log.info("domain %s: quiesced snapshot refused (%s); taking it without", uuid, e)
            snap = dom.snapshotCreateXML(xml, flags)
            return self._snapshot_info(conn, snap)

        return self._call(run)

    def snapshot_list(self, uuid: str) -> list[SnapshotInfo]:
        def run(dom: libvirt.virDomain) -> list[SnapshotInfo]:
            conn = dom.connect()
            found = [
                self._snapshot_info(conn, s) for s in dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
            ]
            return found

        return self._with_dom(uuid, run)

    def snapshot_revert(self, uuid: str, name: str) -> PowerState:
        def run(dom: libvirt.virDomain) -> PowerState:
            snap = self._snapshot(dom, name)
            if snap is None:
                raise HypervisorFatalError(f"domain {uuid} has no snapshot named {name!r}")
            data = parse_snapshot(snap.getXMLDesc(0))
            if data["kind"] == "internal":
                dom.revertToSnapshot(snap, 0)
                return _STATES.get(dom.state()[0], PowerState.UNKNOWN)
            # libvirt 9.0 cannot revert to an external snapshot: the newest of a branch is reverted by hand.
            if snap.numChildren(0):
                raise HypervisorFatalError(
                    f"snapshot {name!r} has later snapshots; revert to the newest, or delete those"
                )
            if dom.isActive():
                dom.destroy()
            conn = dom.connect()
            for path in data["overlays"].values():
                vol = _volume_by_path(conn, path)
                if vol is None:
                    raise HypervisorFatalError(f"the overlay {path} of snapshot {name!r} is not a volume of a pool")
                root = ET.fromstring(vol.XMLDesc(0))
                pool = vol.storagePoolLookupByVolume()
                again = volume_xml(
                    name=vol.name(),
                    capacity_bytes=int(root.findtext("capacity", default="0")),
                    fmt="qcow2",
                    backing_path=root.findtext("backingStore/path", default=""),
                    backing_format=root.find("backingStore/format").get("type", "qcow2")  # type: ignore[union-attr]
                    if root.find("backingStore/format") is not None
                    else "qcow2",
                )
                vol.delete(0)
                pool.createXML(again, 0)
            return PowerState.OFF

        return self._with_dom(uuid, run)

    def snapshot_delete(self, uuid: str, name: str) -> bool:
        def run(conn):
            dom = self._dom(conn, uuid)
            snap = None if dom is None else self._snapshot(dom, name)
            if dom is None or snap is None:
                return False
            data = parse_snapshot(snap.getXMLDesc(0))
            if data["kind"] == "internal":
                snap.delete(0)
                return True
            # libvirt 9.0 merges an external snapshot's overlays by block commit on a running domain only (on one
            # that is off it refuses a snapshot with children: "could not find base disk source in disk source
            # chain"): a domain that is off is started paused for the merge (its guest never runs) and stopped.
            started = False
            if not dom.isActive():
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                started = True
            try:
                snap.delete(0)
            finally:
                if started and dom.isActive():
                    dom.destroy()
            self._refresh_pools_of(conn, data["overlays"].values())  # libvirt removed the files: the pools are told
            return True

        return self._call(run)

    def snapshot_copy_disks(self, uuid: str, name: str, *, pool: str, copies: dict[str, str], keep: str) -> None:
        def back(dom: libvirt.virDomain) -> None:
            """Revert to `keep` (taken off, without memory: the domain stays off) and delete it, if it is there."""
            kept = self._snapshot(dom, keep)
            if kept is None:
                return
            if dom.isActive():
                dom.destroy()
            dom.revertToSnapshot(kept, 0)
            kept.delete(0)

        def run(conn):
            dom = self._dom(conn, uuid)
            if dom is None:
                raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
            snap = self._snapshot(dom, name)
            if snap is None:
                raise HypervisorFatalError(f"domain {uuid} has no snapshot named {name!r}")
            data = parse_snapshot(snap.getXMLDesc(0))
            if data["kind"] != "internal":
                raise HypervisorFatalError(
                    f"snapshot {name!r} is external: its disks are the volumes below its overlays"
                )
            if dom.isActive():
                raise HypervisorFatalError(
                    f"domain {uuid} is running: its disks are copied from a snapshot when it is off"
                )
            p = self._pool(conn, pool)
            back(dom)  # a copy interrupted by a crash left its keep: the domain's own state is in it
            todo = {old: new for old, new in copies.items() if self._vol(p, new) is None}
            if not todo:
                return
            sources = {old: self._vol(p, old) for old in todo}
            missing = sorted(old for old, vol in sources.items() if vol is None)
            if missing:
                raise HypervisorFatalError(f"volume {missing[0]!r} does not exist in pool {pool!r}")
            dom.snapshotCreateXML(snapshot_xml(name=keep, description=f"the state before copying {name}"), 0)
            made: list[libvirt.virStorageVol] = []
            try:
                # A memory snapshot cannot be reverted to with the domain left off: paused (no guest code runs),
                # then powered off; the disks hold the snapshot's state either way.
                paused = data["memory"] or data["state"] not in ("shutoff", "disk-snapshot", "")
                dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED if paused else 0)
                if dom.isActive():
                    dom.destroy()
                for old, new in todo.items():
                    vol = sources[old]
                    assert vol is not None
                    info = self._vol_info(vol)
                    xml = volume_xml(name=new, capacity_bytes=info.capacity_bytes, fmt="qcow2")
                    made.append(p.createXMLFrom(xml, vol, 0))  # qemu-img convert: the active layer, no snapshots
                if dom.isActive():  # started behind the portal's back (virsh, a BMC): the copies may be torn
                    raise HypervisorFatalError(f"domain {uuid} was started during the copy: copies discarded")
            except BaseException:
                for vol in made:
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
                raise
            finally:
                back(dom)

        return self._call(run)


def _job_stats(dom: libvirt.virDomain, flags: int = 0) -> dict:
    """The domain's job statistics; empty when there are none (the domain is gone, or it has no job)."""
    try:
        return dom.jobStats(flags) or {}
    except libvirt.libvirtError as e:
        log.debug("job statistics of %s: %s", dom.UUIDString(), e)
        return {}


def _set_max_downtime(dom: libvirt.virDomain, ms: int) -> int:
    """Bound the migration's pause at the switch; the bound QEMU reports back, 0 when it could not be set yet."""
    try:
        dom.migrateSetMaxDowntime(ms, 0)
        return dom.migrateGetMaxDowntime(0)
    except libvirt.libvirtError as e:
        log.debug("max downtime of %s not set yet: %s", dom.UUIDString(), e)
        return 0


def _abort(dom: libvirt.virDomain) -> bool:
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        log.debug("abort of the migration of %s: %s", dom.UUIDString(), e)
        return False
    return True


def _progress(stats: dict, elapsed: float, max_downtime_ms: int) -> MigrationProgress:
    return MigrationProgress(
        elapsed_s=elapsed,
        memory_total=stats.get("memory_total", 0),
        memory_processed=stats.get("memory_processed", 0),
        memory_remaining=stats.get("memory_remaining", 0),
        disk_total=stats.get("disk_total", 0),
        disk_processed=stats.get("disk_processed", 0),
        disk_remaining=stats.get("disk_remaining", 0),
        max_downtime_ms=max_downtime_ms,
    )
