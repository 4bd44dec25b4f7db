"""What the portal needs from a hypervisor, as plain data. Standard library only."""

from __future__ import annotations

import ipaddress
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import BinaryIO
from urllib.parse import urlsplit


def is_loopback(address: str) -> bool:
    """Loopback, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def remote_host(uri: str) -> str:
    """The host of a libvirt URI when it names another machine than the portal's; "" for this one (no host,
    localhost, a loopback address: qemu:///system, qemu+ssh://localhost/system, a local socket). The one
    answer to "is this hypervisor this machine", for the console proxy and for reading host addresses."""
    host = urlsplit(uri).hostname or ""
    return "" if not host or host == "localhost" or is_loopback(host) else host


class PowerState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    OFF = "off"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


class HypervisorError(Exception):
    """Base class. Retryable unless it is a HypervisorFatalError."""


class HypervisorUnavailable(HypervisorError):
    """Cannot connect, or the connection broke: retry later."""


class HypervisorFatalError(HypervisorError):
    """Bad spec, missing object, no permission: retrying will not help."""


class MigrationAborted(HypervisorFatalError):
    """A live migration stopped before the switch, by cancel or at its timeout: the domain runs on the source."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "cancelled" or "timeout"


@dataclass(frozen=True)
class PoolInfo:
    name: str
    active: bool
    type: str
    path: str
    capacity_bytes: int
    allocation_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    active: bool
    forward_mode: str  # "nat", "route", "bridge", "isolated", ...
    bridge: str
    guard: str = ""  # the portal's traffic filter for NICs on this network, when the host has it


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    state: PowerState
    managed: bool  # carries the portal's metadata element
    # host_info only, for a domain that is not the portal's: its shape (domain_shape), for staff deciding on an
    # adoption; None from list_domains and for the portal's own.
    shape: dict | None = None


@dataclass(frozen=True)
class DomainCounters:
    """A running domain's cumulative counters at one bulk read (the metrics' rates are their differences between
    two reads of the same run). None: the driver or the guest does not tell it (libvirt's test driver tells none
    of them; the balloon's guest figures need the guest's balloon driver)."""

    cpu_time_ns: int | None = None  # CPU time of the whole domain (vCPUs and emulator threads)
    vcpus: int | None = None  # vCPUs it runs now
    memory_current_kib: int | None = None  # what the balloon gives it
    memory_available_kib: int | None = None  # what the guest sees (balloon driver)
    memory_unused_kib: int | None = None  # what the guest leaves unused (balloon driver)
    memory_rss_kib: int | None = None  # QEMU's resident memory on the host
    disk_read_bytes: int | None = None  # summed over its disks
    disk_write_bytes: int | None = None
    disk_read_reqs: int | None = None
    disk_write_reqs: int | None = None
    net_rx_bytes: int | None = None  # summed over its NICs
    net_tx_bytes: int | None = None


@dataclass(frozen=True)
class HostCountersRead:
    """A hypervisor's own cumulative CPU times (nanoseconds, all CPUs) and memory (KiB) at one bulk read; None
    where the driver does not tell it."""

    cpus: int | None = None
    cpu_busy_ns: int | None = None  # kernel + user
    cpu_idle_ns: int | None = None  # idle + iowait
    memory_total_kib: int | None = None
    memory_free_kib: int | None = None
    memory_buffers_kib: int | None = None
    memory_cached_kib: int | None = None


@dataclass(frozen=True)
class DomainObserved:
    """A domain as one bulk read of its hypervisor sees it."""

    state: PowerState
    run: int  # libvirt's domain id: a new one at every start, -1 while it is not running
    counters: DomainCounters | None = None  # while it runs, from the same bulk call; None when off or untold


@dataclass(frozen=True)
class HostObserved:
    """Every domain of a hypervisor and its networks' DHCP leases, read in a number of calls that does not grow
    with the domains (domains_observed)."""

    domains: dict[str, DomainObserved]  # UUID -> what was seen
    leases: dict[str, list[str]]  # MAC (lower case) -> addresses ("a.b.c.d/prefix") the host's DHCP leased
    counters: HostCountersRead | None = None  # the host's CPU and memory counters; None when it tells none


@dataclass(frozen=True)
class DomainInspected:
    """One running domain looked at closely (domain_inspect): what its live XML and the guest tell."""

    console_unprotected: bool  # its VNC server lets clients in without a password
    addresses: dict[str, list[str]]  # MAC -> addresses, as domain_addresses gives them


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    arch: str
    cpus: int
    memory_mib: int
    cpu_model: str
    libvirt_version: str
    hypervisor_version: str  # QEMU's version for qemu:// URIs
    domain_type: str  # the best type that runs guests here: "kvm" or "qemu"
    domain_types: list[str] = field(default_factory=list)  # what libvirt offers for the host arch
    guest_arches: list[str] = field(default_factory=list)
    machine_types: list[str] = field(default_factory=list)  # for the host arch, e.g. pc, q35, pc-i440fx-7.2
    cpu_modes: list[str] = field(default_factory=list)  # host-passthrough, host-model, custom, ...
    cpu_models: list[str] = field(default_factory=list)  # usable named models
    firmwares: list[str] = field(default_factory=list)  # "bios", "efi" (libvirt's automatic selection)
    interfaces: list[dict] = field(default_factory=list)  # host interfaces: name, type (ethernet, bridge, ...), active
    devices: list[dict] = field(default_factory=list)  # PCI and USB node devices that can be passed through
    pools: list[PoolInfo] = field(default_factory=list)
    networks: list[NetworkInfo] = field(default_factory=list)
    domains: list[DomainInfo] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# Domains the portal defines carry an element in this namespace in <metadata>.
PORTAL_METADATA_NS = "https://ansistack-portal.invalid/xmlns/machine/1"


@dataclass(frozen=True)
class DiskSpec:
    path: str
    device: str = "disk"  # "disk" or "cdrom"
    format: str = "qcow2"  # "qcow2" or "raw"
    bus: str = "virtio"  # "virtio", "ide", "sata", "scsi"
    boot_order: int | None = None
    cache: str = ""  # "", "none", "writeback", "writethrough", "directsync", "unsafe"


@dataclass(frozen=True)
class NicSpec:
    type: str  # "network" (libvirt network), "bridge" (host bridge), "direct" (macvtap) or "user" (QEMU NAT)
    source: str  # network, bridge or host interface name; empty for "user"
    mac: str
    model: str = "virtio"
    boot_order: int | None = None
    mode: str = "bridge"  # macvtap: bridge, vepa, private, passthrough
    vlan: int | None = None
    guard: str = ""  # the nwfilter that keeps the guest away from its hypervisor (portal networks)


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML says. The UUID is the machine's, which makes define idempotent."""

    uuid: str
    name: str
    domain_type: str
    vcpus: int
    memory_mib: int
    max_vcpus: int = 0  # a running domain's vCPUs can be raised up to this (0: none beyond vcpus)
    max_memory_mib: int = 0  # and its memory (the balloon's ceiling)
    arch: str = "x86_64"
    machine: str = "pc"
    title: str = ""
    description: str = ""
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    vnc_listen: str = "127.0.0.1"
    vnc_password: str = ""  # empty: a random one (it starts expired; the console proxy sets its own per session)
    serial_log: str = ""  # file the serial console is also written to
    boot_devices: tuple[str, ...] = ()  # e.g. ("network", "hd"): <os><boot dev>, instead of per-device order
    bios_serial: bool = False  # firmware and option ROM (iPXE) output on the serial console too
    cpu_mode: str = ""  # "", "host-passthrough", "host-model", "custom"
    cpu_model: str = ""  # with cpu_mode "custom"
    topology: tuple[int, int, int] | None = None  # sockets, cores, threads
    smbios: dict = field(default_factory=dict)  # system entries: manufacturer, product, version, serial, sku, family
    watchdog: bool = False
    rng: bool = False
    qemu_args: tuple[str, ...] = ()  # staff only: bypasses every check
    hostdevs: tuple[dict, ...] = ()  # node devices (as HostInfo.devices lists them) passed to the guest
    firmware: str = ""  # "" (BIOS) or "efi"
    secure_boot: bool = False
    video: str = "vga"  # "vga" on x86, "virtio" elsewhere
    metadata: dict = field(default_factory=dict)  # portal ids, as attributes of the metadata element


@dataclass(frozen=True)
class DomainSize:
    """A domain's vCPUs and memory: as running (`live_*`, 0 when off) and in its persistent config, each with the
    maximum it can be raised to (live: without a restart; config: what the next cold start boots with)."""

    running: bool
    vcpus: int  # config
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    live_vcpus: int = 0
    live_max_vcpus: int = 0
    live_memory_mib: int = 0
    live_max_memory_mib: int = 0


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    format: str
    capacity_bytes: int
    allocation_bytes: int
    backing_path: str = ""


@dataclass(frozen=True)
class MigrationProgress:
    """One look at a live migration under way (the source's job statistics)."""

    elapsed_s: float  # since the call began
    memory_total: int  # bytes of guest memory
    memory_processed: int  # bytes of memory sent so far (pages sent again count again)
    memory_remaining: int
    disk_total: int  # bytes of disk the storage copy has to send (only the disks' own allocated data)
    disk_processed: int
    disk_remaining: int
    max_downtime_ms: int  # the pause allowed at the switch, as the source's QEMU has it now; 0 until set


@dataclass(frozen=True)
class MigrationResult:
    """A live migration that ended with the domain running on the target."""

    seconds: float  # the whole call
    memory_bytes: int  # memory sent
    disk_bytes: int  # disk data sent by the storage copy, as libvirt reports it: 0 with libvirt 9.0 and QEMU 7.2,
    # whose blockdev NBD copy reports no disk figures (the integration test counts the link's bytes instead)
    downtime_ms: int | None  # the guest's pause at the switch as libvirt measured it (None: not reported); it
    # includes the target's start of the vCPUs, so it can exceed the bound, which QEMU applies to the last memory pass
    max_downtime_ms: int  # the bound that was in force
    disks: tuple[str, ...]  # the disk targets (vda, ...) copied
    progress_reports: int  # how often `progress` was called


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of a domain as the hypervisor has it."""

    name: str
    parent: str  # "" for a root of the tree
    kind: str  # "internal" (inside the qcow2 disks) or "external" (disk-only overlays)
    memory: bool  # holds the running domain's memory: reverting to it gives the domain back running
    state: str  # the domain's state when it was taken, as libvirt says it: running, shutoff, disk-snapshot
    created: int  # Unix time
    current: bool  # the one the domain runs on from
    description: str = ""
    overlays: tuple[str, ...] = ()  # external: the overlay files it made (the disks as written since)
    size_bytes: int = 0  # space it holds: an external one's overlays; an internal one's growth of the disks when taken
    quiesced: bool = False  # known only from snapshot_create: the guest agent froze the file systems first


class HypervisorDriver(ABC):
    """Everything the portal asks of a hypervisor, as plain data in and out (never Django models).

    Contract for every method: a hypervisor that cannot be reached, or a connection that broke, raises
    HypervisorUnavailable (retry later); anything else that goes wrong raises HypervisorFatalError, and no
    other exception (no libvirtError) leaves a driver. A missing storage pool is HypervisorFatalError. Steps
    that create or remove look before they act, so calling one twice is harmless. A driver is a cheap handle
    on the hypervisor at `uri`: it holds nothing that needs releasing (the libvirt driver's connections
    belong to a per-thread cache, see connections.connect and drop_connection). Held for both drivers by
    tests/hypervisors/test_driver_contract.py.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    # --- the host ----------------------------------------------------------------

    @abstractmethod
    def host_info(self) -> HostInfo:
        """Everything a sync records: capabilities, interfaces, devices, pools, networks, domains."""

    @abstractmethod
    def list_domains(self) -> list[DomainInfo]:
        """Every domain on the hypervisor, the portal's and others'."""

    # --- storage: volumes by pool and name -----------------------------------------

    @abstractmethod
    def pool_path(self, pool: str) -> str:
        """The pool's target directory (where its volumes' files are)."""

    @abstractmethod
    def volume_info(self, *, pool: str, name: str) -> VolumeInfo | None:
        """The volume, or None if absent."""

    @abstractmethod
    def create_volume(
        self, *, pool: str, name: str, fmt: str, capacity_bytes: int, backing_path: str = "", backing_format: str = ""
    ) -> VolumeInfo:
        """Create the volume (a qcow2 overlay when backing_path is given) unless it exists; the existing one
        is returned unchanged."""

    @abstractmethod
    def upload_volume(self, *, pool: str, name: str, source: BinaryIO, length: int) -> None:
        """Write `length` bytes read from `source` into an existing volume; HypervisorFatalError if absent."""

    @abstractmethod
    def download_volume(
        self, *, pool: str, name: str, sink: Callable[[bytes], None], offset: int = 0, length: int = 0
    ) -> None:
        """Pass the volume's bytes from `offset` (length 0: to its end) to sink(); HypervisorFatalError if absent."""

    @abstractmethod
    def delete_volume(self, *, pool: str, name: str) -> bool:
        """Delete the volume; no-op (False) if absent."""

    @abstractmethod
    def clone_volume(
        self, *, pool: str, name: str, new_name: str, backing_path: str = "", backing_format: str = ""
    ) -> VolumeInfo:
        """A full copy of the volume in the same pool, flattened (standing on no backing file), unless `new_name`
        exists (then that one is returned unchanged); HypervisorFatalError if `name` is absent. With
        `backing_path` (the file the volume itself stands on, read-only), only the volume's own layer is copied,
        into a qcow2 standing on that same file: a linked clone's disk."""

    @abstractmethod
    def resize_volume(self, *, pool: str, name: str, capacity_bytes: int) -> None:
        """Grow the volume to capacity_bytes; never shrinks; HypervisorFatalError if absent."""

    @abstractmethod
    def refresh_pool(self, pool: str) -> None:
        """Rescan the pool, so files written by others (the serial log) show as volumes."""

    @abstractmethod
    def volume_names(self, pool: str) -> list[str]:
        """The names of every volume in the pool, in one call (refresh_pool first to see files written by others)."""

    # --- domains, by UUID (the machine's) --------------------------------------------
    # Unless a docstring says otherwise, a domain that does not exist is HypervisorFatalError.

    @abstractmethod
    def define_domain(self, spec: DomainSpec) -> bool:
        """Define the domain unless one with spec.uuid exists (then leave it as it is). True if defined now."""

    @abstractmethod
    def domain_state(self, uuid: str) -> PowerState | None:
        """The power state, or None if the domain does not exist."""

    @abstractmethod
    def domain_states(self) -> dict[str, PowerState]:
        """UUID -> power state of every domain on the hypervisor."""

    @abstractmethod
    def domains_observed(self) -> HostObserved:
        """State and run of every domain and the DHCP leases of the host's networks, in a number of calls that
        does not grow with the domains (the reconcile's bulk read); no leases where the host cannot list them.
        The same calls give each running domain's counters and the host's (the metrics' source), None where
        the host tells none."""

    @abstractmethod
    def domain_inspect(self, uuid: str, *, leases: dict[str, list[str]] | None = None) -> DomainInspected | None:
        """A closer look at one domain: whether its running VNC server asks no password, and its guest's addresses
        (with `leases` from domains_observed, those instead of asking for the domain's own). None when absent;
        nothing unprotected and no addresses when off."""

    @abstractmethod
    def domain_xml(self, uuid: str, *, inactive: bool = False, secure: bool = False) -> str:
        """The domain's XML (inactive: its persistent config); `secure` includes secrets: never show or log it."""

    @abstractmethod
    def domain_shape(self, uuid: str) -> dict | None:
        """The shape of the domain's persistent config as domxml.foreign_domain reads it, each disk with its
        storage pool, volume and capacity filled in where its file is a volume of a pool (pool "" where it is
        not), plus `persistent` and `autostart`; None if the domain does not exist."""

    @abstractmethod
    def domain_mark(self, uuid: str, attributes: dict[str, str]) -> bool:
        """Put the portal's metadata element (PORTAL_METADATA_NS) with these attributes in the domain's
        persistent config (and its live one while it runs), touching nothing else; no-op (False) when it
        carries exactly that element already."""

    @abstractmethod
    def start(self, uuid: str) -> None:
        """Start the domain; no-op if it runs. A cold start gives a console without a password one first."""

    @abstractmethod
    def shutdown(self, uuid: str) -> None:
        """Ask the guest to shut down (ACPI); no-op if off."""

    @abstractmethod
    def power_off(self, uuid: str) -> None:
        """Pull the plug; no-op if off."""

    @abstractmethod
    def reboot(self, uuid: str) -> None:
        """Ask the guest to reboot (ACPI); a domain that is off is cold-started instead."""

    @abstractmethod
    def reset(self, uuid: str) -> None:
        """Press the reset button; a domain that is off is cold-started instead."""

    @abstractmethod
    def set_autostart(self, uuid: str, enabled: bool) -> None:
        """Start the domain with the hypervisor, or not; idempotent."""

    @abstractmethod
    def block_resize(self, uuid: str, *, path: str, capacity_bytes: int) -> None:
        """Grow the disk at `path` of a running domain, so the guest sees the new size at once."""

    @abstractmethod
    def domain_size(self, uuid: str) -> DomainSize:
        """The domain's vCPUs and memory, live and in its config; HypervisorFatalError if absent."""

    @abstractmethod
    def set_vcpus(self, uuid: str, count: int, *, maximum: int, live: bool) -> None:
        """Give the persistent config `count` vCPUs of at most `maximum` (raised or lowered, in the order libvirt
        takes); with `live`, the running domain too (count within its live maximum, else HypervisorFatalError)."""

    @abstractmethod
    def set_memory(self, uuid: str, memory_mib: int, *, maximum: int, live: bool) -> None:
        """Give the persistent config `memory_mib` of memory (the balloon) of at most `maximum`; with `live`, the
        running domain too (within its live maximum, else HypervisorFatalError)."""

    @abstractmethod
    def rename_domain(self, uuid: str, name: str, *, title: str = "") -> bool:
        """Rename the shut-off domain (and set its title); False if it already has the name. A running one is
        HypervisorFatalError: libvirt renames only inactive domains."""

    @abstractmethod
    def undefine(self, uuid: str) -> bool:
        """Stop and undefine the domain; no-op (False) if absent. Its volumes are left to the caller."""

    @abstractmethod
    def change_media(self, uuid: str, *, target: str, path: str) -> None:
        """Insert `path` into the CD-ROM drive `target` (path empty: eject), live and in the persistent config."""

    @abstractmethod
    def attach_disk(self, uuid: str, disk: DiskSpec) -> str:
        """Add a disk or CD-ROM drive to the domain's persistent config and, when it runs, to the running guest
        (only disks on a hot-plug bus, virtio or scsi: anything else on a running domain is HypervisorFatalError).
        Its target is the first free one on its bus; returned. A disk at that path already there: its target."""

    @abstractmethod
    def detach_disk(self, uuid: str, *, target: str = "", path: str = "") -> bool:
        """Remove the disk with that target (or source path) from the running guest (waiting until the guest lets
        it go) and from the persistent config; False if the domain has none."""

    @abstractmethod
    def attach_nic(self, uuid: str, nic: NicSpec) -> bool:
        """Add the NIC to the persistent config and, when the domain runs, to the running guest; False if a NIC
        with its MAC is there already."""

    @abstractmethod
    def detach_nic(self, uuid: str, *, mac: str) -> bool:
        """Remove the NIC with that MAC, live (waiting until the guest lets it go) and from the config; False if
        absent."""

    @abstractmethod
    def boot_once(self, uuid: str, *, target: str) -> None:
        """Cold-start the domain from disk `target` once; later starts use the saved boot order again."""

    # --- networks and traffic filters --------------------------------------------------

    @abstractmethod
    def define_network(self, xml: str) -> bool:
        """Define, start and autostart the network unless one of its name exists. True if made now."""

    @abstractmethod
    def remove_network(self, name: str) -> bool:
        """Stop and undefine the network; no-op (False) if absent."""

    @abstractmethod
    def define_guard(self, xml: str) -> None:
        """Define the traffic filter (nwfilter), or update it in place; NICs that use it get the change live."""

    @abstractmethod
    def remove_guard(self, name: str) -> bool:
        """Undefine the traffic filter `name` (a network's guard_name, a host bridge's host_guard_name); no-op
        (False) if absent, or while a running domain still uses it."""

    @abstractmethod
    def filter_bridge_nics(self, uuid: str, filters: dict[str, str]) -> bool:
        """Make the domain's NICs on the host bridges in `filters` (bridge -> filter) name their filter, in its
        persistent config and keeping its VNC password; True if it was changed now."""

    # --- consoles and what a running guest shows -------------------------------------------

    @abstractmethod
    def vnc_address(self, uuid: str) -> tuple[str, int] | None:
        """Where the running domain's VNC server listens now; None when absent, off, or without VNC."""

    @abstractmethod
    def vnc_open(self, uuid: str, *, valid_for: float = 15.0) -> tuple[str, int, str] | None:
        """Give the running VNC server a fresh password valid for `valid_for` s: (host, port, password); the
        password is empty for a server that has none; None when absent, off, or without VNC."""

    @abstractmethod
    def vnc_protect(self, uuid: str) -> bool:
        """Give the persistent config an (expired) VNC password if it has none; True if added now."""

    @abstractmethod
    def vnc_unprotected(self) -> set[str]:
        """UUIDs of the running domains whose VNC server lets clients in without a password."""

    @abstractmethod
    def serial_console(self, uuid: str, *, take_over: bool = False) -> socket.socket:
        """A socket joined to the running domain's first serial port until either end closes;
        HypervisorFatalError when it is not running or another client has the port (unless take_over)."""

    @abstractmethod
    def domain_addresses(self, uuid: str) -> dict[str, list[str]]:
        """MAC -> addresses of the running guest, as far as the hypervisor can tell; empty when absent or off."""

    @abstractmethod
    def screenshot(self, uuid: str) -> bytes | None:
        """The running domain's screen as an image file's bytes; None when absent or off."""

    # --- moving a running domain ---------------------------------------------------------------

    @abstractmethod
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
        """Move the running domain to `target` (a driver of the same kind, on another hypervisor) while it runs.

        Before: the target holds, at the paths in `paths`, every disk the domain writes (each created empty at its
        virtual size and format; an overlay over the target's own copy of its base image) and every read-only file
        it names (seed ISO, CD-ROM media: copied whole), and `paths` maps each file path in the domain's XML (disks,
        serial log) to its place on the target: one left out is refused before anything moves. The writable disks'
        own data (an overlay's clusters, not its base) is copied while the guest runs; `address` is the target's
        address that the source reaches (the memory and disk streams go there); the domain's VNC server listens on
        `vnc_listen` there. The pause at the switch is bounded by `max_downtime_ms` (the migration goes on until
        the rest fits in it), the streams by `bandwidth_mib_s` (0: no limit).

        While it runs, `progress` is called about twice a second, in the calling thread, and `cancelled` is asked
        as often: True aborts the migration, as does `timeout` seconds passing; both raise MigrationAborted with
        the domain still running on the source and nothing defined on the target (the files the caller made
        there stay for it to remove). Any other failure raises HypervisorError, the domain likewise on the
        source. On success the domain runs on the target, defined there persistently (its config at the new
        paths), and is undefined on the source; the source's files stay for the caller to remove."""

    # --- snapshots, by domain UUID and snapshot name -------------------------------------------------

    @abstractmethod
    def snapshot_create(
        self,
        uuid: str,
        *,
        name: str,
        description: str = "",
        memory: bool = False,
        overlays: dict[str, str] | None = None,
    ) -> SnapshotInfo:
        """Take a snapshot; a name the domain has already is HypervisorFatalError.

        overlays None: internal, inside the domain's qcow2 disks: with the memory of a running domain (memory must
        be asked: QEMU takes an internal snapshot of a running guest only with its memory, so a running domain
        without `memory` is refused), of the disks alone when it is off. overlays {target: path}: external and
        disk-only (`--disk-only`): each named disk gets a new qcow2 overlay at `path`, which the caller made a
        volume name of its pool; `memory` is refused. A running domain whose guest agent answers has its file
        systems frozen first (quiesced), else it is taken without (quiesced False)."""

    @abstractmethod
    def snapshot_list(self, uuid: str) -> list[SnapshotInfo]:
        """Every snapshot of the domain, parents before their children."""

    @abstractmethod
    def snapshot_revert(self, uuid: str, name: str) -> PowerState:
        """Bring the domain back to the snapshot; the power state it is left in. Internal: disks and memory as
        they were (a memory snapshot of a running domain comes back running, a disk one off). External: only the
        newest of its branch (no children): the domain stopped, its overlays emptied, so the disks read as at
        the snapshot; left off. One with children is HypervisorFatalError."""

    @abstractmethod
    def snapshot_copy_disks(self, uuid: str, name: str, *, pool: str, copies: dict[str, str], keep: str) -> None:
        """Copy the disks as internal snapshot `name` holds them: each volume `copies` names (a disk of the domain,
        in `pool`) into a standalone qcow2 of the pool named by its value (flattened: no backing file, no internal
        snapshots), one that exists already being kept as it is. The domain must be off (else HypervisorFatalError)
        and is left as it was: same disks, same snapshots, the same one current, off.

        Through the hypervisor's API alone (so for a remote one too): the domain's state is first kept in a
        temporary internal snapshot named `keep`, the domain reverted to `name` (a memory snapshot paused, then
        powered off: its disks hold the snapshot's), the volumes copied, the domain reverted to `keep`, which is
        deleted; on a failure too. A `keep` found already (a copy interrupted by a crash) is reverted to and
        deleted first. An external snapshot, or one that is absent, is HypervisorFatalError, and so is a domain
        started meanwhile from outside (its copies, which may be torn, removed; the revert stops it)."""

    @abstractmethod
    def snapshot_delete(self, uuid: str, name: str) -> bool:
        """Delete the snapshot; no-op (False) if absent. Internal: its data leaves the qcow2 disks. External: its
        overlays are merged (block commit) into the disks below them and their files removed, on a domain that is
        off as on one that runs, with children or not; its children take its parent."""
