"""Cold migration for real: the host's libvirtd and a private one in its own namespaces, the real worker and the
real BMC server. An image machine is shut down, moved through the API, and boots on the other host from disks
that hold what it wrote; a network-boot machine moves and its BMC, same port and credentials, now powers the
domain on the other host."""

import subprocess
import time

import pytest
from rest_framework.test import APIClient

from hypervisors import services as hv_services
from hypervisors.drivers import connections
from hypervisors.models import Hypervisor, HypervisorStatus, ImageCopy
from machines.models import Machine
from portal.models import ApiToken
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory
from tests.integration.test_network_bmc import ipmi
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.integration

PATTERN = "write -P 0x5a 600M 64k"  # what the machine "wrote", past the image's own data


@pytest.fixture
def other_host(tmp_path):
    """A private libvirtd with a dir pool named like the host's; requested before `worker` so it outlives it."""
    with PrivateLibvirtd.start(name="move", log_dir=ARTIFACTS) as lv:
        lv.define_xml(
            "pool", f"<pool type='dir'><name>default</name><target><path>{lv.workdir / 'pool'}</path></target></pool>"
        )
        try:
            yield lv
        finally:
            connections.drop_connection(lv.uri)


@pytest.fixture
def api(other_host, worker, local):
    user = UserFactory(username="mover", is_staff=True)  # staff: moves are theirs, and the user-mode NIC
    _, raw = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    target = hv_services.hypervisor_create(name="other", uri=other_host.uri)
    client.target = wait_for(
        lambda: (h := Hypervisor.objects.get(pk=target.pk)).status == HypervisorStatus.ONLINE and h, 60
    )
    return client


def virsh_local(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    ).stdout.strip()


def create(api, **body) -> Machine:
    r = api.post(
        "/api/v1/machines/",
        {"hypervisor": "local", "vcpus": 1, "memory_mib": 256, "disk_gib": 1, "nics": [{"type": "user"}], **body},
        format="json",
    )
    assert r.status_code == 201, r.content
    machine = wait_for(lambda: (m := Machine.objects.get(pk=r.json()["id"])).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    return machine


def moved(machine_id: int) -> Machine:
    def done():
        m = Machine.objects.get(pk=machine_id)
        return m if not m.operation else None

    return wait_for(done, 180, interval=1, message="the move never ended")


def test_a_stopped_image_machine_moves_and_boots_there_with_its_data(api, other_host, tiny_image):
    machine = create(api, name="mover1", deploy_type="image", image=tiny_image.pk)
    uuid = str(machine.uuid)
    serial_log(machine.pk, "TINY-GUEST ready")
    assert api.post(f"/api/v1/machines/{machine.pk}/migrate/", {}, format="json").status_code == 409  # running
    api.post(f"/api/v1/machines/{machine.pk}/power/", {"action": "poweroff"}, format="json")
    wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).power_state == "off" and not m.operation, 30)
    source_disk = virsh_local("vol-path", "--pool", "default", machine.disk_volume)
    subprocess.run(["qemu-io", "-c", PATTERN, source_disk], check=True, capture_output=True)

    started = time.monotonic()
    r = api.post(f"/api/v1/machines/{machine.pk}/migrate/", {"hypervisor": "other"}, format="json")
    assert r.status_code == 202, r.content
    after = moved(machine.pk)
    took = time.monotonic() - started
    events = list(after.events.filter(step="migrate").values_list("level", "message"))
    print(f"cold move of an image machine: {took:.1f} s; events: {events}")
    assert after.hypervisor == api.target, events
    assert not [m for level, m in events if level == "error"], events

    # Gone from the host, defined off on the other, the overlay on the other's own copy of the image.
    assert virsh_local("dominfo", uuid) == "" and machine.disk_volume not in virsh_local("vol-list", "default")
    assert other_host.virsh("domstate", uuid).strip() == "shut off"
    copy = ImageCopy.objects.get(image=tiny_image, hypervisor=api.target)
    target_disk = other_host.virsh("vol-path", "--pool", "default", machine.disk_volume).strip()
    info = subprocess.run(["qemu-img", "info", "-U", target_disk], capture_output=True, text=True).stdout
    assert f"backing file: {copy.path}" in info, info
    read = subprocess.run(["qemu-io", "-r", "-c", PATTERN.replace("write", "read"), target_disk], capture_output=True)
    assert read.returncode == 0 and b"read 65536/65536" in read.stdout, read.stdout + read.stderr

    # It boots there, as the same instance (cloud-init does not start over).
    assert api.post(f"/api/v1/machines/{machine.pk}/power/", {"action": "start"}, format="json").status_code == 202
    wait_for(lambda: other_host.virsh("domstate", uuid).strip() == "running", 60)
    log = serial_log(machine.pk, "TINY-GUEST ready", timeout=120)
    assert f"instance-id: {machine.instance_id}" in log


@pytest.mark.engines
def test_a_network_machine_moves_and_its_bmc_follows(api, other_host, bmc_server):
    machine = create(api, name="mover2", deploy_type="network")
    uuid = str(machine.uuid)
    creds = api.get(f"/api/v1/machines/{machine.pk}/bmc/").json()
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")
    assert "Chassis Power is off" in ipmi(creds, "power", "status").stdout

    r = api.post(f"/api/v1/machines/{machine.pk}/migrate/", {"hypervisor": api.target.pk}, format="json")
    assert r.status_code == 202, r.content
    after = moved(machine.pk)
    assert after.hypervisor == api.target, list(after.events.values_list("message", flat=True))
    assert virsh_local("dominfo", uuid) == ""

    # The same address, port and credentials; the domain it powers is the one on the other host.
    def powered_on():
        return ipmi(creds, "power", "on").returncode == 0 and other_host.virsh("domstate", uuid).strip() == "running"

    wait_for(powered_on, 30, interval=1, message="the BMC never powered the moved domain on")
    assert "Chassis Power is on" in ipmi(creds, "power", "status").stdout
    assert ipmi(creds, "power", "off").returncode == 0
    wait_for(lambda: other_host.virsh("domstate", uuid).strip() == "shut off", 30)


def test_evacuating_a_host_moves_its_machines_and_a_running_one_runs_on(api, other_host, tiny_image, local):
    runner = create(api, name="runner", deploy_type="image", image=tiny_image.pk)
    idle = create(api, name="idle", deploy_type="network")
    serial_log(runner.pk, "TINY-GUEST ready")

    started = time.monotonic()
    r = api.post(f"/api/v1/hypervisors/{local.pk}/evacuate/", {"restart": True}, format="json")
    assert r.status_code == 202, r.content
    assert r.json()["hypervisor"]["maintenance"] is True
    assert sorted(r.json()["machines"]) == ["idle: to other", "runner: to other"]
    # Nothing new lands on the drained host meanwhile.
    refused = api.post(
        "/api/v1/machines/",
        {"name": "late", "deploy_type": "network", "hypervisor": "local", "nics": [{"type": "user"}]},
        format="json",
    )
    assert refused.status_code == 400 and "in maintenance" in refused.content.decode()
    for machine in (runner, idle):
        after = moved(machine.pk)
        assert after.hypervisor == api.target, list(after.events.values_list("message", flat=True))
    print(f"evacuation of 2 machines (one shut down and started again): {time.monotonic() - started:.1f} s")
    assert not {str(runner.uuid), str(idle.uuid)} & set(virsh_local("list", "--all", "--uuid").split())
    assert other_host.virsh("domstate", str(runner.uuid)).strip() == "running"
    assert other_host.virsh("domstate", str(idle.uuid)).strip() == "shut off"
    steps = list(Machine.objects.get(pk=runner.pk).events.filter(step="migrate").values_list("message", flat=True))
    assert any(s.startswith("shutting down for the move") for s in steps) and steps[-1] == "started again on other"
    assert not any("did not shut down" in s for s in steps), steps  # the guest's ACPI power button worked
    serial_log(runner.pk, f"instance-id: {runner.instance_id}", "TINY-GUEST ready", timeout=120)
