"""The sweeper on the host's libvirtd, through the real worker: a machine whose row is deleted behind the portal's
back (as a delete that crashed between its steps would leave it) is found by the sweep, listed on the hypervisor
page, and removed from it, with nothing of it left on the host.

The host's libvirtd is shared with other test runs (their own databases), whose machines look like orphans to
this one: the test removes only its own machine's items, never "all"."""

import subprocess
import time

import pytest
from django.test import Client
from django.urls import reverse

from hypervisors.drivers import get_driver
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine
from portal.models import AuditEvent
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)


def volumes_of(uuid: str) -> list[str]:
    virsh("pool-refresh", "default")  # the serial log QEMU writes shows as a volume only after a refresh
    listed = virsh("vol-list", "default").stdout.splitlines()[2:]
    return sorted(line.split()[0] for line in listed if uuid in line)


def test_a_machine_whose_row_vanished_is_swept_shown_and_removed(worker, local, tiny_image, settings):
    settings.PORTAL_ORPHAN_GRACE = 0  # the sweeps run here, in the test process; the removal in the worker
    staff = UserFactory(username="sweeper-staff", is_staff=True)
    machine = services.machine_create(
        owner=staff,
        hypervisor=local,
        name="swept1",
        deploy_type="image",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        extra_disks=[{"size_gib": 1}],
        nics=[services.NicInput(type="user")],
    )
    uuid = str(machine.uuid)
    try:
        machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
        assert machine.status == "active", machine.status_message
        made = volumes_of(uuid)
        assert made == sorted(
            [machine.disk_volume, machine.extra_disk_volume(0), machine.seed_volume, machine.serial_volume]
        )
        assert virsh("domstate", uuid).stdout.strip() == "running"

        services.hypervisor_sweep_run(local.pk)
        assert not [o for o in Hypervisor.objects.get(pk=local.pk).orphans if o["uuid"] == uuid]  # owned
        Machine.objects.filter(pk=machine.pk).delete()  # the row goes; the running domain and its volumes stay
        started = time.monotonic()
        first = services.hypervisor_sweep_run(local.pk)
        found = services.hypervisor_sweep_run(local.pk)
        print(f"two sweeps of the host: {time.monotonic() - started:.2f} s")
        assert first is not None and found is not None
        mine = {o["key"]: o for o in found if o["uuid"] == uuid}
        assert set(mine) == {f"domain:{uuid}", *(f"volume:default/{name}" for name in made)}
        assert all(o["reported"] for o in mine.values())
        assert mine[f"domain:{uuid}"]["name"] == machine.domain_name

        page = Client()
        page.force_login(staff)
        html = page.get(reverse("hypervisors:detail", args=[local.pk])).content.decode()
        for key in mine:
            assert f'data-key="{key}"' in html
        assert machine.domain_name in html and machine.disk_volume in html

        started = time.monotonic()
        r = page.post(reverse("machines:hypervisor-orphans-remove", args=[local.pk]), {"key": sorted(mine)})
        assert r.status_code == 302
        wait_for(
            lambda: virsh("dominfo", uuid).returncode != 0 and not volumes_of(uuid), 60, message="still on the host"
        )
        print(f"removal through the worker: {time.monotonic() - started:.2f} s")
        assert virsh("list", "--all", "--uuid").stdout.split().count(uuid) == 0
        wait_for(lambda: not [o for o in Hypervisor.objects.get(pk=local.pk).orphans if o["uuid"] == uuid], 10)
        audited = AuditEvent.objects.filter(action="hypervisor.orphan_remove", user_id=staff.pk)
        assert sorted(e.outcome for e in audited) == ["success"] * len(mine)
    finally:  # whatever failed above, nothing of this machine stays on the shared host
        driver = get_driver(local.uri)
        driver.undefine(uuid)
        for name in volumes_of(uuid):
            driver.delete_volume(pool="default", name=name)
