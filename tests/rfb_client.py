"""An RFB client's bytes, written out by hand for the console tests: key events, and the stream that once
smuggled key events past the view-only filter (issue 11)."""

import struct

SHIFT_L, ENTER = 0xFFE1, 0xFF0D
SHIFTED = set('>_|$()*:"&')


def key(keysym: int, down: bool) -> bytes:
    """An RFB KeyEvent (type 4)."""
    return struct.pack(">BBxxI", 4, int(down), keysym)


def key_events(text: str) -> list[bytes]:
    """KeyEvents typing `text` on a US layout: press and release each key, Shift around shifted ones."""
    events = []
    for ch in text:
        sym = ENTER if ch == "\n" else ord(ch)
        shift = ch in SHIFTED or ch.isupper()
        if shift:
            events.append(key(SHIFT_L, True))
        events += [key(sym, True), key(sym, False)]
        if shift:
            events.append(key(SHIFT_L, False))
    return events


def update_request(incremental: bool = True, width: int = 640, height: int = 480) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), 0, 0, width, height)


def shifted_key_stream(events: list[bytes]) -> bytes:
    """The client messages after ClientInit of an RFB 3.3 client that carried `events` past the old filter.

    That filter took 14 bytes of handshake as RFB 3.8 sends them (version, security type, ClientInit);
    a 3.3 client sends no security type, so it started one byte late. What the VNC server reads as a
    FramebufferUpdateRequest, the key events and a SetEncodings of 248 entries, the old filter read as a
    SetEncodings, a Fence and another SetEncodings, all "display" messages it passed; both ended in step.
    """
    count = len(events)
    stream = bytearray([3, 2, 0]) + struct.pack(">H", 2 + 2 * count) + bytes(5) + b"".join(events)
    encodings = bytearray(4 * 248)
    encodings[7] = 220  # the old filter's Fence length
    encodings[228:232] = bytes([2, 0]) + struct.pack(">H", 190)  # and its second SetEncodings
    return bytes(stream + bytes([2, 0]) + struct.pack(">H", 248) + encodings)
