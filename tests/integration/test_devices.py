"""Devices after create, for real: one tiny guest on the host's libvirtd through the real worker. A virtio disk is
hot-plugged into the running guest (`virsh domblklist` lists it, and the guest's kernel sees it on its serial
console) and hot-unplugged with its volume deleted; shut off, a CD-ROM drive with an ISO is added to the image
machine and a NIC attached and detached (the domain's XML shows each); started again, it runs with the drive."""

from __future__ import annotations

import subprocess
import time

import pytest

from hypervisors.drivers.libvirt_driver import LibvirtDriver
from machines import services
from machines.models import Machine
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True).stdout


def settled(machine: Machine, timeout: float = 120) -> Machine:
    """The machine once the worker released its operation."""
    return wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).operation == "" and m, timeout)


def targets(uuid: str) -> dict[str, str]:
    """`virsh domblklist`: target -> source, of the running domain."""
    lines = virsh("domblklist", uuid).splitlines()[2:]
    return {parts[0]: parts[1] for parts in (line.split() for line in lines) if len(parts) == 2}


def events(machine: Machine) -> list[str]:
    return list(machine.events.values_list("message", flat=True))


def test_a_tiny_guest_takes_a_disk_live_and_a_cd_rom_and_a_nic_while_off(local, tiny_image, tiny_iso):
    owner = UserFactory(username="devices", is_staff=True)  # staff: the user-mode NIC
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="dev1",
        image=tiny_image,
        memory_mib=128,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    uuid, driver = str(machine.uuid), LibvirtDriver(local.uri)
    assert "vdb" not in targets(uuid)

    # A blank virtio disk into the running guest.
    started = time.monotonic()
    services.machine_attach_disk(machine=machine, actor=owner, size_gib=1)
    machine = settled(machine)
    attach = time.monotonic() - started
    volume = f"m-{machine.uuid}-disk1.qcow2"
    assert targets(uuid).get("vdb", "").endswith(volume), (targets(uuid), events(machine))
    assert "vdb" in driver.domain_xml(uuid, inactive=True)
    assert machine.extra_disks == [{"size_gib": 1, "n": 1}]
    assert "attached as vdb (the running guest has it now)" in events(machine)[-1]

    # The guest's kernel saw it: virtio_blk announces vdb on the serial console.
    def seen() -> bool:
        services.machine_serial_log_run(machine.pk)
        return "[vdb]" in Machine.objects.get(pk=machine.pk).last_observed.serial_log  # "virtio_blk virtio3: [vdb] ..."

    wait_for(seen, 30, interval=1.0)

    # Hot-unplugged (the guest lets it go), and its volume deleted.
    started = time.monotonic()
    services.machine_detach_disk(machine=machine, actor=owner, disk=1)
    machine = settled(machine)
    detach = time.monotonic() - started
    assert "vdb" not in targets(uuid), events(machine)
    assert "vdb" not in driver.domain_xml(uuid, inactive=True)
    driver.refresh_pool(machine.pool)
    assert driver.volume_info(pool=machine.pool, name=volume) is None
    assert machine.extra_disks == [] and f"its volume {volume} deleted" in events(machine)[-1]

    # Shut off: a CD-ROM drive with the tiny ISO, after the seed (hda), and a NIC on and off again.
    with pytest.raises(services.MachineError, match="Shut it down first"):
        services.machine_add_cdrom(machine=machine, actor=owner, image=tiny_iso)
    services.machine_power(machine=machine, action="poweroff", actor=owner)
    machine = settled(machine)
    assert machine.power_state == "off"
    services.machine_add_cdrom(machine=machine, actor=owner, image=tiny_iso)
    machine = settled(machine)
    config = driver.domain_xml(uuid, inactive=True)
    assert "dev='hdb'" in config or 'dev="hdb"' in config, events(machine)
    assert machine.cdroms.get().image == tiny_iso and "added as hdb with tiny-installer" in events(machine)[-1]

    mac = "52:54:00:de:70:01"
    services.machine_attach_nic(machine=machine, actor=owner, nic=services.NicInput(type="user", mac=mac))
    machine = settled(machine)
    assert mac in virsh("dumpxml", "--inactive", uuid), events(machine)
    assert machine.nics.count() == 2
    services.machine_detach_nic(machine=machine, actor=owner, nic=2)
    machine = settled(machine)
    assert mac not in virsh("dumpxml", "--inactive", uuid), events(machine)
    assert machine.nics.count() == 1

    # Started again, it runs with the drive (its ISO in it); eject works live.
    services.machine_power(machine=machine, action="start", actor=owner)
    machine = settled(machine)
    assert machine.power_state == "running"
    assert targets(uuid)["hdb"].startswith("/"), targets(uuid)
    services.machine_change_media(machine=machine, slot=0, image=None, actor=owner)
    machine = settled(machine)
    assert targets(uuid)["hdb"] == "-", (targets(uuid), events(machine))
    print(f"\nhot attach {attach:.2f} s, hot detach with the volume {detach:.2f} s")
