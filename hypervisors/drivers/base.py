"""What the portal needs from a hypervisor, as plain data. Standard library only."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum


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


class HypervisorDriver(ABC):
    def __init__(self, uri: str) -> None:
        self.uri = uri

    @abstractmethod
    def host_info(self) -> HostInfo:
        """Everything a sync records: capabilities, pools, networks, domains."""

    @abstractmethod
    def list_domains(self) -> list[DomainInfo]: ...

    def close(self) -> None:
        """Release this driver's hold on the connection."""

    def __enter__(self) -> HypervisorDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
class VolumeInfo:
    name: str
    path: str
    format: str
    capacity_bytes: int
    allocation_bytes: int
    backing_path: str = ""
