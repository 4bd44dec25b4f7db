"""Consoles and BMCs of machines on remote hypervisors reached over qemu+tls://, for real: libvirtds in
network namespaces of their own (tests/integration/remote_host.py), the real worker, console proxy and
BMC server. An ISO machine's screen and serial port reach the client through the proxy; a network-boot
machine's BMC (virtualbmc in the BMC server, dialling the remote libvirtd with the worker's client
certificate named in the URI) powers it and sets its boot device; and with two hosts whose machines' VNC
servers have the same port, each token opens its own machine's screen and no other."""

import socket
import struct
import time
import xml.etree.ElementTree as ET

import pytest

from hypervisors import services as hv_services
from hypervisors.drivers import connections, get_driver
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import consoles, crypto, rfb, services
from machines.models import Machine
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory
from tests.integration.remote_host import RemoteTlsHost
from tests.integration.test_console_auth import RfbWs, rfb_session
from tests.integration.test_iso_console import WsClient, handshake, serial_token, token_for
from tests.integration.test_network_bmc import ipmi, udp_port_free
from tests.rfb_client import update_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_tls_host():
    """Another remote TLS host in its own namespace and /30, for machines on two hosts at once."""
    with RemoteTlsHost.start(hostname="remote-tls-b", log_dir=ARTIFACTS, instance="b") as host:
        print(f"second remote TLS host answering over TLS after {host.started_in:.2f} s")
        try:
            yield host
        finally:
            connections.drop_connection(host.uri)


def register(remote: RemoteTlsHost, name: str) -> Hypervisor:
    """The remote host registered by its TLS URI with its link address as console address, online."""
    hv = hv_services.hypervisor_create(name=name, uri=remote.uri, console_address=remote.ip)
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status != HypervisorStatus.PENDING and h, 30)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    return hv


def create(hv: Hypervisor, owner, name: str, deploy_type: str, image=None) -> Machine:
    started = time.monotonic()
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name=name,
        deploy_type=deploy_type,
        image=image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],  # the remote hosts have no libvirt networks
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    print(f"{deploy_type} machine {name} active on {hv.name} after {time.monotonic() - started:.1f} s")
    return machine


def read_framebuffer_update(ws: RfbWs, width: int, height: int) -> list[bytes]:
    """One full FramebufferUpdate in raw encoding (the only one a client that sent no SetEncodings gets):
    the pixel data of each rectangle (32 bits per pixel, the server's default format)."""
    ws.send(update_request(incremental=False, width=width, height=height))
    kind, count = struct.unpack(">BxH", ws.read_exact(4))
    assert kind == 0 and count >= 1
    rects = []
    for _ in range(count):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", ws.read_exact(12))
        assert encoding == 0, encoding
        rects.append(ws.read_exact(w * h * 4, timeout=60))
    return rects


def test_an_iso_machines_screen_and_serial_port_reach_the_client_through_the_proxy(
    worker, remote_tls_host, tiny_iso, console_proxy
):
    remote = remote_tls_host
    hv = register(remote, "remote-tls")
    owner = UserFactory(username="remote-installer", is_staff=True)  # staff: the user-mode NIC
    machine = create(hv, owner, "riso", "iso", tiny_iso)
    assert remote.virsh_local("domdisplay", str(machine.uuid)).startswith(f"vnc://{remote.ip}:")
    serial_log(machine.pk, "ISOLINUX", "TINY-GUEST ready", timeout=120)  # booted from the CD, shell up

    # The graphical console: the proxy reaches the remote VNC server, authenticates with the password it
    # just set over TLS, and hands the client the guest's screen.
    started = time.monotonic()
    ws, width, height, name = rfb_session(console_proxy, machine, token_for(machine), 8)
    connected = time.monotonic() - started
    assert name == f"QEMU ({machine.domain_name})".encode() and width >= 640 and height >= 400
    rects = read_framebuffer_update(ws, width, height)
    first_frame = time.monotonic() - started
    pixels = b"".join(rects)
    assert len(pixels) == width * height * 4  # the whole screen came over
    assert len({pixels[i : i + 3] for i in range(0, len(pixels), 4)}) >= 2, "a blank screen: no text on it"
    ws.close()
    print(f"remote console: ServerInit {connected:.2f} s, full {width}x{height} frame {first_frame:.2f} s")

    # The machine page's screenshot, taken by the worker through libvirt's stream over TLS.
    started = time.monotonic()
    services.machine_screenshot_request(machine=machine, max_age=0)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).last_observed.screenshot_taken, 30)
    png = services.screenshot_path(machine).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    print(f"remote screenshot {time.monotonic() - started:.2f} s, {len(png)} bytes")

    # The serial console: a libvirt console stream over TLS, a shell through the proxy.
    serial = WsClient(console_proxy, f"/serial/{machine.pk}?token={serial_token(machine)}")
    try:
        assert serial.status == 101
        started = time.monotonic()
        serial.send(b"\r")
        assert b"# " in serial.read_until(b"# "), serial.data[-300:]
        prompt = time.monotonic() - started
        started = time.monotonic()
        serial.send(b"echo REMOTE_$((6*7)) $(uname -m)\r")
        out = serial.read_until(b"REMOTE_42 x86_64")
        assert b"REMOTE_42 x86_64" in out, out[-500:]
        print(
            f"remote serial: a prompt {prompt:.2f} s after the upgrade, a round trip {time.monotonic() - started:.2f} s"
        )
    finally:
        serial.close()


def vnc_port(machine: Machine) -> tuple[str, int]:
    address = get_driver(machine.hypervisor.uri).vnc_address(str(machine.uuid))
    assert address is not None, f"{machine.name} has no VNC server"
    return address


def password_opens(address: tuple[str, int], password: str) -> bool:
    """Whether the VNC server at `address` accepts VNC authentication with `password`."""
    with socket.create_connection(address, timeout=10) as sock:
        try:
            rfb.authenticate_to_server(rfb.SocketChannel(sock), password)
        except rfb.VncAuthFailed:
            return False
    return True


def test_with_equal_vnc_ports_on_two_hosts_each_token_opens_its_own_machine(
    worker, remote_tls_host, second_tls_host, tiny_iso, console_proxy
):
    hosts = [(remote_tls_host, "remote-tls"), (second_tls_host, "remote-tls-b")]
    for remote, _ in hosts:  # nothing else runs there: each host's first VNC server takes the first port
        assert remote.virsh_local("list", "--name").strip() == ""
    owner = UserFactory(username="two-hosts", is_staff=True)
    a, b = (create(register(remote, name), owner, f"eq-{name}", "iso", tiny_iso) for remote, name in hosts)
    (host_a, port_a), (host_b, port_b) = vnc_port(a), vnc_port(b)
    assert port_a == port_b == 5900 and (host_a, host_b) == (remote_tls_host.ip, second_tls_host.ip)
    print(f"A on {host_a}:{port_a}, B on {host_b}:{port_b}")

    # Each token opens its own machine's screen: QEMU names the desktop after the domain.
    for machine in (a, b, a):
        ws, _, _, name = rfb_session(console_proxy, machine, token_for(machine), 8)
        assert name == f"QEMU ({machine.domain_name})".encode(), (machine.name, name)
        ws.close()

    # A token is bound to its machine: A's, fresh or spent (even with its reconnect secret), opens nothing at B.
    path_b = f"/console/{b.pk}"
    assert handshake(console_proxy, f"{path_b}?token={token_for(a)}")[0] == 403
    raw = token_for(a)
    assert handshake(console_proxy, f"/console/{a.pk}?token={raw}")[0] == 101
    secret = consoles.console_reconnect_secret(raw)
    assert handshake(console_proxy, f"{path_b}?token={raw}", reconnect=secret)[0] == 403
    assert handshake(console_proxy, f"/console/{a.pk}?token={raw}", reconnect=secret)[0] == 101  # still A's
    assert handshake(console_proxy, f"/serial/{b.pk}?token={serial_token(a)}")[0] == 403

    # The password the portal sets for A opens A's server only, though B's listens on the same port.
    opened = get_driver(a.hypervisor.uri).vnc_open(str(a.uuid), valid_for=10)
    assert opened is not None
    password = opened[2]
    assert not password_opens((host_b, port_b), password)
    assert password_opens((host_a, port_a), password)

    # Ports are reused on one host too: A stops, C starts on A's host and gets A's old port. A's token then
    # opens nothing (the proxy asks A's hypervisor where A listens now: nowhere), C's opens C.
    services.machine_power(machine=a, action="poweroff", actor=owner)
    wait_for(lambda: (m := Machine.objects.get(pk=a.pk)).power_state == "off" and not m.operation, 30)
    c = create(a.hypervisor, owner, "eq-c", "iso", tiny_iso)
    assert vnc_port(c) == (host_a, port_a)
    assert handshake(console_proxy, f"/console/{a.pk}?token={token_for(a)}") == (403, b"")
    ws, _, _, name = rfb_session(console_proxy, c, token_for(c), 8)
    assert name == f"QEMU ({c.domain_name})".encode()
    ws.close()


def boot_order(remote: RemoteTlsHost, machine: Machine) -> list[str]:
    xml = remote.virsh_local("dumpxml", "--inactive", str(machine.uuid))
    return [b.get("dev", "") for b in ET.fromstring(xml).findall("os/boot")]


def test_ipmitool_drives_a_network_boot_machine_on_the_remote_host(worker, remote_tls_host, bmc_server):
    remote = remote_tls_host
    hv = register(remote, "remote-tls")
    owner = UserFactory(username="remote-metal", is_staff=True)
    machine = create(hv, owner, "rmetal", "network")

    def state() -> str:
        return remote.virsh_local("domstate", str(machine.uuid)).strip()

    assert state() == "shut off" and boot_order(remote, machine) == ["network", "hd"]
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")
    machine = Machine.objects.get(pk=machine.pk)
    creds = {
        "address": machine.bmc_address,
        "port": machine.bmc_port,
        "username": machine.bmc_username,
        "password": crypto.decrypt(machine.bmc_password_encrypted),
    }

    # The BMC reads the remote domain over TLS with the client certificate the URI names (the host listens
    # on TLS only and refuses a client without the lab's certificate).
    started = time.monotonic()
    status = ipmi(creds, "power", "status")
    print(f"power status over IPMI and TLS {time.monotonic() - started:.2f} s")
    assert "Chassis Power is off" in status.stdout, status.stderr

    # Boot device: persistent disk, then PXE for the next boot only; both land in the remote definition.
    assert ipmi(creds, "chassis", "bootdev", "disk", "options=persistent").returncode == 0
    assert boot_order(remote, machine) == ["hd"]
    assert ipmi(creds, "chassis", "bootdev", "pxe").returncode == 0
    assert boot_order(remote, machine) == ["network"]

    started = time.monotonic()
    assert ipmi(creds, "power", "on").returncode == 0
    wait_for(lambda: state() == "running", 30, message="the remote domain did not start")
    print(f"power on over IPMI: running on the remote host after {time.monotonic() - started:.2f} s")
    assert "Chassis Power is on" in ipmi(creds, "power", "status").stdout
    serial_log(machine.pk, "iPXE", timeout=60)  # it booted from the network
    assert boot_order(remote, machine) == ["hd"]  # and the one-time device gave way to the persistent one

    started = time.monotonic()
    assert ipmi(creds, "power", "off").returncode == 0
    wait_for(lambda: state() == "shut off", 30, message="the remote domain did not stop")
    print(f"power off over IPMI: shut off on the remote host after {time.monotonic() - started:.2f} s")
    assert "Chassis Power is off" in ipmi(creds, "power", "status").stdout

    # The host vanishes: its BMC (on the portal's machine) answers with an error, not a state; back, it works.
    remote.link_down()
    try:
        started = time.monotonic()
        lost = ipmi(creds, "power", "status")
        print(
            f"power status with the host's link down: {lost.returncode} after {time.monotonic() - started:.2f} s: "
            f"{(lost.stdout + lost.stderr).strip()!r}"
        )
        assert lost.returncode != 0 or "Chassis Power" not in lost.stdout
    finally:
        remote.link_up()
    started = time.monotonic()
    wait_for(lambda: "Chassis Power is off" in ipmi(creds, "power", "status").stdout, 60, interval=1)
    print(f"the BMC answers again {time.monotonic() - started:.2f} s after the link came back")

    # Deleting the machine stops its BMC and removes the remote domain.
    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="delete did not finish")
    bmc_address, bmc_port = str(machine.bmc_address), int(machine.bmc_port or 0)
    wait_for(lambda: udp_port_free(bmc_address, bmc_port), 15, message="the BMC port stayed open")
    assert str(machine.uuid) not in remote.virsh_local("list", "--all", "--uuid")
