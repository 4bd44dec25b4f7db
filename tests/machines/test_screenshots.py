import struct
import zlib

import pytest

from machines.screenshots import BadImage, distinct_colours, ppm_to_png, to_png


def ppm(width: int, height: int, pixel=lambda x, y: (x % 256, y % 256, 7)) -> bytes:
    body = bytes(c for y in range(height) for x in range(width) for c in pixel(x, y))
    return f"P6\n# made by a test\n{width} {height}\n255\n".encode() + body


def decode_png(png: bytes) -> tuple[int, int, bytes]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos, idat, size = 8, b"", None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_a_small_screen_is_kept_pixel_for_pixel():
    png, w, h = ppm_to_png(ppm(4, 2), max_width=480)
    width, height, raw = decode_png(png)
    assert (w, h) == (width, height) == (4, 2)
    assert raw[:13] == b"\x00" + bytes([0, 0, 7, 1, 0, 7, 2, 0, 7, 3, 0, 7])


def test_a_large_screen_is_shrunk_by_a_whole_factor():
    png, w, h = ppm_to_png(ppm(720, 400), max_width=480)
    assert (w, h) == (360, 200)
    width, height, raw = decode_png(png)
    assert len(raw) == height * (1 + width * 3)
    assert raw[1:7] == bytes([0, 0, 7, 2, 0, 7])  # every second pixel


def test_blank_and_busy_screens():
    assert distinct_colours(ppm(64, 64, lambda x, y: (0, 0, 0))) == 1
    assert distinct_colours(ppm(64, 64)) > 10


@pytest.mark.parametrize(
    "data", [b"P5\n1 1\n255\n\x00", b"P6\n10 10\n255\n\x00\x00", b"P6\n1 1\n65535\n" + b"\x00" * 6]
)
def test_bad_input_is_refused(data):
    with pytest.raises(BadImage):
        ppm_to_png(data)


def test_png_from_newer_qemu_is_kept_as_is():
    png, _, _ = ppm_to_png(ppm(8, 8))
    assert to_png(png) is png
    assert to_png(ppm(8, 8)).startswith(b"\x89PNG")
