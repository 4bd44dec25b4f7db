"""Moving a stopped machine to another hypervisor (cold migration). Its disks travel through libvirt's volume
streams (download from the source, upload to the target: the same transport for every URI, no shared storage
or SSH between hosts); an overlay on an image is re-pointed at the target's copy of that image, which is
copied first if the target lacks it. Then the target gets the same define steps as a create (provisioning,
left off), and only when the target is whole is the source removed. A failure removes what the target got."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, cast

from django.conf import settings

from hypervisors.drivers.base import HypervisorDriver, HypervisorFatalError
from hypervisors.drivers.qemu_img import ImageRejected, rebase_header
from hypervisors.models import Image, ImageCopy
from machines import provisioning
from machines.models import Machine
from machines.states import DeployType


def copy_volume(
    source: HypervisorDriver,
    target: HypervisorDriver,
    *,
    pool: str,
    target_pool: str,
    name: str,
    backing_path: str = "",
    backing_format: str = "",
) -> int:
    """Copy one volume byte for byte (through a file in the portal's data directory), re-pointing a qcow2
    overlay at `backing_path` on the way. A half copy of an earlier try is replaced. Returns the bytes copied."""
    if source.volume_info(pool=pool, name=name) is None:
        raise HypervisorFatalError(f"volume {name} is not in pool {pool} on the source")
    spool = Path(settings.DATA_DIR) / "tmp"
    spool.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool, prefix="move-", suffix=".img") as tmp:
        f = cast(BinaryIO, tmp)

        def sink(chunk: bytes) -> None:
            f.write(chunk)

        source.download_volume(pool=pool, name=name, sink=sink)
        f.flush()
        if backing_path:
            try:
                rebase_header(f.name, backing_path=backing_path, backing_format=backing_format)
            except ImageRejected as e:
                raise HypervisorFatalError(f"volume {name}: {e}") from None
        length = os.fstat(f.fileno()).st_size
        f.seek(0)
        target.delete_volume(pool=target_pool, name=name)
        # Created raw at the exact length, then written whole: the file is the source's bytes and nothing more
        # (the domain names the disk's format itself).
        target.create_volume(pool=target_pool, name=name, fmt="raw", capacity_bytes=length)
        target.upload_volume(pool=target_pool, name=name, source=f, length=length)
    return length


def shares_storage(source: HypervisorDriver, target: HypervisorDriver, *, pool: str, target_pool: str) -> bool:
    """Whether the target's pool is the source's storage (one directory behind two libvirtds, as NFS would
    make it): a probe volume made on the target and looked for on the source."""
    probe = f"portal-move-probe-{uuid.uuid4().hex}"
    target.create_volume(pool=target_pool, name=probe, fmt="raw", capacity_bytes=512)
    try:
        source.refresh_pool(pool)
        return source.volume_info(pool=pool, name=probe) is not None
    finally:
        target.delete_volume(pool=target_pool, name=probe)
        source.refresh_pool(pool)


def copy_disks(machine: Machine, moved: Machine, source: HypervisorDriver, target: HypervisorDriver) -> list[str]:
    """Every disk of `machine` (on the source) into `moved`'s pool on the target; what was copied, for the
    events. The seed is not copied (the define builds it again, with the same instance-id, so cloud-init
    does not run again), nor the serial log (the target starts its own)."""
    done = []

    def copy(name: str, image: Image | None) -> None:
        backing = provisioning.ensure_image(moved, target, image) if image is not None else ""
        size = copy_volume(
            source,
            target,
            pool=machine.pool,
            target_pool=moved.pool,
            name=name,
            backing_path=backing,
            backing_format=image.format if image is not None else "",
        )
        done.append(f"{name} ({size / (1 << 20):.1f} MiB)")

    copy(machine.disk_volume, machine.image if machine.deploy_type == DeployType.IMAGE else None)
    for i, entry in enumerate(provisioning.extra_disk_entries(machine)):
        image = Image.objects.filter(pk=entry["image"]).first() if entry.get("image") else None
        copy(machine.extra_disk_volume(i), image)
    return done


def prepare_live(
    machine: Machine, moved: Machine, source: HypervisorDriver, target: HypervisorDriver
) -> dict[str, str]:
    """What a live move needs on the target before the call (HypervisorDriver.migrate_live): every disk the domain
    writes made empty there by the same steps as a create (an overlay over the target's copy of the image, copied
    first if needed; blank and extra disks thin, at their sizes), the read-only files made whole (the seed again,
    same instance-id; the ISOs in the drives copied), the host guards written with the target's addresses. Returns
    each file path of the domain on the source mapped to its place on the target."""
    provisioning.ensure_host_guards(moved, target)
    here, far = source.pool_path(machine.pool), target.pool_path(moved.pool)
    names = [machine.disk_volume, machine.serial_volume]
    if machine.deploy_type == DeployType.IMAGE:
        provisioning.ensure_disk(moved, target, provisioning.ensure_image(moved, target))
        provisioning.ensure_seed(moved, target)
        names.append(machine.seed_volume)
    else:
        provisioning.ensure_blank_disk(moved, target)
    provisioning.ensure_extra_disks(moved, target)
    names += [machine.extra_disk_volume(i) for i in range(len(provisioning.extra_disk_entries(machine)))]
    paths = {f"{here}/{name}": f"{far}/{name}" for name in names}
    for cdrom in machine.cdroms.select_related("image"):
        if cdrom.image is not None:
            there = provisioning.ensure_image(moved, target, cdrom.image)
            copy = ImageCopy.objects.filter(image=cdrom.image, hypervisor=machine.hypervisor, pool=machine.pool).first()
            if copy is not None:
                paths[copy.path] = there
    return paths
