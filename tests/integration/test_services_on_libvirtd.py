"""What the unit layer checks only against the fake driver, on the host's real libvirtd.

The reconcile (a domain that vanished behind the portal's back, a machine stuck busy), growing the disk of
a machine that is off, and a network the portal defines and deletes again. The services run in this
process and their tasks inline (HUEY.immediate), through get_driver: LibvirtDriver("qemu:///system").
Domains are defined straight through the driver with a blank disk (no image to copy, nothing to boot), so
each test takes seconds. The contract of the driver itself is tests/hypervisors/test_driver_contract.py.
"""

from __future__ import annotations

import uuid as uuidlib
from datetime import timedelta

import pytest
from django.utils import timezone

from hypervisors import networks
from hypervisors.drivers.base import DiskSpec, DomainSpec, PowerState
from hypervisors.drivers.domxml import guard_name
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, UserFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}


@pytest.fixture
def real(libvirtd):
    """The host's libvirtd as an online hypervisor, and its driver; what a test made there goes afterwards."""
    hv = HypervisorFactory(name=f"real-{uuidlib.uuid4().hex[:6]}", uri=libvirtd, pools=[POOL])
    driver = LibvirtDriver(libvirtd)
    made: list[Machine] = []
    yield hv, driver, made
    for machine in made:
        driver.undefine(str(machine.uuid))
        driver.delete_volume(pool="default", name=machine.disk_volume)


def machine_on(real, name: str, *, running: bool, **fields) -> Machine:
    """A machine row and its domain on the real host (a blank 1 GiB disk), as a finished create leaves them."""
    hv, driver, made = real
    machine = MachineFactory(
        name=name,
        owner=UserFactory(username=f"o-{name}"),
        hypervisor=hv,
        deploy_type="network",
        status=Status.ACTIVE,
        disk_gib=1,
        **fields,
    )
    made.append(machine)
    disk = driver.create_volume(pool="default", name=machine.disk_volume, fmt="qcow2", capacity_bytes=1 << 30)
    driver.define_domain(
        DomainSpec(
            uuid=str(machine.uuid),
            name=machine.domain_name,
            domain_type="qemu",
            vcpus=1,
            memory_mib=64,
            disks=(DiskSpec(path=disk.path, boot_order=1),),
            metadata={"machine": machine.pk},
        )
    )
    if running:
        driver.start(str(machine.uuid))
    return machine


def test_the_reconcile_follows_the_real_domain_and_records_one_that_vanished(real):
    hv, driver, _ = real
    machine = machine_on(real, "vanish", running=True)
    services.hypervisor_reconcile_run(hv.pk)
    assert Machine.objects.get(pk=machine.pk).power_state == PowerState.RUNNING
    driver.power_off(str(machine.uuid))
    services.hypervisor_reconcile_run(hv.pk)
    assert Machine.objects.get(pk=machine.pk).power_state == PowerState.OFF

    driver.undefine(str(machine.uuid))  # behind the portal's back (virsh undefine, say)
    services.hypervisor_reconcile_run(hv.pk)
    services.hypervisor_reconcile_run(hv.pk)
    assert Machine.objects.get(pk=machine.pk).power_state == "missing"
    assert machine.events.filter(step="reconcile", message="the domain vanished from the hypervisor").count() == 1


def test_the_periodic_reconcile_fails_a_machine_stuck_busy_and_keeps_the_others_true(real, settings):
    hv, _, _ = real
    settings.PORTAL_SCREENSHOTS_PER_MINUTE = 0  # screenshots are tests/integration/test_iso_console.py's
    stuck = machine_on(real, "stuck", running=False)
    running = machine_on(real, "running", running=True)
    long_ago = timezone.now() - timedelta(seconds=settings.PORTAL_PROVISION_TIMEOUT + 60)
    Machine.objects.filter(pk=stuck.pk).update(status=Status.PROVISIONING, status_changed=long_ago)
    services.machines_reconcile()
    stuck = Machine.objects.get(pk=stuck.pk)
    assert stuck.status == Status.ERROR and "timed out after" in stuck.status_message
    assert Machine.objects.get(pk=running.pk).power_state == PowerState.RUNNING
    assert Hypervisor.objects.get(pk=hv.pk).status == "online"


def test_growing_the_disk_of_a_machine_that_is_off_grows_its_volume(real, django_capture_on_commit_callbacks):
    _, driver, _ = real
    machine = machine_on(real, "grow", running=False)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_grow_disk(machine=machine, disk_gib=3, actor=machine.owner)
    machine = Machine.objects.get(pk=machine.pk)
    assert machine.status == Status.ACTIVE and machine.disk_gib == 3, machine.status_message
    assert driver.volume_info(pool="default", name=machine.disk_volume).capacity_bytes == 3 << 30
    assert driver.domain_state(str(machine.uuid)) == PowerState.OFF  # grown in place, not started


def test_a_network_the_portal_defined_is_deleted_with_its_guard(real, django_capture_on_commit_callbacks):
    hv, driver, _ = real
    name = f"del-{uuidlib.uuid4().hex[:6]}"
    spec = networks.NetworkSpec(
        name=name,
        mode="isolated",
        bridge=f"vb{name[-6:]}",
        cidr="10.213.77.1/24",
        dhcp_start="10.213.77.10",
        dhcp_end="10.213.77.20",
    )
    try:
        with django_capture_on_commit_callbacks(execute=True):
            networks.network_create(hypervisor=hv, spec=spec)
        listed = {n["name"]: n for n in Hypervisor.objects.get(pk=hv.pk).networks}
        assert listed[name]["active"] and listed[name]["guard"] == guard_name(name)

        with django_capture_on_commit_callbacks(execute=True):
            networks.network_delete(hypervisor=Hypervisor.objects.get(pk=hv.pk), name=name)
        assert name not in {n["name"] for n in Hypervisor.objects.get(pk=hv.pk).networks}
        assert guard_name(name) not in {n.guard for n in driver.host_info().networks}
        assert (
            driver.remove_guard(guard_name(name)) is False and driver.remove_network(name) is False
        )  # both already gone
    finally:
        driver.remove_network(name)
        driver.remove_guard(guard_name(name))
