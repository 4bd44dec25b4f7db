"""Console connections and refusals land in the audit trail (issue 14), from the proxy itself: it serves no
Django request, so each row names the token's user and the client address the proxy sees, and a refusal
its reason. Through a real ConsoleProxyServer on the loopback and real websocket handshakes."""

import socket
import threading
from datetime import timedelta
from unittest import mock

import pytest
from django.conf import settings
from django.utils import timezone

from machines import console_proxy, consoles
from machines.models import ConsoleSession, ConsoleToken
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, MachineFactory, UserFactory

ORIGIN = settings.PORTAL_CONSOLE_ALLOWED_ORIGINS[0]


@pytest.fixture
def proxy(transactional_db):
    server = console_proxy.ConsoleProxyServer("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def machine(transactional_db):
    owner = UserFactory(username="con-owner")
    # test:/// has no domain of this machine: the proxy's visit to the hypervisor finds it not running.
    return MachineFactory(name="conaudit", owner=owner, hypervisor=HypervisorFactory(), status=Status.ACTIVE)


def connect(port: int, path: str, origin: str | None = ORIGIN) -> tuple[int, socket.socket]:
    """A websocket upgrade to the proxy; returns the HTTP status and the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    headers = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: binary",
    ]
    if origin is not None:
        headers.append(f"Origin: {origin}")
    sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
    status = b""
    while b"\r\n" not in status:
        chunk = sock.recv(1)
        if not chunk:
            break
        status += chunk
    return int(status.split()[1]), sock


def status_of(port: int, path: str, origin: str | None = ORIGIN) -> int:
    code, sock = connect(port, path, origin)
    sock.close()
    return code


def rows():
    events = AuditEvent.objects.filter(action="console.connect").order_by("pk")
    return [(e.outcome, e.username, e.address, e.object_id, e.detail) for e in events]


def test_refusals_are_recorded_with_the_reason_the_user_and_the_address(proxy, machine, settings):
    owner, mid = machine.owner, str(machine.pk)
    raw, _ = consoles.console_token_issue(machine=machine, user=owner)
    assert status_of(proxy, f"/console/{machine.pk}?token={raw}", origin="https://evil.example") == 403
    assert status_of(proxy, f"/console/{machine.pk}?token={raw}", origin=None) == 403
    assert status_of(proxy, f"/console/{machine.pk}?token=not-a-token") == 403
    expired, _ = consoles.console_token_issue(machine=machine, user=owner)
    ConsoleToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert status_of(proxy, f"/console/{machine.pk}?token={expired}") == 403
    fresh, _ = consoles.console_token_issue(machine=machine, user=owner)
    # Spent, and the machine is not running: the visit to the hypervisor finds no VNC server.
    assert status_of(proxy, f"/console/{machine.pk}?token={fresh}") == 403
    assert status_of(proxy, f"/console/{machine.pk}?token={fresh}") == 403  # replayed
    settings.PORTAL_CONSOLE_MAX_PER_USER = 0
    capped, _ = consoles.console_token_issue(machine=machine, user=owner)
    with mock.patch.object(console_proxy, "vnc_connect", return_value=socket.socket()):
        assert status_of(proxy, f"/console/{machine.pk}?token={capped}") == 403
    assert rows() == [
        ("refused", "", "127.0.0.1", mid, "graphical console: origin https://evil.example is not allowed"),
        ("refused", "", "127.0.0.1", mid, "graphical console: origin (none) is not allowed"),
        ("refused", "", "127.0.0.1", mid, "graphical console: unknown token"),
        ("refused", "con-owner", "127.0.0.1", mid, "graphical console: token expired unused"),
        ("refused", "con-owner", "127.0.0.1", mid, "graphical console: the machine is not running (no VNC server)"),
        (
            "refused",
            "con-owner",
            "127.0.0.1",
            mid,
            "graphical console: token already used (a reconnect needs its reconnect secret)",
        ),
        (
            "refused",
            "con-owner",
            "127.0.0.1",
            mid,
            f"graphical console: user {owner.pk} already has 0 console sessions",
        ),
    ]
    every = " ".join(AuditEvent.objects.values_list("detail", flat=True))
    assert raw not in every and fresh not in every and expired not in every  # never the token


def test_a_connection_is_recorded_with_the_tokens_user_and_a_token_for_another_machine_against_the_one_tried(
    proxy, machine
):
    viewer = UserFactory(username="con-viewer", is_staff=True)
    other = MachineFactory(name="elsewhere", owner=machine.owner, hypervisor=machine.hypervisor)
    raw, _ = consoles.console_token_issue(machine=machine, user=viewer)
    assert status_of(proxy, f"/console/{other.pk}?token={raw}") == 403
    with socket.create_server(("127.0.0.1", 0)) as vnc:
        near = socket.create_connection(vnc.getsockname())
        far, _ = vnc.accept()
        with mock.patch.object(console_proxy, "vnc_connect", return_value=near):
            code, client = connect(proxy, f"/console/{machine.pk}?token={raw}")
        assert code == 101
        client.close()
        far.close()
    session = ConsoleSession.objects.get(machine=machine)
    got = rows()
    assert got[0] == (
        "refused",
        "con-viewer",
        "127.0.0.1",
        str(other.pk),
        f"graphical console: token is for machine {machine.pk}, not {other.pk}",
    )
    assert got[1][:4] == ("success", "con-viewer", "127.0.0.1", str(machine.pk))
    assert got[1][4] == f"graphical console: session {session.pk} opened"


def test_a_hypervisor_that_cannot_be_reached_is_recorded_as_failed(proxy, machine):
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    with mock.patch.object(console_proxy, "vnc_connect", side_effect=ConnectionRefusedError(111, "Connection refused")):
        assert status_of(proxy, f"/console/{machine.pk}?token={raw}") == 503
    ((outcome, user, address, _, detail),) = rows()
    assert (outcome, user, address) == ("failed", "con-owner", "127.0.0.1")
    assert "cannot reach the VNC server: Connection refused" in detail


def test_an_audit_write_that_fails_does_not_change_the_proxys_answer(proxy, machine, caplog):
    with mock.patch.object(consoles, "console_connection_record", side_effect=RuntimeError("database away")):
        assert status_of(proxy, f"/console/{machine.pk}?token=nope") == 403
    assert "cannot record it in the audit trail" in caplog.text
