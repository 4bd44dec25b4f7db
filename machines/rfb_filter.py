"""What a console client may say to the VNC server: every client message is parsed, always.

The proxy terminates the RFB handshake itself (machines/rfb.py), so the first byte the filter
sees is the client's ClientInit and everything after it is a sequence of client-to-server
messages: the filter never has to guess where the stream starts (an RFB 3.3 client once shifted
a filter that did). Each message's type and length are known before a byte of it is passed on:

- view-only: only FramebufferUpdateRequest, SetPixelFormat and SetEncodings (at most
  MAX_ENCODINGS) reach the server; key, pointer, clipboard, QEMU (keys, audio), xvp (power),
  desktop-size, fence and continuous-update messages are read and dropped, and ClientInit is
  rewritten to "shared" so a viewer cannot disconnect the others;
- operate: every message it can parse goes through.

In both modes a message type it does not know, or a length over the bounds, ends the session
(ViolatedProtocol): the length of what follows could not be known. `view_only` is read at the
start of each message, so another thread may flip it at any time (the session watcher does,
when a user's role is lowered); a message already under way finishes as it started.
"""

from __future__ import annotations

import struct

from machines.rfb import ViolatedProtocol

__all__ = ["ClientMessageFilter", "FilteredSocket", "ViolatedProtocol"]

MAX_ENCODINGS = 64  # SetEncodings entries; noVNC sends about 20
MAX_CUT_TEXT = 1 << 20  # bytes of clipboard text; QEMU closes a connection that sends more
MAX_FENCE = 64  # the RFB fence payload limit

SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE_REQUEST, KEY, POINTER, CUT_TEXT = 0, 2, 3, 4, 5, 6
CONTINUOUS_UPDATES, FENCE, XVP, SET_DESKTOP_SIZE, QEMU = 150, 248, 250, 251, 255
VIEW_ONLY_TYPES = frozenset({SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE_REQUEST})
FIXED = {SET_PIXEL_FORMAT: 20, UPDATE_REQUEST: 10, KEY: 8, POINTER: 6, CONTINUOUS_UPDATES: 10, XVP: 4}


def message_length(buf: bytes) -> int | None:
    """The length of the client message at the start of buf (one byte at least), or None when more
    bytes are needed to tell. Raises ViolatedProtocol for an unknown type or an over-long length."""
    kind = buf[0]
    if kind in FIXED:
        return FIXED[kind]
    if kind == SET_ENCODINGS:
        if len(buf) < 4:
            return None
        (count,) = struct.unpack(">H", buf[2:4])
        if count > MAX_ENCODINGS:
            raise ViolatedProtocol(f"SetEncodings with {count} encodings (at most {MAX_ENCODINGS})")
        return 4 + 4 * count
    if kind == CUT_TEXT:
        if len(buf) < 8:
            return None
        (length,) = struct.unpack(">i", buf[4:8])  # negative: extended clipboard, the absolute value is the length
        if abs(length) > MAX_CUT_TEXT:
            raise ViolatedProtocol(f"ClientCutText of {abs(length)} bytes (at most {MAX_CUT_TEXT})")
        return 8 + abs(length)
    if kind == FENCE:
        if len(buf) < 9:
            return None
        if buf[8] > MAX_FENCE:
            raise ViolatedProtocol(f"Fence with {buf[8]} bytes of payload (at most {MAX_FENCE})")
        return 9 + buf[8]
    if kind == SET_DESKTOP_SIZE:
        return None if len(buf) < 7 else 8 + 16 * buf[6]
    if kind == QEMU:
        if len(buf) < 2:
            return None
        if buf[1] == 0:  # extended key event
            return 12
        if buf[1] == 1:  # audio: 0 enable, 1 disable, 2 set format (+ 6 bytes)
            if len(buf) < 4:
                return None
            (operation,) = struct.unpack(">H", buf[2:4])
            if operation in (0, 1):
                return 4
            if operation == 2:
                return 10
            raise ViolatedProtocol(f"QEMU audio message with operation {operation}")
        raise ViolatedProtocol(f"QEMU client message with subtype {buf[1]}")
    raise ViolatedProtocol(f"unknown client message type {kind}")


class ClientMessageFilter:
    """Feed it the client's bytes from its ClientInit on; it returns the bytes the server may see."""

    def __init__(self, view_only: bool = True) -> None:
        self.view_only = view_only  # may be flipped by another thread at any time
        self.client_init = True  # the first byte is ClientInit's shared flag
        self.head = b""  # the start of a message whose length is not known yet
        self.passing = 0  # bytes of the current message still to forward
        self.dropping = 0  # bytes of the current message still to drop
        self.dropped = 0  # messages dropped so far (view-only input)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        buf = self.head + bytes(data)  # head: at most 8 bytes of a message whose length is not known yet
        self.head = b""
        pos, end = 0, len(buf)
        while pos < end:
            if self.passing or self.dropping:
                take = min(end - pos, self.passing or self.dropping)
                if self.passing:
                    out += buf[pos : pos + take]
                    self.passing -= take
                else:
                    self.dropping -= take
                pos += take
            elif self.client_init:
                out.append(1 if self.view_only else buf[pos])
                self.client_init = False
                pos += 1
            else:
                length = message_length(buf[pos : pos + 9])  # no header needs more than 9 bytes
                if length is None:
                    self.head = buf[pos:]
                    break
                if self.view_only and buf[pos] not in VIEW_ONLY_TYPES:
                    self.dropping = length
                    self.dropped += 1
                else:
                    self.passing = length
        return bytes(out)


class FilteredSocket:
    """The proxy's socket to the VNC server, seen by websockify: what it sends passes the filter.

    `view_only` may be set from another thread at any time, and takes effect at the next message."""

    def __init__(self, sock, view_only: bool = True) -> None:
        self._sock = sock
        self._filter = ClientMessageFilter(view_only=view_only)

    @property
    def view_only(self) -> bool:
        return self._filter.view_only

    @view_only.setter
    def view_only(self, value: bool) -> None:
        self._filter.view_only = value

    @property
    def dropped(self) -> int:
        """Client messages dropped so far (view only)."""
        return self._filter.dropped

    def send(self, data: bytes) -> int:
        allowed = self._filter.feed(bytes(data))
        if allowed:
            self._sock.sendall(allowed)
        return len(data)  # all of it is dealt with

    def __getattr__(self, name):
        return getattr(self._sock, name)
