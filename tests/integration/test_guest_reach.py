"""A tenant's guest reaches nothing of its hypervisor, on every NIC kind a user who is not staff may pick,
while consoles keep working through the proxy.

A private libvirtd (tests/private_libvirtd.py) stands in for a hypervisor in its own network
namespace, where a listener answers TCP and UDP on 0.0.0.0 for every port a portal host uses: VNC,
the console proxy, the web server, the BMCs and IPMI, libvirtd, SSH, Redis and PostgreSQL. Without
protection a guest on a libvirt network reaches all of them through its bridge address (and a guest
on QEMU's user-mode network through 10.0.2.2, the host's loopback). Staff define the tenant network and
a NAT network through the portal, and publish that NAT network, a host bridge the hypervisor has an
address on (a LAN) and a host interface for macvtap; behind the bridge and the interface a "LAN peer"
(another namespace) answers on port 7, as any other machine on that LAN would. A plain user creates one
Debian 12 machine through the API with a NIC of each kind; its first-boot script
(tests/integration/guest/reach_probe.py), through each NIC in turn, tries every port on every address
of the hypervisor (on every network, its broadcast there, another address of it, 10.0.2.2) and the
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
from hypervisors.drivers import connections
from hypervisors.drivers.domxml import guard_name, host_guard_name
from hypervisors.models import Hypervisor, HypervisorStatus, PublishedNetwork
from machines import consoles
from machines.models import Machine
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory
from tests.integration.test_cloud_init import debian_image  # noqa: F401 - a fixture
from tests.integration.test_iso_console import WsClient, rfb_open
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.integration

GATEWAY = networks.TENANT_CIDR.split("/")[0]  # the hypervisor's address on the tenant network
NAT = networks.NetworkSpec(
    name="reach-nat", mode="nat", cidr="192.168.218.1/24", dhcp_start="192.168.218.100", dhcp_end="192.168.218.200"
)
BRIDGE, BRIDGE_HOST, BRIDGE_GUEST, BRIDGE_PEER = "pubbr0", "192.168.216.1", "192.168.216.50", "192.168.216.9"
PARENT, PARENT_HOST, PARENT_GUEST, PARENT_PEER = "mvlow", "192.168.217.1", "192.168.217.50", "192.168.217.9"
MANAGEMENT = "10.99.0.1"  # another address of the hypervisor
HOST_ADDRESSES = [GATEWAY, NAT.cidr.split("/")[0], BRIDGE_HOST, PARENT_HOST]  # the hypervisor's, on each network
POOL = "reach-pool"
# What a portal hypervisor listens on: VNC, console proxy, web, BMCs, IPMI, libvirtd (TCP, TLS), SSH, Redis, PostgreSQL.
PORTS = [5900, 5901, 5902, 5903, 5904, 5905, 6080, 8000, 6230, 6231, 6232, 623, 16509, 16514, 22, 6379, 5432]
ECHO = 7  # what the LAN peer answers on
NEIGHBOUR = "192.168.213.9"  # the peer's address on the tenant network: as another tenant's guest would be
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
    """A private hypervisor whose every interesting port answers on every address it has, with a LAN on
    a host bridge and on a macvtap parent, and a peer on that LAN in a namespace of its own."""
    procs = []
    with PrivateLibvirtd.start(name="reach", log_dir=ARTIFACTS) as lv:
        try:
            # The LAN peer: a network namespace of its own (a process holds it), a listener on ECHO.
            peer = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], start_new_session=True)
            procs.append(peer)
            lv.peer_pid = peer.pid
            wait_for(lambda: os.readlink(f"/proc/{peer.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 10)
            for argv in (
                # Another address of the hypervisor, as its management address would be (on lo: no dummy module here).
                ["ip", "addr", "add", f"{MANAGEMENT}/32", "dev", "lo"],
                # A host bridge the hypervisor has an address on, with the peer's end of a veth on it.
                ["ip", "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0"],
                ["ip", "addr", "add", f"{BRIDGE_HOST}/24", "dev", BRIDGE],
                ["ip", "link", "set", BRIDGE, "up"],
                ["ip", "link", "add", "lanport", "type", "veth", "peer", "name", "lan0", "netns", str(peer.pid)],
                ["ip", "link", "set", "lanport", "master", BRIDGE],
                ["ip", "link", "set", "lanport", "up"],
                # A host interface with an address of the hypervisor, for macvtap; the peer on its far end.
                ["ip", "link", "add", PARENT, "type", "veth", "peer", "name", "lan1", "netns", str(peer.pid)],
                ["ip", "addr", "add", f"{PARENT_HOST}/24", "dev", PARENT],
                ["ip", "link", "set", PARENT, "up"],
            ):
                r = lv.run_inside(*argv)
                assert r.returncode == 0, (argv, r.stderr)
            for argv in (
                ["ip", "addr", "add", f"{BRIDGE_PEER}/24", "dev", "lan0"],
                ["ip", "link", "set", "lan0", "up"],
                ["ip", "addr", "add", f"{PARENT_PEER}/24", "dev", "lan1"],
                ["ip", "link", "set", "lan1", "up"],
                ["ip", "link", "set", "lo", "up"],
            ):
                r = subprocess.run(["nsenter", "-t", str(peer.pid), "--net", *argv], capture_output=True, text=True)
                assert r.returncode == 0, (argv, r.stderr)
            for pid, ports in ((lv.init_pid, PORTS), (peer.pid, [ECHO])):
                listener = subprocess.Popen(
                    ["nsenter", "-t", str(pid), "--net", sys.executable, "-c", LISTENER, *map(str, ports)],
                    stdout=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
                procs.append(listener)
                assert listener.stdout.readline().strip() == "listening"
            lv.define_xml(
                "pool",
                f"<pool type='dir'><name>{POOL}</name><target><path>{lv.workdir / 'pool'}</path></target></pool>",
            )
            yield lv
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            connections.drop_connection(lv.uri)


def broadcast(address: str) -> str:
    return address.rsplit(".", 1)[0] + ".255"


# Each NIC the plain user's machine has: the probe's pass through it (tag, the hypervisor's address on its
# network, the guest's own address where no DHCP gives one, and what must answer).
NICS = [
    {
        "tag": "tenant",
        "nic": {"type": "network", "source": settings.PORTAL_TENANT_NETWORK},
        "gateway": GATEWAY,
        "address": "",
        "control": (GATEWAY, 53),
        "neighbours": [(NEIGHBOUR, ECHO)],
    },
    {
        "tag": "nat",
        "nic": {"type": "network", "source": NAT.name},
        "gateway": HOST_ADDRESSES[1],
        "address": "",
        "control": (HOST_ADDRESSES[1], 53),
    },
    {
        "tag": "bridge",
        "nic": {"type": "bridge", "source": BRIDGE, "dhcp4": False, "addresses": [f"{BRIDGE_GUEST}/24"]},
        "gateway": BRIDGE_HOST,
        "address": f"{BRIDGE_GUEST}/24",
        "control": (BRIDGE_PEER, ECHO),
    },
    {
        "tag": "macvtap",
        "nic": {
            "type": "direct",
            "source": PARENT,
            "mode": "bridge",
            "dhcp4": False,
            "addresses": [f"{PARENT_GUEST}/24"],
        },
        "gateway": PARENT_HOST,
        "address": f"{PARENT_GUEST}/24",
        "control": (PARENT_PEER, ECHO),
    },
]


def targets(n: dict) -> list[str]:
    """Every address of the hypervisor, seen from this NIC: on each network, the broadcast of this NIC's
    own network, its management address and 10.0.2.2 (where user-mode networking puts the host's loopback)."""
    return [*HOST_ADDRESSES, broadcast(n["gateway"]), MANAGEMENT, "10.0.2.2"]


def probe_script(macs: dict[str, str]) -> str:
    passes = []
    for n in NICS:
        subnet = n["gateway"].rsplit(".", 1)[0] + "."
        routed = [t for t in targets(n) if not t.startswith(subnet)]
        passes.append(
            {
                "tag": n["tag"],
                "mac": macs[n["tag"]],
                "address": n["address"],
                "gateway": n["gateway"],
                "targets": targets(n),
                "routed": routed,
                "control": list(n["control"]),
                "neighbours": n.get("neighbours", []),
            }
        )
    return PROBE.read_text() + f"main(**{json.dumps({'passes': passes, 'ports': PORTS})})\n"


@pytest.mark.timeout(600)  # a Debian boot under emulation, then about a thousand probes through four NICs
def test_a_tenant_guest_reaches_nothing_of_its_hypervisor(reach_lab, worker, console_proxy, request):
    lv = reach_lab
    image, other = request.getfixturevalue("debian_image"), request.getfixturevalue("iso_machine")
    # The lab really answers: from inside its namespace, every port is open on every address.
    for address in (MANAGEMENT, "127.0.0.1", BRIDGE_HOST):
        check = lv.run_inside(
            sys.executable, "-c", f"import socket; socket.create_connection(('{address}', 5900), 2).recv(5)"
        )
        assert check.returncode == 0, check.stderr

    hv = hv_services.hypervisor_create(name="reach-lab", uri=lv.uri)
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status != HypervisorStatus.PENDING and h, 60)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    # Staff set up the tenant network (as bootstrap does on 'local') and a NAT network, and publish the NAT
    # network, the host bridge and the host interface (macvtap, mode bridge) to everyone.
    networks.network_create(hypervisor=hv, spec=networks.tenant_spec())
    networks.network_create(hypervisor=hv, spec=NAT)
    tenant = settings.PORTAL_TENANT_NETWORK
    for kind, source, modes in (("network", NAT.name, []), ("bridge", BRIDGE, []), ("direct", PARENT, ["bridge"])):
        PublishedNetwork.objects.create(hypervisor=hv, kind=kind, source=source, modes=modes, everyone=True)

    def ready():
        h = Hypervisor.objects.get(pk=hv.pk)
        guarded = {n["name"] for n in h.networks if n["active"] and n.get("guard")}
        bridge = next((i for i in h.interfaces if i["name"] == BRIDGE), {})
        return h if {tenant, NAT.name} <= guarded and bridge.get("mac") else None

    hv = wait_for(ready, 60, message="the networks with their guards, or the bridge's MAC, never appeared")
    # Another tenant's guest on the tenant network, as far as the prober can tell: a port of the tenant
    # bridge, isolated as libvirt isolates each guest's port there, with the LAN peer behind it.
    tenant_bridge = next(n["bridge"] for n in hv.networks if n["name"] == tenant)
    for argv in (
        ["ip", "link", "add", "tnport", "type", "veth", "peer", "name", "tn0", "netns", str(lv.peer_pid)],
        ["ip", "link", "set", "tnport", "master", tenant_bridge],
        ["bridge", "link", "set", "dev", "tnport", "isolated", "on"],
        ["ip", "link", "set", "tnport", "up"],
    ):
        r = lv.run_inside(*argv)
        assert r.returncode == 0, (argv, r.stderr)
    for argv in (["ip", "addr", "add", f"{NEIGHBOUR}/24", "dev", "tn0"], ["ip", "link", "set", "tn0", "up"]):
        r = subprocess.run(["nsenter", "-t", str(lv.peer_pid), "--net", *argv], capture_output=True, text=True)
        assert r.returncode == 0, (argv, r.stderr)
    # The neighbour answers the hypervisor (whose port on the bridge is not isolated), once the new port
    # has passed STP's listening and learning states.
    hello = f"import socket; socket.create_connection(('{NEIGHBOUR}', {ECHO}), 2).recv(5)"
    wait_for(
        lambda: lv.run_inside(sys.executable, "-c", hello).returncode == 0,
        30,
        message="the neighbour on the tenant bridge never answered the hypervisor",
    )

    # A plain user, through the API, with a NIC of each kind.
    user = UserFactory(username="tenant")
    api = APIClient()
    api.force_authenticate(user)
    macs = {n["tag"]: f"52:54:00:7e:00:{i:02x}" for i, n in enumerate(NICS, start=1)}
    nics = [{**n["nic"], "mac": macs[n["tag"]]} for n in NICS]
    r = api.post(
        "/api/v1/machines/",
        {
            "name": "prober",
            "hypervisor": hv.name,
            "image": image.pk,
            "vcpus": 1,
            "memory_mib": 768,
            "disk_gib": 4,
            "pool": POOL,
            "nics": nics,
            "script": probe_script(macs),
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    machine = Machine.objects.get(pk=r.json()["id"])
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    xml = lv.virsh("dumpxml", str(machine.uuid))
    for guard in (guard_name(tenant), guard_name(NAT.name), host_guard_name(BRIDGE)):
        assert f"<filterref filter='{guard}'/>" in xml, xml
    assert lv.virsh("nwfilter-list").count("portal-") >= 3
    # libvirt isolates the guest's port on the tenant bridge (the portal's <port isolated='yes'/>).
    ports = json.loads(lv.run_inside("bridge", "-j", "-d", "link", "show").stdout)
    mine = [p for p in ports if p.get("master") == tenant_bridge and p["ifname"].startswith("vnet")]
    assert [p.get("isolated") for p in mine] == [True], ports

    text = serial_log(machine.pk, "REACH done", timeout=480)
    (ARTIFACTS / "guest-reach-serial.log").write_text(text)
    results = dict(re.findall(r"REACH (\w+ \w+ \S+:\d+) (open|closed)", text))
    print("\n".join(f"  {k} {v}" for k, v in sorted(results.items())))
    opened = []
    for n in NICS:
        tag = n["tag"]
        addresses = re.search(rf"REACH {tag} addresses (.*)", text)[1]
        assert (n["address"].split("/")[0] or n["gateway"].rsplit(".", 1)[0] + ".") in addresses, (tag, addresses)
        control = f"{tag} tcp {n['control'][0]}:{n['control'][1]}"
        assert results.pop(control) == "open", f"{control}: the one thing this NIC may reach must answer"
        expected = {
            f"{tag} {proto} {address}:{port}" for proto in ("tcp", "udp") for address in targets(n) for port in PORTS
        } | {f"{tag} raw 127.0.0.1:{port}" for port in PORTS}
        neighbours = {f"{tag} {proto} {a}:{p}" for a, p in n.get("neighbours", []) for proto in ("tcp", "udp")}
        assert neighbours <= set(results), sorted(neighbours - set(results))
        expected |= neighbours  # another tenant's guest: out of reach too (port isolation)
        missing = expected - set(results)
        if missing:  # the raw probe could not even address the hypervisor's MAC: nothing went out at all
            assert f"REACH {tag} raw no-arp {n['gateway']}" in text, sorted(missing)[:5]
            assert missing <= {f"{tag} raw 127.0.0.1:{port}" for port in PORTS}, sorted(missing)[:5]
        opened += sorted(k for k in expected & set(results) if results[k] == "open")
    assert not opened, f"a tenant's guest reached its hypervisor: {opened}"

    # Meanwhile another machine's console still opens through the proxy, with its password answered by the proxy.
    raw, _ = consoles.console_token_issue(machine=other, user=other.owner)
    ws = WsClient(console_proxy, f"/console/{other.pk}?token={raw}")
    try:
        assert ws.status == 101
        assert rfb_open(ws)  # ServerInit with the desktop name: QEMU accepted the proxy's authentication
    finally:
        ws.close()
