"""Changing a machine after create, for real: one tiny guest on the host's libvirtd through the real worker. Made
with room for 2 vCPUs, it is grown from 1 to 2 while it runs (the domain's live count, as `virsh vcpucount` and
the driver read it); a memory change beyond its maximum is kept pending and runs after a cold restart; shut off,
it is renamed (its domain too, as `virsh list` shows); its tags filter the list."""

from __future__ import annotations

import subprocess
import time

import pytest
from django.test import Client

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


def power(machine: Machine, action: str, state: str) -> Machine:
    services.machine_power(machine=Machine.objects.get(pk=machine.pk), action=action, actor=machine.owner)
    machine = settled(machine)
    assert machine.power_state == state, machine.events.last()
    return machine


def test_a_tiny_guest_grows_live_waits_for_a_cold_start_is_renamed_and_filtered_by_tag(local, tiny_image):
    owner = UserFactory(username="changer", is_staff=True)  # staff: the user-mode NIC
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="grow1",
        image=tiny_image,
        vcpus=1,
        max_vcpus=2,
        memory_mib=128,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
        tags=["int-test"],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    uuid, driver = str(machine.uuid), LibvirtDriver(local.uri)
    assert virsh("vcpucount", uuid, "--live", "--active").strip() == "1"
    assert virsh("vcpucount", uuid, "--live", "--maximum").strip() == "2"

    # 1 -> 2 vCPUs while it runs, within the maximum chosen at create: live, nothing pending.
    started = time.monotonic()
    services.machine_change(machine=machine, actor=owner, vcpus=2)
    machine = settled(machine)
    live = time.monotonic() - started
    assert machine.pending == {} and machine.vcpus == 2, list(machine.events.values_list("message", flat=True))
    assert virsh("vcpucount", uuid, "--live", "--active").strip() == "2"
    assert virsh("vcpucount", uuid, "--config", "--active").strip() == "2"
    assert driver.domain_size(uuid).live_vcpus == 2
    assert driver.domain_state(uuid) == "running"

    # 128 -> 192 MiB, beyond its maximum (128): in the config now, pending until a cold start.
    services.machine_change(machine=machine, actor=owner, memory_mib=192)
    machine = settled(machine)
    assert machine.pending == {"memory_mib": 192} and machine.memory_mib == 192
    size = driver.domain_size(uuid)
    assert (size.memory_mib, size.max_memory_mib, size.live_max_memory_mib) == (192, 192, 128)
    page = Client()
    page.force_login(owner)
    assert b"Applies at next cold start: 192 MiB memory" in page.get(f"/machines/{machine.pk}/").content

    # A rename while it runs is refused; shut off, the domain is renamed.
    with pytest.raises(services.MachineError, match="only while it is shut off"):
        services.machine_change(machine=machine, actor=owner, name="grown1")
    machine = power(machine, "poweroff", "off")
    assert machine.pending == {"memory_mib": 192}  # an off machine has not booted it yet
    services.machine_change(machine=machine, actor=owner, name="grown1")
    machine = settled(machine)
    assert machine.name == "grown1" and machine.domain_name == f"grown1-{machine.uuid.hex[:8]}"
    assert machine.domain_name in virsh("list", "--all", "--name").split()
    assert f"grow1-{machine.uuid.hex[:8]}" not in virsh("list", "--all", "--name").split()

    # The cold start boots the config: the pending memory runs, and the renamed domain with it.
    started = time.monotonic()
    machine = power(machine, "start", "running")
    cold = time.monotonic() - started
    assert machine.pending == {}
    assert machine.domain_name in virsh("list", "--name").split()
    size = driver.domain_size(uuid)
    assert (size.live_vcpus, size.live_max_memory_mib) == (2, 192)
    assert "262144" not in virsh("dominfo", uuid) and "196608 KiB" in virsh("dominfo", uuid)  # Max memory

    # Smaller values wait too; a start from outside the portal (virsh) boots them, and the reconcile, seeing
    # the domain's new run, reads its size and clears what runs.
    services.machine_change(machine=machine, actor=owner, vcpus=1, memory_mib=160)
    machine = settled(machine)
    assert machine.pending == {"vcpus": 1, "memory_mib": 160}
    services.hypervisor_reconcile_run(local.pk)  # the same run as at the change: it runs neither yet
    assert Machine.objects.get(pk=machine.pk).pending == {"vcpus": 1, "memory_mib": 160}
    virsh("destroy", uuid)
    virsh("start", uuid)
    started = time.monotonic()

    def cleared() -> bool:  # the guest's balloon driver gives the memory back within seconds of its boot
        services.hypervisor_reconcile_run(local.pk)
        return Machine.objects.get(pk=machine.pk).pending == {}

    wait_for(cleared, 60, interval=1.0)
    seen = time.monotonic() - started
    machine = Machine.objects.get(pk=machine.pk)
    assert machine.pending == {}, list(machine.events.values_list("message", flat=True))
    assert machine.events.filter(message__startswith="running since a start outside the portal").exists()
    size = driver.domain_size(uuid)
    assert (size.live_vcpus, size.live_memory_mib) == (1, 160)
    assert virsh("vcpucount", uuid, "--live", "--active").strip() == "1"

    # The maxima after create: raised while it runs, in the config at once and pending until a cold start;
    # while it is off, set at once. After the start the guest grows live up to the new maximum.
    services.machine_change(machine=machine, actor=owner, max_vcpus=3)
    machine = settled(machine)
    assert machine.pending == {"max_vcpus": 3} and machine.max_vcpus == 3
    assert virsh("vcpucount", uuid, "--config", "--maximum").strip() == "3"
    assert virsh("vcpucount", uuid, "--live", "--maximum").strip() == "2"
    machine = power(machine, "poweroff", "off")
    started = time.monotonic()
    services.machine_change(machine=machine, actor=owner, max_memory_mib=256)
    machine = settled(machine)
    off_change = time.monotonic() - started
    assert machine.max_memory_mib == 256 and driver.domain_size(uuid).max_memory_mib == 256
    machine = power(machine, "start", "running")
    assert machine.pending == {}
    size = driver.domain_size(uuid)
    assert (size.live_max_vcpus, size.live_max_memory_mib) == (3, 256)
    services.machine_change(machine=machine, actor=owner, vcpus=3)
    machine = settled(machine)
    assert "vcpus" not in machine.pending, list(machine.events.values_list("message", flat=True))
    assert virsh("vcpucount", uuid, "--live", "--active").strip() == "3"
    # Read seconds after the boot, the balloon may not be down to 160 MiB yet, so the worker may keep the memory
    # pending; the reconcile clears it once the guest runs it.
    wait_for(cleared, 60, interval=1.0)

    # Tags: the API's list and the page filter by them.
    services.machine_change(machine=machine, actor=owner, tags=["int-test", "grown"])
    api = page.get("/api/v1/machines/?tag=grown").json()["results"]
    assert [m["name"] for m in api] == ["grown1"]
    assert page.get("/api/v1/machines/?tag=absent").json()["results"] == []
    print(
        f"\nlive 1 -> 2 vCPUs in {live:.1f} s; cold start with the pending memory in {cold:.1f} s; "
        f"an outside start's pending cleared by the reconcile {seen:.1f} s after it; a maximum set while off in "
        f"{off_change:.1f} s"
    )

    services.machine_delete(machine=Machine.objects.get(pk=machine.pk), actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert machine.domain_name not in virsh("list", "--all", "--name").split()
