"""Moving machines between hypervisors: a move's request (who, where to, whether it fits), the worker's step
(machines/moves.py copies the disks), and a hypervisor's maintenance (drained: nothing new lands there;
evacuated: each of its machines moved by placement). Cold: the machine is off while its disks travel; a
running one is shut down first and started again on the target when asked (`restart`)."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorDriver, HypervisorError, MigrationAborted, is_loopback
from hypervisors.drivers.base import PowerState as DomainState
from hypervisors.models import Hypervisor
from hypervisors.offers import offers_for
from machines import moves, policy, provisioning, tasks
from machines.capacity import claim_room, held_by
from machines.models import Machine, MachineNic
from machines.services.common import (
    MachineError,
    _claim_attempt,
    _claim_operation,
    _enqueue,
    _release_attempt,
    _release_operation,
)
from machines.services.lifecycle import _lock_for_allocation
from machines.services.validation import (
    _check_named_hypervisor,
    _validate_hardware_against,
    _validate_nics,
)
from machines.states import PowerState, Status
from portal.audit import audited

log = logging.getLogger(__name__)

# What a host may not offer that the machine's definition names (machines.services.validation checks them).
_CHECKED_HARDWARE = ("firmware", "machine_type", "cpu_mode", "cpu_model")


@audited("machine.migrate", obj_kwarg="machine")
@transaction.atomic
def machine_migrate(
    *, machine: Machine, actor, hypervisor: Hypervisor | None = None, live: bool = False, restart: bool = False
) -> Hypervisor:
    """Queue a cold move of the machine to `hypervisor` (None: the one placement picks, never its own), checked
    for room and architecture under the same locks as a create, its room held there until the move ends.
    A running machine is refused unless `restart`: then it is shut down, moved and started on the target.
    Returns the target."""
    policy.require(actor, machine, "migrate")
    if machine.adopted:
        raise MachineError(
            f"{machine.name} was adopted: its disks are the domain's own volumes, which the portal does not move."
        )
    machine = _lock_for_allocation(machine)
    if live and machine.power_state != PowerState.RUNNING:
        raise MachineError(f"{machine.name} is not running: a live move is for a running machine; move it cold.")
    if live and machine.firmware == "uefi":
        raise MachineError(f"{machine.name} boots UEFI, whose variables a live move does not carry: move it cold.")
    if machine.power_state == PowerState.RUNNING and not (restart or live):
        raise MachineError(
            f"{machine.name} is running; shut it down first, or ask for a restart (shut down, moved, started there)."
        )
    if hypervisor is not None and hypervisor.pk == machine.hypervisor_id:
        raise ValidationError({"hypervisor": f"{machine.name} is already on {hypervisor.name}."})
    if machine.hostdevs:
        raise MachineError(
            f"{machine.name} passes devices of {machine.hypervisor.name} through; remove them before moving it."
        )
    nics = list(machine.nics.all())
    networks = tuple(dict.fromkeys(n.source for n in nics if n.type == MachineNic.Type.NETWORK))
    if hypervisor is not None:
        _check_named_hypervisor(hypervisor, machine.pool)
    # Room on the target, by placement's rules (the machine's quota does not change: it is the same machine).
    room = claim_room(
        hypervisor,
        need=held_by(machine),
        pool=machine.pool,
        image=machine.image,
        user=actor,
        networks=networks,
        exclude=machine.hypervisor_id,
    )
    target = room.hypervisor
    if live and is_loopback(target.console_address):
        raise MachineError(
            f"{target.name}'s console address {target.console_address} is a loopback address: a live move streams the"
            " machine to the target's address on the hypervisors' network. Set it, or move the machine cold."
        )
    # What a create there would check: the architecture, the NICs' sources and who may use them, the hardware.
    if why := offers_for(target).refuse_placed_arch(provisioning.machine_arch(machine)):
        raise ValidationError({"hypervisor": f"{target.name} cannot run this machine: {why}."})
    try:
        _validate_nics(target, nics, owner=machine.owner, project=machine.project)
        _validate_hardware_against(target, {f: getattr(machine, f) for f in _CHECKED_HARDWARE}, machine.image)
    except ValidationError as e:
        raise ValidationError(
            {"hypervisor": f"{target.name} cannot take {machine.name}: {' '.join(e.messages)}"}
        ) from None
    if machine.snapshots.exists():  # their metadata and overlays are this host's libvirt's: a move carries neither
        raise MachineError(f"{machine.name} has snapshots; delete them before moving it.")
    _claim_operation(machine, "migrate")
    Machine.objects.filter(pk=machine.pk).update(moving_to=target)
    how = "live" if live else f"cold{', restarted there' if restart else ''}"
    machine.log("migrate", f"move to {target.name} requested ({how})")
    _enqueue(tasks.machine_migrate_task, machine.pk, target.pk, restart, live)
    return target


@audited("machine.migrate_cancel", obj_kwarg="machine")
@transaction.atomic
def machine_migrate_cancel(*, machine: Machine, actor) -> None:
    """Call off a live move under way: the worker aborts it and the machine runs on where it was. (A cold move's
    copy is not interrupted; it ends by itself.)"""
    policy.require(actor, machine, "migrate")
    if not Machine.objects.filter(pk=machine.pk, operation="migrate", moving_to__isnull=False).update(moving_to=None):
        raise MachineError(f"{machine.name} is not being moved.")
    machine.log("migrate", f"cancel requested by {actor.get_username()}")


def machine_migrate_run(machine_id: int, target_id: int, restart: bool = False, live: bool = False) -> None:
    """Worker: (shut it down if `restart`,) copy the disks, define the machine on the target (off), switch the
    row, remove it from the source, (start it on the target). Until the switch the source is untouched; a
    failure before it removes what the target got, and a machine shut down for the move is started again."""
    machine = Machine.objects.select_related("hypervisor", "image").get(pk=machine_id)
    if machine.operation != "migrate" or not _claim_attempt(machine, (Status.ACTIVE,)):
        return  # a stale delivery: the move was called off or ended
    target_hv = Hypervisor.objects.get(pk=target_id)
    source_hv = machine.hypervisor
    moved = Machine.objects.select_related("image").get(pk=machine_id)
    moved.hypervisor = target_hv
    started = timezone.now()
    uuid = str(machine.uuid)
    was_running = False
    try:  # every way out below ends in the `finally`: the room, the operation and the attempt released
        if not Machine.objects.filter(pk=machine.pk, moving_to=target_hv).exists():
            machine.log("migrate", f"move to {target_hv.name} cancelled before it began", "warning")
            return
        source, target = get_driver(source_hv.uri), get_driver(target_hv.uri)
        if target.domain_state(uuid) is not None:
            # The same libvirtd under another name, or a stale copy: copying would overwrite the machine's disks.
            machine.log(
                "migrate", f"not moved: {target_hv.name} already has a domain with this machine's UUID", level="error"
            )
            return
        if live:
            return _move_live(machine, moved, source, target)
        if source.domain_state(uuid) == DomainState.RUNNING:
            if not restart:
                machine.log("migrate", "not moved: the machine is running; shut it down first", level="error")
                return
            was_running = True
            _stop_for_move(machine, source)
        if moves.shares_storage(source, target, pool=machine.pool, target_pool=moved.pool):
            # Copying onto itself would first delete the machine's own disks.
            machine.log(
                "migrate",
                f"not moved: pool {moved.pool} on {target_hv.name} is the same storage as {machine.pool} on"
                f" {source_hv.name}; a move copies disks between separate pools",
                level="error",
            )
            return
        try:
            copied = moves.copy_disks(machine, moved, source, target)
            machine.log("migrate", f"copied to {target_hv.name}: " + (", ".join(copied) or "no disks"))
            provisioning.provision(moved, target, start=False)
            if source.domain_state(uuid) == DomainState.RUNNING:
                # Started behind the portal's back (its BMC, virsh) while its disks were read: the copy is stale.
                raise HypervisorError(f"{source_hv.name} started the machine while it was copied")
        except HypervisorError as e:
            removed = _clean_target(moved, target)
            machine.log(
                "migrate",
                f"move to {target_hv.name} failed: {e}; {source_hv.name} keeps it"
                + (f" (removed from {target_hv.name}: {', '.join(removed)})" if removed else ""),
                level="error",
            )
            if was_running:
                _start_again(machine, source, f"on {source_hv.name}")
            return
        Machine.objects.filter(pk=machine.pk).update(hypervisor=target_hv, power_state=PowerState.OFF)
        seconds = (timezone.now() - started).total_seconds()
        machine.log("migrate", f"now on {target_hv.name} ({seconds:.1f} s)")
        try:
            removed = provisioning.deprovision(machine, source)
            machine.log("migrate", f"removed from {source_hv.name}: " + ", ".join(removed or ["nothing"]))
        except HypervisorError as e:  # the machine lives on the target; the source keeps a stale copy to remove
            machine.log("migrate", f"could not remove it from {source_hv.name}: {e}", level="warning")
        if was_running:
            _start_again(
                Machine.objects.select_related("hypervisor").get(pk=machine.pk), target, f"on {target_hv.name}"
            )
    except HypervisorError as e:
        machine.log("migrate", f"move to {target_hv.name} failed: {e}", level="error")
    except Exception as e:  # noqa: BLE001 - any failure ends the move, with the reason
        log.exception("machine %s: the move failed", machine.pk)
        machine.log("migrate", f"move to {target_hv.name} failed: {type(e).__name__}: {e}", level="error")
    finally:
        Machine.objects.filter(pk=machine.pk).update(moving_to=None)
        _release_operation(machine)
        _release_attempt(machine)


def _move_live(machine: Machine, moved: Machine, source: HypervisorDriver, target: HypervisorDriver) -> None:
    """The live move: the target made ready (moves.prepare_live), the domain moved while it runs (libvirt copies
    the disks' own data and the memory, then switches within PORTAL_LIVE_MIGRATION_DOWNTIME_MS), the row
    switched, the source's files removed. Cancel (moving_to cleared), the timeout or a failure: the machine runs
    on the source and what the target got is removed."""
    source_hv, target_hv, uuid = machine.hypervisor, moved.hypervisor, str(machine.uuid)
    if source.domain_state(uuid) != DomainState.RUNNING:
        machine.log("migrate", "not moved: a live move is for a running machine, and it is not running", "error")
        return
    last = [0.0]

    def progress(report) -> None:
        if report.elapsed_s - last[0] >= 2:
            last[0] = report.elapsed_s
            done = report.memory_processed / report.memory_total * 100 if report.memory_total else 0
            machine.log("migrate", f"live: {done:.0f}% of memory sent after {report.elapsed_s:.0f} s")

    try:
        paths = moves.prepare_live(machine, moved, source, target)
        machine.log("migrate", f"{target_hv.name} ready: {len(paths)} files; moving it live")
        result = source.migrate_live(
            uuid,
            target=target,
            address=target_hv.console_address,
            paths=paths,
            vnc_listen=target_hv.console_address,
            max_downtime_ms=settings.PORTAL_LIVE_MIGRATION_DOWNTIME_MS,
            bandwidth_mib_s=settings.PORTAL_LIVE_MIGRATION_BANDWIDTH_MIB_S,
            timeout=settings.PORTAL_LIVE_MIGRATION_TIMEOUT,
            progress=progress,
            cancelled=lambda: not Machine.objects.filter(pk=machine.pk, moving_to=target_hv).exists(),
        )
    except HypervisorError as e:
        removed = _clean_target(moved, target)
        why = "cancelled" if isinstance(e, MigrationAborted) and e.reason == "cancelled" else f"failed: {e}"
        machine.log(
            "migrate",
            f"live move to {target_hv.name} {why}; it runs on {source_hv.name}"
            + (f" (removed from {target_hv.name}: {', '.join(removed)})" if removed else ""),
            level="warning" if why == "cancelled" else "error",
        )
        return
    Machine.objects.filter(pk=machine.pk).update(
        hypervisor=target_hv, power_state=PowerState.RUNNING, power_checked=timezone.now()
    )
    downtime = f", paused {result.downtime_ms} ms" if result.downtime_ms is not None else ""
    machine.log(
        "migrate",
        f"now running on {target_hv.name}: live in {result.seconds:.1f} s, {result.memory_bytes / (1 << 20):.0f} MiB"
        f" of memory sent{downtime} (bound {result.max_downtime_ms} ms)",
    )
    try:
        removed = provisioning.deprovision(machine, source)  # libvirt undefined it there; its files stay to go
        machine.log("migrate", f"removed from {source_hv.name}: " + ", ".join(removed or ["nothing"]))
    except HypervisorError as e:
        machine.log("migrate", f"could not remove its files from {source_hv.name}: {e}", level="warning")


def _stop_for_move(machine: Machine, driver: HypervisorDriver) -> None:
    """Shut the guest down (ACPI) for a restart move, waiting PORTAL_MOVE_SHUTDOWN_TIMEOUT; then power it off."""
    uuid, wait = str(machine.uuid), settings.PORTAL_MOVE_SHUTDOWN_TIMEOUT
    machine.log("migrate", f"shutting down for the move (up to {wait} s)")
    driver.shutdown(uuid)
    deadline = time.monotonic() + wait
    while driver.domain_state(uuid) == DomainState.RUNNING and time.monotonic() < deadline:
        time.sleep(1)
    if driver.domain_state(uuid) == DomainState.RUNNING:
        machine.log("migrate", f"it did not shut down within {wait} s: powered off", level="warning")
        driver.power_off(uuid)
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.OFF, power_checked=timezone.now())


def _start_again(machine: Machine, driver: HypervisorDriver, where: str) -> None:
    """A machine that ran before its move runs after it, wherever it ended up."""
    try:
        provisioning.ensure_running(machine, driver)
    except HypervisorError as e:
        machine.log("migrate", f"could not start it again {where}: {e}", level="error")
        return
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING, power_checked=timezone.now())
    machine.log("migrate", f"started again {where}")


def _clean_target(moved: Machine, target) -> list[str]:
    try:
        return provisioning.deprovision(moved, target)
    except HypervisorError as e:
        log.warning("machine %s: could not clean the target after a failed move: %s", moved.pk, e)
        return []


# --- maintenance --------------------------------------------------------------------------------------------


def _staff_only(actor, doing: str) -> None:
    if not getattr(actor, "is_staff", False):
        raise PermissionDenied(f"Only staff {doing}.")


@audited("hypervisor.maintenance", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_set_maintenance(*, hypervisor: Hypervisor, enabled: bool, actor) -> Hypervisor:
    """Drain a hypervisor (enabled: no create or move lands there; its machines run on and are watched) or
    return it to service."""
    _staff_only(actor, "put a hypervisor in maintenance")
    Hypervisor.objects.filter(pk=hypervisor.pk).update(maintenance=enabled)
    hypervisor.maintenance = enabled
    return hypervisor


@audited("hypervisor.evacuate", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_evacuate(*, hypervisor: Hypervisor, actor, restart: bool = False) -> list[str]:
    """Drain the hypervisor, then queue a move for each of its machines to where placement finds room (each
    checked and recorded like a move of its own): running ones live, UEFI ones only with `restart` (shut down,
    moved, started there), stopped ones cold. What happens to each, one line per machine: moves that were
    refused leave the machine here."""
    _staff_only(actor, "evacuate a hypervisor")
    Hypervisor.objects.filter(pk=hypervisor.pk).update(maintenance=True)  # first: nothing new lands meanwhile
    hypervisor.maintenance = True
    report = []
    machines = Machine.objects.filter(hypervisor=hypervisor).select_related("hypervisor", "image", "owner", "project")
    for machine in machines.order_by("pk"):
        if machine.status != Status.ACTIVE:
            report.append(f"{machine.name}: stays ({machine.get_status_display().lower()})")
            continue
        # Live where it runs and may move live; cold otherwise (a running one only when asked to restart it).
        ways = [{"live": True}, {"restart": restart}] if machine.power_state == PowerState.RUNNING else [{}]
        for n, way in enumerate(ways, start=1):
            try:
                target = machine_migrate(machine=machine, actor=actor, **way)
            except (MachineError, ValidationError, PermissionDenied) as e:
                if n == len(ways):
                    report.append(f"{machine.name}: stays ({' '.join(getattr(e, 'messages', [str(e)]))})")
                continue
            report.append(f"{machine.name}: to {target.name}{' (live)' if way.get('live') else ''}")
            break
    return report
