"""Domain policy in one place: what the portal supports, and what a hypervisor offers.

Choices: the values the portal itself supports whatever the hypervisor (disk buses and caches, firmware,
CPU modes, NIC models, macvtap modes, SMBIOS keys). Models, forms and services take them from here.

Offers: what one hypervisor offers, as its last sync found it (offers_for), with a question per rule,
each answering with the refusal the portal gives (None: offered). A list the sync did not report is
empty, and nothing is refused for it: the hypervisor is the authority when the guest is defined there.
Menu: what the create form shows over one hypervisor or every one placement may pick.

Plain data over a Hypervisor row: nothing here queries the database, and nothing imports machines
(the hypervisors app is below it), so which devices machines hold comes in as `taken`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:  # hypervisors.models takes its choices from here
    from hypervisors.models import Hypervisor

# --- Choices: what the portal supports (model fields, form fields and the services' checks) ---

DISK_BUSES = ("virtio", "sata", "scsi", "ide")
DISK_CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")  # empty: the hypervisor's default
FIRMWARES = ("bios", "uefi")
FIRMWARE_LABELS = {"bios": "BIOS", "uefi": "UEFI"}
LIBVIRT_FIRMWARE = {"uefi": "efi"}  # the portal's firmware names as the sync reports them (libvirt's)
CPU_MODES = {
    "host-passthrough": "host-passthrough (the host's CPU as it is)",
    "host-model": "host-model (the closest named model, migratable)",
    "custom": "custom (a named model)",
}
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
NIC_MODEL_LABELS = {"virtio": "virtio (fastest; Linux, or Windows with drivers)"}  # the others: their names
MACVTAP_MODES = ("bridge", "vepa", "private", "passthrough")
# macvtap modes staff may open to users. "passthrough" hands the host's interface to the guest: staff only.
PUBLISHABLE_MODES = tuple(m for m in MACVTAP_MODES if m != "passthrough")
SMBIOS_KEYS = {"manufacturer", "product", "version", "serial", "sku", "family", "uuid"}


def either(values: Iterable[str]) -> str:
    """("a", "b", "c") -> "a, b or c", as the refusals list the choices."""
    values = list(values)
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else "".join(values)


# --- Offers: what one hypervisor offers ---


def _hexid(value: str) -> str:
    """0x8086 -> 8086, as lspci -n shows vendor and product ids."""
    return value[2:] if value.startswith("0x") else value


@dataclass(frozen=True)
class Offer:
    """What one hypervisor offers, from its synced fields (offers_for). The lists keep the sync's order."""

    name: str
    arch: str = ""
    guest_arches: tuple[str, ...] = ()
    machine_types: tuple[str, ...] = ()
    cpu_modes: tuple[str, ...] = ()  # libvirt's, which may name modes the portal has no use for ("maximum")
    cpu_models: tuple[str, ...] = ()
    firmwares: tuple[str, ...] = ()  # libvirt's names: "bios", "efi"
    pools: tuple[dict, ...] = ()
    networks: tuple[dict, ...] = ()
    interfaces: tuple[dict, ...] = ()
    devices: tuple[dict, ...] = ()

    # What the create form lists.
    @property
    def arches(self) -> list[str]:
        """The guest architectures; none reported: the host's own (none known: nothing)."""
        return [a for a in (self.guest_arches or (self.arch,)) if a]

    @property
    def active_pools(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.pools if p.get("active")}

    @property
    def network_names(self) -> set[str]:
        """Every libvirt network the sync listed, active or not."""
        return {n["name"] for n in self.networks}

    @property
    def active_networks(self) -> list[str]:
        return [n["name"] for n in self.networks if n.get("active", True)]

    @property
    def bridges(self) -> list[str]:
        return [i["name"] for i in self.interfaces if i.get("type") == "bridge"]

    @property
    def macvtap_interfaces(self) -> list[str]:
        """Host interfaces the form offers for macvtap: not bridges, not loopback."""
        return [i["name"] for i in self.interfaces if i.get("type") != "bridge" and i["name"] != "lo"]

    def free_devices(self, taken: Collection[str]) -> list[dict]:
        """The PCI and USB devices no machine holds (`taken`: the names machines hold)."""
        return [d for d in self.devices if d["name"] not in taken]

    # Questions of the machine's checks: the refusal, or None when it is offered.
    def refuse_guest_arch(self, arch: str) -> str | None:
        if self.guest_arches and arch not in self.guest_arches:
            return f"{self.name} cannot run {arch} guests (it offers {', '.join(self.guest_arches)})."
        return None

    def refuse_firmware(self, firmware: str) -> str | None:
        wanted = LIBVIRT_FIRMWARE.get(firmware)
        if wanted and self.firmwares and wanted not in self.firmwares:
            return f"{self.name} has no UEFI firmware (install OVMF there)."
        return None

    def refuse_machine_type(self, machine_type: str) -> str | None:
        if self.machine_types and machine_type not in self.machine_types:
            some = ", ".join(t for t in self.machine_types if "." not in t or t.endswith(("7.2", "8.0")))[:200]
            return f"{self.name} has no machine type {machine_type!r} (it has e.g. {some})."
        return None

    def refuse_cpu_mode(self, mode: str) -> str | None:
        if self.cpu_modes and mode not in self.cpu_modes:
            return f"{self.name} supports CPU modes {', '.join(self.cpu_modes)}, not {mode}."
        return None

    def refuse_cpu_model(self, model: str) -> str | None:
        if self.cpu_models and model not in self.cpu_models:
            return f"{model!r} is not a usable CPU model on {self.name}."
        return None

    def refuse_pool(self, pool: str) -> str | None:
        if pool not in self.active_pools:
            return f"Storage pool {pool!r} is not active on {self.name}."
        return None

    def refuse_network(self, source: str) -> str | None:
        """A NIC on a libvirt network (the refusal follows "NIC n: ")."""
        if source not in self.network_names:
            have = ", ".join(sorted(self.network_names)) or "none"
            return f"network {source!r} does not exist on {self.name} (it has: {have})."
        return None

    def refuse_bridge(self, source: str) -> str | None:
        """A NIC on a host bridge (the refusal follows "NIC n: "); no interfaces reported: any name."""
        known = self._interface_types()
        if known and known.get(source) != "bridge":
            have = ", ".join(n for n, t in known.items() if t == "bridge") or "none"
            return f"{self.name} has no bridge {source!r} (bridges: {have})."
        return None

    def refuse_macvtap(self, source: str) -> str | None:
        """A macvtap NIC on a host interface (the refusal follows "NIC n: ")."""
        known = self._interface_types()
        if not source or (known and source not in known):
            return f"name a host interface of {self.name} for macvtap{' (' + ', '.join(known) + ')' if known else ''}."
        return None

    def _interface_types(self) -> dict[str, str]:
        return {x["name"]: x["type"] for x in self.interfaces}

    def refuse_device(self, name: str, taken: Collection[str]) -> str | None:
        """A host device by name: one the sync listed that no machine holds."""
        if name not in {d["name"] for d in self.devices}:
            return f"{self.name} has no PCI or USB device {name!r}."
        if name in taken:
            return f"{name} is already given to another machine."
        return None

    def match_device(self, pattern: str, taken: Collection[str]) -> tuple[str, str | None]:
        """(the first free device whose "name vendor:product description" the regular expression matches,
        None), or ("", the refusal)."""
        try:
            regex = re.compile(pattern)
        except re.error as e:
            return "", f"Not a regular expression: {e}."
        devices = {d["name"]: d for d in self.devices}
        free = [
            n
            for n, d in devices.items()
            if n not in taken and regex.search(f"{n} {_hexid(d['vendor'])}:{_hexid(d['product'])} {d['description']}")
        ]
        if not free:
            return "", f"No free device on {self.name} matches {pattern!r}."
        return free[0], None

    # Questions of placement (the reasons leave out the host's name: placement prefixes it).
    def refuse_placed_arch(self, arch: str) -> str | None:
        """Placement puts a guest of another architecture only where the host lists it among its guest
        architectures (none reported: only its own)."""
        if arch and self.arch != arch and arch not in self.guest_arches:
            return f"{self.arch or 'unknown'} host that cannot emulate {arch}"
        return None

    def missing_networks(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self.network_names]

    def pool_free_gib(self, pool: str) -> int | None:
        """What libvirt last reported free in the active pool, in GiB; None: no such active pool."""
        found = self.active_pools.get(pool)
        return None if found is None else (found.get("available_bytes") or 0) >> 30


def offers_for(hypervisor: Hypervisor) -> Offer:
    """What the hypervisor offers, as its last sync found it."""
    return Offer(
        name=hypervisor.name,
        arch=hypervisor.arch or "",
        guest_arches=tuple(hypervisor.guest_arches or ()),
        machine_types=tuple(hypervisor.machine_types or ()),
        cpu_modes=tuple(hypervisor.cpu_modes or ()),
        cpu_models=tuple(hypervisor.cpu_models or ()),
        firmwares=tuple(hypervisor.firmwares or ()),
        pools=tuple(hypervisor.pools or ()),
        networks=tuple(hypervisor.networks or ()),
        interfaces=tuple(hypervisor.interfaces or ()),
        devices=tuple(hypervisor.devices or ()),
    )


# --- Menu: what the create form offers ---


@dataclass
class Menu:
    """What the create form offers. For one hypervisor: what its last sync found. For "any hypervisor":
    the hardware every online one has (placement may pick any of them), and the networks, bridges,
    interfaces and pools some one has (the service then checks the one placement picks)."""

    hypervisor: Hypervisor | None = None
    arches: list[str] = field(default_factory=list)
    machine_types: list[str] = field(default_factory=list)
    cpu_modes: list[str] = field(default_factory=list)  # the portal's (CPU_MODES), in its order
    cpu_models: list[str] = field(default_factory=list)
    uefi: bool = False
    networks: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)  # free ones, one hypervisor only

    @classmethod
    def over(
        cls, hypervisors: Sequence[Hypervisor], *, hypervisor: Hypervisor | None = None, taken: Collection[str] = ()
    ) -> Self:
        """The menu over these hypervisors (one, `hypervisor`, whose free devices it lists; or the online
        ones, for "any hypervisor"). `taken`: the devices machines hold on `hypervisor`."""
        offers = [offers_for(h) for h in hypervisors]

        def every(values: Callable[[Offer], Sequence[str]]) -> list[str]:
            # A hypervisor whose sync did not report the list is not asked (the service accepts there too).
            sets = [set(values(o)) for o in offers if values(o)]
            return sorted(set.intersection(*sets)) if sets else []

        def some(values: Callable[[Offer], Iterable[str]]) -> list[str]:
            return sorted({v for o in offers for v in values(o)})

        modes = every(lambda o: o.cpu_modes)
        return cls(
            hypervisor=hypervisor,
            arches=some(lambda o: o.arches),  # none known: no filter
            machine_types=every(lambda o: o.machine_types),
            cpu_modes=[m for m in CPU_MODES if m in modes],
            cpu_models=every(lambda o: o.cpu_models),
            uefi=all(o.refuse_firmware("uefi") is None for o in offers),
            networks=some(lambda o: o.active_networks),
            bridges=some(lambda o: o.bridges),
            interfaces=some(lambda o: o.macvtap_interfaces),
            pools=some(lambda o: o.active_pools),
            devices=offers_for(hypervisor).free_devices(taken) if hypervisor else [],
        )
