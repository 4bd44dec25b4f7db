"""The image catalogue: uploads, imports from a URL, volumes registered from a pool,
validation, and distribution into hypervisor pools."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorDriver, HypervisorError, HypervisorFatalError
from hypervisors.drivers.qemu_img import ImageRejected, inspect
from hypervisors.models import Hypervisor, Image, ImageCopy, ImageFormat, ImageKind, ImageStatus
from portal import http_fetch
from portal.audit import audited
from portal.refusals import Refusal

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_EVERY = 0.5  # seconds between progress updates in the database


class ImageInUse(Refusal):
    """Machines still use the image."""


def image_dir() -> Path:
    return Path(settings.PORTAL_IMAGE_DIR)


def max_file_bytes() -> int:
    return settings.PORTAL_IMAGE_MAX_FILE_GIB << 30


def _declared_format(kind: str, fmt: str) -> str:
    return ImageFormat.ISO if kind == ImageKind.ISO else fmt


def _new_image(*, name: str, kind: str, fmt: str, owner=None, **fields) -> Image:
    image = Image(
        name=name, kind=kind, format=_declared_format(kind, fmt), owner=owner, status=ImageStatus.IMPORTING, **fields
    )
    image.full_clean()
    image.save()
    image.file_name = f"{image.pk}.{'iso' if kind == ImageKind.ISO else image.format}"
    image.save(update_fields=["file_name"])
    return image


def _private(path: str, flags: int) -> int:
    """An opener for files in the catalogue: readable by the portal's user only, whatever the umask."""
    return os.open(path, flags, 0o600)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _finish(image: Image, path: Path, sha256: str) -> None:
    """Validate the file at its final path and mark the image ready, or error (and remove the file)."""
    try:
        facts = inspect(
            str(path),
            image.format,
            max_virtual_bytes=settings.PORTAL_IMAGE_MAX_VIRTUAL_GIB << 30,
            cpu_seconds=settings.PORTAL_QEMU_IMG_CPU_SECONDS,
            memory_mib=settings.PORTAL_QEMU_IMG_MEMORY_MIB,
        )
    except ImageRejected as e:
        path.unlink(missing_ok=True)
        _fail(image, f"Refused: {e}")
        return
    Image.objects.filter(pk=image.pk).update(
        status=ImageStatus.READY,
        status_message="",
        sha256=sha256,
        file_size_bytes=path.stat().st_size,
        virtual_size_bytes=facts.virtual_size_bytes,
        progress_bytes=path.stat().st_size,
    )


def _fail(image: Image, message: str) -> None:
    Image.objects.filter(pk=image.pk).update(status=ImageStatus.ERROR, status_message=message)


@audited("image.upload")
@transaction.atomic
def image_create_from_upload(*, name: str, kind: str, fmt: str, uploaded, owner=None, **fields) -> Image:
    """Take an uploaded file (already streamed to disk by Django) and queue its validation."""
    if uploaded.size > max_file_bytes():
        raise ValidationError({"file": f"The file is over the limit of {settings.PORTAL_IMAGE_MAX_FILE_GIB} GiB."})
    image = _new_image(name=name, kind=kind, fmt=fmt, owner=owner, total_bytes=uploaded.size, **fields)
    final = image_dir() / image.file_name
    temp = getattr(uploaded, "temporary_file_path", None)
    if temp:
        # A hard link on the same file system: no copy; Django removes the temporary name itself.
        try:
            os.link(temp(), final)
        except OSError:
            shutil.copyfile(temp(), final)
    else:
        with open(final, "wb") as out:
            for chunk in uploaded.chunks():
                out.write(chunk)
    os.chmod(final, 0o600)
    from hypervisors.tasks import image_validate_task

    transaction.on_commit(lambda: image_validate_task(image.pk))
    return image


def image_validate(image_id: int) -> None:
    """Worker: checksum and inspect an uploaded file."""
    image = Image.objects.get(pk=image_id)
    path = image_dir() / image.file_name
    _finish(image, path, _sha256_of(path))


def validate_source_url(url: str) -> None:
    """http(s) only, and no address literal the worker would refuse (names are checked by the worker, after DNS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError({"source_url": "Give an http:// or https:// URL."})
    try:
        ipaddress.ip_address(parts.hostname.split("%", 1)[0])
    except ValueError:
        return
    reason = http_fetch.refusal(parts.hostname, _allowed_networks())
    if reason:
        raise ValidationError({"source_url": f"Refused: {reason}."})


def _allowed_networks() -> list:
    return http_fetch.parse_networks(settings.PORTAL_IMPORT_ALLOWED_NETWORKS)


@audited("image.import")
@transaction.atomic
def image_create_from_url(
    *, name: str, kind: str, fmt: str, source_url: str, expected_sha256: str = "", owner=None, **fields
) -> Image:
    """Register the image and queue its download."""
    validate_source_url(source_url)
    expected = expected_sha256.strip().lower()
    if expected and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise ValidationError({"expected_sha256": "A SHA-256 checksum is 64 hexadecimal characters."})
    image = _new_image(
        name=name, kind=kind, fmt=fmt, owner=owner, source_url=source_url, expected_sha256=expected, **fields
    )
    from hypervisors.tasks import image_import_task

    transaction.on_commit(lambda: image_import_task(image.pk))
    return image


def image_import(image_id: int) -> None:
    """Worker: stream the URL to a .part file with a running checksum, then rename and validate. Every hop is
    checked (portal/http_fetch.py); the import has a deadline and a size cap; a failure leaves no file."""
    image = Image.objects.get(pk=image_id)
    final = image_dir() / image.file_name
    part = final.with_name(final.name + ".part")
    h = hashlib.sha256()
    received = 0
    last = time.monotonic()

    def sink(chunk: bytes) -> None:
        nonlocal received, last
        h.update(chunk)
        out.write(chunk)
        received += len(chunk)
        if time.monotonic() - last > PROGRESS_EVERY:
            Image.objects.filter(pk=image.pk).update(progress_bytes=received)
            last = time.monotonic()

    try:
        validate_source_url(image.source_url)  # http(s) only, never file: or ftp:
        with open(part, "wb", opener=_private) as out:
            http_fetch.fetch(
                image.source_url,
                sink,
                allowed_networks=_allowed_networks(),
                timeout_s=settings.PORTAL_IMPORT_TIMEOUT,
                max_bytes=min(max_file_bytes(), settings.PORTAL_IMPORT_MAX_BYTES),
                on_length=lambda total: Image.objects.filter(pk=image.pk).update(total_bytes=total),
            )
    except ValidationError as e:
        part.unlink(missing_ok=True)
        _fail(image, f"Import failed: {' '.join(e.messages)}")
        return
    except (http_fetch.FetchError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        _fail(image, f"Import failed: {e}")
        return
    except BaseException:
        part.unlink(missing_ok=True)  # never a partial file, whatever stopped the import
        raise
    sha = h.hexdigest()
    if image.expected_sha256 and sha != image.expected_sha256:
        part.unlink(missing_ok=True)
        _fail(image, f"Checksum mismatch: expected {image.expected_sha256}, got {sha}.")
        return
    os.replace(part, final)
    _finish(image, final, sha)


@audited("image.register")
@transaction.atomic
def image_register_volume(
    *, name: str, kind: str, fmt: str, hypervisor: Hypervisor, pool: str, volume: str, owner=None, **fields
) -> Image:
    """Register a volume already in a hypervisor's pool; the worker copies it into the catalogue."""
    if not pool or not volume:
        raise ValidationError({"source_volume": "Name the pool and the volume."})
    image = _new_image(
        name=name,
        kind=kind,
        fmt=fmt,
        owner=owner,
        source_hypervisor=hypervisor,
        source_pool=pool,
        source_volume=volume,
        **fields,
    )
    from hypervisors.tasks import image_register_task

    transaction.on_commit(lambda: image_register_task(image.pk))
    return image


def image_fetch_volume(image_id: int) -> None:
    """Worker: download the registered volume through libvirt, then validate it like any upload."""
    image = Image.objects.select_related("source_hypervisor").get(pk=image_id)
    final = image_dir() / image.file_name
    part = final.with_name(final.name + ".part")
    h = hashlib.sha256()
    source = image.source_hypervisor
    assert source is not None  # a volume import always names its hypervisor
    try:
        driver = get_driver(source.uri)
        with open(part, "wb", opener=_private) as out:
            info = driver.volume_info(pool=image.source_pool, name=image.source_volume)
            if info is None:
                raise HypervisorFatalError(f"volume {image.source_volume!r} is not in pool {image.source_pool!r}")
            Image.objects.filter(pk=image.pk).update(total_bytes=info.allocation_bytes)

            def sink(data: bytes) -> None:
                h.update(data)
                out.write(data)

            driver.download_volume(pool=image.source_pool, name=image.source_volume, sink=sink)
    except (HypervisorError, OSError) as e:
        part.unlink(missing_ok=True)
        _fail(image, f"Could not read the volume: {e}")
        return
    os.replace(part, final)
    _finish(image, final, h.hexdigest())


def image_create_pending(*, name: str, fmt: str = ImageFormat.QCOW2, owner=None, **fields) -> Image:
    """A disk image whose bytes the worker writes later (image_fill_from_stream), importing until then: for
    callers in higher layers that make an image from something of theirs (a machine's disk)."""
    return _new_image(name=name, kind=ImageKind.DISK, fmt=fmt, owner=owner, **fields)


def image_fill_from_stream(image_id: int, fill: Callable[[Callable[[bytes], None]], None]) -> None:
    """Worker: fill(sink) passes the image's bytes to sink, which writes them to a private .part file with a
    running checksum and the catalogue's size cap; the file is renamed and validated like any upload. A failure
    (of fill too: it raises) leaves no file and the image in error with the reason."""
    image = Image.objects.get(pk=image_id)
    final = image_dir() / image.file_name
    part = final.with_name(final.name + ".part")
    h = hashlib.sha256()
    received = 0

    def sink(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > max_file_bytes():
            raise ValueError(f"over the limit of {settings.PORTAL_IMAGE_MAX_FILE_GIB} GiB")
        h.update(data)
        out.write(data)

    try:
        with open(part, "wb", opener=_private) as out:
            fill(sink)
    except (HypervisorError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        _fail(image, f"Could not write the image: {e}")
        return
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    _finish(image, final, h.hexdigest())


@audited("image.delete", obj_kwarg="image")
@transaction.atomic
def image_delete(*, image: Image) -> None:
    """Remove an image from the catalogue and its file. Copies in pools stay until no machine needs them."""
    from django.db.models import ProtectedError

    try:
        image.delete()
    except ProtectedError as e:
        raise ImageInUse(f"Image {image.name} is used by {len(e.protected_objects)} machine(s).") from None
    if image.file_name:
        transaction.on_commit(lambda: (image_dir() / image.file_name).unlink(missing_ok=True))


def ensure_image_copy(image: Image, hypervisor: Hypervisor, pool: str, driver: HypervisorDriver) -> tuple[str, bool]:
    """The path of the image in `pool`, uploading it through libvirt the first time. Returns (path, uploaded)."""
    copy = ImageCopy.objects.filter(image=image, hypervisor=hypervisor, pool=pool).first()
    vol = driver.volume_info(pool=pool, name=image.volume_name)
    if copy and vol and copy.sha256 == image.sha256:
        return vol.path, False
    if vol is not None:
        if _volume_sha256(driver, pool, image.volume_name) == image.sha256:
            _record_copy(image, hypervisor, pool, vol.path)
            return vol.path, False
        driver.delete_volume(pool=pool, name=image.volume_name)  # not ours, or a broken earlier upload
    ImageCopy.objects.filter(image=image, hypervisor=hypervisor, pool=pool).delete()
    path = image_dir() / image.file_name
    fmt = "raw" if image.kind == ImageKind.ISO else image.format
    vol = driver.create_volume(pool=pool, name=image.volume_name, fmt=fmt, capacity_bytes=image.file_size_bytes)
    try:
        with open(path, "rb") as f:
            driver.upload_volume(pool=pool, name=image.volume_name, source=f, length=image.file_size_bytes)
    except BaseException:
        driver.delete_volume(pool=pool, name=image.volume_name)  # never leave half an image behind
        raise
    _record_copy(image, hypervisor, pool, vol.path)
    return vol.path, True


def _volume_sha256(driver: HypervisorDriver, pool: str, name: str) -> str:
    h = hashlib.sha256()
    driver.download_volume(pool=pool, name=name, sink=h.update)
    return h.hexdigest()


def _record_copy(image: Image, hypervisor: Hypervisor, pool: str, path: str) -> None:
    ImageCopy.objects.update_or_create(
        image=image,
        hypervisor=hypervisor,
        pool=pool,
        defaults={"volume": image.volume_name, "path": path, "sha256": image.sha256},
    )
