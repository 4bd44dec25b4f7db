"""Clones of a stopped machine, and images saved from a machine's disk.

A clone is a new machine (its own UUID, MACs, instance-id, name, and a network-boot machine's own BMC port and
credentials) whose disks start as copies of the source's, made on the source's hypervisor (the disks are there):

- linked: each disk's own qcow2 layer copied onto the same read-only base it stands on, the pool's copy of a
  catalogue image (content-addressed, never written). Nothing writable ever becomes a backing file, so the source
  keeps running and writing its own layer afterwards, and deleting either machine leaves the other whole. A disk
  standing on no image (ISO and network-boot machines, a rebuild's kept disk), or a source with snapshots inside
  its qcow2 files, is copied whole instead (said in the clone's events).
- full: each disk flattened into a standalone qcow2 (libvirt's createXMLFrom: qemu-img convert of the chain).
- from a snapshot: a rebuild's kept disk, or a disk-only (external) snapshot, whose overlays stand on the disks
  as they were when it was taken (read-only while it exists, so the source may run): those copied whole, since
  a snapshot's delete merges its overlay down into them.
- from an internal snapshot (inside the qcow2 files, as BIOS machines take them), through libvirt's API alone (so
  on a remote hypervisor too), with the source off: its state kept in a temporary internal snapshot
  (`keep_snapshot`), the domain reverted to the chosen one (a memory snapshot paused, then powered off), each disk
  copied whole (flattened: the active layer, no snapshots), the domain reverted to the temporary snapshot, which is
  deleted (on a failure too). A crash midway leaves that snapshot on the domain, its name saying what it is: the
  same clone's next run (or an operator, `virsh snapshot-revert`) reverts to it and deletes it first.

The source is held (its one operation, "clone") from the request until every copy is made, and must be off while
they are read; each clone then goes through the normal provisioning pipeline (a queued task each), which finds
its disks made, writes a new cloud-init seed (a new instance-id: cloud-init runs again, with the clone's host name)
and defines the domain with the clone's MACs.

An image from a machine: the disk's whole chain flattened into a volume beside it, streamed into the catalogue
(hypervisors.images.image_fill_from_stream) and validated like any upload; it belongs to the one who saved it.
"""

from __future__ import annotations

import logging
import re
import uuid as uuidlib

from django.core.exceptions import ValidationError
from django.db import transaction

from hypervisors import images
from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorDriver, HypervisorError, HypervisorFatalError
from hypervisors.drivers.base import PowerState as DomainState
from hypervisors.models import Image, ImageCopy
from machines import policy, provisioning, tasks
from machines.access import project_choices
from machines.capacity import check_quota, claim_room, held_by
from machines.models import Machine, MachineCdrom, MachineNic, MachineSnapshot, Project, hostname_validator
from machines.services.bmcs import bmc_assign
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from machines.services.validation import NicInput, _validate_nics, generate_mac
from machines.states import DeployType, InvalidTransition, PowerState, Status
from portal.audit import audited

log = logging.getLogger(__name__)

MAX_CLONES = 20  # at once: each is a disk copy on one host while the source is held
_PATTERN = re.compile(r"[^{}]*\{n\}[^{}]*")

# What a clone takes from its source as it is (the rest is its own: name, owner, UUID, MACs, instance-id, BMC).
COPIED_FIELDS = (
    "pool",
    "deploy_type",
    "image",
    "vcpus",
    "memory_mib",
    "disk_gib",
    "ssh_authorized_keys",
    "packages",
    "script",
    "user_data",
    "autostart",
    "power_on_after_create",
    "tags",
    "description",
    "max_vcpus",
    "max_memory_mib",
    "machine_type",
    "cpu_mode",
    "cpu_model",
    "cpu_topology",
    "watchdog",
    "rng",
    "disk_bus",
    "disk_cache",
    "extra_disks",
    "firmware",
    "secure_boot",
    "qemu_args",
)


def clone_names(name: str, count: int, name_pattern: str | None) -> list[str]:
    """The clones' names: `name` for one; for several, `name_pattern` with {n} replaced by 1..count (web-{n})."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_CLONES:
        raise ValidationError({"count": f"Make 1 to {MAX_CLONES} clones at once."})
    pattern = (name_pattern or "").strip()
    if pattern:
        if len(pattern) > 60 or not _PATTERN.fullmatch(pattern):
            raise ValidationError(
                {"name_pattern": "A name pattern holds {n} once, and no other braces, e.g. web-{n} (at most 60)."}
            )
        names = [pattern.replace("{n}", str(n)) for n in range(1, count + 1)]
        field = "name_pattern"
    elif count == 1:
        names, field = [(name or "").strip()], "name"
    else:
        raise ValidationError({"name_pattern": "Several clones need a name pattern with {n}, e.g. web-{n}."})
    for n in names:
        if not n:
            raise ValidationError({field: "Give the clone a name."})
        try:
            hostname_validator(n)
        except ValidationError as e:
            raise ValidationError({field: f"{n[:70]!r}: {' '.join(e.messages)}"}) from None
    return names


def _source_snapshot(source: Machine, snapshot: MachineSnapshot | None) -> MachineSnapshot | None:
    if snapshot is None:
        return None
    if snapshot.machine_id != source.pk:
        raise ValidationError({"snapshot": "That snapshot is not one of this machine's."})
    if snapshot.status != MachineSnapshot.Status.READY:
        raise ValidationError({"snapshot": f"Snapshot {snapshot.name} is {snapshot.get_status_display().lower()}."})
    return snapshot


def _internal(snapshot: MachineSnapshot | None) -> bool:
    """An internal snapshot (inside the qcow2 files): copied by reverting the stopped source to it and back."""
    return snapshot is not None and not snapshot.kept_disk and snapshot.kind == MachineSnapshot.Kind.INTERNAL


def keep_snapshot(clone: Machine) -> str:
    """The temporary internal snapshot that keeps the source's state while a clone copies an internal snapshot of
    it (underscores: no name a user gives a snapshot)."""
    return f"portal_clone_keep_{clone.pk}"


def _refuse_unclonable(source: Machine, actor, doing: str, snapshot: MachineSnapshot | None = None) -> None:
    if source.adopted:
        raise MachineError(
            f"{source.name} was adopted: its disks are the domain's own, which the portal does not copy."
        )
    from_overlay = snapshot is not None and snapshot.kind == MachineSnapshot.Kind.EXTERNAL and not snapshot.kept_disk
    if not from_overlay and source.snapshots.filter(kind=MachineSnapshot.Kind.EXTERNAL, automatic=False).exists():
        raise MachineError(
            f"{source.name} has disk-only snapshots: its disks are overlays the portal does not {doing}; "
            "delete the snapshots first."
        )


def _refuse_running(source: Machine, doing: str) -> None:
    if source.power_state != PowerState.OFF:
        state = source.get_power_state_display().lower()
        raise MachineError(
            f"{source.name} is {state}: shut it down first ({doing} reads its disk, which must not change meanwhile)."
        )


def _clone_project(actor, source: Machine, project: Project | None) -> Project | None:
    """The clones' project: the one asked for (the actor an admin there), else the source's when the actor may
    create machines in it, else none (the clones are the actor's own)."""
    choices = project_choices(actor)
    if project is not None:
        if not choices.filter(pk=project.pk).exists():
            raise ValidationError({"project": f"You are not an admin of project {project.name}."})
        return project
    if source.project_id is not None and choices.filter(pk=source.project_id).exists():
        return source.project
    return None


@audited("machine.clone", obj_kwarg="machine")
@transaction.atomic
def machine_clone(
    *,
    machine: Machine,
    actor,
    name: str = "",
    count: int = 1,
    name_pattern: str | None = None,
    linked: bool = True,
    snapshot: MachineSnapshot | None = None,
    project: Project | None = None,
) -> list[Machine]:
    """Clone a stopped machine (or a rebuild's kept disk of it) into `count` new machines of the actor's, on the
    source's hypervisor, quota-checked as a whole; queued (the source held until its disks are copied)."""
    policy.require(actor, machine, "clone")
    names = clone_names(name, count, name_pattern)
    source = Machine.objects.select_related("hypervisor", "image", "owner", "project").get(pk=machine.pk)
    _refuse_unclonable(source, actor, "copy", snapshot)
    if source.qemu_args and not actor.is_staff:
        raise MachineError(f"{source.name} has extra QEMU arguments, which only staff may give a machine.")
    if source.hostdevs:
        raise MachineError(f"{source.name} has host devices passed through: a device is one machine's.")
    snap = _source_snapshot(source, snapshot)
    project = _clone_project(actor, source, project)
    taken = list(Machine.objects.filter(owner=actor, name__in=names).values_list("name", flat=True))
    if taken:
        field = "name_pattern" if name_pattern else "name"
        raise ValidationError({field: f"You already have a machine named {', '.join(sorted(taken)[:5])}."})
    one = held_by(source)
    total = {k: v * len(names) for k, v in one.items()}
    check_quota(actor, **total, project=project)  # locks the project's and the actor's quota rows first
    source = Machine.objects.select_for_update().select_related("hypervisor", "image", "project").get(pk=source.pk)
    if source.status != Status.ACTIVE:
        raise MachineError(f"{source.name} is {source.get_status_display().lower()}; a clone needs it active.")
    if snap is None:
        _refuse_running(source, "a clone")
    elif _internal(snap) and source.power_state != PowerState.OFF:
        raise MachineError(
            f"{source.name} is {source.get_power_state_display().lower()}: shut it down first (a clone from internal "
            f"snapshot {snap.name} turns the stopped machine's disks back to it for the copy, then forward again)."
        )
    if source.operation:
        raise MachineError(f"{source.name} is busy with another operation; try again when it is done.")
    hv = claim_room(source.hypervisor, need=total, pool=source.pool, image=None, user=actor).hypervisor
    source_nics = list(source.nics.all())
    nics = [
        NicInput(
            type=n.type,
            source=n.source,
            dhcp4=n.dhcp4 or bool(n.addresses),  # static addresses are the source's: a clone asks DHCP instead
            dhcp6=n.dhcp6,
            nameservers=list(n.nameservers),
            search=list(n.search),
            model=n.model,
            mode=n.mode,
            vlan=n.vlan,
        )
        for n in source_nics
    ]
    _validate_nics(hv, nics, owner=actor, project=project)
    _claim_operation(source, "clone")
    if snap is not None and not snap.kept_disk:
        # Whole copies: an internal snapshot's disks are read out flattened, and a disk-only snapshot's layers are
        # written again when a snapshot is deleted.
        linked = False
    kind = "linked" if linked else "full copy"
    origin = f"snapshot {snap.name} of {source.name}" if snap else source.name
    smbios = {k: v for k, v in (source.smbios or {}).items() if k != "serial"}  # a serial number is one machine's
    clones = []
    for clone_name in names:
        clone = Machine(
            owner=actor,
            project=project,
            hypervisor=hv,
            name=clone_name,
            cloned_from=source,
            smbios=smbios,
            instance_id=f"i-{uuidlib.uuid4().hex}",
            **{f: getattr(source, f) for f in COPIED_FIELDS},
        )
        clone.full_clean()
        clone.save()
        if clone.deploy_type == DeployType.NETWORK:
            bmc_assign(clone)
        for i, nic in enumerate(nics):
            MachineNic.objects.create(
                machine=clone,
                index=i,
                mac=generate_mac(),
                **{k: getattr(nic, k) for k in ("type", "source", "dhcp4", "dhcp6", "nameservers", "search")},
                **{k: getattr(nic, k) for k in ("model", "mode", "vlan")},
            )
        for cdrom in source.cdroms.all():
            MachineCdrom.objects.create(machine=clone, slot=cdrom.slot, image_id=cdrom.image_id)
        clone.log("create", f"cloned ({kind}) from {origin} by {actor.get_username()} on {hv.name}")
        dropped = [f"NIC {i + 1}" for i, n in enumerate(source_nics) if n.addresses]
        if dropped:
            clone.log("create", f"{', '.join(dropped)}: the source's static addresses left out (DHCP)", "warning")
        clone.transition(Status.PROVISIONING, f"its disks are being copied from {source.name}")
        clones.append(clone)
    source.log("clone", f"{len(clones)} {kind} clone(s) by {actor.get_username()}: {', '.join(names)}")
    _enqueue(tasks.machine_clone_task, source.pk, [c.pk for c in clones], linked, snap.pk if snap else None)
    return clones


def _image_base(source: Machine, driver: HypervisorDriver, name: str) -> tuple[str, str]:
    """(path, format) of the read-only base the volume stands on when it is the pool's copy of a catalogue image
    (content-addressed, never written: a linked clone may stand on it too); ("", "") otherwise."""
    info = driver.volume_info(pool=source.pool, name=name)
    if info is None or not info.backing_path:
        return "", ""
    copy = ImageCopy.objects.filter(hypervisor_id=source.hypervisor_id, pool=source.pool, path=info.backing_path)
    found = copy.select_related("image").first()
    if found is None:
        return "", ""
    return info.backing_path, found.image.format


def _copy_disks(
    source: Machine, clone: Machine, driver: HypervisorDriver, *, linked: bool, snap: MachineSnapshot | None
) -> str:
    """The clone's disk volumes made from the source's (idempotent: a volume already there is kept)."""
    extra = range(len(source.extra_disks or []))
    if _internal(snap):
        assert snap is not None
        copies = {source.disk_volume: clone.disk_volume}
        copies.update({source.extra_disk_volume(i): clone.extra_disk_volume(i) for i in extra})
        uuid, keep = str(source.uuid), keep_snapshot(clone)
        driver.snapshot_copy_disks(uuid, snap.name, pool=source.pool, copies=copies, keep=keep)
        sizes = {new: driver.volume_info(pool=source.pool, name=new) for new in copies.values()}
        return "; ".join(
            f"{new} (a whole copy of the disk as in snapshot {snap.name}, "
            f"{(info.allocation_bytes if info else 0) >> 20} MiB)"
            for new, info in sizes.items()
        )
    if snap is not None and not snap.kept_disk:  # a disk-only snapshot: each disk as it was, below its overlay
        pairs = [(_below(source, driver, snap.volume(0)), clone.disk_volume)]
        pairs += [(_below(source, driver, snap.volume(i + 1)), clone.extra_disk_volume(i)) for i in extra]
        linked = False
    else:
        pairs = [(snap.volume(0) if snap else source.disk_volume, clone.disk_volume)]
        pairs += [(source.extra_disk_volume(i), clone.extra_disk_volume(i)) for i in extra]
    inside = snap is None and source.snapshots.filter(kind=MachineSnapshot.Kind.INTERNAL, automatic=False).exists()
    made = []
    for old, new in pairs:
        base, fmt = _image_base(source, driver, old) if linked and not inside else ("", "")
        vol = driver.clone_volume(pool=source.pool, name=old, new_name=new, backing_path=base, backing_format=fmt)
        made.append(
            f"{new} ({'its own layer over ' + base.rsplit('/', 1)[-1] if base else 'a whole copy'}, "
            f"{vol.allocation_bytes >> 20} MiB)"
        )
    if linked and inside:
        made.append("whole copies: the source's internal snapshots live inside its qcow2 files")
    return "; ".join(made)


def _below(source: Machine, driver: HypervisorDriver, overlay: str) -> str:
    """The pool volume an external snapshot's overlay stands on: the disk as it was when the snapshot was taken
    (the machine's own disk volume, or an earlier snapshot's overlay), read-only while the snapshot exists."""
    info = driver.volume_info(pool=source.pool, name=overlay)
    if info is None or not info.backing_path:
        raise HypervisorFatalError(f"the snapshot's overlay {overlay} is missing, or stands on nothing")
    folder, _, name = info.backing_path.rpartition("/")
    if folder != driver.pool_path(source.pool).rstrip("/"):
        raise HypervisorFatalError(f"the snapshot's overlay {overlay} stands on {info.backing_path}, outside the pool")
    return name


def machine_clone_run(source_id: int, clone_ids: list[int], linked: bool, snapshot_id: int | None = None) -> None:
    """Worker: copy the source's disks for each clone still provisioning, then queue its provisioning; the source
    is released at the end whatever happens. A clone whose copy fails ends in error, with what was made removed."""
    source = Machine.objects.select_related("hypervisor").filter(pk=source_id).first()
    if source is None:
        Machine.objects.filter(pk__in=clone_ids, status=Status.PROVISIONING).update(status_message="source gone")
        return
    snap = MachineSnapshot.objects.filter(pk=snapshot_id).first() if snapshot_id else None
    try:
        driver = get_driver(source.hypervisor.uri)
        state = driver.domain_state(str(source.uuid))
        needs_off = snap is None or _internal(snap)
        problem = "" if state in (None, DomainState.OFF) or not needs_off else f"{source.name} is {state}"
        for clone in Machine.objects.filter(pk__in=clone_ids).select_related("hypervisor", "image", "owner"):
            if clone.status != Status.PROVISIONING or clone.attempt_id:
                continue  # deleted or taken over meanwhile
            _clone_one(source, clone, driver, linked=linked, snap=snap, problem=problem)
    except HypervisorError as e:
        for clone in Machine.objects.filter(pk__in=clone_ids, status=Status.PROVISIONING, attempt_id=""):
            _fail_clone(clone, None, f"copying {source.name}'s disks failed: {e}")
    finally:
        _release_operation(source)


def _clone_one(source: Machine, clone: Machine, driver, *, linked: bool, snap, problem: str) -> None:
    if problem:
        return _fail_clone(clone, None, f"{problem}: a clone reads a stopped machine's disk")
    try:
        made = _copy_disks(source, clone, driver, linked=linked, snap=snap)
    except HypervisorError as e:
        return _fail_clone(clone, driver, f"copying {source.name}'s disks failed: {e}")
    clone.log("disk", f"copied from {source.name}: {made}")
    if Machine.objects.filter(pk=clone.pk, status=Status.PROVISIONING).exists():
        tasks.machine_provision_task(clone.pk)  # the normal pipeline: seed, domain, start


def _fail_clone(clone: Machine, driver, message: str) -> None:
    if driver is not None:
        for name in clone.volumes:
            try:
                driver.delete_volume(pool=clone.pool, name=name)
            except HypervisorError:
                log.warning("clone %s: could not remove %s", clone.pk, name)
    try:
        clone.transition(Status.ERROR, message)
    except InvalidTransition:
        pass


def export_volume(machine: Machine, image: Image) -> str:
    """The volume beside the machine's disk that holds its flattened copy while it is saved as `image`."""
    return f"m-{machine.uuid}-export{image.pk}.qcow2"


@audited("machine.save_image", obj_kwarg="machine")
@transaction.atomic
def image_from_machine(
    *, machine: Machine, actor, name: str, os_name: str = "", default_user: str | None = None
) -> Image:
    """Save a stopped machine's main disk as a new catalogue image of the actor's (flattened, validated like any
    upload); queued, the machine held until its disk is read."""
    policy.require(actor, machine, "save_image")
    source = Machine.objects.select_for_update().select_related("hypervisor", "image").get(pk=machine.pk)
    _refuse_unclonable(source, actor, "flatten")
    if source.status != Status.ACTIVE:
        raise MachineError(f"{source.name} is {source.get_status_display().lower()}; saving it needs it active.")
    _refuse_running(source, "saving an image")
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "Name the image."})
    if Image.objects.filter(name=name).exists():
        raise ValidationError({"name": f"An image named {name[:100]} exists; choose another name."})
    base = source.image if source.deploy_type == DeployType.IMAGE else None
    _claim_operation(source, "save_image")
    image = images.image_create_pending(
        name=name,
        owner=actor,
        os_name=os_name or (base.os_name if base else ""),
        default_user=default_user if default_user is not None else (base.default_user if base else "debian"),
        arch=provisioning.machine_arch(source),
    )
    source.log("image", f"being saved as image {image.name} by {actor.get_username()}")
    _enqueue(tasks.machine_save_image_task, source.pk, image.pk)
    return image


def image_from_machine_run(machine_id: int, image_id: int) -> None:
    """Worker: flatten the disk's chain into a volume beside it, stream that into the catalogue, remove it."""
    source = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    image = Image.objects.filter(pk=image_id).first()
    if source is None or image is None:
        return
    temp = export_volume(source, image)
    driver = None
    try:
        driver = get_driver(source.hypervisor.uri)

        def fill(sink) -> None:
            assert driver is not None
            state = driver.domain_state(str(source.uuid))
            if state not in (None, DomainState.OFF):
                raise HypervisorError(f"{source.name} is {state}: an image is saved from a stopped machine")
            driver.clone_volume(pool=source.pool, name=source.disk_volume, new_name=temp)
            driver.download_volume(pool=source.pool, name=temp, sink=sink)

        images.image_fill_from_stream(image.pk, fill)
    finally:
        if driver is not None:
            try:
                driver.delete_volume(pool=source.pool, name=temp)
            except HypervisorError:
                log.warning("machine %s: could not remove %s", source.pk, temp)
        _release_operation(source)
    image.refresh_from_db()
    outcome = "saved as" if image.is_ready else "could not be saved as"
    source.log("image", f"{outcome} image {image.name}" + (f": {image.status_message}" if not image.is_ready else ""))
