"""The RFB (VNC) handshake, terminated by the console proxy on both sides.

To the VNC server (QEMU) the proxy is a client: RFB 3.8, security type 2 (VNC authentication)
with the password the proxy set through libvirt a moment before; the browser never sees it. To
the browser the proxy is a server that offers security type None, for RFB 3.3, 3.7 and 3.8
clients as each version does it. Anything else from the browser ends the connection. After the
handshake the proxy knows exactly where the client's message stream starts (its ClientInit),
which is what the view-only filter needs (machines/rfb_filter.py).
"""

from __future__ import annotations

import re
import select
import socket
import struct
import time
from typing import Protocol

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

RFB_33, RFB_37, RFB_38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
CLIENT_VERSIONS = {RFB_33: 3, RFB_37: 7, RFB_38: 8}
SEC_INVALID, SEC_NONE, SEC_VNC = 0, 1, 2
HANDSHAKE_TIMEOUT = 30.0  # seconds a browser has to finish its side of the handshake
MAX_REASON = 4096  # bytes of a failure reason the proxy reads from a VNC server


class ViolatedProtocol(Exception):
    """The peer broke the protocol, or sent what the proxy does not accept: the connection ends."""


class PeerClosed(ViolatedProtocol):
    """The peer went away during the handshake (a page closed, a probe): nothing to warn about."""


class VncAuthFailed(ViolatedProtocol):
    """The VNC server refused the proxy's password."""


class Channel(Protocol):
    def read(self, n: int) -> bytes:
        """Exactly n bytes, or raise ViolatedProtocol (closed, timed out)."""

    def write(self, data: bytes) -> None: ...


class SocketChannel:
    """A blocking socket (with a timeout) as a Channel: the proxy's connection to the VNC server."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise ViolatedProtocol("the VNC server did not answer in time") from None
            if not chunk:
                raise PeerClosed("the VNC server closed the connection during the handshake")
            buf += chunk
        return bytes(buf)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


class FramesChannel:
    """The browser's websocket (websockify's handler) as a Channel, with a deadline for the whole
    handshake. Bytes that arrive beyond what the handshake reads are kept in `leftover`: they are
    the start of the client's message stream and go through the filter."""

    def __init__(self, handler, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.handler = handler
        self.deadline = time.monotonic() + timeout
        self.leftover = b""

    def read(self, n: int) -> bytes:
        while len(self.leftover) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ViolatedProtocol("the browser did not finish the RFB handshake in time")
            if not self.handler.request.pending():
                ready, _, _ = select.select([self.handler.request], [], [], left)
                if not ready:
                    continue
            bufs, closed = self.handler.recv_frames()
            self.leftover += b"".join(bufs)
            if closed and len(self.leftover) < n:
                raise PeerClosed("the browser closed the connection during the RFB handshake")
        data, self.leftover = self.leftover[:n], self.leftover[n:]
        return data

    def write(self, data: bytes) -> None:
        pending = self.handler.send_frames([data])
        while pending:
            select.select([], [self.handler.request], [], 1)
            pending = self.handler.send_frames()


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _reason(channel: Channel) -> str:
    (length,) = struct.unpack(">I", channel.read(4))
    if length > MAX_REASON:
        raise ViolatedProtocol("the VNC server sent an over-long failure reason")
    return channel.read(length).decode("utf-8", errors="replace")


def vnc_key(password: str) -> bytes:
    """VNC authentication's DES key: the password's first 8 bytes, zero-padded, each byte's bits reversed."""
    raw = password.encode("latin-1")[:8].ljust(8, b"\0")
    return bytes(int(f"{b:08b}"[::-1], 2) for b in raw)


def vnc_response(password: str, challenge: bytes) -> bytes:
    """The answer to a VNC authentication challenge: the 16 bytes DES-encrypted (ECB) with vnc_key().
    TripleDES with the same key three times is single DES."""
    if len(challenge) != 16:
        raise ValueError("a VNC challenge has 16 bytes")
    encryptor = Cipher(TripleDES(vnc_key(password) * 3), modes.ECB()).encryptor()  # noqa: S305 - the protocol's cipher
    return encryptor.update(challenge) + encryptor.finalize()


def authenticate_to_server(server: Channel, password: str) -> int:
    """The client side of the handshake with the VNC server, up to (not including) ClientInit.
    Returns the security type used: SEC_VNC, or SEC_NONE for a domain defined before the portal set
    passwords (the caller warns; `password` is then empty). A server that offers no VNC authentication
    when the proxy has just set a password is not the machine's (another process on its port): refused.
    Raises VncAuthFailed or ViolatedProtocol."""
    version = server.read(12)
    match = re.fullmatch(rb"RFB (\d{3})\.(\d{3})\n", version)
    if not match or (int(match[1]), int(match[2])) < (3, 8):
        raise ViolatedProtocol(f"the VNC server speaks {version!r}; the proxy needs RFB 3.8")
    server.write(RFB_38)
    (count,) = server.read(1)
    if count == 0:
        raise ViolatedProtocol(f"the VNC server refused the connection: {_reason(server)}")
    offered = server.read(count)
    if SEC_VNC in offered and password:
        server.write(bytes([SEC_VNC]))
        server.write(vnc_response(password, server.read(16)))
        chosen = SEC_VNC
    elif SEC_NONE in offered and not password:
        server.write(bytes([SEC_NONE]))
        chosen = SEC_NONE
    else:
        raise ViolatedProtocol(f"the VNC server offers security types {list(offered)}; the proxy needs 2 (VNC)")
    (result,) = struct.unpack(">I", server.read(4))
    if result != 0:
        reason = _reason(server)
        raise (VncAuthFailed if chosen == SEC_VNC else ViolatedProtocol)(f"the VNC server refused: {reason}")
    return chosen


def accept_client(client: Channel) -> int:
    """The server side of the handshake with the browser, up to (not including) its ClientInit:
    security type None, as RFB 3.3, 3.7 or 3.8 each do it. Returns the client's minor version.
    Any other version, or any other security type chosen, raises ViolatedProtocol."""
    client.write(RFB_38)
    version = client.read(12)
    minor = CLIENT_VERSIONS.get(version)
    if minor is None:
        raise ViolatedProtocol(f"unsupported RFB client version {version[:12]!r}")
    if minor == 3:
        client.write(_u32(SEC_NONE))  # 3.3: the server decides; no SecurityResult for None
        return minor
    client.write(bytes([1, SEC_NONE]))
    choice = client.read(1)
    if choice != bytes([SEC_NONE]):
        if minor == 8:
            message = b"only security type None is offered"
            client.write(_u32(1) + _u32(len(message)) + message)
        raise ViolatedProtocol(f"the client chose security type {choice[0]}, which was not offered")
    if minor == 8:
        client.write(_u32(0))  # 3.8 sends a SecurityResult for None too; 3.7 does not
    return minor
