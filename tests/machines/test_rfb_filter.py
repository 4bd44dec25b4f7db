import struct

import pytest

from machines.rfb_filter import ViewOnlyFilter, ViolatedProtocol

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x01"
UPDATE = bytes([3, 1]) + struct.pack(">HHHH", 0, 0, 640, 480)
ENCODINGS = bytes([2, 0]) + struct.pack(">H", 2) + struct.pack(">ii", 0, -223)
KEY = bytes([4, 1, 0, 0]) + struct.pack(">I", 0x61)
POINTER = bytes([5, 1]) + struct.pack(">HH", 10, 10)
QEMU_KEY = bytes([255, 0]) + struct.pack(">HII", 1, 0x61, 0x1E)
CUT = bytes([6, 0, 0, 0]) + struct.pack(">i", 5) + b"hello"


def test_pictures_pass_and_input_is_dropped():
    f = ViewOnlyFilter()
    out = f.feed(HANDSHAKE + ENCODINGS + KEY + UPDATE + POINTER + QEMU_KEY + CUT + UPDATE)
    assert out == HANDSHAKE + ENCODINGS + UPDATE + UPDATE


def test_messages_split_across_writes():
    f = ViewOnlyFilter()
    stream = HANDSHAKE + QEMU_KEY + UPDATE + KEY
    out = b"".join(f.feed(stream[i : i + 3]) for i in range(0, len(stream), 3))
    assert out == HANDSHAKE + UPDATE


def test_unknown_messages_end_the_session():
    f = ViewOnlyFilter()
    with pytest.raises(ViolatedProtocol):
        f.feed(HANDSHAKE + bytes([99, 0, 0, 0]))
