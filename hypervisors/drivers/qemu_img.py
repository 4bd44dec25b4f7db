"""Inspecting image files: the only module that runs qemu-img.

Every call passes -f (never lets qemu-img probe a format) and runs under CPU
and memory limits, as Nova does, since a crafted image can make qemu-img
spin or eat memory.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

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
        size = _check_iso(path)
    else:
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


def _check_iso(path: str) -> int:
    iso = pycdlib.PyCdlib()
    try:
        iso.open(path)
    except (PyCdlibException, OSError) as e:
        raise ImageRejected(f"not a readable ISO 9660 image: {e}") from None
    finally:
        try:
            iso.close()
        except PyCdlibException:
            pass
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
