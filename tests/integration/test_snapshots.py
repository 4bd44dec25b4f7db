"""Snapshots for real, on the host's libvirtd through the real worker: the tiny guest writes a marker on its disk
(and one in its memory), the portal snapshots it, the guest changes both, the portal reverts, and the originals are
read back from the serial console; deleting the snapshot leaves no libvirt metadata, no snapshot inside the qcow2
and no volume behind. A BIOS machine takes an internal snapshot with its memory while it runs (it comes back
running); a UEFI machine an external disk-only one (an overlay volume, merged back on delete)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from hypervisors.drivers.base import HypervisorDriver, HypervisorFatalError
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from machines import services
from machines.models import Machine, MachineSnapshot
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration

SECTOR = 1_500_000  # where on the 1 GiB disk the marker goes (past the image's own data)
DISK_MARK = re.compile(rb"MARK-(ORIG|CHANGED|MERGED)")
RAM_MARK = re.compile(rb"RAM-(ORIG|CHANGED|MERGED)")


class Serial:
    """The guest's serial port through the driver, read as it comes."""

    def __init__(self, driver: HypervisorDriver, uuid: str) -> None:
        self.sock = driver.serial_console(uuid, take_over=True)
        self.sock.settimeout(0.2)
        self.data = b""

    def read_until(self, pattern: re.Pattern, timeout: float, after: int = 0, poke: bool = False) -> re.Match:
        deadline = time.monotonic() + timeout
        while (found := pattern.search(self.data, after)) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the serial console never showed {pattern.pattern!r}: {self.data[-600:]!r}")
            if poke:
                self.sock.sendall(b"\r")
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                self.data += chunk
        return found

    def run(self, command: str) -> int:
        start = len(self.data)
        self.sock.sendall(command.encode() + b"\r")
        return start

    def close(self) -> None:
        self.sock.close()


def write_marks(driver: HypervisorDriver, uuid: str, word: str) -> None:
    """The guest writes MARK-<word> at SECTOR of its disk and RAM-<word> in a file of its RAM disk."""
    serial = Serial(driver, uuid)
    try:
        serial.read_until(re.compile(rb"# "), 90, poke=True)
        at = serial.run(
            f"printf 'MARK-%s\\n' {word} | dd of=/dev/vda bs=512 seek={SECTOR} conv=notrunc 2>/dev/null;"
            f" printf 'RAM-%s\\n' {word} > /tmp/mark; sync; echo WROTE-$((6*7))"
        )
        serial.read_until(re.compile(rb"WROTE-42"), 60, after=at)
    finally:
        serial.close()


def read_marks(driver: HypervisorDriver, uuid: str) -> tuple[bytes, bytes]:
    """What the guest reads back: the disk's marker (page cache dropped, so from the disk) and the RAM one."""
    serial = Serial(driver, uuid)
    try:
        serial.read_until(re.compile(rb"# "), 90, poke=True)
        at = serial.run(
            f"echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip={SECTOR} count=1 2>/dev/null | head -c 16;"
            " echo; cat /tmp/mark 2>/dev/null || echo RAM-NONE; echo READ-$((6*7))"
        )
        serial.read_until(re.compile(rb"READ-42"), 60, after=at)
        disk, ram = DISK_MARK.search(serial.data, at), RAM_MARK.search(serial.data, at)
        return (disk.group(1) if disk else b"NONE"), (ram.group(1) if ram else b"NONE")
    finally:
        serial.close()


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True).stdout


def settled(machine: Machine, timeout: float = 120) -> Machine:
    """The machine once the worker released its operation."""
    return wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).operation == "" and m, timeout)


def ready(snap: MachineSnapshot, timeout: float = 120) -> MachineSnapshot:
    s = wait_for(lambda: (s := MachineSnapshot.objects.get(pk=snap.pk)).status in ("ready", "error") and s, timeout)
    assert s.status == "ready", s.status_message
    return s


def machine_volumes(machine: Machine) -> set[str]:
    virsh("pool-refresh", machine.pool)
    return {line.split()[0] for line in virsh("vol-list", machine.pool).splitlines() if str(machine.uuid) in line}


def make_machine(local, image, name: str, **hw) -> Machine:
    owner = UserFactory(username=f"snap-{name}", is_staff=True)  # staff: the user-mode NIC
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name=name,
        image=image,
        memory_mib=128 if not hw else 256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
        **hw,
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    return machine


def test_a_bios_machine_reverts_to_an_internal_memory_snapshot_and_delete_leaves_nothing(local, tiny_image):
    machine = make_machine(local, tiny_image, "snapbios")
    uuid, driver = str(machine.uuid), LibvirtDriver(local.uri)
    owner = machine.owner
    write_marks(driver, uuid, "ORIG")

    started = time.monotonic()
    snap = services.snapshot_create(
        machine=machine, name="before", description="the original", memory=True, actor=owner
    )
    snap = ready(snap)
    took = time.monotonic() - started
    assert (snap.kind, snap.memory, snap.parent) == ("internal", True, None) and snap.size_bytes > 0
    listed = virsh("snapshot-list", uuid, "--name").split()
    assert listed == ["before"]
    machine = settled(machine)

    write_marks(driver, uuid, "CHANGED")
    assert read_marks(driver, uuid) == (b"CHANGED", b"CHANGED")

    started = time.monotonic()
    services.snapshot_revert(machine=Machine.objects.get(pk=machine.pk), snapshot=snap, actor=owner)
    machine = settled(machine)
    reverted = time.monotonic() - started
    assert machine.power_state == "running"  # a memory snapshot of a running machine comes back running
    assert driver.domain_state(uuid) == "running"
    assert read_marks(driver, uuid) == (b"ORIG", b"ORIG")  # the disk and the memory as they were

    disk = f"{driver.pool_path(machine.pool)}/{machine.disk_volume}"
    services.snapshot_delete(machine=machine, snapshot=MachineSnapshot.objects.get(pk=snap.pk), actor=owner)
    wait_for(lambda: not MachineSnapshot.objects.filter(pk=snap.pk).exists(), 120)
    machine = settled(machine)
    assert virsh("snapshot-list", uuid, "--name").split() == []
    inside = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", disk], capture_output=True, text=True, check=True
        ).stdout
    )
    assert not inside.get("snapshots"), inside.get("snapshots")  # nothing left inside the qcow2
    assert machine_volumes(machine) == {machine.disk_volume, machine.seed_volume, machine.serial_volume}
    assert read_marks(driver, uuid) == (b"ORIG", b"ORIG")  # a delete changes nothing in the guest
    print(
        f"\nBIOS internal snapshot with {machine.memory_mib} MiB: taken in {took:.1f} s, reverted in {reverted:.1f} s"
    )

    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert machine_volumes(machine) == set()


def test_a_uefi_machine_reverts_to_an_external_disk_only_snapshot_and_delete_merges_it_back(local, file_server):
    from tests.integration.test_firmware_arch import import_image

    image = import_image(file_server, "tiny_uefi_disk", "tiny-uefi-snap", "x86_64")
    machine = make_machine(local, image, "snapuefi", firmware="uefi", machine_type="q35")
    uuid, driver, owner = str(machine.uuid), LibvirtDriver(local.uri), machine.owner
    assert services.snapshot_method(machine) == "external"
    with pytest.raises(HypervisorFatalError, match="pflash") as refused:  # why the portal goes external for UEFI
        driver.snapshot_create(uuid, name="internal", memory=True)
    print(f"\nlibvirt on an internal snapshot of a UEFI machine: {refused.value}")
    write_marks(driver, uuid, "ORIG")

    started = time.monotonic()
    snap = ready(services.snapshot_create(machine=machine, name="before", actor=owner))
    took = time.monotonic() - started
    overlay = f"m-{machine.uuid}-disk-snap{snap.pk}.qcow2"
    assert (snap.kind, snap.memory, snap.quiesced) == ("external", False, False)  # no guest agent in the tiny guest
    assert overlay in machine_volumes(machine)
    assert f"/{overlay}'" in virsh("dumpxml", uuid)  # the guest writes to the overlay now
    machine = settled(machine)

    write_marks(driver, uuid, "CHANGED")
    started = time.monotonic()
    services.snapshot_revert(machine=Machine.objects.get(pk=machine.pk), snapshot=snap, actor=owner)
    machine = settled(machine)
    reverted = time.monotonic() - started
    assert machine.power_state == "off"  # a disk-only snapshot comes back off
    services.machine_power(machine=machine, action="start", actor=owner)
    machine = settled(machine)
    disk, ram = read_marks(driver, uuid)
    assert (disk, ram) == (b"ORIG", b"NONE")  # the disk as it was; a fresh boot, so nothing in RAM

    write_marks(driver, uuid, "MERGED")  # into the overlay: the delete must merge it into the disk below
    started = time.monotonic()
    services.snapshot_delete(machine=machine, snapshot=MachineSnapshot.objects.get(pk=snap.pk), actor=owner)
    wait_for(lambda: not MachineSnapshot.objects.filter(pk=snap.pk).exists(), 120)
    machine = settled(machine)
    deleted = time.monotonic() - started
    assert virsh("snapshot-list", uuid, "--name").split() == []
    assert overlay not in machine_volumes(machine)
    assert overlay not in virsh("dumpxml", uuid) and overlay not in virsh("dumpxml", "--inactive", uuid)
    assert read_marks(driver, uuid)[0] == b"MERGED"  # merged back: the disk reads what the guest wrote last
    print(
        f"UEFI external snapshot: taken in {took:.1f} s, reverted in {reverted:.1f} s, merged back in {deleted:.1f} s"
    )

    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert machine_volumes(machine) == set()


def test_a_rebuild_keeps_the_old_disk_as_a_snapshot_that_brings_it_back(local, tiny_image):
    machine = make_machine(local, tiny_image, "snaprebuild")
    uuid, driver, owner = str(machine.uuid), LibvirtDriver(local.uri), machine.owner
    write_marks(driver, uuid, "ORIG")

    started = time.monotonic()
    services.machine_rebuild(machine=Machine.objects.get(pk=machine.pk), actor=owner)
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    rebuilt = time.monotonic() - started
    assert machine.status == "active", machine.status_message
    kept = machine.snapshots.get()
    assert kept.kept_disk and kept.status == "ready" and kept.size_bytes > 0
    assert kept.volume(0) in machine_volumes(machine)
    assert read_marks(driver, uuid)[0] == b"NONE"  # a fresh disk from the image: no marker there

    services.snapshot_revert(machine=Machine.objects.get(pk=machine.pk), snapshot=kept, actor=owner)
    machine = settled(machine)
    assert machine.power_state == "off"
    services.machine_power(machine=machine, action="start", actor=owner)
    machine = settled(machine)
    assert read_marks(driver, uuid)[0] == b"ORIG"  # the disk from before the rebuild
    print(f"\nrebuild keeping the old disk: {rebuilt:.1f} s; the kept copy holds {kept.size_bytes} bytes")

    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert machine_volumes(machine) == set()
