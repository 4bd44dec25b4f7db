"""Console authentication and view-only, for real: QEMU's VNC servers ask a password only the proxy holds,
RFB 3.3, 3.7 and 3.8 clients get the screen through the proxy, and a viewer's key events (the RFB 3.3
stream that once went through the filter) never reach the guest, while an operator's do."""

import re
import socket
import struct
import time
import xml.etree.ElementTree as ET
from io import StringIO

import pytest
from django.core.management import call_command

from hypervisors.drivers import get_driver
from machines import rfb, services
from machines.models import Machine, Membership
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import ProjectFactory, UserFactory
from tests.integration.test_iso_console import WsClient, token_for, virsh
from tests.rfb_client import key_events, shifted_key_stream, update_request

pytestmark = pytest.mark.integration


def console_log_size() -> int:
    """Where the proxy's log ends now (test-artifacts/ is shared by every run: read only what follows)."""
    path = ARTIFACTS / "console.log"
    return path.stat().st_size if path.exists() else 0


def console_log_since(offset: int) -> str:
    with open(ARTIFACTS / "console.log", "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


class RfbWs(WsClient):
    """The websocket client of the console tests, reading exact byte counts."""

    def read_exact(self, n: int, timeout: float = 30) -> bytes:
        out = self.read(n, timeout)
        assert len(out) == n, (out, self.data, self.close_reason)
        return out

    def closed(self, timeout: float = 10) -> bool:
        """Whether the proxy closes the connection within `timeout`."""
        self.read_until(b"\0never\0", timeout=timeout)
        return self.close_reason is not None or self._eof()

    def _eof(self) -> bool:
        self.sock.settimeout(0.5)
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


def rfb_session(port: int, machine: Machine, token: str, minor: int) -> tuple[RfbWs, int, int, bytes]:
    """An RFB 3.<minor> client through the proxy up to ServerInit: (socket, width, height, desktop name)."""
    ws = RfbWs(port, f"/console/{machine.pk}?token={token}")
    assert ws.status == 101
    assert ws.read_exact(12) == b"RFB 003.008\n"
    ws.send(f"RFB 003.00{minor}\n".encode())
    if minor == 3:
        assert ws.read_exact(4) == struct.pack(">I", 1)  # the server says: None
    else:
        assert ws.read_exact(2) == b"\x01\x01"  # one type offered: None
        ws.send(b"\x01")
        if minor == 8:
            assert ws.read_exact(4) == struct.pack(">I", 0)
    ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", ws.read_exact(4))
    ws.read_exact(16)  # pixel format
    (length,) = struct.unpack(">I", ws.read_exact(4))
    return ws, width, height, ws.read_exact(length)


def raw_vnc(machine: Machine) -> tuple[socket.socket, bytes]:
    """A plain TCP connection to the machine's VNC server (as a guest on 10.0.2.2 would open one), after
    the version exchange: (socket, the security types offered)."""
    driver = get_driver(machine.hypervisor.uri)
    host, port = driver.vnc_address(str(machine.uuid))
    sock = socket.create_connection((host, port), timeout=10)
    channel = rfb.SocketChannel(sock)
    assert channel.read(12) == b"RFB 003.008\n"
    channel.write(b"RFB 003.008\n")
    (count,) = channel.read(1)
    return sock, channel.read(count)


def try_password(machine: Machine, password: str) -> bool:
    """Whether QEMU accepts VNC authentication with this password."""
    driver = get_driver(machine.hypervisor.uri)
    host, port = driver.vnc_address(str(machine.uuid))
    with socket.create_connection((host, port), timeout=10) as sock:
        try:
            rfb.authenticate_to_server(rfb.SocketChannel(sock), password)
        except rfb.VncAuthFailed:
            return False
    return True


def graphics(machine: Machine, *, inactive: bool) -> ET.Element:
    driver = get_driver(machine.hypervisor.uri)
    xml = driver.domain_xml(str(machine.uuid), inactive=inactive, secure=True)
    return ET.fromstring(xml).find("devices/graphics[@type='vnc']")


def test_a_vnc_server_answers_only_the_password_the_proxy_just_set(iso_machine):
    serial_log(iso_machine.pk, "TINY-GUEST ready")
    sock, offered = raw_vnc(iso_machine)
    assert offered == b"\x02"  # VNC authentication only: no None
    sock.sendall(b"\x02")
    rfb.SocketChannel(sock).read(16)
    sock.sendall(bytes(16))  # a guess
    assert rfb.SocketChannel(sock).read(4) == struct.pack(">I", 1)
    sock.close()

    # The password at rest in the domain's config was expired from the start: it opens nothing.
    assert not try_password(iso_machine, graphics(iso_machine, inactive=True).get("passwd"))
    assert not try_password(iso_machine, graphics(iso_machine, inactive=False).get("passwd"))

    # The proxy's way: a fresh password, which QEMU accepts (so the proxy's DES is QEMU's), once rotated...
    driver = get_driver(iso_machine.hypervisor.uri)
    started = time.monotonic()
    _, _, first = driver.vnc_open(str(iso_machine.uuid))
    print(f"rotation {1000 * (time.monotonic() - started):.0f} ms")
    host, port = driver.vnc_address(str(iso_machine.uuid))
    session = socket.create_connection((host, port), timeout=10)
    assert rfb.authenticate_to_server(rfb.SocketChannel(session), first) == rfb.SEC_VNC
    _, _, second = driver.vnc_open(str(iso_machine.uuid), valid_for=3)
    assert first != second and not try_password(iso_machine, first)  # ...the old one fails at once
    assert try_password(iso_machine, second)
    session.sendall(b"\x01")  # ...and the session it opened goes on: ClientInit, ServerInit
    width, height = struct.unpack(">HH", rfb.SocketChannel(session).read(4))
    assert width >= 640 and height >= 400
    session.close()
    time.sleep(4)  # a password set for 3 s (the proxy's are VNC_PASSWORD_VALID_FOR) expires by itself
    assert not try_password(iso_machine, second)


@pytest.mark.engines
def test_rfb_33_37_and_38_clients_get_the_screen_through_the_proxy(iso_machine, console_proxy):
    serial_log(iso_machine.pk, "TINY-GUEST ready")
    sizes = set()
    for minor in (3, 7, 8):
        ws, width, height, name = rfb_session(console_proxy, iso_machine, token_for(iso_machine), minor)
        assert name == f"QEMU ({iso_machine.domain_name})".encode() and width >= 640 and height >= 400
        ws.send(update_request(incremental=False, width=width, height=height))
        assert struct.unpack(">BxH", ws.read_exact(4))[0] == 0  # a FramebufferUpdate comes back
        sizes.add((width, height))
        ws.close()
    assert len(sizes) == 1

    # Anything but those three versions, or a security type that was not offered, ends the connection.
    for answer in (b"RFB 003.005\n", b"RFB 004.001\n", b"HELLO THERE!"):
        ws = RfbWs(console_proxy, f"/console/{iso_machine.pk}?token={token_for(iso_machine)}")
        ws.read_exact(12)
        ws.send(answer)
        assert ws.closed(), answer
    ws = RfbWs(console_proxy, f"/console/{iso_machine.pk}?token={token_for(iso_machine)}")
    ws.read_exact(12)
    ws.send(b"RFB 003.008\n")
    ws.read_exact(2)
    ws.send(b"\x02")
    assert ws.read_exact(4) == struct.pack(">I", 1) and ws.closed()


def test_a_viewers_keys_never_reach_the_guest_and_an_operators_do(iso_machine, console_proxy):
    serial_log(iso_machine.pk, "TINY-GUEST ready")
    project = ProjectFactory(name="onlookers")
    Machine.objects.filter(pk=iso_machine.pk).update(project=project)
    viewer = UserFactory(username="onlooker")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    from machines import consoles

    iso_machine = Machine.objects.get(pk=iso_machine.pk)
    raw, _ = consoles.console_token_issue(machine=iso_machine, user=viewer)
    log_start = console_log_size()

    # The RFB 3.3 stream that carried "echo pwned..." past the old filter, in the pieces a browser sends.
    ws, *_ = rfb_session(console_proxy, iso_machine, raw, 3)
    attack = shifted_key_stream(key_events("echo pwned-by-viewer >/dev/console\n"))
    for i in range(0, len(attack), 64):
        ws.send(attack[i : i + 64])
    assert ws.closed()  # its over-long SetEncodings ends the session; the keys were dropped before it
    log_line = f"console of machine {iso_machine.pk} for user {viewer.pk} (view only)"
    wait_for(lambda: log_line in console_log_since(log_start), 10)
    again = consoles.console_token_issue(machine=iso_machine, user=viewer)[0]
    ws, width, height, _ = rfb_session(console_proxy, iso_machine, again, 8)
    for event in key_events("echo typed-by-viewer >/dev/console\n"):  # plain key events, well-formed
        ws.send(event)
    ws.send(update_request(width=width, height=height))
    ws.read_exact(4)  # the server still answers the viewer: the session is alive, only its keys went nowhere
    ws.close()

    # The owner operates: the same typing reaches the guest's shell (and shows the viewer's did not).
    ws, *_ = rfb_session(console_proxy, iso_machine, token_for(iso_machine), 3)
    for event in key_events("echo typed-by-owner >/dev/console\n"):
        ws.send(event)
    log = serial_log(iso_machine.pk, "typed-by-owner")
    ws.close()
    assert "pwned-by-viewer" not in log and "typed-by-viewer" not in log
    assert "SetEncodings with 248 encodings" in console_log_since(log_start)


def test_machines_defined_without_a_password_are_reported_and_fixed_by_a_cold_start(
    iso_machine, console_proxy, tmp_path
):
    """A domain as the portal defined them before (no passwd): the proxy still reaches it and warns, the
    reconcile records it, and the portal's next cold start gives it a password."""
    uuid = str(iso_machine.uuid)
    virsh("destroy", uuid)
    root = ET.fromstring(virsh("dumpxml", "--inactive", "--security-info", uuid))
    g = root.find("devices/graphics")
    del g.attrib["passwd"], g.attrib["passwdValidTo"]
    legacy = tmp_path / "legacy.xml"
    legacy.write_text(ET.tostring(root, encoding="unicode"))
    virsh("define", str(legacy))
    virsh("start", uuid)  # behind the portal's back, as an older portal started it
    serial_log(iso_machine.pk, "TINY-GUEST ready")
    sock, offered = raw_vnc(iso_machine)
    sock.close()
    assert offered == b"\x01"
    ws, width, _, _ = rfb_session(console_proxy, iso_machine, token_for(iso_machine), 8)
    ws.close()
    assert width >= 640
    wait_for(
        lambda: (
            f"({iso_machine.domain_name}): its VNC server accepts clients without a password"
            in (ARTIFACTS / "console.log").read_text(errors="replace")
        ),
        10,
    )
    # The one-off command writes the password into the config; the running server keeps none until...
    out = StringIO()
    call_command("console_auth_upgrade", "--now", stdout=out)
    # (The worker's own minute reconcile may have written it first: then the command finds it there.)
    counts = re.search(r"password added to (\d+), already there on (\d+)", out.getvalue())
    assert counts and int(counts[1]) + int(counts[2]) == 1 and "not enough): 1 as last seen" in out.getvalue()
    assert graphics(iso_machine, inactive=True).get("passwd")
    # Recorded by the command's reconcile.
    assert Machine.objects.get(pk=iso_machine.pk).last_observed.console_unprotected
    # The reconcile does the same by itself for a machine it finds so (its BMC or autostart may start it).
    virsh("define", str(legacy))
    services.hypervisor_reconcile_run(iso_machine.hypervisor_id)
    assert Machine.objects.get(pk=iso_machine.pk).last_observed.console_unprotected
    assert graphics(iso_machine, inactive=True).get("passwd")
    assert raw_vnc(iso_machine)[1] == b"\x01"
    # ...the portal stops and starts it.
    services.machine_power(machine=Machine.objects.get(pk=iso_machine.pk), action="poweroff", actor=iso_machine.owner)
    wait_for(lambda: (m := Machine.objects.get(pk=iso_machine.pk)).power_state == "off" and not m.operation, 30)
    services.machine_power(machine=Machine.objects.get(pk=iso_machine.pk), action="start", actor=iso_machine.owner)
    wait_for(lambda: (m := Machine.objects.get(pk=iso_machine.pk)).power_state == "running" and not m.operation, 30)
    assert raw_vnc(iso_machine)[1] == b"\x02"
    services.hypervisor_reconcile_run(iso_machine.hypervisor_id)
    assert not Machine.objects.get(pk=iso_machine.pk).last_observed.console_unprotected
    ws, width, _, _ = rfb_session(console_proxy, iso_machine, token_for(iso_machine), 8)
    ws.close()


def test_the_password_survives_every_redefine(iso_machine, console_proxy):
    """Media changes, boot once from CD-ROM, a grown disk and virtualbmc's boot device all rewrite the
    domain; each keeps its VNC password (libvirt drops it from XML not read with VIR_DOMAIN_XML_SECURE)."""
    from machines.bmc_server import PortalVirtualBMC

    serial_log(iso_machine.pk, "TINY-GUEST ready")

    def operation_done():
        return wait_for(lambda: not Machine.objects.get(pk=iso_machine.pk).operation, 60)

    services.machine_change_media(
        machine=Machine.objects.get(pk=iso_machine.pk), slot=0, image=None, actor=iso_machine.owner
    )
    operation_done()
    services.machine_change_media(
        machine=Machine.objects.get(pk=iso_machine.pk), slot=0, image=iso_machine.image, actor=iso_machine.owner
    )
    operation_done()
    services.machine_grow_disk(machine=Machine.objects.get(pk=iso_machine.pk), disk_gib=2, actor=iso_machine.owner)
    wait_for(lambda: Machine.objects.get(pk=iso_machine.pk).status == "active", 60)
    services.machine_boot_cdrom_once(machine=Machine.objects.get(pk=iso_machine.pk), actor=iso_machine.owner)
    operation_done()
    bmc = PortalVirtualBMC(
        username="bmc-test",
        password="a-long-test-password",
        port=0,
        address="127.0.0.1",
        domain_name=iso_machine.domain_name,
        libvirt_uri=iso_machine.hypervisor.uri,
    )
    assert bmc.set_boot_device("network") is None  # None: done (virtualbmc returns an IPMI code on failure)
    for inactive in (True, False):
        g = graphics(iso_machine, inactive=inactive)
        assert g.get("passwd") and len(g.get("passwd")) == 8, (inactive, ET.tostring(g))
    assert ET.fromstring(_inactive_xml(iso_machine)).find("os/boot").get("dev") == "network"

    # A cold start after all that: still only VNC authentication, and the proxy still gets in.
    services.machine_power(machine=Machine.objects.get(pk=iso_machine.pk), action="poweroff", actor=iso_machine.owner)
    wait_for(lambda: (m := Machine.objects.get(pk=iso_machine.pk)).power_state == "off" and not m.operation, 30)
    services.machine_power(machine=Machine.objects.get(pk=iso_machine.pk), action="start", actor=iso_machine.owner)
    wait_for(lambda: (m := Machine.objects.get(pk=iso_machine.pk)).power_state == "running" and not m.operation, 30)
    assert raw_vnc(iso_machine)[1] == b"\x02"
    ws, width, _, _ = rfb_session(console_proxy, iso_machine, token_for(iso_machine), 8)
    ws.close()
    assert width >= 640


def _inactive_xml(machine: Machine) -> str:
    driver = get_driver(machine.hypervisor.uri)
    return driver.domain_xml(str(machine.uuid), inactive=True)
