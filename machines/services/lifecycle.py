"""A machine's life: create (validate, place, claim quota, queue the provisioning), provision, rebuild,
grow its disk, delete."""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from huey.exceptions import RetryTask

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError, HypervisorFatalError, HypervisorUnavailable
from hypervisors.drivers.base import PowerState as DomainState  # what the driver reports, not the model's field
from hypervisors.models import Hypervisor, Image
from machines import attempts, cloudinit, leases, policy, provisioning, tasks
from machines.access import project_choices
from machines.capacity import check_quota, claim_room, held, held_by, lock_quotas
from machines.models import Machine, MachineCdrom, MachineNic, MachineObserved, Project
from machines.policy import RULES, has_ready_image, statuses_text
from machines.services import changes, snapshots
from machines.services.adoption import machine_adopt_run
from machines.services.bmcs import bmc_assign
from machines.services.common import (
    MachineError,
    _attempt_fence,
    _claim_attempt,
    _enqueue,
    _owned_by_newer,
    _release_attempt,
)
from machines.services.observation import screenshot_path
from machines.services.validation import (
    NicInput,
    _check_named_hypervisor,
    _claim_hostdevs,
    _default_nics,
    _refuse_against_policy,
    _validate_cloud_init,
    _validate_hardware_against,
    _validate_hardware_input,
    _validate_iso_request,
    _validate_network_request,
    _validate_nics,
)
from machines.states import DeployType, InvalidTransition, PowerState, Status
from portal import audit
from portal.audit import audited

log = logging.getLogger(__name__)


@audited("machine.create")
@transaction.atomic
def machine_create(
    *,
    owner,
    hypervisor: Hypervisor | None,
    name: str,
    deploy_type: str = DeployType.IMAGE,
    image: Image | None = None,
    vcpus: int = 1,
    memory_mib: int = 1024,
    disk_gib: int = 10,
    max_vcpus: int | None = None,
    max_memory_mib: int | None = None,
    description: str = "",
    tags: list[str] | None = None,
    nics: list[NicInput] | None = None,
    ssh_authorized_keys: str = "",
    packages: str = "",
    script: str = "",
    user_data: str = "",
    pool: str = "default",
    deletion_protection: bool = False,
    autostart: bool = True,
    extra_isos: list[Image] | None = None,
    power_on: bool | None = None,
    project: Project | None = None,
    override_capacity: bool = False,
    lease_days: int | None = None,
    **hardware,
) -> Machine:
    """Validate, save, and queue provisioning. Raises ValidationError with a message per field.
    override_capacity (staff, with a named hypervisor): create it even where the host has no room.
    lease_days (machines.leases): None, the project's default lease; 0, none; N days, within its maximum."""
    if deploy_type not in DeployType.values:
        raise ValidationError({"deploy_type": f"Choose one of {', '.join(DeployType.values)}."})
    # The most a running machine can be grown to without a restart (machines.services.changes), and its labels.
    max_vcpus, max_memory_mib = changes.clean_maxima(
        vcpus, memory_mib, max_vcpus, max_memory_mib, hardware.get("cpu_topology")
    )
    tags = changes.clean_tags(tags)
    extra_isos = extra_isos or []
    if deploy_type == DeployType.ISO:
        _validate_iso_request(extra_isos, ssh_authorized_keys, packages, script, user_data)
    elif deploy_type == DeployType.NETWORK:
        _validate_network_request(image, nics, extra_isos, ssh_authorized_keys, packages, script, user_data)
        power_on = bool(power_on)
    elif extra_isos:
        raise ValidationError({"extra_isos": "Extra ISOs are for ISO machines."})
    if project is not None and not project_choices(owner).filter(pk=project.pk).exists():
        raise ValidationError({"project": f"You are not an admin of project {project.name}."})
    hardware = _validate_hardware_input(owner, deploy_type, vcpus, hardware, project)
    expires_at = _lease_at_create(owner, project, lease_days)
    # What the machine will hold (capacity.held: main disk, extra disks, ...), checked against the quotas and
    # the host under the locks every allocating path takes in this order: project, user's quota, hypervisor.
    need = held(
        {"vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib, "extra_disks": hardware.get("extra_disks")}
    )
    check_quota(owner, **need, project=project)
    if hypervisor is not None:
        _check_named_hypervisor(hypervisor, pool)
    # "Any hypervisor" places where the NICs' networks exist, preferring the tenant network for default NICs.
    networks = tuple(dict.fromkeys(n.source for n in nics or [] if n.type == MachineNic.Type.NETWORK))
    prefer = settings.PORTAL_TENANT_NETWORK if nics is None else ""
    room = claim_room(
        hypervisor,
        need=need,
        pool=pool,
        image=image,
        user=owner,
        override=override_capacity,
        networks=networks,
        prefer_network=prefer,
    )
    hypervisor = room.hypervisor
    nics = _default_nics(owner, hypervisor, project, deploy_type) if nics is None else nics
    _validate_nics(hypervisor, nics, owner=owner, project=project)
    _validate_hardware_against(hypervisor, hardware, image)
    hardware = _claim_hostdevs(hypervisor, hardware)
    script, user_data = script.replace("\r\n", "\n"), user_data.replace("\r\n", "\n")  # browsers send CRLF
    if len(script.encode()) > cloudinit.USER_DATA_MAX_BYTES:
        raise ValidationError({"script": "The script is over 64 KiB."})
    machine = Machine(
        owner=owner,
        project=project,
        hypervisor=hypervisor,
        name=name,
        deploy_type=deploy_type,
        image=image,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_gib=disk_gib,
        max_vcpus=max_vcpus,
        max_memory_mib=max_memory_mib,
        description=description.strip(),
        tags=tags,
        ssh_authorized_keys=ssh_authorized_keys.strip(),
        packages=packages.strip(),
        script=script,
        user_data=user_data,
        pool=pool,
        deletion_protection=deletion_protection,
        autostart=autostart,
        power_on_after_create=True if power_on is None else power_on,
        expires_at=expires_at,
        **hardware,
        instance_id=f"i-{uuidlib.uuid4().hex}",
    )
    machine.full_clean()
    machine.save()
    if deploy_type == DeployType.NETWORK:
        bmc_assign(machine)
    try:
        for i, nic in enumerate(nics):
            nic.row(machine, i).save()
    except IntegrityError:
        raise ValidationError({"nics": "That MAC address is already used by another machine."}) from None
    if deploy_type == DeployType.ISO:
        for slot, iso in enumerate([image, *extra_isos]):
            MachineCdrom.objects.create(machine=machine, slot=slot, image=iso)
    elif deploy_type == DeployType.IMAGE:
        _validate_cloud_init(machine)
    machine.log("create", f"requested by {owner.get_username()} on {hypervisor.name}")
    if room.placement is not None:
        machine.log("placement", room.placement.reason())
    if room.over_capacity:
        note = f"created over capacity on {hypervisor.name} by staff ({owner.get_username()}): {room.over_capacity}"
        machine.log("placement", note, level="warning")
        audit.record("machine.capacity_override", machine, user=owner, detail=note)
    machine.transition(Status.PROVISIONING)
    _enqueue(tasks.machine_provision_task, machine.pk)
    return machine


def _lease_at_create(owner, project: Project | None, lease_days: int | None):
    """The new machine's lease end: the project's default, or what was asked within the project's maximum."""
    now = timezone.now()
    try:
        until = leases.from_days(lease_days, project=project, now=now)
        if lease_days is not None:
            leases.check(until, project=project, actor=owner, now=now)
    except leases.LeaseRefused as e:
        raise ValidationError({"lease_days": str(e)}) from None
    return until


def _cleanup(machine: Machine, driver) -> None:
    """Remove what a failed attempt made; failures here are recorded, not raised."""
    try:
        removed = provisioning.deprovision(machine, driver)
        machine.log("cleanup", "removed " + (", ".join(removed) if removed else "nothing (nothing was made)"))
    except HypervisorError as e:
        machine.log("cleanup", f"could not clean up: {e}", level="error")


def machine_provision_run(machine_id: int) -> None:
    """Worker: run the pipeline for a machine in PROVISIONING or REBUILDING, as one fenced attempt (see
    machines.attempts): any failure ends it in ERROR with what was made removed; a fenced attempt stops and,
    unless a newer one owns the machine, removes what it made."""
    machine = Machine.objects.select_related("hypervisor", "image", "owner").get(pk=machine_id)
    if machine.adopted:  # its domain exists: the pipeline would make another machine's disks (a resumed attempt)
        machine_adopt_run(machine_id)
        return
    if not _claim_attempt(machine, (Status.PROVISIONING, Status.REBUILDING)):
        return  # a duplicate or stale delivery
    Machine.objects.filter(pk=machine.pk).update(attempts=machine.attempts + 1)
    driver = None
    try:
        driver = get_driver(machine.hypervisor.uri)
        with attempts.fenced(_attempt_fence(machine)):
            provisioning.provision(machine, driver)
            attempts.fence()  # the end counts too: a late attempt never makes a machine active
    except attempts.Fenced:
        _stale_attempt_ends(machine, driver)
        return
    except HypervisorUnavailable as e:
        if machine.attempts < settings.PORTAL_PROVISION_RETRIES:
            delay = 5 * 2**machine.attempts
            machine.log("retry", f"{e}; trying again in {delay} s", level="warning")
            _release_attempt(machine)
            raise RetryTask(delay=delay) from None
        _fail_attempt(machine, driver, f"hypervisor unavailable: {e}")
        return
    except (HypervisorFatalError, cloudinit.CloudInitError, NotImplementedError) as e:
        _fail_attempt(machine, driver, str(e))
        return
    except Exception as e:  # noqa: BLE001 - any failure ends the attempt: never left provisioning
        log.exception("machine %s: provisioning failed", machine.pk)
        _fail_attempt(machine, driver, f"{type(e).__name__}: {e}")
        return
    try:
        state = driver.domain_state(str(machine.uuid))
    except HypervisorError:
        state = None
    Machine.objects.filter(pk=machine.pk).update(
        attempts=0, power_state=str(state or PowerState.UNKNOWN), power_checked=timezone.now()
    )
    if str(state or "") == PowerState.RUNNING:  # a (re)build's first start is a cold start: what was pending runs now
        from machines.services.changes import pending_applied  # changes builds on this module

        pending_applied(machine, driver)
    machine.transition(Status.ACTIVE)
    _release_attempt(machine)


def _still_ours(machine: Machine) -> bool:
    return Machine.objects.filter(pk=machine.pk, attempt_id=machine.attempt_id).exclude(attempt_id="").exists()


def _fail_attempt(machine: Machine, driver, message: str) -> None:
    """The attempt failed: remove what it made, then ERROR with the reason (if it still owns the machine)."""
    if not _still_ours(machine):
        return _stale_attempt_ends(machine, driver)  # fenced meanwhile: a newer owner's things stay
    if driver is not None:
        _cleanup(machine, driver)
    try:
        machine.transition(Status.ERROR, message)
    except InvalidTransition:
        pass  # deleted or taken over meanwhile
    _release_attempt(machine)


def _stale_attempt_ends(machine: Machine, driver) -> None:
    """A fenced attempt (timed out, deleted, taken over): what it made goes unless a newer attempt owns it."""
    if _owned_by_newer(machine) or driver is None:
        log.info("machine %s: a stale attempt stopped; a newer one owns the machine", machine.pk)
        return
    try:
        removed = provisioning.deprovision(machine, driver)
    except HypervisorError as e:
        log.warning("machine %s: a stale attempt could not remove what it made: %s", machine.pk, e)
        return
    log.info("machine %s: a stale attempt stopped and removed %s", machine.pk, ", ".join(removed) or "nothing")
    if Machine.objects.filter(pk=machine.pk).exists():
        machine.log("cleanup", "a stopped attempt removed what it made: " + (", ".join(removed) or "nothing"))


@audited("machine.delete", obj_kwarg="machine")
@transaction.atomic
def machine_delete(*, machine: Machine, actor, keep_disks: bool | None = None) -> None:
    """Queue the removal of the domain and its volumes. Refused with protection, touching nothing. keep_disks
    (adopted machines only; their default): undefine the domain and leave its disk volumes where they are."""
    policy.require(actor, machine, "delete")
    machine = Machine.objects.select_for_update().get(pk=machine.pk)
    if keep_disks is None:
        keep_disks = machine.adopted
    if keep_disks and not machine.adopted:
        raise MachineError(
            f"{machine.name}'s disks are the portal's own volumes: only an adopted machine's disks can be kept."
        )
    if machine.deletion_protection:
        raise MachineError(f"{machine.name} is protected from deletion; clear the protection first.")
    if machine.status not in RULES["delete"].statuses:
        raise MachineError(
            f"{machine.name} is busy ({machine.get_status_display().lower()}); try again when it is done."
        )
    _refuse_while_operation(machine)
    machine.transition(Status.DELETING)
    # A provision, rebuild or grow still running is fenced: it stops at its next step and leaves the rest to this.
    Machine.objects.filter(pk=machine.pk).update(attempt_id="")
    if machine.adopted:
        machine.log("delete", "its disks are kept" if keep_disks else "its disks are removed too")
    _enqueue(tasks.machine_delete_task, machine.pk, keep_disks)


def machine_delete_run(machine_id: int, keep_disks: bool | None = None) -> None:
    """Worker: destroy, undefine, remove volumes, then forget the machine. An adopted machine's disks are the
    domain's own volumes, read from its XML before it goes; they stay unless keep_disks is False (None: kept)."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None or not _claim_attempt(machine, (Status.DELETING,)):
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        if machine.adopted:
            removed = provisioning.deprovision_adopted(machine, driver, keep_disks=keep_disks is not False)
        else:
            removed = provisioning.deprovision(machine, driver)
    except HypervisorUnavailable as e:
        machine.log("delete", f"{e}; trying again", level="warning")
        _release_attempt(machine)
        raise RetryTask(delay=15) from None
    except Exception as e:  # noqa: BLE001 - any failure ends the attempt, with the reason
        if not isinstance(e, HypervisorFatalError):
            log.exception("machine %s: delete failed", machine.pk)
        machine.transition(Status.ERROR, f"delete failed: {e}")
        _release_attempt(machine)
        return
    log.info("machine %s deleted: %s", machine.pk, ", ".join(removed))
    screenshot_path(machine).unlink(missing_ok=True)
    machine.delete()  # its console tokens and sessions go with it


@audited("machine.rebuild", obj_kwarg="machine")
@transaction.atomic
def machine_rebuild(*, machine: Machine, actor, snapshot: bool = True) -> None:
    """Recreate the disk from the image and a fresh seed (new instance-id): the guest starts over.
    It allocates nothing new: the disks come back at the sizes the machine holds (capacity.held), so no
    quota or capacity check is needed, and the locks are taken in the allocating paths' order all the same.
    With `snapshot` (the default), the old disk is kept first as an automatic snapshot (a whole copy: the
    snapshots inside the replaced qcow2 go with it), which the disk quota counts."""
    policy.require(actor, machine, "rebuild")
    machine = _lock_for_allocation(machine)
    if machine.deletion_protection:
        raise MachineError(f"{machine.name} is protected; clear the protection to rebuild it (its disk is replaced).")
    if machine.status not in RULES["rebuild"].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; rebuild needs it active or failed."
        )
    _refuse_while_operation(machine)
    if not has_ready_image(machine):
        raise MachineError("The machine's image is not available any more.")
    _refuse_against_policy(machine, "rebuilt")
    if snapshot and not machine.adopted:
        kept = snapshots.rebuild_snapshot_record(machine, actor)
        machine.log("rebuild", f"the old disk will be kept as snapshot {kept.name}")
    Machine.objects.filter(pk=machine.pk).update(instance_id=f"i-{uuidlib.uuid4().hex}", attempts=0)
    MachineObserved.objects.filter(machine_id=machine.pk).update(ssh_host_keys="")  # the new instance makes new ones
    machine.transition(Status.REBUILDING)
    _enqueue(tasks.machine_rebuild_task, machine.pk)


def machine_rebuild_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if machine.status != Status.REBUILDING or machine.attempts:
        return machine_provision_run(machine_id)  # a retry only needs the pipeline
    if not _claim_attempt(machine, (Status.REBUILDING,)):
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        keep = snapshots.rebuild_keep_disk(machine, driver)
        removed = provisioning.deprovision(machine, driver, keep=keep)
        snapshots.rebuild_forget_snapshots(machine, keep)
        machine.log("rebuild", "removed " + ", ".join(removed or ["nothing"]))
    except Exception as e:  # noqa: BLE001 - any failure ends the attempt, with the reason
        if not isinstance(e, HypervisorError):
            log.exception("machine %s: rebuild failed", machine.pk)
        if _still_ours(machine):
            with contextlib.suppress(InvalidTransition):
                machine.transition(Status.ERROR, f"rebuild failed: {e}")
        _release_attempt(machine)
        return
    return machine_provision_run(machine_id)  # the pipeline, as an attempt of its own


def _refuse_while_operation(machine: Machine) -> None:
    """One operation at a time per machine: a power action, media change or move in progress comes first."""
    if machine.operation:
        raise MachineError(f"{machine.name} is busy with another operation; try again when it is done.")


def _lock_for_allocation(machine: Machine) -> Machine:
    """The machine's row locked after its project's and owner's quota rows (lock_quotas: the order every
    allocating path takes). Refused if the machine changed hands between reading and locking."""
    current = Machine.objects.select_related("owner", "project").get(pk=machine.pk)
    lock_quotas(current.owner, current.project)
    locked = Machine.objects.select_for_update().get(pk=machine.pk)
    if (locked.owner_id, locked.project_id) != (current.owner_id, current.project_id):
        raise MachineError(f"{machine.name} changed owner or project meanwhile; try again.")
    return locked


@audited("machine.grow_disk", obj_kwarg="machine")
@transaction.atomic
def machine_grow_disk(*, machine: Machine, disk_gib: int, actor) -> None:
    """Grow the disk (never shrink). A running guest sees the new size at once."""
    policy.require(actor, machine, "grow_disk")
    if machine.adopted:
        raise MachineError(
            f"{machine.name} was adopted: its disks are the domain's own, which the portal does not grow."
        )
    machine = _lock_for_allocation(machine)
    if machine.status not in RULES["grow_disk"].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; growing the disk needs it "
            f"{statuses_text('grow_disk')}."
        )
    _refuse_while_operation(machine)
    if machine.snapshots.filter(kind="external").exists():  # the guest writes an overlay, not the disk volume
        raise MachineError(f"{machine.name} has external snapshots; delete them before growing its disk.")
    if disk_gib <= machine.disk_gib:
        raise ValidationError(
            {"disk_gib": f"The disk is {machine.disk_gib} GiB; give a larger size (disks only grow)."}
        )
    if disk_gib > 16384:
        raise ValidationError({"disk_gib": "At most 16384 GiB."})
    before, after = held_by(machine), held_by(machine, disk_gib=disk_gib)
    check_quota(machine.owner, **{k: after[k] - before[k] for k in after}, project=machine.project)
    # The host's pool must hold the larger disk, as a create's would (the disk is thin, but so is a create's).
    hv = Hypervisor.objects.select_for_update().get(pk=machine.hypervisor_id)
    pool = next((p for p in hv.pools if p["name"] == machine.pool and p.get("active")), None)
    free = (pool.get("available_bytes") or 0) >> 30 if pool else None
    if free is not None and disk_gib - machine.disk_gib > free:
        raise ValidationError(
            {
                "disk_gib": f"Hypervisor {hv.name} has {free} GiB free in pool {machine.pool}; growing by "
                f"{disk_gib - machine.disk_gib} GiB does not fit."
            }
        )
    old = machine.disk_gib
    machine.transition(Status.RESIZING, f"{old} GiB to {disk_gib} GiB")
    Machine.objects.filter(pk=machine.pk).update(disk_gib=disk_gib)
    _enqueue(tasks.machine_grow_disk_task, machine.pk)


def machine_grow_disk_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").get(pk=machine_id)
    if not _claim_attempt(machine, (Status.RESIZING,)):
        return
    try:
        _grow_disk(machine)
    except RetryTask:
        _release_attempt(machine)
        raise
    except Exception as e:  # noqa: BLE001 - any failure ends the attempt, with the reason
        if _still_ours(machine):  # not a machine deleted meanwhile (its delete owns it now)
            log.exception("machine %s: growing the disk failed", machine.pk)
            with contextlib.suppress(InvalidTransition):
                machine.transition(Status.ERROR, f"growing the disk failed: {type(e).__name__}: {e}")
    _release_attempt(machine)


def _grow_disk(machine: Machine) -> None:
    size = machine.disk_gib << 30
    try:
        driver = get_driver(machine.hypervisor.uri)
        if driver.domain_state(str(machine.uuid)) == DomainState.RUNNING:
            info = driver.volume_info(pool=machine.pool, name=machine.disk_volume)
            assert info is not None  # the running domain uses it
            path = info.path
            driver.block_resize(str(machine.uuid), path=path, capacity_bytes=size)
        else:
            driver.resize_volume(pool=machine.pool, name=machine.disk_volume, capacity_bytes=size)
    except HypervisorUnavailable as e:
        machine.log("resize", f"{e}; trying again", level="warning")
        raise RetryTask(delay=15) from None
    except HypervisorFatalError as e:
        machine.transition(Status.ERROR, f"growing the disk failed: {e}")
        return
    machine.log("resize", f"disk is now {machine.disk_gib} GiB")
    machine.transition(Status.ACTIVE)
