"""The tiny guest images the integration tests boot, built by scripts/build-test-images.sh.

    from tests.images import test_images
    images = test_images()   # {"tiny_disk": "/var/cache/.../tiny-<hash>.qcow2", "tiny_iso": ..., ...}

The script caches the images (under $PORTAL_TEST_IMAGE_DIR, default
/var/cache/ansistack-portal/test-images) keyed by its inputs, so it only builds
on the first run on a machine (about 10 s, plus apt-get installs) and answers in
milliseconds after that. This module runs it at most once per process.

The images are shared and read-only: boot them through a qcow2 overlay
(`qemu-img create -f qcow2 -F qcow2 -b <tiny_disk> overlay.qcow2`) or as a
read-only CD-ROM, never write to them.
"""

import subprocess
import threading
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-test-images.sh"
EXPECTED = ("tiny_disk", "tiny_iso", "tiny_kernel", "tiny_initrd")
BUILD_TIMEOUT_S = 900

_images: dict[str, str] | None = None
_lock = threading.Lock()


def test_images() -> dict[str, str]:
    """Image name -> absolute path, building the images if needed (once per process)."""
    global _images
    with _lock:
        if _images is None:
            _images = _build()
        return dict(_images)


# A helper, not a test, whatever its name: keep pytest from collecting it
# into the modules that import it.
test_images.__test__ = False


CLOUD_SCRIPT = SCRIPT.parent / "build-debian-cloud-image.sh"
_cloud: str | None = None


FIRMWARE_SCRIPT = SCRIPT.parent / "build-test-images-firmware.sh"
_firmware: dict[str, str] | None = None


def firmware_images() -> dict[str, str]:
    """The UEFI x86_64 and the arm64 (UEFI, GRUB, Debian cloud kernel) tiny guests, cached."""
    global _firmware
    with _lock:
        if _firmware is None:
            _firmware = _run(FIRMWARE_SCRIPT)
        return dict(_firmware)


def debian_cloud_image() -> str:
    """Path of the Debian 12 cloud-init image (debootstrap, about 80 s the first time, cached)."""
    global _cloud
    with _lock:
        if _cloud is None:
            _cloud = _run(CLOUD_SCRIPT)["debian12_cloud"]
        return _cloud


def _build() -> dict[str, str]:
    images = _run(SCRIPT)
    missing = [name for name in EXPECTED if name not in images]
    if missing:
        raise AssertionError(f"{SCRIPT} did not print {missing}")
    return images


def _run(script: Path) -> dict[str, str]:
    try:
        result = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{script} did not finish within {BUILD_TIMEOUT_S} s\nstderr:\n{_text(exc.stderr)}"
        ) from None
    if result.returncode != 0:
        raise AssertionError(f"{script} failed with exit code {result.returncode}\nstderr:\n{result.stderr}")

    images: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, sep, path = line.partition("=")
        if not sep or not name or not path:
            raise AssertionError(f"{script} printed an unexpected line: {line!r}\nstderr:\n{result.stderr}")
        images[name.strip()] = path.strip()

    absent = [path for path in images.values() if not Path(path).is_file()]
    if not images or absent:
        raise AssertionError(
            f"{script} output is incomplete (missing files {absent})\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return images


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
