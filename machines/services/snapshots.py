"""Snapshots of a machine: taken, reverted to and deleted by the worker, one operation at a time per machine.

The portal owns the disk layout, so it picks the method that works for the machine (snapshot_method): internal
qcow2 snapshots for BIOS machines (with the memory of a running machine, which then comes back running), and
external disk-only overlays for UEFI machines, whose pflash firmware libvirt 9.0 refuses internal snapshots of.
An overlay is a volume of the machine's pool named from its UUID (MachineSnapshot.volume), so a delete and the
sweeper know it as the machine's. A rebuild that snapshots first keeps the old disk whole as a volume of its own
(a "kept disk" snapshot), since the snapshots inside the replaced qcow2 go with it.

Who may: an operator takes one (it changes nothing in the guest); an admin reverts (that throws away what the
disks hold since, as a rebuild does) and deletes (machines.policy). The space each holds counts in the disk
quota (machines.capacity); a new one needs room for its memory, or a GiB, when it is asked for.
"""

from __future__ import annotations

import logging
import uuid as uuidlib

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorDriver, HypervisorError, PowerState
from hypervisors.drivers.domxml import disk_targets
from machines import policy, tasks
from machines.capacity import check_quota
from machines.models import KEPT_DISK_PREFIX, Machine, MachineSnapshot
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from portal.audit import audited

log = logging.getLogger(__name__)

MAX_SNAPSHOTS = 20  # per machine: each one costs space, and internal ones slow the qcow2 down
Kind = MachineSnapshot.Kind
SnapStatus = MachineSnapshot.Status

METHOD_TEXT = {
    Kind.INTERNAL: "internal qcow2 snapshots, with the memory of a running machine (BIOS firmware)",
    Kind.EXTERNAL: "external disk-only overlays (libvirt 9.0 refuses internal snapshots of UEFI firmware)",
}


def snapshot_method(machine: Machine) -> str:
    """How the portal snapshots this machine: external for UEFI machines, internal for the others."""
    return Kind.EXTERNAL if machine.firmware == "uefi" else Kind.INTERNAL


def method_text(machine: Machine) -> str:
    return METHOD_TEXT[Kind(snapshot_method(machine))]


def snapshot_tree(machine: Machine) -> list[tuple[MachineSnapshot, int]]:
    """The machine's snapshots in tree order, each with its depth (0: a root), for the page."""
    snaps = list(machine.snapshots.select_related("parent", "created_by"))
    children: dict[int | None, list[MachineSnapshot]] = {}
    ids = {s.pk for s in snaps}
    for s in snaps:
        children.setdefault(s.parent_id if s.parent_id in ids else None, []).append(s)
    out: list[tuple[MachineSnapshot, int]] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in children.get(parent, []):
            out.append((s, depth))
            walk(s.pk, depth + 1)

    walk(None, 0)
    return out


def _actor(actor):
    return actor if getattr(actor, "is_authenticated", False) and getattr(actor, "pk", None) else None


@audited("machine.snapshot", obj_kwarg="machine")
@transaction.atomic
def snapshot_create(
    *, machine: Machine, name: str, description: str = "", memory: bool = False, actor, automatic: bool = False
) -> MachineSnapshot:
    """Queue a snapshot by the machine's method. A running BIOS machine's holds its memory (QEMU takes internal
    snapshots of a running guest with it); a UEFI machine's is disk-only, quiesced where its guest agent answers."""
    policy.require(actor, machine, "snapshot")
    machine = Machine.objects.select_for_update().get(pk=machine.pk)
    if machine.adopted:
        raise MachineError(f"{machine.name}'s disks are not the portal's own volumes: it cannot snapshot them.")
    kind = snapshot_method(machine)
    snap = MachineSnapshot(
        machine=machine,
        name=name,
        description=description,
        kind=kind,
        memory=memory,
        automatic=automatic,
        created_by=_actor(actor),
    )
    snap.full_clean(exclude=["machine", "parent", "created_by"], validate_unique=False)
    if machine.snapshots.filter(name=name).exists():
        raise ValidationError({"name": f"{machine.name} has a snapshot named {name} already."})
    if kind == Kind.EXTERNAL and memory:
        raise ValidationError(
            {"memory": "UEFI machines take disk-only snapshots here (libvirt 9.0 cannot revert external memory)."}
        )
    if kind == Kind.INTERNAL and not memory and machine.power_state == PowerState.RUNNING:
        raise ValidationError(
            {
                "memory": f"{machine.name} is running: its snapshot holds its memory (QEMU takes internal "
                "snapshots of a running guest with it). Ask for memory, or shut it down for a disk-only one."
            }
        )
    if machine.status not in policy.RULES["snapshot"].statuses:
        raise MachineError(f"{machine.name} is {machine.get_status_display().lower()}; a snapshot needs it active.")
    if machine.snapshots.count() >= MAX_SNAPSHOTS:
        raise MachineError(f"{machine.name} has {MAX_SNAPSHOTS} snapshots, the most it may; delete one first.")
    # The space is measured once taken; asked for, it needs room for its memory (or a GiB) in the disk quota.
    room = -(-machine.memory_mib // 1024) if memory else 1
    check_quota(machine.owner, disk_gib=room, project=machine.project)
    _claim_operation(machine, "snapshot")
    try:
        with transaction.atomic():
            snap.save()
    except IntegrityError:
        raise ValidationError({"name": f"{machine.name} has a snapshot named {name} already."}) from None
    how = "with memory" if memory else "disk-only"
    machine.log("snapshot", f"snapshot {name} requested ({kind}, {how})")
    _enqueue(tasks.machine_snapshot_task, snap.pk)
    return snap


def _load(snapshot_id: int) -> MachineSnapshot | None:
    return MachineSnapshot.objects.select_related("machine__hypervisor").filter(pk=snapshot_id).first()


def _overlays(snap: MachineSnapshot, driver: HypervisorDriver) -> dict[str, str]:
    """Disk target -> the overlay path an external snapshot gives it: every writable disk of the domain, in
    target order (the main disk first), as volumes of the machine's pool."""
    machine = snap.machine
    here = driver.pool_path(machine.pool)
    targets = sorted(disk_targets(driver.domain_xml(str(machine.uuid))))
    return {target: f"{here}/{snap.volume(i)}" for i, target in enumerate(targets)}


def _note_power(machine: Machine, driver: HypervisorDriver) -> None:
    state = driver.domain_state(str(machine.uuid))
    if state is not None:
        Machine.objects.filter(pk=machine.pk).update(power_state=str(state), power_checked=timezone.now())


def _refresh_sizes(machine: Machine, driver: HypervisorDriver) -> None:
    """External snapshots' overlays grow as the guest writes: their sizes as the hypervisor has them now."""
    sizes = {i.name: i.size_bytes for i in driver.snapshot_list(str(machine.uuid)) if i.kind == Kind.EXTERNAL}
    for name, size in sizes.items():
        MachineSnapshot.objects.filter(machine=machine, name=name, kind=Kind.EXTERNAL).update(size_bytes=size)


def snapshot_create_run(snapshot_id: int) -> None:
    snap = _load(snapshot_id)
    if snap is None or snap.status != SnapStatus.CREATING:
        return
    machine = snap.machine
    try:
        driver = get_driver(machine.hypervisor.uri)
        if snap.kept_disk:
            info = driver.volume_info(pool=machine.pool, name=snap.volume(0))
            fields: dict[str, object] = {"size_bytes": info.allocation_bytes if info else 0}
        else:
            overlays = _overlays(snap, driver) if snap.kind == Kind.EXTERNAL else None
            taken = driver.snapshot_create(
                str(machine.uuid), name=snap.name, description=snap.description, memory=snap.memory, overlays=overlays
            )
            parent = machine.snapshots.filter(name=taken.parent).first() if taken.parent else None
            fields = {
                "memory": taken.memory,
                "quiesced": taken.quiesced,
                "size_bytes": taken.size_bytes,
                "parent": parent,
            }
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.READY, status_message="", **fields)
        how = "with memory" if fields.get("memory") else "disk-only"
        quiesced = ", quiesced by the guest agent" if fields.get("quiesced") else ""
        machine.log("snapshot", f"snapshot {snap.name} taken ({snap.kind}, {how}{quiesced})")
        _note_power(machine, driver)
    except HypervisorError as e:
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.ERROR, status_message=str(e))
        machine.log("snapshot", f"snapshot {snap.name} failed: {e}", level="error")
    finally:
        _release_operation(machine)


def _ready(machine: Machine, snapshot: MachineSnapshot, what: str) -> None:
    if snapshot.machine_id != machine.pk:
        raise MachineError(f"{snapshot.name} is not a snapshot of {machine.name}.")
    # A snapshot left creating, reverting or deleting by a worker that died (its machine holds no operation any
    # more: the reconcile clears stale ones) is what it was: a revert's may be reverted to again, any deleted.
    busy = (SnapStatus.CREATING, SnapStatus.REVERTING, SnapStatus.DELETING)
    stale = snapshot.status in busy and not machine.operation
    usable = snapshot.status == SnapStatus.READY or (stale and snapshot.status == SnapStatus.REVERTING)
    if what == "deleted":
        usable = usable or snapshot.status == SnapStatus.ERROR or stale
    if not usable:
        raise MachineError(
            f"Snapshot {snapshot.name} is {snapshot.get_status_display().lower()}; it cannot be {what} now."
        )


@audited("machine.snapshot_revert", obj_kwarg="machine")
@transaction.atomic
def snapshot_revert(*, machine: Machine, snapshot: MachineSnapshot, actor) -> None:
    """Queue the machine's return to the snapshot: what the disks (and memory) held then. A memory snapshot
    brings a running machine back running; a disk-only one leaves it off."""
    policy.require(actor, machine, "snapshot_revert")
    machine = Machine.objects.select_for_update().get(pk=machine.pk)
    _ready(machine, snapshot, "reverted to")
    if machine.deletion_protection:
        raise MachineError(f"{machine.name} is protected; clear the protection to revert it (its disks go back).")
    if snapshot.kept_disk and machine.snapshots.exclude(pk=snapshot.pk).exists():
        raise MachineError(
            f"{snapshot.name} is the disk from before a rebuild: delete the snapshots taken since first "
            "(they live in the disk a revert replaces)."
        )
    if snapshot.kind == Kind.EXTERNAL and not snapshot.kept_disk and snapshot.children.exists():
        raise MachineError(
            f"{snapshot.name} has later snapshots; revert to the newest one, or delete those first "
            "(an external snapshot is reverted by emptying its overlay)."
        )
    if machine.status not in policy.RULES["snapshot_revert"].statuses:
        raise MachineError(f"{machine.name} is {machine.get_status_display().lower()}; a revert needs it active.")
    _claim_operation(machine, "snapshot-revert", action="snapshot_revert")
    MachineSnapshot.objects.filter(pk=snapshot.pk).update(status=SnapStatus.REVERTING)
    machine.log("snapshot", f"revert to snapshot {snapshot.name} requested")
    _enqueue(tasks.machine_snapshot_revert_task, snapshot.pk)


def snapshot_revert_run(snapshot_id: int) -> None:
    snap = _load(snapshot_id)
    if snap is None or snap.status != SnapStatus.REVERTING:
        return
    machine = snap.machine
    try:
        driver = get_driver(machine.hypervisor.uri)
        uuid = str(machine.uuid)
        if snap.kept_disk:  # the disk from before a rebuild comes back as a copy (the snapshot stays for later)
            driver.power_off(uuid)
            driver.delete_volume(pool=machine.pool, name=machine.disk_volume)
            driver.clone_volume(pool=machine.pool, name=snap.volume(0), new_name=machine.disk_volume)
            state = PowerState.OFF
        else:
            state = driver.snapshot_revert(uuid, snap.name)
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.READY, status_message="")
        machine.log("snapshot", f"reverted to snapshot {snap.name}; the machine is {state}")
        Machine.objects.filter(pk=machine.pk).update(power_state=str(state), power_checked=timezone.now())
        _refresh_sizes(machine, driver)
    except HypervisorError as e:
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.READY, status_message=f"revert failed: {e}")
        machine.log("snapshot", f"revert to snapshot {snap.name} failed: {e}", level="error")
    finally:
        _release_operation(machine)


@audited("machine.snapshot_delete", obj_kwarg="machine")
@transaction.atomic
def snapshot_delete(*, machine: Machine, snapshot: MachineSnapshot, actor) -> None:
    """Queue the snapshot's removal: an internal one's data leaves the qcow2 disks, an external one's overlays
    are merged into the disks below them and removed; its children take its parent."""
    policy.require(actor, machine, "snapshot_delete")
    machine = Machine.objects.select_for_update().get(pk=machine.pk)
    _ready(machine, snapshot, "deleted")
    if machine.status not in policy.RULES["snapshot_delete"].statuses:
        raise MachineError(f"{machine.name} is {machine.get_status_display().lower()}; a delete needs it active.")
    _claim_operation(machine, "snapshot-delete", action="snapshot_delete")
    MachineSnapshot.objects.filter(pk=snapshot.pk).update(status=SnapStatus.DELETING)
    machine.log("snapshot", f"delete of snapshot {snapshot.name} requested")
    _enqueue(tasks.machine_snapshot_delete_task, snapshot.pk)


def snapshot_delete_run(snapshot_id: int) -> None:
    snap = _load(snapshot_id)
    if snap is None or snap.status != SnapStatus.DELETING:
        return
    machine = snap.machine
    try:
        driver = get_driver(machine.hypervisor.uri)
        if not snap.kept_disk:
            driver.snapshot_delete(str(machine.uuid), snap.name)  # False: never taken (a failed create)
        for name in snap.volumes:  # libvirt removed the merged overlays; a kept disk, or a failed create's, go here
            driver.delete_volume(pool=machine.pool, name=name)
        with transaction.atomic():
            MachineSnapshot.objects.filter(parent=snap).update(parent=snap.parent)
            snap.delete()
        machine.log("snapshot", f"snapshot {snap.name} deleted")
        _refresh_sizes(machine, driver)
        _note_power(machine, driver)
    except HypervisorError as e:
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.ERROR, status_message=f"delete failed: {e}")
        machine.log("snapshot", f"delete of snapshot {snap.name} failed: {e}", level="error")
    finally:
        _release_operation(machine)


# --- before a rebuild ----------------------------------------------------------------------------------------


def rebuild_snapshot_record(machine: Machine, actor) -> MachineSnapshot:
    """Inside machine_rebuild's transaction: the row of the automatic snapshot a rebuild keeps the old disk as
    (taken by the rebuild's worker before it replaces the disk). Counted in the quota like any snapshot."""
    name = f"{KEPT_DISK_PREFIX}{timezone.now():%Y%m%d-%H%M%S}-{uuidlib.uuid4().hex[:4]}"
    try:
        check_quota(machine.owner, disk_gib=1, project=machine.project)
    except ValidationError as e:
        raise ValidationError(
            f"{' '.join(e.messages)} The rebuild keeps the old disk as a snapshot first: make room, or rebuild "
            "without a snapshot."
        ) from None
    return MachineSnapshot.objects.create(
        machine=machine,
        name=name,
        description="The disk as it was before the rebuild.",
        kind=Kind.EXTERNAL,
        automatic=True,
        created_by=_actor(actor),
    )


def rebuild_keep_disk(machine: Machine, driver: HypervisorDriver) -> tuple[str, ...]:
    """In the rebuild's worker, before the domain and disks go: copy the disk as the guest writes it now (the
    top of its chain, flattened) into the pending kept-disk snapshot's volume. The volumes the rebuild keeps:
    that one and those of earlier rebuilds' kept disks (whole files, on nothing the rebuild removes)."""
    keep = tuple(s.volume(0) for s in machine.snapshots.all() if s.kept_disk and s.status == SnapStatus.READY)
    pending = machine.snapshots.filter(automatic=True, status=SnapStatus.CREATING, name__startswith=KEPT_DISK_PREFIX)
    snap = pending.order_by("-created").first()
    if snap is None:
        return keep
    uuid = str(machine.uuid)
    top = machine.disk_volume  # an external snapshot's overlay is on top of it while one exists
    if driver.domain_state(uuid) is not None:
        files = disk_targets(driver.domain_xml(uuid))
        first = files[sorted(files)[0]].rsplit("/", 1)[-1] if files else ""
        if first.startswith(f"m-{machine.uuid}-disk"):
            top = first
    if driver.volume_info(pool=machine.pool, name=top) is None:
        MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.ERROR, status_message="no disk to keep")
        return keep
    driver.power_off(uuid)  # a consistent copy: the guest is replaced next anyway
    copy = driver.clone_volume(pool=machine.pool, name=top, new_name=snap.volume(0))
    MachineSnapshot.objects.filter(pk=snap.pk).update(status=SnapStatus.READY, size_bytes=copy.allocation_bytes)
    machine.log("rebuild", f"kept the old disk as snapshot {snap.name} ({copy.allocation_bytes} bytes)")
    return (*keep, snap.volume(0))


def rebuild_forget_snapshots(machine: Machine, keep: tuple[str, ...]) -> None:
    """After a rebuild removed the domain and its disks: the snapshots that lived in them are gone too (libvirt's
    metadata went with the domain, their data and overlays with the disks); only kept disks stay."""
    gone = [s for s in machine.snapshots.all() if not (s.kept_disk and s.volume(0) in keep)]
    if gone:
        MachineSnapshot.objects.filter(pk__in=[s.pk for s in gone]).delete()
        machine.log("rebuild", "snapshots inside the replaced disk removed: " + ", ".join(s.name for s in gone))
