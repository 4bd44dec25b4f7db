"""A tenant's guest reaches nothing of its hypervisor, while consoles keep working through the proxy.

A private libvirtd (tests/private_libvirtd.py) stands in for a hypervisor in its own network
namespace, where a listener answers TCP and UDP on 0.0.0.0 for every port a portal host uses: VNC,
the console proxy, the web server, the BMCs and IPMI, libvirtd, SSH, Redis and PostgreSQL. Without
protection a guest on a libvirt network reaches all of them through its bridge address (and a guest
on QEMU's user-mode network through 10.0.2.2, the host's loopback). Staff define the tenant network
through the portal; a plain user creates a Debian 12 machine through the API with the default NIC;
its first-boot script (tests/integration/guest/reach_probe.py) tries every port on the hypervisor's
address on the network, its broadcast, another address of the hypervisor, 10.0.2.2, and the
hypervisor's loopback with hand-made SYNs through a raw socket, and prints what answered.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from hypervisors import networks
from hypervisors import services as hv_services
from hypervisors.drivers import libvirt_driver
from hypervisors.drivers.domxml import guard_name
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import consoles
from machines.models import Machine
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory
from tests.integration.test_cloud_init import debian_image  # noqa: F401 - a fixture
from tests.integration.test_iso_console import WsClient, rfb_open
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.integration

GATEWAY = networks.TENANT_CIDR.split("/")[0]  # the hypervisor's address on the tenant network
BROADCAST = GATEWAY.rsplit(".", 1)[0] + ".255"
MANAGEMENT = "10.99.0.1"  # another address of the hypervisor
POOL = "reach-pool"
# What a portal hypervisor listens on: VNC, console proxy, web, BMCs, IPMI, libvirtd (TCP, TLS), SSH, Redis, PostgreSQL.
PORTS = [5900, 5901, 5902, 5903, 5904, 5905, 6080, 8000, 6230, 6231, 6232, 623, 16509, 16514, 22, 6379, 5432]
PROBE = Path(__file__).parent / "guest" / "reach_probe.py"

LISTENER = textwrap.dedent("""\
    import socket, sys, threading
    def tcp(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen()
        while True:
            c, _ = s.accept(); c.sendall(b"hello"); c.close()
    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
        while True:
            data, peer = s.recvfrom(512); s.sendto(b"hello", peer)
    for port in map(int, sys.argv[1:]):
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
        threading.Thread(target=udp, args=(port,), daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()
""")


@pytest.fixture
def reach_lab():
    """A private hypervisor whose every interesting port answers on every address it has."""
    with PrivateLibvirtd.start(name="reach", log_dir=ARTIFACTS) as lv:
        # Another address of the hypervisor, as its management address would be (on lo: no dummy module here).
        assert lv.run_inside("ip", "addr", "add", f"{MANAGEMENT}/32", "dev", "lo").returncode == 0
        listener = subprocess.Popen(["nsenter", "-t", str(lv.init_pid), "--net", sys.executable, "-c", LISTENER,
                                     *map(str, PORTS)], stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            assert listener.stdout.readline().strip() == "listening"
            lv.define_xml(
                "pool",
                f"<pool type='dir'><name>{POOL}</name><target><path>{lv.workdir / 'pool'}</path></target></pool>",
            )
            yield lv
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(listener.pid, signal.SIGKILL)
            listener.wait(10)
            libvirt_driver.drop_connection(lv.uri)


def probe_script() -> str:
    call = dict(addresses=[GATEWAY, BROADCAST, MANAGEMENT, "10.0.2.2"], ports=PORTS, control=(GATEWAY, 53),
                raw_via=GATEWAY)  # fmt: skip
    return PROBE.read_text() + f"main(**{json.dumps(call)})\n"


def test_a_tenant_guest_reaches_nothing_of_its_hypervisor(reach_lab, worker, console_proxy, request):
    lv = reach_lab
    image, other = request.getfixturevalue("debian_image"), request.getfixturevalue("iso_machine")
    # The lab really answers: from inside its namespace, every port is open on every address.
    for address in (MANAGEMENT, "127.0.0.1"):
        check = lv.run_inside(
            sys.executable, "-c", f"import socket; socket.create_connection(('{address}', 5900), 2).recv(5)"
        )
        assert check.returncode == 0, check.stderr

    hv = hv_services.hypervisor_create(name="reach-lab", uri=lv.uri)
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status != HypervisorStatus.PENDING and h, 60)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    # Staff set up the tenant network, as bootstrap does on 'local'.
    networks.network_create(hypervisor=hv, spec=networks.tenant_spec())
    tenant = settings.PORTAL_TENANT_NETWORK

    def guarded():
        h = Hypervisor.objects.get(pk=hv.pk)
        return h if any(n["name"] == tenant and n["active"] and n.get("guard") for n in h.networks) else None

    hv = wait_for(guarded, 30, message="the tenant network and its guard never appeared")

    # A plain user, through the API, with the default NIC.
    user = UserFactory(username="tenant")
    api = APIClient()
    api.force_authenticate(user)
    r = api.post("/api/v1/machines/", {"name": "prober", "hypervisor": hv.name, "image": image.pk, "vcpus": 1,
                                       "memory_mib": 768, "disk_gib": 4, "pool": POOL, "script": probe_script()},
                 format="json")  # fmt: skip
    assert r.status_code == 201, r.content
    machine = Machine.objects.get(pk=r.json()["id"])
    nic = machine.nics.get()
    assert (nic.type, nic.source) == ("network", tenant)  # the default NIC for everyone
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    xml = lv.virsh("dumpxml", str(machine.uuid))
    assert f"<filterref filter='{guard_name(tenant)}'/>" in xml, xml

    text = serial_log(machine.pk, "REACH done", timeout=420)
    (ARTIFACTS / "guest-reach-serial.log").write_text(text)
    results = dict(re.findall(r"REACH (\w+ \S+:\d+) (open|closed)", text))
    print("\n".join(f"  {k} {v}" for k, v in sorted(results.items())))
    addresses = re.search(r"REACH addresses (.*)", text)[1]
    assert GATEWAY.rsplit(".", 1)[0] + "." in addresses, addresses  # the guest is on the tenant network
    assert results.pop(f"tcp {GATEWAY}:53") == "open", "the probe must see the one service it may use (DNS)"
    expected = {f"{proto} {address}:{port}" for proto in ("tcp", "udp") for address in (GATEWAY, BROADCAST, MANAGEMENT, "10.0.2.2")
                for port in PORTS} | {f"raw 127.0.0.1:{port}" for port in PORTS}  # fmt: skip
    missing = expected - set(results)
    if missing:  # the raw probe could not even address the hypervisor's MAC: nothing went out at all
        assert f"REACH raw no-arp {GATEWAY}" in text or f"REACH raw no-route {GATEWAY}" in text, sorted(missing)[:5]
        assert missing <= {f"raw 127.0.0.1:{port}" for port in PORTS}, sorted(missing)[:5]
    opened = sorted(k for k, v in results.items() if v == "open")
    assert not opened, f"a tenant's guest reached its hypervisor: {opened}"

    # Meanwhile another machine's console still opens through the proxy, with its password answered by the proxy.
    raw, _ = consoles.console_token_issue(machine=other, user=other.owner)
    ws = WsClient(console_proxy, f"/console/{other.pk}?token={raw}")
    try:
        assert ws.status == 101
        assert rfb_open(ws)  # ServerInit with the desktop name: QEMU accepted the proxy's authentication
    finally:
        ws.close()
