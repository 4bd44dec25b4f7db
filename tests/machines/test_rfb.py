"""The proxy's two RFB handshakes, against fake peers on socket pairs: the browser's side (security None,
RFB 3.3, 3.7 and 3.8 as each does it) and the VNC server's side (VNC authentication)."""

import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from hypervisors.models import Hypervisor
from machines import console_proxy, rfb
from machines.consoles import ConsoleDenied
from tests.fakes import FakeHost

# Computed independently of the portal's code, with OpenSSL 3.0 (legacy provider):
#   key = each byte of "Pa55w0rd" with its bits reversed = 0a86acacee0c4e26 (worked out with bc and rev)
#   openssl enc -des-ecb -K 0a86acacee0c4e26 -nopad <<< challenge 00112233445566778899aabbccddeeff
PASSWORD = "Pa55w0rd"
CHALLENGE = bytes.fromhex("00112233445566778899aabbccddeeff")
RESPONSE = bytes.fromhex("057225515ce77c1ff299c6079da6a23c")


def test_vnc_authentication_answers_with_des_of_the_bit_reversed_password():
    assert rfb.vnc_key(PASSWORD).hex() == "0a86acacee0c4e26"
    assert rfb.vnc_response(PASSWORD, CHALLENGE) == RESPONSE
    assert rfb.vnc_key("longer-than-8") == rfb.vnc_key("longer-t")  # VNC uses the first 8 bytes


@pytest.fixture
def pair():
    proxy_end, peer = socket.socketpair()
    proxy_end.settimeout(5)
    peer.settimeout(5)
    yield rfb.SocketChannel(proxy_end), peer
    proxy_end.close()
    peer.close()


def recv_exactly(sock, n):
    return rfb.SocketChannel(sock).read(n)


def run_proxy_side(fn, *args):
    """Run the proxy's side in a thread; return a function giving its result (or raising its error)."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()

    def result():
        thread.join(5)
        if "error" in box:
            raise box["error"]
        return box["result"]

    return result


def test_an_rfb_38_client_gets_none_then_a_security_result(pair):
    proxy, client = pair
    result = run_proxy_side(rfb.accept_client, proxy)
    assert recv_exactly(client, 12) == b"RFB 003.008\n"
    client.sendall(b"RFB 003.008\n")
    assert recv_exactly(client, 2) == b"\x01\x01"  # one type: None
    client.sendall(b"\x01")
    assert recv_exactly(client, 4) == b"\x00\x00\x00\x00"  # SecurityResult OK
    assert result() == 8
    client.sendall(b"\x01")  # ClientInit is the client's first message to the server: not the handshake's
    assert proxy.read(1) == b"\x01"


def test_an_rfb_37_client_gets_none_and_no_security_result(pair):
    proxy, client = pair
    result = run_proxy_side(rfb.accept_client, proxy)
    recv_exactly(client, 12)
    client.sendall(b"RFB 003.007\n")
    assert recv_exactly(client, 2) == b"\x01\x01"
    client.sendall(b"\x01")
    assert result() == 7
    client.sendall(b"\x01")
    assert proxy.read(1) == b"\x01"  # the next byte is ClientInit, no SecurityResult came before it
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(1)


def test_an_rfb_33_client_is_told_the_security_type(pair):
    proxy, client = pair
    result = run_proxy_side(rfb.accept_client, proxy)
    recv_exactly(client, 12)
    client.sendall(b"RFB 003.003\n" + b"\x01")  # 3.3: the client says nothing more before ClientInit
    assert recv_exactly(client, 4) == struct.pack(">I", 1)
    assert result() == 3
    assert proxy.read(1) == b"\x01"


@pytest.mark.parametrize(
    "version", [b"RFB 003.889\n", b"RFB 004.000\n", b"RFB 003.008 ", b"GET / HTTP/1\n", b"RFB 003.005\n"]
)
def test_other_client_versions_end_the_connection(pair, version):
    proxy, client = pair
    result = run_proxy_side(rfb.accept_client, proxy)
    recv_exactly(client, 12)
    client.sendall(version)
    with pytest.raises(rfb.ViolatedProtocol, match="version"):
        result()


@pytest.mark.parametrize("minor", [7, 8])
def test_a_client_that_picks_another_security_type_is_refused(pair, minor):
    proxy, client = pair
    result = run_proxy_side(rfb.accept_client, proxy)
    recv_exactly(client, 12)
    client.sendall(f"RFB 003.00{minor}\n".encode())
    recv_exactly(client, 2)
    client.sendall(b"\x02")  # VNC authentication, which was not offered
    with pytest.raises(rfb.ViolatedProtocol, match="security type 2"):
        result()
    if minor == 8:
        assert recv_exactly(client, 4) == struct.pack(">I", 1)  # 3.8 is told why
        (n,) = struct.unpack(">I", recv_exactly(client, 4))
        assert b"None" in recv_exactly(client, n)


def test_a_client_that_goes_quiet_is_dropped(pair):
    proxy, client = pair
    proxy.sock.settimeout(0.3)
    result = run_proxy_side(rfb.accept_client, proxy)
    recv_exactly(client, 12)
    client.sendall(b"RFB 003.0")
    with pytest.raises(rfb.ViolatedProtocol):
        result()


def fake_vnc_server(peer, password: str, challenge: bytes = CHALLENGE, types: bytes = b"\x02") -> dict:
    """QEMU's side of the handshake up to SecurityResult, in a thread; returns what it saw."""
    seen = {}

    def serve():
        peer.sendall(b"RFB 003.008\n")
        seen["version"] = recv_exactly(peer, 12)
        peer.sendall(bytes([len(types)]) + types)
        seen["choice"] = recv_exactly(peer, 1)
        if seen["choice"] == b"\x02":
            peer.sendall(challenge)
            seen["response"] = recv_exactly(peer, 16)
            ok = seen["response"] == rfb.vnc_response(password, challenge)
        else:
            ok = True
        peer.sendall(
            struct.pack(">I", 0) if ok else struct.pack(">I", 1) + struct.pack(">I", 21) + b"Authentication failed"
        )

    def run():
        try:
            serve()
        except (OSError, rfb.ViolatedProtocol):
            pass  # the proxy's side gave up first, as the test wanted

    threading.Thread(target=run, daemon=True).start()
    return seen


def test_the_proxy_authenticates_to_the_vnc_server(pair):
    proxy, server = pair
    seen = fake_vnc_server(server, PASSWORD)
    assert rfb.authenticate_to_server(proxy, PASSWORD) == rfb.SEC_VNC
    assert seen == {"version": b"RFB 003.008\n", "choice": b"\x02", "response": RESPONSE}


def test_a_wrong_password_is_an_authentication_failure(pair):
    proxy, server = pair
    fake_vnc_server(server, "another1")
    with pytest.raises(rfb.VncAuthFailed, match="Authentication failed"):
        rfb.authenticate_to_server(proxy, PASSWORD)


def test_a_legacy_server_without_a_password_is_still_reached(pair):
    proxy, server = pair
    fake_vnc_server(server, "", types=b"\x01")
    assert rfb.authenticate_to_server(proxy, "") == rfb.SEC_NONE


def test_no_downgrade_to_no_authentication_once_the_proxy_set_a_password(pair):
    """After the proxy gave the machine's VNC server a password, a server on that port offering only None is
    not the machine's (another process took the port): the user must not land on it."""
    proxy, server = pair
    fake_vnc_server(server, "", types=b"\x01")
    with pytest.raises(rfb.ViolatedProtocol, match="security types"):
        rfb.authenticate_to_server(proxy, PASSWORD)


def test_a_server_offering_neither_is_refused(pair):
    proxy, server = pair
    fake_vnc_server(server, "", types=b"\x10\x13")  # Tight, VeNCrypt
    with pytest.raises(rfb.ViolatedProtocol, match="security types"):
        rfb.authenticate_to_server(proxy, PASSWORD)


# --- the broker: rotation and authentication under one lock per machine ---------------------------------


class RotatingVncServer:
    """A VNC server on a TCP port that accepts only the password the fake hypervisor set last, as QEMU does
    after libvirt changes it, and takes its time before the challenge (so sessions overlap)."""

    def __init__(self, host: FakeHost, uuid: str) -> None:
        self.host, self.uuid = host, uuid
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.results: list[bool] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock):
        try:
            self.handshake(sock)
        except (OSError, rfb.ViolatedProtocol):
            pass
        finally:
            sock.close()

    def handshake(self, sock):
        sock.sendall(b"RFB 003.008\n")
        recv_exactly(sock, 12)
        sock.sendall(b"\x01\x02")
        recv_exactly(sock, 1)
        time.sleep(0.1)  # meanwhile another session could rotate the password, but for the lock
        challenge = bytes(range(16))
        sock.sendall(challenge)
        ok = recv_exactly(sock, 16) == rfb.vnc_response(self.host.domains[self.uuid]["vnc_password"], challenge)
        self.results.append(ok)
        sock.sendall(struct.pack(">I", 0) if ok else struct.pack(">I", 1) + struct.pack(">I", 6) + b"failed")
        sock.recv(1)


def test_sessions_starting_together_each_authenticate(host):
    uuid = "5c7a4f40-0d6f-4d8e-9d1c-3b1f0e5a7c11"
    host.domains[uuid] = {"state": "running", "vnc_protected": True}
    server = RotatingVncServer(host, uuid)
    host.domains[uuid]["vnc_address"] = ("127.0.0.1", server.port)
    machine = SimpleNamespace(
        pk=7, uuid=uuid, hypervisor=Hypervisor(name="fake", uri="fake://", console_address="127.0.0.1")
    )
    socks, errors = [], []

    def connect():
        try:
            socks.append(console_proxy.vnc_connect(machine))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    server.listener.close()
    for s in socks:
        s.close()
    assert not errors and len(socks) == 4 and server.results == [True] * 4
    assert host.calls.count("vnc_open") == 4  # a fresh password for every session


def test_the_proxy_refuses_a_remote_hypervisors_loopback_and_dials_nothing(host, monkeypatch):
    """The console of a remote hypervisor whose domain listens on loopback (defined by hand, or saved before the
    rule): dialled from here, 127.0.0.1 would be the portal's own loopback, another machine's console."""
    uuid = "5c7a4f40-0d6f-4d8e-9d1c-3b1f0e5a7c12"
    host.domains[uuid] = {"state": "running", "vnc_protected": True, "vnc_address": ("127.0.0.1", 5900)}
    dialled = []
    monkeypatch.setattr(console_proxy.socket, "create_connection", lambda *a, **k: dialled.append(a) or 1 / 0)
    remote = Hypervisor(name="hv2", uri="qemu+ssh://hv2.example.org/system", console_address="127.0.0.1")
    machine = SimpleNamespace(pk=8, uuid=uuid, hypervisor=remote)
    with pytest.raises(ConsoleDenied, match="own loopback"):
        console_proxy.vnc_connect(machine)
    assert dialled == []
