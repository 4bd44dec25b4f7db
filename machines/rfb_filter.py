"""View-only consoles: drop a VNC client's input before it reaches the machine.

Parses the client-to-server half of RFB 3.8 (after the handshake) and passes
only messages that ask for pictures; key, pointer, clipboard, resize and xvp
(power) messages are dropped. An unknown message type ends the session,
since its length cannot be known.
"""

from __future__ import annotations

import struct

DROP, PASS = False, True


class ViolatedProtocol(Exception):
    pass


def _length(buf: bytes) -> tuple[int, bool] | None:
    """(length, passes) of the client message at the start of buf, or None if more bytes are needed."""
    kind = buf[0]
    fixed = {0: (20, PASS), 3: (10, PASS), 4: (8, DROP), 5: (6, DROP), 150: (10, PASS), 250: (4, DROP)}
    if kind in fixed:
        return fixed[kind]
    if kind == 2:  # SetEncodings: count at [2:4]
        return (4 + 4 * struct.unpack(">H", buf[2:4])[0], PASS) if len(buf) >= 4 else None
    if kind == 6:  # ClientCutText: length at [4:8] (negative: extended clipboard, abs is the length)
        return (8 + abs(struct.unpack(">i", buf[4:8])[0]), DROP) if len(buf) >= 8 else None
    if kind == 248:  # Fence: payload length at [8]
        return (9 + buf[8], PASS) if len(buf) >= 9 else None
    if kind == 251:  # SetDesktopSize: screens at [6]
        return (8 + 16 * buf[6], DROP) if len(buf) >= 7 else None
    if kind == 255:  # QEMU: 0 = extended key event, 1 = audio
        if len(buf) < 4:
            return None
        if buf[1] == 0:
            return 12, DROP
        if buf[1] == 1:
            return (10 if struct.unpack(">H", buf[2:4])[0] == 2 else 4), PASS
    raise ViolatedProtocol(f"unknown client message {kind}")


class ViewOnlyFilter:
    """Feed it client bytes; it returns the bytes the server may see."""

    HANDSHAKE = 12 + 1 + 1  # ProtocolVersion, chosen security type (None), ClientInit

    def __init__(self) -> None:
        self.handshake_left = self.HANDSHAKE
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if self.handshake_left:
            head, data = data[: self.handshake_left], data[self.handshake_left :]
            out += head
            self.handshake_left -= len(head)
        self.pending += data
        while self.pending:
            parsed = _length(self.pending)
            if parsed is None or len(self.pending) < parsed[0]:
                break
            size, passes = parsed
            if passes:
                out += self.pending[:size]
            self.pending = self.pending[size:]
        return bytes(out)


class ViewOnlySocket:
    """Wraps the proxy's socket to the VNC server: sends only what the filter lets through."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._filter = ViewOnlyFilter()

    def send(self, data: bytes) -> int:
        allowed = self._filter.feed(bytes(data))
        if allowed:
            self._sock.sendall(allowed)
        return len(data)  # all of it is dealt with

    def __getattr__(self, name):
        return getattr(self._sock, name)
