"""Clones and images from machines for real, on the host's libvirtd through the real worker. The tiny guest writes
a marker on its disk and is stopped; a linked clone and a full copy are made, each boots with its own MAC, its own
cloud-init instance-id and host name (read from its serial console, where the tiny guest prints its seed) and reads
the source's marker from its disk; the linked clone's disk is a thin qcow2 layer on the pool's copy of the image,
the full copy's a standalone file. The source then boots unchanged (its instance-id, MAC and marker), the clones'
writes never reaching it. Its disk saved as an image lands in the catalogue, ready, and a machine made from that
image boots with the marker on its disk.

Guests, to spare the two shared cores: four tiny ones (128 MiB), at most two running at a time."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from hypervisors.drivers.base import HypervisorFatalError, PowerState
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from hypervisors.models import Image
from machines import provisioning, services
from machines.models import Machine, MachineSnapshot
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.integration.test_snapshots import SECTOR, Serial, machine_volumes

pytestmark = pytest.mark.integration

INSTANCE_ID = re.compile(rb"instance-id: *['\"]?(i-[0-9a-f]+)")
HOSTNAME = re.compile(rb"TINY-GUEST hostname=([a-z0-9-]+)")
MARK = re.compile(rb"CLONE-(ORIG|CHANGED)")
MAC = re.compile(rb"MAC=([0-9a-f:]{17})")


def active(machine: Machine, timeout: float = 240) -> Machine:
    m = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, timeout)
    assert m.status == "active", m.status_message
    return m


def idle(machine: Machine, timeout: float = 120) -> Machine:
    return wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).operation == "" and m, timeout)


def power(machine: Machine, action: str, want: str) -> Machine:
    services.machine_power(machine=Machine.objects.get(pk=machine.pk), action=action, actor=machine.owner)
    idle(machine)
    return wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).power_state == want and m, 120)


def booted(driver: LibvirtDriver, machine: Machine) -> dict:
    """What the guest printed at boot (serial log: instance-id, host name), then what it reads now over its serial
    console (its NIC's MAC, the marker at SECTOR of its disk)."""

    def log_so_far() -> bytes:
        try:
            return provisioning.fetch_serial_log(machine, driver).encode()
        except HypervisorFatalError as e:  # the pool's refresh while another volume job runs on it (shared host)
            if "asynchronous jobs running" not in str(e):
                raise
            return b""

    log = wait_for(lambda: (t := log_so_far()) and b"TINY-GUEST ready" in t and t, 120)
    serial = Serial(driver, str(machine.uuid))
    try:
        serial.read_until(re.compile(rb"# "), 90, poke=True)
        at = serial.run(
            "echo MAC=$(cat /sys/class/net/eth0/address); echo 3 > /proc/sys/vm/drop_caches;"
            f" dd if=/dev/vda bs=512 skip={SECTOR} count=1 2>/dev/null | head -c 16; echo; echo READ-$((6*7))"
        )
        serial.read_until(re.compile(rb"READ-42"), 60, after=at)
        mac, mark = MAC.search(serial.data, at), MARK.search(serial.data, at)
    finally:
        serial.close()
    return {
        "instance_id": INSTANCE_ID.findall(log)[-1].decode(),
        "hostname": HOSTNAME.findall(log)[-1].decode(),
        "mac": mac.group(1).decode() if mac else "",
        "mark": mark.group(1).decode() if mark else "",
    }


def write_mark(driver: LibvirtDriver, machine: Machine, word: str) -> None:
    serial = Serial(driver, str(machine.uuid))
    try:
        serial.read_until(re.compile(rb"# "), 90, poke=True)
        at = serial.run(
            f"printf 'CLONE-%s\\n' {word} | dd of=/dev/vda bs=512 seek={SECTOR} conv=notrunc 2>/dev/null; sync;"
            " echo WROTE-$((6*7))"
        )
        serial.read_until(re.compile(rb"WROTE-42"), 60, after=at)
    finally:
        serial.close()


def qemu_img_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def delete(machine: Machine) -> None:
    services.machine_delete(machine=Machine.objects.get(pk=machine.pk), actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 90)


def test_linked_and_full_clones_boot_as_new_instances_and_a_saved_image_boots(local, tiny_image, monkeypatch):
    owner = UserFactory(username="cloner", is_staff=True)  # staff: the user-mode NIC, which needs no host network
    source = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="golden",
        image=tiny_image,
        memory_mib=128,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    source = active(source)
    driver = LibvirtDriver(local.uri)
    pool_dir = driver.pool_path(source.pool)
    first = booted(driver, source)
    assert first["instance_id"] == source.instance_id and first["hostname"] == "golden"
    write_mark(driver, source, "ORIG")
    source = power(source, "poweroff", "off")

    Machine.objects.filter(pk=source.pk).update(power_state="running")  # as a reconcile would see it running
    with pytest.raises(services.MachineError, match="running: shut it down first"):
        services.machine_clone(machine=Machine.objects.get(pk=source.pk), actor=owner, name="x")
    Machine.objects.filter(pk=source.pk).update(power_state="off")
    source.refresh_from_db()

    started = time.monotonic()
    (linked,) = services.machine_clone(machine=source, actor=owner, name="golden-linked", linked=True)
    linked = active(linked)
    linked_s = time.monotonic() - started
    idle(source)
    started = time.monotonic()
    (full,) = services.machine_clone(machine=source, actor=owner, name="golden-full", linked=False)
    full = active(full)
    full_s = time.monotonic() - started

    base = qemu_img_info(f"{pool_dir}/{source.disk_volume}")["backing-filename"]
    linked_disk = qemu_img_info(f"{pool_dir}/{linked.disk_volume}")
    full_disk = qemu_img_info(f"{pool_dir}/{full.disk_volume}")
    assert linked_disk["backing-filename"] == base and base.startswith(f"{pool_dir}/portal-image-")
    assert "backing-filename" not in full_disk
    assert linked_disk["actual-size"] < full_disk["actual-size"]

    seen = {}
    for clone in (linked, full):
        got = booted(driver, clone)
        nic = clone.nics.get()
        assert got["instance_id"] == clone.instance_id != source.instance_id
        assert got["hostname"] == clone.name
        assert got["mac"] == nic.mac != source.nics.get().mac
        assert got["mark"] == "ORIG"  # the source's disk as it was when stopped
        write_mark(driver, clone, "CHANGED")
        seen[clone.name] = got
        delete(clone)  # two guests at most at any time
    assert len({g["instance_id"] for g in seen.values()} | {source.instance_id}) == 3
    assert Machine.objects.filter(cloned_from=source).count() == 0  # both deleted; the source stays whole

    source = power(source, "start", "running")
    again = booted(driver, source)
    assert again["instance_id"] == source.instance_id and again["mac"] == source.nics.get().mac
    assert again["mark"] == "ORIG"  # the clones' writes never reached it
    source = power(source, "poweroff", "off")

    started = time.monotonic()
    image = services.image_from_machine(machine=source, actor=owner, name="golden-image", os_name="Tiny Linux")
    image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status in ("ready", "error") and i, 180)
    saved_s = time.monotonic() - started
    assert image.status == "ready", image.status_message
    assert image.owner == owner and image.default_user == "tiny" and image.virtual_size_bytes == 1 << 30
    assert not any("-export" in v for v in machine_volumes(source))  # the flattened copy is gone
    made = active(
        services.machine_create(
            owner=owner,
            hypervisor=local,
            name="from-golden",
            image=image,
            memory_mib=128,
            disk_gib=1,
            nics=[services.NicInput(type="user")],
        )
    )
    got = booted(driver, made)
    assert got["hostname"] == "from-golden" and got["mark"] == "ORIG"
    print(
        f"\nclones of a 1 GiB tiny machine: linked to active in {linked_s:.1f} s "
        f"({linked_disk['actual-size'] >> 10} KiB disk), full copy in {full_s:.1f} s "
        f"({full_disk['actual-size'] >> 10} KiB); saved as an image in {saved_s:.1f} s "
        f"({image.file_size_bytes >> 10} KiB)"
    )
    delete(made)

    # A clone of a disk-only (external) snapshot, taken while the source runs: the disk below the snapshot's
    # overlay, copied whole while the source goes on writing into the overlay. (The tiny BIOS guest is given the
    # UEFI machines' method, which libvirt takes for any domain, to spare a slower UEFI boot.)
    monkeypatch.setattr("machines.services.snapshots.snapshot_method", lambda machine: "external")
    source = power(source, "start", "running")
    snap = services.snapshot_create(machine=Machine.objects.get(pk=source.pk), name="disk-only", actor=owner)
    snap = wait_for(lambda: (s := MachineSnapshot.objects.get(pk=snap.pk)).status in ("ready", "error") and s, 120)
    assert (snap.status, snap.kind) == ("ready", "external"), snap.status_message
    source = idle(source)
    write_mark(driver, source, "CHANGED")  # into the overlay, after the snapshot
    started = time.monotonic()
    (from_snap,) = services.machine_clone(machine=source, actor=owner, name="golden-snap", snapshot=snap)
    from_snap = active(from_snap)
    snap_s = time.monotonic() - started
    snap_disk = qemu_img_info(f"{pool_dir}/{from_snap.disk_volume}")
    assert "backing-filename" not in snap_disk and snap_disk["virtual-size"] == 1 << 30  # standalone, its size
    assert "full copy" in from_snap.events.get(step="create").message
    got = booted(driver, from_snap)
    assert got["instance_id"] == from_snap.instance_id and got["mark"] == "ORIG"  # the disk at the snapshot
    print(
        f"clone of a disk-only snapshot while the source runs: active in {snap_s:.1f} s ({snap_disk['actual-size'] >> 10} KiB)"
    )
    delete(from_snap)
    delete(source)


def test_a_clone_of_an_internal_snapshot_reads_the_disk_as_it_was_and_the_source_stays_as_it_is(local, tiny_image):
    """A BIOS machine's snapshot lives inside its qcow2 file: the clone, made through libvirt alone with the source
    off (kept, reverted to the snapshot, copied, reverted back), boots with the disk as the snapshot holds it."""
    owner = UserFactory(username="inside-cloner", is_staff=True)
    source = active(
        services.machine_create(
            owner=owner,
            hypervisor=local,
            name="inside",
            image=tiny_image,
            memory_mib=128,
            disk_gib=1,
            nics=[services.NicInput(type="user")],
        )
    )
    driver = LibvirtDriver(local.uri)
    disk_path = f"{driver.pool_path(source.pool)}/{source.disk_volume}"
    booted(driver, source)
    write_mark(driver, source, "ORIG")
    snap = services.snapshot_create(machine=Machine.objects.get(pk=source.pk), name="a", memory=True, actor=owner)
    snap = wait_for(lambda: (s := MachineSnapshot.objects.get(pk=snap.pk)).status in ("ready", "error") and s, 120)
    assert (snap.status, snap.kind) == ("ready", "internal"), snap.status_message
    idle(source)
    write_mark(driver, source, "CHANGED")  # after the snapshot
    source = power(source, "poweroff", "off")
    snapshots_before = driver.snapshot_list(str(source.uuid))
    inside_before = [s["name"] for s in qemu_img_info(disk_path).get("snapshots", [])]
    assert inside_before == ["a"]

    started = time.monotonic()
    (c,) = services.machine_clone(machine=source, actor=owner, name="inside-clone", snapshot=snap)
    c = active(c)
    clone_s = time.monotonic() - started
    copy = qemu_img_info(f"{driver.pool_path(c.pool)}/{c.disk_volume}")
    assert "backing-filename" not in copy and "snapshots" not in copy  # standalone, no snapshots carried over
    assert driver.snapshot_list(str(source.uuid)) == snapshots_before  # no temporary snapshot left, same current
    assert [s["name"] for s in qemu_img_info(disk_path).get("snapshots", [])] == inside_before
    assert driver.domain_state(str(source.uuid)) == PowerState.OFF
    got = booted(driver, c)
    assert got["instance_id"] == c.instance_id and got["mark"] == "ORIG"  # the disk as in snapshot a
    copied = c.events.get(message__startswith="copied from").created - c.events.filter(step="create")[0].created
    print(
        f"\nclone of an internal memory snapshot: disk copied (keep, revert, copy, revert back) "
        f"{copied.total_seconds():.1f} s after the request, active in {clone_s:.1f} s ({copy['actual-size'] >> 10} KiB disk)"
    )
    delete(c)
    source = power(source, "start", "running")
    assert booted(driver, source)["mark"] == "CHANGED"  # the source's own disk, as before the clone
    delete(source)
