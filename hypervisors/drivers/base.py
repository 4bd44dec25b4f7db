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
