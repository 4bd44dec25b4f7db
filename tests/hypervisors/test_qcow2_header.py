"""The portal reads a qcow2 header itself and refuses what it does not support before any qemu-img runs.
Headers are written by hand with struct (QEMU's docs/interop/qcow2.txt)."""

import struct
import subprocess

import pycdlib
import pytest

from hypervisors.drivers import qemu_img
from hypervisors.drivers.qemu_img import ImageRejected, check_qcow2_header, inspect

LIMIT = 64 << 30
CLUSTER_BITS = 16


def header(
    *,
    magic: bytes = b"QFI\xfb",
    version: int = 3,
    backing: tuple[int, int] = (0, 0),
    cluster_bits: int = CLUSTER_BITS,
    size: int = 1 << 30,
    crypt: int = 0,
    incompatible: int = 0,
    header_length: int = 112,
    extensions: list[tuple[int, bytes]] | None = None,
    end: bool = True,
) -> bytes:
    """A qcow2 image's first cluster (the rest of the image is not needed to judge the header)."""
    data = struct.pack(
        ">4sIQIIQIIQQIIQ", magic, version, backing[0], backing[1], cluster_bits, size, crypt, 0, 0, 0, 0, 0, 0
    )
    if version >= 3:
        data += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
        data += b"\0" * (header_length - len(data))  # the compression type byte (zlib) and padding
    for kind, payload in extensions or []:
        data += struct.pack(">II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    if end:
        data += struct.pack(">II", 0, 0)
    return data + b"\0" * ((1 << cluster_bits) - len(data))


@pytest.fixture
def write(tmp_path):
    def write(data: bytes) -> str:
        path = tmp_path / "crafted.qcow2"
        path.write_bytes(data)
        return str(path)

    return write


@pytest.fixture
def no_qemu_img(monkeypatch):
    """Any subprocess from the module (qemu-img) fails the test: refusals come first."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"qemu-img ran: {args}")

    monkeypatch.setattr(qemu_img.subprocess, "run", refuse)


def test_a_plain_v3_header_passes_and_gives_the_virtual_size(write):
    assert check_qcow2_header(write(header(size=5 << 30))) == 5 << 30


def test_a_v2_header_passes(write):
    assert check_qcow2_header(write(header(version=2))) == 1 << 30


def test_images_made_by_qemu_img_pass(tmp_path):
    for compat in ("0.10", "1.1"):
        path = tmp_path / f"{compat}.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", f"compat={compat}", str(path), "1G"], check=True)
        assert check_qcow2_header(str(path)) == 1 << 30


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"QFI\x00"}, "the file is raw, not qcow2"),  # detected by magic first
        ({"version": 1}, "qcow2 version 1 is not supported"),
        ({"version": 4}, "qcow2 version 4 is not supported"),
        ({"cluster_bits": 30}, "cluster size 2\\^30 is out of range"),
        ({"cluster_bits": 8}, "cluster size 2\\^8 is out of range"),
        ({"backing": (0x200, 11)}, "with a backing file is refused"),
        ({"backing": (0, 11)}, "with a backing file is refused"),
        ({"crypt": 1}, "encrypted qcow2 image is refused"),
        ({"crypt": 2}, "encrypted qcow2 image is refused"),
        ({"incompatible": 1 << 0}, "incompatible features are not supported: dirty"),
        ({"incompatible": 1 << 1}, "incompatible features are not supported: corrupt"),
        ({"incompatible": 1 << 2}, "with an external data file is refused"),
        ({"incompatible": 1 << 3}, "incompatible features are not supported: compression type"),
        ({"incompatible": 1 << 4}, "incompatible features are not supported: extended L2"),
        ({"incompatible": 1 << 9 | 1}, "not supported: dirty, unknown bit 9"),
        ({"header_length": 100}, "header length 100 is invalid"),
        ({"header_length": 108}, "header length 108 is invalid"),  # not a multiple of 8
        ({"extensions": [(0x44415441, b"/etc/shadow")]}, "with an external data file is refused"),
        ({"extensions": [(0xE2792ACA, b"raw")]}, "naming a backing file format is refused"),
        ({"extensions": [(0x0537BE77, b"\0" * 16)]}, "encrypted qcow2 image is refused"),
        ({"end": False, "extensions": [(0x12345678, b"\xff" * ((1 << CLUSTER_BITS) - 120))]}, "run past the first"),
    ],
)
def test_refused_before_any_qemu_img(write, no_qemu_img, fields, message):
    path = write(header(**fields))
    with pytest.raises(ImageRejected, match=message):
        inspect(path, "qcow2", max_virtual_bytes=LIMIT)


def test_an_unknown_extension_is_skipped_and_a_refused_one_after_it_found(write, no_qemu_img):
    feature_names = (0x6803F857, b"\0" * 48)  # what qemu-img writes: harmless
    assert check_qcow2_header(write(header(extensions=[feature_names, (0x0BADF00D, b"x" * 13)]))) == 1 << 30
    with pytest.raises(ImageRejected, match="external data file"):
        check_qcow2_header(write(header(extensions=[feature_names, (0x44415441, b"data.raw")])))


def test_a_truncated_header_is_refused(write, no_qemu_img):
    with pytest.raises(ImageRejected, match="truncated"):
        check_qcow2_header(write(header()[:40]))
    with pytest.raises(ImageRejected, match="truncated"):
        check_qcow2_header(write(header()[:80]))


def test_the_virtual_size_in_the_header_is_capped_before_qemu_img(write, no_qemu_img):
    with pytest.raises(ImageRejected, match="over the limit of 64 GiB"):
        inspect(write(header(size=1 << 50)), "qcow2", max_virtual_bytes=LIMIT)


def test_iso_parsing_runs_in_a_child_under_the_limits(tmp_path):
    path = tmp_path / "x.iso"
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="TEST")
    iso.write(str(path))
    iso.close()
    assert inspect(str(path), "iso", max_virtual_bytes=LIMIT).virtual_size_bytes == path.stat().st_size
    # An address-space limit too small for the child interpreter to start: refused, so the limit reaches it.
    with pytest.raises(ImageRejected, match="not a readable ISO 9660 image"):
        inspect(str(path), "iso", max_virtual_bytes=LIMIT, memory_mib=8)


def test_a_broken_iso_is_refused_with_pycdlibs_reason(tmp_path):
    path = tmp_path / "broken.iso"
    data = bytearray(64 * 2048)
    data[0x8001:0x8006] = b"CD001"  # the magic, and nothing sane around it
    path.write_bytes(bytes(data))
    with pytest.raises(ImageRejected, match="not a readable ISO 9660 image: .+"):
        inspect(str(path), "iso", max_virtual_bytes=LIMIT)


def test_a_bad_magic_is_refused_by_the_header_check_itself(write):
    with pytest.raises(ImageRejected, match="bad magic"):
        check_qcow2_header(write(header(magic=b"QFI\x00")))
