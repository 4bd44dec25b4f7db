"""Live moves through the portal, for real: the API asks, the real worker prepares the target (machines/moves.py
prepare_live) and calls LibvirtDriver.migrate_live, the row follows. The tiny image machine runs on the host's
libvirtd with a counter on its serial port and moves to a libvirtd in its own namespaces (qemu+tls) while it
runs: the counter goes on there, its console opens on the target through the proxy, nothing of it is left on
the host. A move cancelled at once leaves it running where it was."""

import re
import time

import pytest
from rest_framework.test import APIClient

from hypervisors import services as hv_services
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from hypervisors.models import Hypervisor, HypervisorStatus
from machines.models import Machine
from portal.models import ApiToken
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.integration.test_console_auth import rfb_session
from tests.integration.test_iso_console import token_for
from tests.integration.test_live_migration import COUNTER, Serial, ticks

pytestmark = pytest.mark.integration


def virsh_local(*args: str) -> str:
    import subprocess

    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True).stdout


@pytest.fixture
def api(worker, local, remote_tls_host):
    staff = UserFactory(username="live-mover", is_staff=True)  # moves are staff's; the user-mode NIC
    _, raw = ApiToken.issue(user=staff)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    hv = hv_services.hypervisor_create(name="remote-tls", uri=remote_tls_host.uri, console_address=remote_tls_host.ip)
    client.target = wait_for(
        lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status != HypervisorStatus.PENDING and h, 30
    )
    assert client.target.status == HypervisorStatus.ONLINE, client.target.status_error
    return client


def running_machine(api, image, name: str) -> Machine:
    r = api.post(
        "/api/v1/machines/",
        {
            "name": name,
            "deploy_type": "image",
            "hypervisor": "local",
            "image": image.pk,
            "vcpus": 1,
            "memory_mib": 128,
            "disk_gib": 1,
            "nics": [{"type": "user"}],
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    machine = wait_for(lambda: (m := Machine.objects.get(pk=r.json()["id"])).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    return machine


def move_ended(pk: int) -> Machine:
    return wait_for(lambda: not (m := Machine.objects.get(pk=pk)).operation and m, 300, interval=0.5)


def test_a_running_machine_moves_live_through_the_api(api, tiny_image, local, remote_tls_host, console_proxy):
    machine = running_machine(api, tiny_image, "live-api")
    uuid = str(machine.uuid)
    serial = Serial(LibvirtDriver(local.uri), uuid)
    try:
        serial.read_until(re.compile(rb"# "), 90, poke=True)
        serial.run(COUNTER)
        last = serial.read_until(re.compile(rb"TICK 10 "), 30)
        before = ticks(serial.data[: last.end()])
    finally:
        serial.close()

    started = time.monotonic()
    r = api.post(f"/api/v1/machines/{machine.pk}/migrate/", {"hypervisor": "remote-tls", "live": True}, format="json")
    assert r.status_code == 202, r.content
    moved = move_ended(machine.pk)
    took = time.monotonic() - started
    events = list(moved.events.filter(step="migrate").values_list("level", "message"))
    assert moved.hypervisor == api.target and moved.power_state == "running", events
    assert not [m for level, m in events if level == "error"], events
    done = next(m for _, m in events if m.startswith("now running on remote-tls: live in "))
    print(f"live move through the API: {took:.1f} s from the request; {done}")

    # It runs there and goes on counting (no restart: the numbers continue); nothing of it is left here.
    assert remote_tls_host.virsh_local("domstate", uuid).strip() == "running"
    assert uuid not in virsh_local("list", "--all", "--uuid")
    virsh_local("pool-refresh", "default")
    assert uuid not in virsh_local("vol-list", "default")
    serial = Serial(LibvirtDriver(api.target.uri), uuid)
    try:
        serial.read_for(2)
        after = ticks(serial.data)
    finally:
        serial.close()
    assert after and after[0][0] > before[-1][0] and after[0][1] >= before[-1][1], (before[-1], after[:2])

    # Its console opens on the target: the proxy asks the machine's hypervisor, which is the target now.
    ws, _, _, name = rfb_session(console_proxy, moved, token_for(moved), 8)
    ws.close()
    assert name == f"QEMU ({moved.domain_name})".encode()


def test_a_live_move_cancelled_at_once_leaves_it_running_where_it_was(api, tiny_image, local, remote_tls_host):
    machine = running_machine(api, tiny_image, "live-cancel")
    r = api.post(f"/api/v1/machines/{machine.pk}/migrate/", {"hypervisor": "remote-tls", "live": True}, format="json")
    assert r.status_code == 202, r.content
    assert api.post(f"/api/v1/machines/{machine.pk}/migrate/cancel/").status_code == 202
    stayed = move_ended(machine.pk)
    messages = list(stayed.events.filter(step="migrate").values_list("message", flat=True))
    assert stayed.hypervisor == local and "cancel" in messages[-1], messages
    assert virsh_local("domstate", str(machine.uuid)).strip() == "running"
    assert str(machine.uuid) not in remote_tls_host.virsh_local("list", "--all", "--uuid")
    remote_tls_host.virsh_local("pool-refresh", "default")
    assert str(machine.uuid) not in remote_tls_host.virsh_local("vol-list", "default")
