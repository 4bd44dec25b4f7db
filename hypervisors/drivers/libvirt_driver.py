"""The libvirt driver: the only module in the portal that imports libvirt.

Connections are kept per thread and per URI, with libvirt keepalive so a dead
peer is noticed, and reopened after a failure. Every libvirtError is turned
into a HypervisorUnavailable (retry later) or HypervisorFatalError.
"""

from __future__ import annotations

import logging
import socket
import threading
import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

import libvirt

from hypervisors.drivers.base import (
    PORTAL_METADATA_NS,
    DomainInfo,
    HostInfo,
    HypervisorDriver,
    HypervisorFatalError,
    HypervisorUnavailable,
    NetworkInfo,
    PoolInfo,
    PowerState,
)

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5  # seconds between keepalive probes
KEEPALIVE_COUNT = 3  # unanswered probes before libvirt closes the connection
CONNECT_TIMEOUT = 8.0  # seconds to reach a remote hypervisor's port

# Default ports per transport, for the reachability check before libvirt.open().
TRANSPORT_PORTS = {"ssh": 22, "tcp": 16509, "tls": 16514, "libssh": 22, "libssh2": 22}

_UNAVAILABLE_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_AUTH_CANCELLED,
}

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.OFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
}

# Per-thread connection cache: {uri: virConnect}.
_local = threading.local()
_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ignore_libvirt_errors(_ctx, _err) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def _ensure_event_loop() -> None:
    """Keepalive needs libvirt's event loop running in this process."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def translate(e: libvirt.libvirtError) -> HypervisorUnavailable | HypervisorFatalError:
    """Sort a libvirtError into retryable and fatal."""
    message = e.get_error_message() or str(e)
    if e.get_error_code() in _UNAVAILABLE_CODES:
        return HypervisorUnavailable(message)
    return HypervisorFatalError(message)


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast, within `timeout`, when a remote hypervisor's port does not answer.

    libvirt itself can wait minutes on a host that drops packets.
    """
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if not parts.hostname or transport not in TRANSPORT_PORTS:
        return
    port = parts.port or TRANSPORT_PORTS[transport]
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise HypervisorUnavailable(f"cannot reach {parts.hostname}:{port}: {reason}") from None


def _connections() -> dict:
    if not hasattr(_local, "conns"):
        _local.conns = {}
    return _local.conns


def _open(uri: str, timeout: float) -> libvirt.virConnect:
    """libvirt.open() bounded by `timeout`: a peer that accepts but never answers would block for ever."""
    result: dict = {}
    done = threading.Event()
    abandoned = threading.Event()

    def target() -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            result["error"] = e
        else:
            if abandoned.is_set():
                _close_quietly(conn)
            result["conn"] = conn
        done.set()

    threading.Thread(target=target, name="libvirt-open", daemon=True).start()
    if not done.wait(timeout):
        abandoned.set()
        raise HypervisorUnavailable(f"libvirt did not answer within {timeout:g} s")
    if "error" in result:
        e = result["error"]
        raise HypervisorUnavailable(e.get_error_message() or str(e))
    return result["conn"]


def connect(uri: str, timeout: float = CONNECT_TIMEOUT) -> libvirt.virConnect:
    """This thread's open connection to `uri`, reopened if it died."""
    conns = _connections()
    conn = conns.get(uri)
    if conn is not None:
        try:
            if conn.isAlive():
                return conn
        except libvirt.libvirtError:
            pass
        conns.pop(uri, None)
        _close_quietly(conn)
    _ensure_event_loop()
    check_reachable(uri, timeout)
    conn = _open(uri, timeout)
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    except libvirt.libvirtError:
        pass  # drivers without a network connection (test://) have no keepalive
    conns[uri] = conn
    return conn


def _close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def drop_connection(uri: str) -> None:
    """Close this thread's connection to `uri` (the next call reopens it)."""
    conn = _connections().pop(uri, None)
    if conn is not None:
        _close_quietly(conn)


def _version(number: int) -> str:
    major, rest = divmod(number, 1_000_000)
    minor, release = divmod(rest, 1_000)
    return f"{major}.{minor}.{release}"


def parse_capabilities(xml: str) -> dict:
    """Host arch, CPU model, the domain types offered per guest arch, and the usable one."""
    root = ET.fromstring(xml)
    host_arch = root.findtext("host/cpu/arch", default="")
    features = {f.get("name") for f in root.findall("host/cpu/feature")}
    types_by_arch: dict[str, list[str]] = {}
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is None:
            continue
        types = types_by_arch.setdefault(arch.get("name", ""), [])
        for dom in arch.findall("domain"):
            if dom.get("type") not in types:
                types.append(dom.get("type", ""))
    host_types = types_by_arch.get(host_arch, [])
    return {
        "arch": host_arch,
        "cpu_model": root.findtext("host/cpu/model", default=""),
        "domain_types": host_types,
        "guest_arches": sorted(a for a in types_by_arch if a),
        "domain_type": usable_domain_type(host_arch, host_types, features),
    }


def usable_domain_type(arch: str, types: list[str], cpu_features: set) -> str:
    """`kvm` only where it can run guests, else `qemu` (software emulation).

    /dev/kvm alone is not proof: a paravirtual (PVM) host offers it to libvirt but
    its guests die with "KVM internal error". On x86 real KVM needs the vmx or svm
    CPU feature, which the host CPU description lists.
    """
    x86 = arch in ("x86_64", "i686")
    if "kvm" in types and (not x86 or cpu_features & {"vmx", "svm"}):
        return "kvm"
    if "qemu" in types:
        return "qemu"
    return types[0] if types else ""


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


def _network_info(net: libvirt.virNetwork) -> NetworkInfo:
    root = ET.fromstring(net.XMLDesc(0))
    forward = root.find("forward")
    mode = "isolated" if forward is None else forward.get("mode", "nat")
    bridge = root.find("bridge")
    return NetworkInfo(
        name=net.name(),
        active=bool(net.isActive()),
        forward_mode=mode,
        bridge="" if bridge is None else bridge.get("name", ""),
    )


def _is_managed(dom: libvirt.virDomain) -> bool:
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, PORTAL_METADATA_NS, 0)
    except libvirt.libvirtError:
        return False
    return True


def _domain_info(dom: libvirt.virDomain) -> DomainInfo:
    state = dom.state()[0]
    return DomainInfo(
        uuid=dom.UUIDString(),
        name=dom.name(),
        state=_STATES.get(state, PowerState.UNKNOWN),
        managed=_is_managed(dom),
    )


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
        return self._call(self._host_info)

    @staticmethod
    def _host_info(conn: libvirt.virConnect) -> HostInfo:
        caps = parse_capabilities(conn.getCapabilities())
        _model, memory_mib, cpus, *_ = conn.getInfo()
        try:
            hypervisor_version = _version(conn.getVersion())
        except libvirt.libvirtError:
            hypervisor_version = ""
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
            pools=sorted((_pool_info(p) for p in conn.listAllStoragePools(0)), key=lambda p: p.name),
            networks=sorted((_network_info(n) for n in conn.listAllNetworks(0)), key=lambda n: n.name),
            domains=sorted((_domain_info(d) for d in conn.listAllDomains(0)), key=lambda d: d.name),
        )

    def list_domains(self) -> list[DomainInfo]:
        return self._call(lambda conn: [_domain_info(d) for d in conn.listAllDomains(0)])

