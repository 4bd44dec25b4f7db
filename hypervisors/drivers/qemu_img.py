"""Inspecting image files: the only module that runs qemu-img.

Every call passes -f (never lets qemu-img probe a format) and runs under CPU
and memory limits, as Nova does, since a crafted image can make qemu-img
spin or eat memory. Before that, the portal reads a qcow2 header itself (check_qcow2_header) and refuses what
it does not support, so a hostile header never reaches qemu-img; ISOs are opened by pycdlib in a child
process under the same limits (iso_probe.py).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

from hypervisors.drivers import iso_probe

QCOW2_MAGIC = b"QFI\xfb"
ISO_MAGIC_OFFSET = 0x8001  # "CD001" in the first volume descriptor
# Formats we recognise only to refuse them with a clear name.
OTHER_MAGICS = {b"KDMV": "vmdk", b"vhdxfile": "vhdx", b"conectix": "vpc", b"<<< Ora": "vdi", b"\x51\x45\x44\x00": "qed"}


class ImageRejected(Exception):
    """The file is not what it claims, or is unsafe to use. The message is for the user."""


@dataclass(frozen=True)
class ImageFacts:
    format: str
    virtual_size_bytes: int


def detect_format(path: str) -> str:
    """By magic bytes, without asking qemu-img: qcow2, iso, another known format, or raw."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(ISO_MAGIC_OFFSET)
        iso = f.read(5)
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    for magic, name in OTHER_MAGICS.items():
        if head.startswith(magic):
            return name
    if iso == b"CD001":
        return "iso"
    return "raw"


# qcow2 (docs/interop/qcow2.txt in QEMU): the header fields the portal reads, big-endian.
QCOW2_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # magic .. snapshots_offset: 72 bytes
QCOW2_V3_FIELDS = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount_order, header_length
QCOW2_INCOMPATIBLE = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type", 4: "extended L2"}
QCOW2_EXT_END = 0
# Header extensions that point outside the image or need what the portal does not give (keys): refused.
QCOW2_REFUSED_EXTENSIONS = {
    0xE2792ACA: "a qcow2 image naming a backing file format is refused (it has no backing file to name)",
    0x44415441: "a qcow2 image with an external data file is refused",
    0x0537BE77: "an encrypted qcow2 image is refused",
}
MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's own limit


def check_qcow2_header(path: str) -> int:
    """Read a qcow2 header in Python and refuse what the portal does not support, before any qemu-img sees the
    file: only versions 2 and 3, no incompatible feature (dirty, corrupt, external data file, compression
    type, extended L2, or one unknown), no encryption, no backing file, and no header extension that names a
    backing format, an external data file or encryption. Returns the virtual size."""
    with open(path, "rb") as f:
        head = f.read(1 << MAX_CLUSTER_BITS)
    if len(head) < QCOW2_V2_HEADER.size:
        raise ImageRejected("the qcow2 header is truncated")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, *_rest) = QCOW2_V2_HEADER.unpack_from(
        head
    )
    if magic != QCOW2_MAGIC:
        raise ImageRejected("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise ImageRejected(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not 9 <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageRejected(f"qcow2 cluster size 2^{cluster_bits} is out of range")
    if backing_offset or backing_size:
        raise ImageRejected("a qcow2 image with a backing file is refused (it could read files on the host)")
    if crypt:
        raise ImageRejected("an encrypted qcow2 image is refused")
    header_length = QCOW2_V2_HEADER.size
    if version == 3:
        if len(head) < QCOW2_V2_HEADER.size + QCOW2_V3_FIELDS.size:
            raise ImageRejected("the qcow2 header is truncated")
        incompatible, _compatible, _autoclear, _refcount_order, header_length = QCOW2_V3_FIELDS.unpack_from(
            head, QCOW2_V2_HEADER.size
        )
        if header_length < 104 or header_length % 8 or header_length > 1 << cluster_bits:
            raise ImageRejected(f"the qcow2 header length {header_length} is invalid")
        if incompatible:
            names = [QCOW2_INCOMPATIBLE.get(bit, f"unknown bit {bit}") for bit in range(64) if incompatible >> bit & 1]
            if "external data file" in names:
                raise ImageRejected("a qcow2 image with an external data file is refused")
            raise ImageRejected(f"qcow2 incompatible features are not supported: {', '.join(names)}")
    _check_qcow2_extensions(head[: 1 << cluster_bits], header_length)
    return size


def _check_qcow2_extensions(cluster: bytes, offset: int) -> None:
    """Walk the header extensions (type, length, data padded to 8 bytes) up to the end marker."""
    while True:
        if offset + 8 > len(cluster):
            raise ImageRejected("the qcow2 header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", cluster, offset)
        if kind == QCOW2_EXT_END:
            return
        if kind in QCOW2_REFUSED_EXTENSIONS:
            raise ImageRejected(QCOW2_REFUSED_EXTENSIONS[kind])
        offset += 8 + (length + 7) // 8 * 8


def qemu_img_info(path: str, fmt: str, *, cpu_seconds: int = 30, memory_mib: int = 1024) -> dict:
    # The limits are set by prlimit(1), which then runs qemu-img: a preexec_fn would run Python between
    # fork and exec, which deadlocks in the worker's threads (seen: a child stuck on a lock for ever).
    limits = ["prlimit", f"--cpu={cpu_seconds}", f"--as={memory_mib << 20}", "--"]
    try:
        r = subprocess.run(
            [*limits, "qemu-img", "info", "-f", fmt, "--output=json", path],
            capture_output=True,
            text=True,
            timeout=cpu_seconds * 2,
        )
    except subprocess.TimeoutExpired:
        raise ImageRejected("qemu-img took too long to read the image") from None
    if r.returncode != 0:
        raise ImageRejected(f"qemu-img cannot read it as {fmt}: {r.stderr.strip()[:300]}")
    return json.loads(r.stdout)


def inspect(
    path: str, declared: str, *, max_virtual_bytes: int, cpu_seconds: int = 30, memory_mib: int = 1024
) -> ImageFacts:
    """Check that the file is a safe image of the declared format; return its facts."""
    detected = detect_format(path)
    if detected != declared:
        raise ImageRejected(f"the file is {detected}, not {declared} as declared")
    if declared == "iso":
        size = _check_iso(path, cpu_seconds=cpu_seconds, memory_mib=memory_mib)
    else:
        if declared == "qcow2" and check_qcow2_header(path) > max_virtual_bytes:
            raise ImageRejected(f"the virtual size is over the limit of {max_virtual_bytes >> 30} GiB")
        info = qemu_img_info(path, declared, cpu_seconds=cpu_seconds, memory_mib=memory_mib)
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise ImageRejected("a qcow2 image with a backing file is refused (it could read files on the host)")
        data = (info.get("format-specific") or {}).get("data") or {}
        if data.get("data-file"):
            raise ImageRejected("a qcow2 image with an external data file is refused")
        size = int(info["virtual-size"])
    if size > max_virtual_bytes:
        raise ImageRejected(f"virtual size {size >> 30} GiB is over the limit of {max_virtual_bytes >> 30} GiB")
    return ImageFacts(format=declared, virtual_size_bytes=size)


def _check_iso(path: str, *, cpu_seconds: int = 30, memory_mib: int = 1024) -> int:
    """Open the ISO with pycdlib in a child process under the same limits as qemu-img (prlimit), so a crafted
    file that makes the parser spin or allocate costs only that child."""
    limits = ["prlimit", f"--cpu={cpu_seconds}", f"--as={memory_mib << 20}", "--"]
    try:
        r = subprocess.run(
            [*limits, sys.executable, "-I", iso_probe.__file__, path],
            capture_output=True,
            text=True,
            timeout=cpu_seconds * 2,
        )
    except subprocess.TimeoutExpired:
        raise ImageRejected("reading the ISO took too long") from None
    if r.returncode != 0:
        detail = r.stdout.strip() or (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise ImageRejected(f"not a readable ISO 9660 image: {detail[:300]}")
    return os.path.getsize(path)


def rebase_header(path: str, *, backing_path: str, backing_format: str, timeout: float = 60) -> None:
    """Point a qcow2 overlay at another copy of its backing image (`qemu-img rebase -u`: the header only, no
    data read or written), as a cold migration does with an overlay on its way to another host; then check
    that the header says exactly that and names no external data file."""
    try:
        r = subprocess.run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", backing_path, path],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ImageRejected("qemu-img took too long to rebase the overlay") from None
    if r.returncode != 0:
        raise ImageRejected(f"qemu-img cannot rebase the overlay: {r.stderr.strip()[:300]}")
    info = qemu_img_info(path, "qcow2")
    data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if info.get("backing-filename") != backing_path or data_file:
        raise ImageRejected("the overlay's header is not what the rebase wrote")
