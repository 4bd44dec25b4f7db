import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machines.rfb_filter import MAX_ENCODINGS, ClientMessageFilter, FilteredSocket, ViolatedProtocol
from tests.rfb_client import key_events, shifted_key_stream

# The filter starts at the client's ClientInit (the proxy itself does the version and security handshake).
HANDSHAKE = b"\x01"
UPDATE = bytes([3, 1]) + struct.pack(">HHHH", 0, 0, 640, 480)
ENCODINGS = bytes([2, 0]) + struct.pack(">H", 2) + struct.pack(">ii", 0, -223)
PIXEL_FORMAT = (
    bytes([0, 0, 0, 0]) + bytes([32, 24, 0, 1]) + struct.pack(">HHH", 255, 255, 255) + bytes([16, 8, 0, 0, 0, 0])
)
KEY = bytes([4, 1, 0, 0]) + struct.pack(">I", 0x61)
POINTER = bytes([5, 1]) + struct.pack(">HH", 10, 10)
QEMU_KEY = bytes([255, 0]) + struct.pack(">HII", 1, 0x61, 0x1E)
QEMU_AUDIO = bytes([255, 1]) + struct.pack(">H", 2) + bytes([3, 2]) + struct.pack(">I", 44100)
CUT = bytes([6, 0, 0, 0]) + struct.pack(">i", 5) + b"hello"
XVP = bytes([250, 0, 1, 4])  # xvp reboot
FENCE = bytes([248, 0, 0, 0]) + struct.pack(">I", 0) + bytes([3]) + b"abc"
DESKTOP_SIZE = bytes([251, 0]) + struct.pack(">HH", 800, 600) + bytes([1, 0]) + bytes(16)
CONTINUOUS = bytes([150, 1]) + struct.pack(">HHHH", 0, 0, 640, 480)


def test_pictures_pass_and_input_is_dropped():
    f = ClientMessageFilter()
    out = f.feed(HANDSHAKE + ENCODINGS + KEY + UPDATE + POINTER + QEMU_KEY + CUT + UPDATE)
    assert out == HANDSHAKE + ENCODINGS + UPDATE + UPDATE
    assert f.dropped == 4  # the proxy logs how many a session dropped


def test_messages_split_across_writes():
    f = ClientMessageFilter()
    stream = HANDSHAKE + QEMU_KEY + UPDATE + KEY
    out = b"".join(f.feed(stream[i : i + 3]) for i in range(0, len(stream), 3))
    assert out == HANDSHAKE + UPDATE


def test_unknown_messages_end_the_session():
    f = ClientMessageFilter()
    with pytest.raises(ViolatedProtocol):
        f.feed(HANDSHAKE + bytes([99, 0, 0, 0]))


# One of every client message the filter knows, in one stream.
EVERYTHING = [
    PIXEL_FORMAT,
    ENCODINGS,
    UPDATE,
    KEY,
    POINTER,
    CUT,
    QEMU_KEY,
    QEMU_AUDIO,
    XVP,
    FENCE,
    DESKTOP_SIZE,
    CONTINUOUS,
]


def test_view_only_passes_only_the_three_display_messages():
    f = ClientMessageFilter()
    assert f.feed(HANDSHAKE + b"".join(EVERYTHING)) == HANDSHAKE + PIXEL_FORMAT + ENCODINGS + UPDATE


def test_operate_mode_passes_everything_it_can_parse():
    f = ClientMessageFilter(view_only=False)
    assert f.feed(b"\x00" + b"".join(EVERYTHING)) == b"\x00" + b"".join(EVERYTHING)
    with pytest.raises(ViolatedProtocol):
        f.feed(bytes([7]))  # an unknown type closes in operate mode too: its length cannot be known


def test_a_viewer_cannot_ask_for_an_exclusive_session():
    # ClientInit's shared flag 0 would make QEMU disconnect every other client.
    assert ClientMessageFilter().feed(b"\x00" + UPDATE) == b"\x01" + UPDATE


def test_over_long_messages_end_the_session():
    with pytest.raises(ViolatedProtocol, match="encodings"):
        ClientMessageFilter().feed(HANDSHAKE + bytes([2, 0]) + struct.pack(">H", MAX_ENCODINGS + 1))
    with pytest.raises(ViolatedProtocol, match="ClientCutText"):
        ClientMessageFilter().feed(HANDSHAKE + bytes([6, 0, 0, 0]) + struct.pack(">i", -(1 << 24)))
    with pytest.raises(ViolatedProtocol, match="QEMU"):
        ClientMessageFilter().feed(HANDSHAKE + bytes([255, 9, 0, 0]))


def test_a_large_clipboard_is_dropped_without_being_held():
    f = ClientMessageFilter()
    text = b"x" * 500_000
    out = f.feed(HANDSHAKE + bytes([6, 0, 0, 0]) + struct.pack(">i", len(text)))
    for i in range(0, len(text), 65536):
        out += f.feed(text[i : i + 65536])
        assert len(f.head) < 9
    assert out + f.feed(UPDATE) == HANDSHAKE + UPDATE


def test_view_only_can_be_switched_on_between_messages():
    sent = []

    class Sock:
        def sendall(self, data):
            sent.append(bytes(data))

    sock = FilteredSocket(Sock(), view_only=False)
    assert sock.send(HANDSHAKE + KEY + UPDATE + KEY[:3]) == len(HANDSHAKE + KEY + UPDATE + KEY[:3])
    sock.view_only = True  # as the session watcher does when a role is lowered
    sock.send(KEY[3:] + KEY + POINTER + UPDATE)  # the key under way finishes; later input is dropped
    assert b"".join(sent) == HANDSHAKE + KEY + UPDATE + KEY + UPDATE


# --- property: whatever a viewer sends, no input message reaches the server -----------------------------

INPUT_TYPES = {4, 5, 6, 255}  # KeyEvent, PointerEvent, ClientCutText, QEMU (keys)
ALLOWED = {0: lambda b: 20, 2: lambda b: 4 + 4 * int.from_bytes(b[2:4], "big"), 3: lambda b: 10}


def forwarded_messages(data: bytes) -> list[int]:
    """An independent parser of what the server received: ClientInit, then only the three display
    messages (the last one may still be on its way: the filter forwards an allowed message as it
    arrives). Anything else fails the test."""
    assert data[:1] == b"\x01", "ClientInit (shared) first"
    kinds, pos = [], 1
    while pos < len(data):
        kind = data[pos]
        assert kind in ALLOWED, f"message type {kind} reached the server in view-only mode"
        size = ALLOWED[kind](data[pos : pos + 4]) if pos + 4 <= len(data) else 4
        kinds.append(kind)
        pos += size
    return kinds


def _u16(n):
    return struct.pack(">H", n)


MESSAGES = st.one_of(
    st.just(UPDATE),
    st.just(PIXEL_FORMAT),
    st.just(KEY),
    st.just(POINTER),
    st.just(QEMU_KEY),
    st.just(QEMU_AUDIO),
    st.just(XVP),
    st.just(FENCE),
    st.just(DESKTOP_SIZE),
    st.just(CONTINUOUS),
    st.integers(0, 70).map(lambda n: bytes([2, 0]) + _u16(n) + bytes(4 * n)),
    st.binary(max_size=40).map(lambda t: bytes([6, 0, 0, 0]) + struct.pack(">i", len(t)) + t),
    st.binary(max_size=40).map(lambda t: bytes([6, 0, 0, 0]) + struct.pack(">i", -len(t)) + t),
    st.tuples(st.integers(0, 255), st.binary(max_size=12)).map(lambda t: bytes([t[0]]) + t[1]),  # any type at all
)


def _mutate(stream: bytes, edits) -> bytes:
    data = bytearray(stream)
    for where, kind, value in edits:
        if not data:
            break
        i = where % len(data)
        if kind == 0:
            data[i] = value  # flip a byte
        elif kind == 1:
            data.insert(i, value)  # shift the stream by one
        else:
            del data[i]
    return bytes(data)


def _run_viewer(stream: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    """Feed the stream in the given pieces to a view-only filter; return what passed and whether it closed."""
    f = ClientMessageFilter()
    out, at = bytearray(), 0
    try:
        for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
            out += f.feed(stream[at:cut]) if cut > at else b""
            at = max(at, cut)
        return bytes(out), False
    except ViolatedProtocol:
        return bytes(out), True


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    init=st.integers(0, 255),
    messages=st.lists(MESSAGES, max_size=30),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.integers(0, 255)), max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_no_input_ever_reaches_the_server_from_a_viewer(init, messages, edits, cuts):
    stream = _mutate(bytes([init]) + b"".join(messages), edits)
    out, _closed = _run_viewer(stream, cuts)
    if out:
        kinds = forwarded_messages(out)
        assert not INPUT_TYPES & set(kinds)


@settings(max_examples=1000, deadline=None, database=None)
@given(stream=st.binary(min_size=1, max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_no_input_ever_reaches_the_server_from_random_bytes(stream, cuts):
    out, _closed = _run_viewer(stream, cuts)
    if out:
        assert not INPUT_TYPES & set(forwarded_messages(out))


def test_the_rfb_33_shift_attack_is_refused():
    """The issue's stream: an RFB 3.3 client whose key events ("echo pwned >/dev/console", Enter) went
    through the old filter in full (it took 14 bytes of handshake, one too many for RFB 3.3), checked
    against that filter (git 303bfa5) when this test was written. The proxy now does the handshake, so the
    filter starts at ClientInit: the key events are dropped, and the over-long SetEncodings that kept the
    old filter in step ends the session."""
    stream = b"\x01" + shifted_key_stream(key_events("echo pwned >/dev/console\n"))
    out, closed = _run_viewer(stream, [])
    assert closed and out == b""  # the write that carried it passed nothing
    out, closed = _run_viewer(stream, list(range(0, len(stream), 8)))  # as a browser sends, bit by bit
    assert closed and forwarded_messages(out) == [3]  # the FramebufferUpdateRequest, nothing else
    for start in range(1, 120):  # and fed from anywhere in it, nothing but display requests passes
        out, _ = _run_viewer(stream[start:], list(range(0, len(stream), 8)))
        if out:
            assert not INPUT_TYPES & set(forwarded_messages(out))
