"""Machine screenshots: QEMU sends PPM; pages get a small PNG. Pure Python, no imaging library."""

from __future__ import annotations

import struct
import zlib


class BadImage(ValueError):
    pass


def _ppm_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, maxval, offset of the pixels) of a binary PPM (P6)."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":  # a comment runs to the end of the line
            pos = data.index(b"\n", pos)
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace():
            pos += 1
        if start == pos:
            raise BadImage("truncated PPM header")
        fields.append(data[start:pos])
    if fields[0] != b"P6":
        raise BadImage(f"not a binary PPM ({fields[0][:2]!r})")
    width, height, maxval = (int(f) for f in fields[1:])
    if maxval != 255:
        raise BadImage("only 8-bit PPM is supported")
    return width, height, maxval, pos + 1


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def to_png(data: bytes, max_width: int = 480) -> bytes:
    """The screen as PNG: QEMU 7.1 and later already send PNG; older ones send PPM."""
    if data.startswith(PNG_MAGIC):
        return data
    return ppm_to_png(data, max_width)[0]


def ppm_to_png(data: bytes, max_width: int = 480) -> tuple[bytes, int, int]:
    """A PNG of the PPM, shrunk by a whole factor to at most max_width. Returns (png, width, height)."""
    width, height, _maxval, offset = _ppm_header(data)
    pixels = memoryview(data)[offset : offset + width * height * 3]
    if len(pixels) < width * height * 3:
        raise BadImage("truncated PPM pixels")
    step = max(1, -(-width // max_width))
    out_w, out_h = -(-width // step), -(-height // step)
    rows = []
    for y in range(0, height, step):
        row = pixels[y * width * 3 : (y + 1) * width * 3]
        if step == 1:
            rows.append(b"\x00" + bytes(row))
        else:
            picked = bytearray(b"\x00")
            for x in range(0, width * 3, step * 3):
                picked += row[x : x + 3]
            rows.append(bytes(picked))
    header = struct.pack(">IIBBBBB", out_w, out_h, 8, 2, 0, 0, 0)
    png = PNG_MAGIC + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + _chunk(b"IEND", b"")
    return png, out_w, out_h


def distinct_colours(data: bytes, sample: int = 4096) -> int:
    """How many colours a PPM shows in a sample of its pixels: 1 means a blank screen."""
    width, height, _maxval, offset = _ppm_header(data)
    n = width * height
    stride = max(1, n // sample)
    return len({bytes(data[offset + i * 3 : offset + i * 3 + 3]) for i in range(0, n, stride)})
