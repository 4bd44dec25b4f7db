"""Provisioning steps. Each is idempotent (look up before create) and records an event.

The steps take a machine and an open hypervisor driver; they never change the
machine's status (services do that) so a retry can run them all again.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from django.conf import settings
from huey.contrib.djhuey import HUEY
from huey.exceptions import TaskLockedException

from hypervisors.drivers.base import (
    DiskSpec,
    DomainSpec,
    HypervisorDriver,
    HypervisorFatalError,
    HypervisorUnavailable,
    NicSpec,
)
from hypervisors.drivers.domxml import guard_name, host_guard_name, host_guard_xml
from hypervisors.images import ensure_image_copy
from hypervisors.models import Hypervisor, Image
from hypervisors.networks import host_addresses
from machines import attempts, cloudinit, nic_policy, projectkeys
from machines.models import Machine, MachineNic
from machines.states import DeployType

GIB = 1 << 30


def nic_guard(hv: Hypervisor, nic_type: str, source: str, *, host_guard: bool = False) -> str:
    """The traffic filter a NIC carries: the network's guard where the hypervisor has one, and always
    on the tenant network (if its filter went missing, libvirt then refuses to start the domain rather
    than start it unguarded); on a host bridge, with `host_guard` (the machine follows the rules for those
    who are not staff), the bridge's host guard (see ensure_host_guards)."""
    if nic_type == "bridge":
        return host_guard_name(source) if host_guard else ""
    if nic_type != "network":
        return ""
    if source == settings.PORTAL_TENANT_NETWORK:
        return guard_name(source)
    return next((n.get("guard", "") for n in hv.networks if n["name"] == source), "")


def wants_host_guard(machine: Machine) -> bool:
    return nic_policy.follows_rules(machine.owner, machine.project)


def ensure_host_guards(machine: Machine, driver: HypervisorDriver, *, defined: bool = False) -> None:
    """Write the host guard of every host bridge the machine's NICs are on (when it follows the rules),
    from the bridge's MAC and the hypervisor's addresses as the last sync saw them: before the domain is
    defined and before each start, so a bridge whose MAC changed gets a current filter. With `defined`
    (before a start) the domain's NICs are made to name it too, for domains defined before they did
    (e.g. a bridge published after the machine was made). No MAC known: the machine is not defined or
    started (HypervisorFatalError) rather than run unguarded."""
    if not wants_host_guard(machine):
        return
    hv = machine.hypervisor
    bridges = sorted({n.source for n in machine.nics.all() if n.type == "bridge"})
    for bridge in bridges:
        mac = next((i.get("mac", "") for i in hv.interfaces if i["name"] == bridge), "")
        if not mac:
            raise HypervisorFatalError(
                f"host bridge {bridge} on {hv.name}: its MAC is not known (the last sync did not report it), so its "
                f"guard cannot be written and the machine is not started without it; sync {hv.name} and retry."
            )
        driver.define_guard(
            host_guard_xml(
                bridge=bridge,
                host_mac=mac,
                host_addresses=host_addresses(hv),
                host_addresses6=host_addresses(hv, version=6),
            )
        )
    if defined:
        name_host_guards(machine, driver, step="start")


def name_host_guards(machine: Machine, driver: HypervisorDriver, *, step: str) -> None:
    """Make the domain's persistent config name the host guard on its NICs on host bridges (when the
    machine follows the rules), for domains defined before they did; recorded under `step` when it did."""
    bridges = sorted({n.source for n in machine.nics.all() if n.type == "bridge"})
    if not bridges or not wants_host_guard(machine):
        return
    if driver.filter_bridge_nics(str(machine.uuid), {b: host_guard_name(b) for b in bridges}):
        machine.log(step, f"host guard added to the NICs on {', '.join(bridges)} (defined before they had it)")


def _timed(machine: Machine, step: str, fn: Callable[[], str]) -> None:
    """Run one step and record it with how long it took; first, the attempt must still own the machine."""
    attempts.fence()
    started = time.monotonic()
    message = fn()
    machine.log(step, f"{message} ({time.monotonic() - started:.2f} s)")


def seed_spec(machine: Machine) -> cloudinit.SeedSpec:
    return seed_spec_from(machine, list(machine.nics.all()))


def seed_spec_from(machine: Machine, nics: list) -> cloudinit.SeedSpec:
    """The seed for a machine and its NICs (saved MachineNic rows or unsaved NicInput, same fields)."""
    nic_configs = tuple(
        cloudinit.NicConfig(
            mac=n.mac or "52:54:00:00:00:00",
            dhcp4=n.dhcp4,
            dhcp6=n.dhcp6,
            addresses=tuple(n.addresses),
            gateway4=n.gateway4,
            gateway6=n.gateway6,
            nameservers=tuple(n.nameservers),
            search=tuple(n.search),
        )
        for n in nics
    )
    return cloudinit.SeedSpec(
        instance_id=machine.instance_id or f"i-{machine.uuid.hex}",
        hostname=machine.name,
        default_user=(machine.image.default_user if machine.image else "") or "cloud",
        ssh_authorized_keys=(*machine.key_list, *_project_key(machine)),
        packages=tuple(machine.package_list),
        script=machine.script,
        user_data=machine.user_data,
        nics=nic_configs,
    )


def _project_key(machine: Machine) -> tuple[str, ...]:
    """The project's public key (made on first need), which every image machine of a project carries so the
    project's workflows reach it; none for a machine outside projects."""
    project = machine.project if machine.project_id is not None else None
    return () if project is None else (projectkeys.project_public_key(project),)


# What a guest of another architecture needs under emulation: machine type, a 64-bit CPU,
# UEFI (the only firmware of these machines) and a video device they have.
FOREIGN_ARCH_DEFAULTS = {
    "aarch64": {"machine": "virt", "cpu_model": "cortex-a57", "firmware": "efi"},
    "riscv64": {"machine": "virt", "cpu_model": "", "firmware": ""},
    "ppc64le": {"machine": "pseries", "cpu_model": "", "firmware": ""},
    "s390x": {"machine": "s390-ccw-virtio", "cpu_model": "", "firmware": ""},
}


def machine_arch(machine: Machine) -> str:
    return (machine.image.arch if machine.image else "") or machine.hypervisor.arch or "x86_64"


def is_x86(arch: str) -> bool:
    return arch in ("x86_64", "i686")


def cdrom_bus(machine: Machine) -> str:
    """IDE on i440fx (the Debian cloud kernel has no AHCI), SATA on q35, which has no IDE, and
    virtio-scsi on other architectures, which have neither."""
    if not is_x86(machine_arch(machine)):
        return "scsi"
    return "sata" if "q35" in (machine.machine_type or "") else "ide"


def nic_spec(machine: Machine, nic: MachineNic) -> NicSpec:
    """A NIC as the domain XML has it, with the filter that guards its network (a portal network's, or the host
    guard of a host bridge)."""
    return NicSpec(
        type=nic.type,
        source=nic.source,
        mac=nic.mac,
        model=nic.model,
        mode=nic.mode,
        vlan=nic.vlan,
        guard=nic_guard(machine.hypervisor, nic.type, nic.source, host_guard=wants_host_guard(machine)),
    )


def domain_spec(
    machine: Machine, *, disks: tuple[DiskSpec, ...], serial_log: str, boot_devices: tuple[str, ...] = ()
) -> DomainSpec:
    hv = machine.hypervisor
    arch = machine_arch(machine)
    foreign = arch != hv.arch and not (arch == "i686" and hv.arch == "x86_64")
    defaults = FOREIGN_ARCH_DEFAULTS.get(arch, {}) if not is_x86(arch) else {}
    cpu_mode, cpu_model = machine.cpu_mode, machine.cpu_model
    if not cpu_mode and defaults.get("cpu_model"):
        cpu_mode, cpu_model = "custom", defaults["cpu_model"]
    firmware = "efi" if machine.firmware == "uefi" else defaults.get("firmware", "")
    nics = tuple(nic_spec(machine, n) for n in machine.nics.all())
    return DomainSpec(
        uuid=str(machine.uuid),
        name=machine.domain_name,
        title=machine.name,
        description=f"AnsiStack Portal machine {machine.pk} of {machine.owner.get_username()}",
        domain_type="qemu" if foreign else (hv.domain_type or "qemu"),  # another architecture: emulation
        arch=arch,
        vcpus=machine.vcpus,
        memory_mib=machine.memory_mib,
        max_vcpus=machine.max_vcpus or 0,
        max_memory_mib=machine.max_memory_mib or 0,
        disks=disks,
        nics=nics,
        vnc_listen=hv.console_address,
        serial_log=serial_log,
        boot_devices=boot_devices,
        bios_serial=machine.deploy_type == DeployType.NETWORK,  # so PXE shows in the serial log
        machine=machine.machine_type or defaults.get("machine", "pc"),
        cpu_mode=cpu_mode,
        cpu_model=cpu_model,
        firmware=firmware,
        secure_boot=machine.secure_boot,
        video="vga" if is_x86(arch) else "virtio",
        topology=tuple(machine.cpu_topology) if machine.cpu_topology else None,
        smbios=machine.smbios or {},
        watchdog=machine.watchdog,
        rng=machine.rng,
        qemu_args=tuple(machine.qemu_args or ()),
        hostdevs=tuple(d for d in hv.devices if d["name"] in (machine.hostdevs or [])),
        metadata={"id": machine.pk, "owner": machine.owner_id, "deploy-type": machine.deploy_type},
    )


IMAGE_LOCK_WAIT = 600  # seconds to wait for another task copying the same image


@contextmanager
def _waiting_lock(name: str, timeout: float) -> Iterator[None]:
    """Huey's task lock, waited for: machines created together share one image upload."""
    deadline = time.monotonic() + timeout
    lock = HUEY.lock_task(name)
    while True:
        try:
            lock.__enter__()
            break
        except TaskLockedException:
            if time.monotonic() > deadline:
                raise HypervisorUnavailable(
                    "another machine is still copying the same image; trying again later"
                ) from None
            time.sleep(0.1)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def ensure_image(machine: Machine, driver: HypervisorDriver, image: Image | None = None) -> str:
    """The image's path in the machine's pool, copied there through libvirt the first time."""
    image = image or machine.image
    assert image is not None  # only machines with an image (or ISO) get here
    lock = f"image-copy-{image.pk}-{machine.hypervisor_id}-{machine.pool}"
    result: dict = {}

    def step() -> str:
        with _waiting_lock(lock, IMAGE_LOCK_WAIT):
            result["path"], uploaded = ensure_image_copy(image, machine.hypervisor, machine.pool, driver)
        size = image.file_size_bytes / (1 << 20)
        return f"image {image.name} {'copied to' if uploaded else 'already in'} pool {machine.pool} ({size:.1f} MiB)"

    _timed(machine, "image", step)
    return result["path"]


def ensure_disk(machine: Machine, driver: HypervisorDriver, base_path: str) -> str:
    """A qcow2 overlay on the pool's copy of the image, grown to the asked size: never a full copy."""
    result: dict = {}

    def step() -> str:
        image = machine.image
        assert image is not None  # an overlay is only made for an image machine
        vol = driver.create_volume(
            pool=machine.pool,
            name=machine.disk_volume,
            fmt="qcow2",
            capacity_bytes=machine.disk_gib * GIB,
            backing_path=base_path,
            backing_format=image.format,
        )
        result["path"] = vol.path
        return f"disk {machine.disk_gib} GiB, copy-on-write over the image"

    _timed(machine, "disk", step)
    return result["path"]


def ensure_blank_disk(machine: Machine, driver: HypervisorDriver) -> str:
    """A thin qcow2 of the asked size, for an installer (or a network boot) to fill."""
    result: dict = {}

    def step() -> str:
        vol = driver.create_volume(
            pool=machine.pool, name=machine.disk_volume, fmt="qcow2", capacity_bytes=machine.disk_gib * GIB
        )
        result["path"] = vol.path
        return f"blank disk {machine.disk_gib} GiB (thin qcow2)"

    _timed(machine, "disk", step)
    return result["path"]


def extra_disk_entries(machine: Machine) -> list[dict]:
    """Extra disks as {"size_gib", "image", "boot_order"}; a bare number is a blank disk of that size."""
    return [d if isinstance(d, dict) else {"size_gib": d} for d in machine.extra_disks or []]


def extra_disk(machine: Machine, driver: HypervisorDriver, i: int, entry: dict) -> tuple[DiskSpec, str]:
    """Extra disk `i` made unless its volume exists (a blank thin qcow2, or a copy-on-write overlay of an image),
    as the domain takes it; and what was done, for the event."""
    image = Image.objects.filter(pk=entry["image"]).first() if entry.get("image") else None
    backing = ensure_image(machine, driver, image) if image else ""
    vol = driver.create_volume(
        pool=machine.pool,
        name=machine.extra_disk_volume(i),
        fmt="qcow2",
        capacity_bytes=entry["size_gib"] * GIB,
        backing_path=backing,
        backing_format=image.format if image else "",
    )
    disk = DiskSpec(path=vol.path, bus=machine.disk_bus, cache=machine.disk_cache, boot_order=entry.get("boot_order"))
    return disk, f"extra disk {i + 1}: {entry['size_gib']} GiB" + (f" over image {image.name}" if image else " blank")


def ensure_extra_disks(machine: Machine, driver: HypervisorDriver) -> list[DiskSpec]:
    """The extra disks: blank thin ones, or copy-on-write overlays of an image, with their boot order."""
    disks: list[DiskSpec] = []

    def step(i: int, entry: dict) -> str:
        disk, done = extra_disk(machine, driver, i, entry)
        disks.append(disk)
        return done

    for i, entry in enumerate(extra_disk_entries(machine)):
        _timed(machine, "disk", functools.partial(step, i, entry))
    return disks


def boot_order(disks: list[DiskSpec], *defaults: DiskSpec) -> tuple[DiskSpec, ...]:
    """Disks that asked for a boot order come first, in that order; then the defaults (main disk,
    installer CD-ROM) as they are listed. The orders are renumbered from 1."""
    asked = sorted((d for d in disks if d.boot_order), key=lambda d: d.boot_order or 0)
    rank = {id(d): n for n, d in enumerate([*asked, *defaults], start=1)}
    return tuple(replace(d, boot_order=rank.get(id(d))) for d in disks)


def ensure_seed(machine: Machine, driver: HypervisorDriver) -> str:
    """The NoCloud seed ISO (volume id cidata), rebuilt and uploaded on every run."""
    result: dict = {}

    def step() -> str:
        data = cloudinit.build_seed_iso(seed_spec(machine))
        driver.delete_volume(pool=machine.pool, name=machine.seed_volume)
        vol = driver.create_volume(pool=machine.pool, name=machine.seed_volume, fmt="raw", capacity_bytes=len(data))
        driver.upload_volume(pool=machine.pool, name=machine.seed_volume, source=io.BytesIO(data), length=len(data))
        result["path"] = vol.path
        return f"cloud-init seed ({len(data) // 1024} KiB, instance-id {machine.instance_id})"

    _timed(machine, "seed", step)
    return result["path"]


def serial_log_path(machine: Machine, driver: HypervisorDriver) -> str:
    """The serial console log lives in the pool's directory, so libvirt can stream it back from any host."""
    pool_dir = driver.pool_path(machine.pool)
    return f"{pool_dir}/{machine.serial_volume}" if pool_dir.startswith("/") else ""


def ensure_domain(
    machine: Machine, driver: HypervisorDriver, disks: tuple[DiskSpec, ...], boot_devices: tuple[str, ...] = ()
) -> None:
    def step() -> str:
        spec = domain_spec(machine, disks=disks, serial_log=serial_log_path(machine, driver), boot_devices=boot_devices)
        ensure_host_guards(machine, driver)  # first: a NIC on a host bridge must never start without its filter
        created = driver.define_domain(spec)
        driver.set_autostart(spec.uuid, machine.autostart)
        kind = spec.domain_type
        return f"domain {spec.name} {'defined' if created else 'already defined'} ({kind}, {spec.vcpus} vCPU, {spec.memory_mib} MiB)"

    _timed(machine, "define", step)


def ensure_running(machine: Machine, driver: HypervisorDriver) -> None:
    def step() -> str:
        driver.start(str(machine.uuid))
        return "started"

    _timed(machine, "start", step)


def provision(machine: Machine, driver: HypervisorDriver, *, start: bool = True) -> None:
    """Bring the machine to running (start False: defined and left off, as a cold migration's target). Safe to
    re-run after any failure; volumes already there are used as they are."""
    if machine.deploy_type == DeployType.ISO:
        return provision_iso(machine, driver, start=start)
    if machine.deploy_type == DeployType.NETWORK:
        return provision_network(machine, driver, start=start)
    base = ensure_image(machine, driver)
    disk = ensure_disk(machine, driver, base)
    extra = ensure_extra_disks(machine, driver)
    seed = ensure_seed(machine, driver)
    main = DiskSpec(path=disk, format="qcow2", bus=machine.disk_bus, cache=machine.disk_cache)
    seed_disk = DiskSpec(path=seed, device="cdrom", format="raw", bus=cdrom_bus(machine))
    cdroms = cdrom_disks(machine, driver)  # drives added after create (machines.services.devices), after the seed
    ensure_domain(machine, driver, boot_order([main, *extra, seed_disk, *cdroms], main))
    if start:
        ensure_running(machine, driver)


def cdrom_disks(machine: Machine, driver: HypervisorDriver) -> list[DiskSpec]:
    """The ISO machine's CD-ROM drives, each with its ISO copied to the pool (or empty)."""
    disks = []
    for cdrom in machine.cdroms.select_related("image"):
        path = ensure_image(machine, driver, cdrom.image) if cdrom.image else ""
        disks.append(DiskSpec(path=path, device="cdrom", format="raw", bus=cdrom_bus(machine)))
    return disks  # by slot: the installer first


def provision_iso(machine: Machine, driver: HypervisorDriver, *, start: bool = True) -> None:
    """A blank disk first in the boot order, the installer CD-ROM second: a blank disk falls
    through to the installer, and the installed system wins from then on."""
    cdroms = cdrom_disks(machine, driver)
    disk = ensure_blank_disk(machine, driver)
    extra = ensure_extra_disks(machine, driver)
    main = DiskSpec(path=disk, format="qcow2", bus=machine.disk_bus, cache=machine.disk_cache)
    ensure_domain(machine, driver, boot_order([main, *extra, *cdroms], main, *cdroms[:1]))
    if start:
        ensure_running(machine, driver)


def provision_network(machine: Machine, driver: HypervisorDriver, *, start: bool = True) -> None:
    """No OS: a blank disk, network boot first, then disk; defined and left off unless asked.
    Its virtual BMC (manage.py bmc_server) drives it from then on."""
    disk = ensure_blank_disk(machine, driver)
    extra = ensure_extra_disks(machine, driver)
    main = DiskSpec(path=disk, format="qcow2", bus=machine.disk_bus, cache=machine.disk_cache)
    cdroms = cdrom_disks(machine, driver)  # drives added after create (machines.services.devices)
    ensure_domain(machine, driver, (main, *extra, *cdroms), boot_devices=("network", "hd"))
    if start and machine.power_on_after_create:
        ensure_running(machine, driver)
    else:
        machine.log("start", "left powered off; power it on through its BMC")


def cdrom_target(machine: Machine, slot: int) -> str:
    """The guest device of a CD-ROM slot: the disk is virtio, so the drives are the first IDE or SATA/SCSI
    targets (hda, hdb, ... or sda, sdb, ...); an image machine's seed comes first, so its drives after it."""
    first = 1 if machine.deploy_type == DeployType.IMAGE else 0
    return ("hd" if cdrom_bus(machine) == "ide" else "sd") + "abcd"[first + slot]


def deprovision(machine: Machine, driver: HypervisorDriver, *, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the domain and every volume the machine owns (its snapshots' too, but those named in `keep`), and
    the host guard of each host bridge no other machine here has a NIC on. No-op for what is absent. Returns
    what went."""
    removed = []
    if driver.undefine(str(machine.uuid)):
        removed.append(f"domain {machine.domain_name}")
    for bridge in sorted({n.source for n in machine.nics.all() if n.type == "bridge"}):
        others = MachineNic.objects.filter(machine__hypervisor_id=machine.hypervisor_id, type="bridge", source=bridge)
        if not others.exclude(machine=machine).exists() and driver.remove_guard(host_guard_name(bridge)):
            removed.append(f"host guard {host_guard_name(bridge)}")
    driver.refresh_pool(machine.pool)  # the serial log file appears as a volume only after a refresh
    snapshot_volumes = [v for s in machine.snapshots.all() for v in s.volumes]
    for name in [*machine.volumes, *snapshot_volumes]:
        if name not in keep and driver.delete_volume(pool=machine.pool, name=name):
            removed.append(name)
    return removed


def deprovision_adopted(machine: Machine, driver: HypervisorDriver, *, keep_disks: bool) -> list[str]:
    """An adopted machine's end: its disk volumes read from the domain's XML first (they are its own, named as
    whoever made it named them), then the domain undefined, then those volumes deleted unless keep_disks, and
    the host guards as deprovision does. No-op for what is absent. Returns what went."""
    shape = driver.domain_shape(str(machine.uuid))
    disks = [d for d in (shape or {}).get("disks", []) if d["device"] == "disk" and d.get("pool") and d.get("volume")]
    removed = []
    if driver.undefine(str(machine.uuid)):
        removed.append(f"domain {machine.domain_name}")
    for bridge in sorted({n.source for n in machine.nics.all() if n.type == "bridge"}):
        others = MachineNic.objects.filter(machine__hypervisor_id=machine.hypervisor_id, type="bridge", source=bridge)
        if not others.exclude(machine=machine).exists() and driver.remove_guard(host_guard_name(bridge)):
            removed.append(f"host guard {host_guard_name(bridge)}")
    for disk in disks:
        if keep_disks:
            machine.log("delete", f"kept disk {disk['target']}: {disk['pool']}/{disk['volume']}")
        elif driver.delete_volume(pool=disk["pool"], name=disk["volume"]):
            removed.append(f"{disk['pool']}/{disk['volume']}")
    return removed


SERIAL_LOG_LIMIT = 256 * 1024  # bytes of the serial log kept and shown


def fetch_serial_log(machine: Machine, driver: HypervisorDriver, limit: int = SERIAL_LOG_LIMIT) -> str:
    """The tail of the serial console log (at most `limit` bytes), or "" when there is none yet."""
    driver.refresh_pool(machine.pool)
    info = driver.volume_info(pool=machine.pool, name=machine.serial_volume)
    if info is None:
        return ""
    chunks: list[bytes] = []
    offset = max(0, info.capacity_bytes - limit)  # a plain file's capacity is its length
    driver.download_volume(pool=machine.pool, name=machine.serial_volume, sink=chunks.append, offset=offset)
    return b"".join(chunks)[-limit:].decode("utf-8", "replace")
