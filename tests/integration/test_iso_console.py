"""ISO machines and the console proxy, for real: the tiny installer ISO boots through a blank disk,
and the proxy lets exactly the right browser in."""

import base64
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone

from machines import consoles, services
from machines.models import ConsoleSession, ConsoleToken, Machine
from tests import rfb_client
from tests.conftest import ARTIFACTS, STACK_PORTS, serial_log, wait_for
from tests.factories import ProjectFactory, UserFactory
from tests.images import test_images as built_images

pytestmark = pytest.mark.integration

ORIGIN = f"http://127.0.0.1:{STACK_PORTS['web']}"


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60).stdout


class WsClient:
    """Just enough of a websocket client for the serial console: binary frames both ways."""

    def __init__(self, port: int, path: str, origin: str | None = ORIGIN, reconnect: str = "") -> None:
        """reconnect: the token's reconnect secret, offered as the pages do (a subprotocol after "binary")."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        key = base64.b64encode(os.urandom(16)).decode()
        protocols = "binary" + (f", {consoles.RECONNECT_PROTOCOL}{reconnect}" if reconnect else "")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n"
                + (f"Origin: {origin}\r\n" if origin else "")
                + "\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "closed during the handshake"
            head += chunk
        self.status = int(head.split(b" ", 2)[1])
        self.buf, self.data, self.close_reason = head.split(b"\r\n\r\n", 1)[1], b"", None

    def send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frames(self) -> None:
        while len(self.buf) >= 2:
            n, at = self.buf[1] & 0x7F, 2
            if n == 126:
                n, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                n, at = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < at + n:
                return
            opcode, payload, self.buf = self.buf[0] & 0x0F, self.buf[at : at + n], self.buf[at + n :]
            if opcode == 0x8:
                self.close_reason = payload[2:].decode(errors="replace")
            elif opcode in (0x0, 0x1, 0x2):
                self.data += payload

    def _fill(self, enough, timeout: float) -> None:
        """Receive frames until enough(self.data), the server closes, or the time runs out."""
        self._frames()  # what came with the handshake's response (the proxy may send at once after the 101)
        deadline = time.monotonic() + timeout
        while not enough(self.data) and self.close_reason is None and time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.buf += chunk
            self._frames()

    def read_until(self, needle: bytes, timeout: float = 30) -> bytes:
        self._fill(lambda data: needle in data, timeout)
        return self.data

    def read(self, n: int, timeout: float = 15) -> bytes:
        """Exactly n bytes of what the server sent (fewer if it closed or the time ran out), consumed."""
        self._fill(lambda data: len(data) >= n, timeout)
        out, self.data = self.data[:n], self.data[n:]
        return out

    def close(self) -> None:
        self.sock.close()


def handshake(port: int, path: str, origin: str | None = ORIGIN, reconnect: str = "") -> tuple[int, bytes]:
    """Open a websocket and close it; return the HTTP status and, on success, what arrives first
    (for VNC, the RFB banner)."""
    ws = WsClient(port, path, origin, reconnect)
    try:
        return ws.status, ws.read_until(b"\n", timeout=15) if ws.status == 101 else b""
    finally:
        ws.close()


def token_for(machine: Machine) -> str:
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    return raw


def test_iso_machine_falls_through_a_blank_disk_to_the_installer(iso_machine):
    xml = virsh("dumpxml", str(iso_machine.uuid))
    disk_part, cdrom_part = xml.split("device='cdrom'")[0], xml.split("device='cdrom'")[1]
    assert "<target dev='vda' bus='virtio'/>" in disk_part and "<boot order='1'/>" in disk_part
    assert "<target dev='hda' bus='ide'/>" in cdrom_part and "<boot order='2'/>" in cdrom_part
    log = serial_log(iso_machine.pk, "ISOLINUX", "TINY-GUEST ready")
    assert "no-cidata" in log  # an ISO machine gets no cloud-init seed
    assert iso_machine.power_state == "running"


def test_console_proxy_lets_in_only_the_right_connection(iso_machine, console_proxy):
    port, path = console_proxy, f"/console/{iso_machine.pk}"
    raw = token_for(iso_machine)
    status, banner = handshake(port, f"{path}?token={raw}")
    assert status == 101 and banner.startswith(b"RFB 003.0"), (status, banner)

    # A reconnect within the grace is allowed with the token's reconnect secret only (it used to be allowed
    # from the same address, which behind a reverse proxy is everyone's): see
    # test_a_spent_token_reconnects_only_with_its_secret. After the grace, the token is spent.
    assert handshake(port, f"{path}?token={raw}", reconnect=consoles.console_reconnect_secret(raw))[0] == 101
    ConsoleToken.objects.all().update(used_at=timezone.now() - timedelta(seconds=60))
    assert handshake(port, f"{path}?token={raw}", reconnect=consoles.console_reconnect_secret(raw))[0] == 403

    expired = token_for(iso_machine)
    ConsoleToken.objects.filter(used_at__isnull=True).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert handshake(port, f"{path}?token={expired}")[0] == 403

    assert handshake(port, f"/console/{iso_machine.pk + 1000}?token={token_for(iso_machine)}")[0] == 403
    assert handshake(port, f"{path}?token={token_for(iso_machine)}", origin=None)[0] == 403
    assert handshake(port, f"{path}?token={token_for(iso_machine)}", origin="http://evil.example")[0] == 403
    assert handshake(port, f"{path}?token=made-up")[0] == 403
    assert handshake(port, path)[0] == 403

    # Another user cannot even get a token.
    mallory = Client()
    mallory.force_login(UserFactory(username="mallory"))
    assert mallory.post(f"/machines/{iso_machine.pk}/console/token/").status_code == 404
    owner = Client()
    owner.force_login(iso_machine.owner)
    r = owner.post(f"/machines/{iso_machine.pk}/console/token/")
    assert r.status_code == 200 and r["Cache-Control"] == "no-store"
    assert handshake(port, f"{path}?token={r.json()['token']}")[0] == 101

    # Logging out kills the user's unused tokens.
    unused = token_for(iso_machine)
    owner.post("/logout/")
    assert handshake(port, f"{path}?token={unused}")[0] == 403

    # No token ever reaches a log the portal writes.
    for log in ARTIFACTS.glob("*.log"):
        text = log.read_text(errors="replace")
        for secret in (raw, expired, unused, r.json()["token"]):
            assert secret not in text, f"a console token is in {log.name}"


def test_sessions_per_machine_are_capped(iso_machine, console_proxy, settings):
    port, path = console_proxy, f"/console/{iso_machine.pk}"
    socks = []
    try:
        for _ in range(2):  # PORTAL_CONSOLE_MAX_PER_MACHINE
            socks.append(WsClient(port, f"{path}?token={token_for(iso_machine)}"))
            assert socks[-1].status == 101
        assert handshake(port, f"{path}?token={token_for(iso_machine)}")[0] == 403
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: handshake(port, f"{path}?token={token_for(iso_machine)}")[0] == 101, 10)


def test_media_and_boot_once_from_cdrom(iso_machine):
    uuid = str(iso_machine.uuid)
    serial_log(iso_machine.pk, "ISOLINUX", "TINY-GUEST ready")

    # "Install": power off and put a bootable system on the disk; the next start boots from it.
    services.machine_power(machine=iso_machine, action="poweroff", actor=iso_machine.owner)
    wait_for(lambda: (m := Machine.objects.get(pk=iso_machine.pk)).power_state == "off" and not m.operation and m, 30)
    tiny_disk = built_images()["tiny_disk"]
    raw = Path(ARTIFACTS / "installed.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", tiny_disk, str(raw)], check=True)
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "vol-upload", "--pool", "default", iso_machine.disk_volume, str(raw)],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    machine = Machine.objects.get(pk=iso_machine.pk)
    services.machine_power(machine=machine, action="start", actor=machine.owner)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).power_state == "running", 30)
    log = serial_log(machine.pk, "SYSLINUX", "TINY-GUEST ready")
    assert "ISOLINUX" not in log  # the log restarts with each boot: this one came from the disk

    # Eject the installer, then put it back.
    services.machine_change_media(machine=Machine.objects.get(pk=machine.pk), slot=0, image=None, actor=machine.owner)
    wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30)
    cdrom = virsh("dumpxml", uuid).split("device='cdrom'")[1].split("</disk>")[0]
    assert "<source file" not in cdrom
    services.machine_change_media(
        machine=Machine.objects.get(pk=machine.pk), slot=0, image=iso_machine.image, actor=machine.owner
    )
    wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30)
    assert "portal-image-" in virsh("dumpxml", uuid).split("device='cdrom'")[1].split("</disk>")[0]

    # Boot once from the CD-ROM: the installer runs, and the saved boot order keeps the disk first.
    services.machine_boot_cdrom_once(machine=Machine.objects.get(pk=machine.pk), actor=machine.owner)
    wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30)
    log = serial_log(machine.pk, "ISOLINUX", "TINY-GUEST ready")
    inactive = virsh("dumpxml", "--inactive", uuid)
    assert "<boot order='1'/>" in inactive.split("device='cdrom'")[0]


def test_screenshot_of_a_running_machine(iso_machine):
    serial_log(iso_machine.pk, "TINY-GUEST ready")
    services.machine_screenshot_request(machine=iso_machine, max_age=0)
    wait_for(lambda: Machine.objects.get(pk=iso_machine.pk).last_observed.screenshot_taken, 30)
    png = services.screenshot_path(iso_machine).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    owner = Client()
    owner.force_login(iso_machine.owner)
    r = owner.get(f"/machines/{iso_machine.pk}/screenshot.png")
    assert r.status_code == 200 and r["Content-Type"] == "image/png"
    mallory = Client()
    mallory.force_login(UserFactory(username="peeker"))
    assert mallory.get(f"/machines/{iso_machine.pk}/screenshot.png").status_code == 404


def test_a_project_viewer_gets_a_view_only_console(iso_machine, console_proxy):
    from machines.models import Membership

    project = ProjectFactory(name="watchers")
    Machine.objects.filter(pk=iso_machine.pk).update(project=project)
    viewer = UserFactory(username="watcher")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    client = Client()
    client.force_login(viewer)
    r = client.post(f"/machines/{iso_machine.pk}/console/token/")
    assert r.status_code == 200 and r.json()["view_only"] is True
    assert client.post(f"/machines/{iso_machine.pk}/power/", {"action": "poweroff"}).status_code == 403
    status, banner = handshake(console_proxy, f"/console/{iso_machine.pk}?token={r.json()['token']}")
    assert status == 101 and banner.startswith(b"RFB")
    wait_for(
        lambda: (
            f"console of machine {iso_machine.pk} for user {viewer.pk} (view only)"
            in (ARTIFACTS / "console.log").read_text()
        ),
        10,
    )


def test_an_extra_disk_from_an_image_with_boot_order_one_boots_first(worker, local, tiny_iso, tiny_image):
    owner = UserFactory(username="multi-disk")
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="multi1",
        deploy_type="iso",
        image=tiny_iso,
        memory_mib=256,
        disk_gib=1,
        extra_disks=[{"size_gib": 1, "image": tiny_image.pk, "boot_order": 1}, 2],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    xml = virsh("dumpxml", "--inactive", str(machine.uuid))
    disks = xml.split("<disk ")[1:]
    order = {
        d.split("<target dev='")[1].split("'")[0]: (
            d.split("<boot order='")[1].split("'")[0] if "<boot order" in d else None
        )
        for d in disks
    }
    assert order == {"vda": "2", "vdb": "1", "vdc": None, "hda": "3"}, order
    assert "<backingStore" in virsh("vol-dumpxml", "--pool", "default", machine.extra_disk_volume(0))
    log = serial_log(machine.pk, "SYSLINUX", "TINY-GUEST ready")  # the image disk, not the installer ISO
    assert "ISOLINUX" not in log


def serial_token(machine: Machine, user=None) -> str:
    raw, _ = consoles.console_token_issue(machine=machine, user=user or machine.owner, kind="serial")
    return raw


def test_the_serial_console_is_a_shell_through_the_proxy(iso_machine, console_proxy):
    port, path = console_proxy, f"/serial/{iso_machine.pk}"
    # A token is for one kind of console.
    assert handshake(port, f"{path}?token={token_for(iso_machine)}")[0] == 403
    assert handshake(port, f"/console/{iso_machine.pk}?token={serial_token(iso_machine)}")[0] == 403
    serial_log(iso_machine.pk, "TINY-GUEST ready", timeout=120)  # the shell is up on ttyS0

    ws = WsClient(port, f"{path}?token={serial_token(iso_machine)}")
    try:
        assert ws.status == 101
        started = time.monotonic()
        ws.send(b"\r")
        assert b"# " in ws.read_until(b"# "), ws.data
        ws.send(b"echo SERIAL_$((6*7)) $(uname -m)\r")
        out = ws.read_until(b"SERIAL_42 x86_64")
        assert b"SERIAL_42 x86_64" in out, out[-500:]
        print(f"serial round trip {time.monotonic() - started:.2f} s")
        # libvirt gives the console to one client at a time: a second session is refused, with the reason...
        other = WsClient(port, f"{path}?token={serial_token(iso_machine)}")
        other.read_until(b"never", timeout=10)
        assert other.close_reason and "Active console session" in other.close_reason, (other.status, other.close_reason)
        other.close()
        # ...unless it takes the port over, which ends the first one.
        taker = WsClient(port, f"{path}?token={serial_token(iso_machine)}&take_over=1")
        taker.send(b"echo TAKEN_$((6*7))\r")
        assert b"TAKEN_42" in taker.read_until(b"TAKEN_42\r"), taker.data[-300:]
        ws.read_until(b"never", timeout=10)
        assert ws.close_reason is not None or ws.sock.recv(1) == b"", "the first session outlived the take-over"
        taker.close()
    finally:
        ws.close()
    # Closing the page frees the console for the next one (the bridge closes its libvirt connection).
    again = wait_for(
        lambda: (
            (c := WsClient(port, f"{path}?token={serial_token(iso_machine)}")).status == 101
            and (c.send(b"\r") or b"# " in c.read_until(b"# ", timeout=5))
            and c
        ),
        20,
    )
    again.close()
    # No session is left open in the proxy's books.
    wait_for(lambda: not ConsoleSession.objects.filter(machine=iso_machine, ended__isnull=True).exists(), 15)


# --- Tokens and sessions (issue 11, item 5): reconnect secret, atomic caps, roles and lifetime followed. ---


def log_since(path: Path, offset: int) -> str:
    """What a process wrote to its log after offset (logs are appended to across runs)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_a_spent_token_reconnects_only_with_its_secret(iso_machine, console_proxy):
    """Every client reaches the proxy from 127.0.0.1 here, as behind a reverse proxy: the address is no key."""
    port, path = console_proxy, f"/console/{iso_machine.pk}"
    raw = token_for(iso_machine)
    secret = consoles.console_reconnect_secret(raw)
    mark = log_size(ARTIFACTS / "console.log")
    assert handshake(port, f"{path}?token={raw}")[0] == 101
    # Within the grace, from the same address: the token alone (from a log, over a shoulder) is refused.
    assert handshake(port, f"{path}?token={raw}")[0] == 403
    assert handshake(port, f"{path}?token={raw}", reconnect="0" * len(secret))[0] == 403
    status, banner = handshake(port, f"{path}?token={raw}", reconnect=secret)  # the page that received it
    assert status == 101 and banner.startswith(b"RFB 003.0"), (status, banner)
    ConsoleToken.objects.update(used_at=timezone.now() - timedelta(seconds=11))  # PORTAL_CONSOLE_RECONNECT_GRACE
    assert handshake(port, f"{path}?token={raw}", reconnect=secret)[0] == 403
    log = wait_for(lambda: (t := log_since(ARTIFACTS / "console.log", mark)).count("refused console") >= 3 and t, 10)
    assert "a reconnect needs its reconnect secret" in log and "wrong reconnect secret" in log
    assert "the reconnect grace is over" in log and raw not in log and secret not in log


def _connect_all_at_once(port: int, paths: list[str]) -> list[WsClient]:
    """One websocket per path, all opened in the same instant from as many threads."""
    barrier = threading.Barrier(len(paths))
    clients: list[WsClient] = []
    lock = threading.Lock()

    def one(p: str) -> None:
        barrier.wait()
        c = WsClient(port, p)
        with lock:
            clients.append(c)

    threads = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return clients


def test_parallel_connections_get_exactly_the_cap_and_viewers_leave_room_for_operators(iso_machine, console_proxy):
    """The proxy's defaults: 2 operating and 4 view-only sessions per machine (PORTAL_CONSOLE_MAX_PER_MACHINE,
    PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE), 4 per user."""
    from machines.models import Membership

    port, path = console_proxy, f"/console/{iso_machine.pk}"
    project = ProjectFactory(name="crowd")
    Machine.objects.filter(pk=iso_machine.pk).update(project=project)
    viewers = [UserFactory(username=f"crowd{i}") for i in range(10)]
    Membership.objects.bulk_create([Membership(project=project, user=v, role="viewer") for v in viewers])
    machine = Machine.objects.get(pk=iso_machine.pk)
    clients: list[WsClient] = []
    try:
        view_paths = [f"{path}?token={consoles.console_token_issue(machine=machine, user=v)[0]}" for v in viewers]
        clients += _connect_all_at_once(port, view_paths)
        assert sorted(c.status for c in clients) == [101] * 4 + [403] * 6
        # The viewers' cap is full; the owner still gets in, and the operating cap holds as exactly under a crowd.
        owner_paths = [f"{path}?token={token_for(machine)}" for _ in range(8)]
        owners = _connect_all_at_once(port, owner_paths)
        clients += owners
        assert sorted(c.status for c in owners) == [101] * 2 + [403] * 6
        live = ConsoleSession.objects.filter(machine=machine, ended__isnull=True)
        assert live.filter(view_only=True).count() == 4 and live.filter(view_only=False).count() == 2
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: not ConsoleSession.objects.filter(machine=machine, ended__isnull=True).exists(), 15)


def rfb_open(ws: WsClient) -> bytes:
    """The browser's side of the RFB handshake through the proxy (3.8, security None, shared); the desktop name."""
    assert ws.read(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    count = ws.read(1)[0]
    assert 1 in ws.read(count)
    ws.send(b"\x01")
    assert ws.read(4) == b"\x00\x00\x00\x00"
    ws.send(b"\x01")  # ClientInit: shared
    server_init = ws.read(24)
    return ws.read(struct.unpack(">I", server_init[20:24])[0])


def rfb_type(ws: WsClient, text: str) -> None:
    """KeyEvents for text on a US layout, with Shift where it needs it (tests/rfb_client.py)."""
    for event in rfb_client.key_events(text):
        ws.send(event)


def test_an_operator_demoted_to_viewer_types_no_more_within_seconds(iso_machine, console_proxy):
    from machines.models import Membership

    project = ProjectFactory(name="demotions")
    Machine.objects.filter(pk=iso_machine.pk).update(project=project)
    machine = Machine.objects.get(pk=iso_machine.pk)
    operator = UserFactory(username="demoted-operator")
    membership = Membership.objects.create(project=project, user=operator, role="operator")
    serial_log(machine.pk, "TINY-GUEST ready", timeout=120)  # the shell is up on the screen too
    mark = log_size(ARTIFACTS / "console.log")
    raw, _ = consoles.console_token_issue(machine=machine, user=operator)
    ws = WsClient(console_proxy, f"/console/{machine.pk}?token={raw}")
    serial_ws = WsClient(console_proxy, f"/serial/{machine.pk}?token={serial_token(machine, operator)}")
    try:
        assert ws.status == 101 and serial_ws.status == 101
        assert rfb_open(ws)
        session = ConsoleSession.objects.get(machine=machine, user=operator, kind="vnc", ended__isnull=True)
        rfb_type(ws, "echo before-demotion-7 >/dev/console\n")
        serial_log(machine.pk, "before-demotion-7", timeout=30)  # an operator's keys reach the guest

        Membership.objects.filter(pk=membership.pk).update(role="viewer")
        demoted = time.monotonic()
        line = f"console session {session.pk} now view-only"
        wait_for(lambda: line in log_since(ARTIFACTS / "console.log", mark), 6, 0.1, message="no view-only flip")
        took = time.monotonic() - demoted
        print(f"view-only {took:.1f} s after the role was lowered")
        assert took < 5 and ConsoleSession.objects.get(pk=session.pk).view_only
        rfb_type(ws, "echo after-demotion-7 >/dev/console\n")
        ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 64))  # the screen still comes: a FramebufferUpdateRequest
        assert ws.read(1, timeout=10) == b"\x00" and ws.close_reason is None  # ...answered by a FramebufferUpdate
        time.sleep(3)  # the guest would have run it by now (an operator's echo shows within a second)
        assert "after-demotion-7" not in serial_log(machine.pk, "before-demotion-7")
        # The serial console needs the right to operate: that session was ended.
        serial_ws.read_until(b"never", timeout=6)
        closed = serial_ws.close_reason is not None or serial_ws.sock.recv(1) == b""
        assert closed, "the serial session outlived the demotion"
        ended = ConsoleSession.objects.get(machine=machine, user=operator, kind="serial")
        log = log_since(ARTIFACTS / "console.log", mark)
        assert f"session {ended.pk} ended: {consoles.SERIAL_NEEDS_OPERATE}" in log
    finally:
        ws.close()
        serial_ws.close()


@pytest.fixture
def short_lived_console_proxy(django_db_setup):
    """A second console proxy whose sessions live 3 s (PORTAL_CONSOLE_MAX_SESSION); yields (port, its log)."""
    from django.conf import settings

    from tests.conftest import _free_port, _stack_env, _stop, _wait_listening

    port, log_path = _free_port(), ARTIFACTS / "console-short-lived.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "console_proxy", "--port", str(port)],
            cwd=settings.BASE_DIR,
            env={**_stack_env(), "PORTAL_CONSOLE_MAX_SESSION": "3"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(proc, port, "console-short-lived")
        yield port, log_path
    finally:
        _stop(proc)


def test_a_session_ends_at_its_maximum_lifetime(iso_machine, short_lived_console_proxy):
    port, log_path = short_lived_console_proxy
    mark = log_size(log_path)
    ws = WsClient(port, f"/console/{iso_machine.pk}?token={token_for(iso_machine)}")
    try:
        assert ws.status == 101 and rfb_open(ws)
        opened = time.monotonic()
        ws.read_until(b"never", timeout=15)  # the screen's updates, until the proxy closes
        lived = time.monotonic() - opened
        print(f"the session lived {lived:.1f} s")
        assert 2.5 < lived < 7, lived  # 3 s, checked every 2 s
        session = ConsoleSession.objects.filter(machine=iso_machine).latest("pk")
        assert f"console session {session.pk} ended: its maximum lifetime of 3 s is over" in log_since(log_path, mark)
        wait_for(lambda: ConsoleSession.objects.get(pk=session.pk).ended is not None, 10)
    finally:
        ws.close()
