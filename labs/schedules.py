"""Scheduled actions on a machine or on every machine of a lab: power on, shut down, or a snapshot kept to a
retention count, at a set hour and minute (the portal's TIME_ZONE) on some weekdays or every day.

The worker's periodic task calls schedules_run(now) every minute. A schedule is due when its latest set time
at or before `now` is later than its last run (or its creation): each set time runs once, a minute the
worker missed runs once when it is back (within PORTAL_SCHEDULE_CATCH_UP_MINUTES; later than that it is
skipped, said in last_result), and two checks in one minute do not run it twice (the last run is claimed by
a compare-and-swap). Each run acts through the machine services as the portal ("schedule N"), machine by
machine, only on machines its creator may still operate: each is a machine event and an audit record.
Snapshots are named `sched<id>-<time>`; past the retention count the oldest is deleted, one per machine at a
check (a machine does one operation at a time).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from labs.models import Lab, ScheduledAction
from labs.services import lab_level, lab_require, labs_for
from machines import access, leases, policy, services
from machines.access import machines_for
from machines.models import Machine, MachineSnapshot
from machines.states import PowerAction, PowerState
from portal import audit
from portal.audit import audited

log = logging.getLogger(__name__)
Action = ScheduledAction.Action
MAX_PER_TARGET = 20
MAX_RETENTION = 10  # a machine holds at most 20 snapshots (machines.services.snapshots)


def schedules_for(user) -> QuerySet[ScheduledAction]:
    """The schedules a user may see: on machines and labs they see."""
    return ScheduledAction.objects.filter(Q(machine__in=machines_for(user)) | Q(lab__in=labs_for(user))).select_related(
        "machine", "lab", "created_by"
    )


def _check_fields(action: str, hour: int, minute: int, weekdays: object, retention: int) -> list[int]:
    errors = {}
    if action not in Action.values:
        errors["action"] = f"Choose one of {', '.join(Action.values)}."
    if not isinstance(hour, int) or not 0 <= hour <= 23:
        errors["hour"] = "An hour is 0 to 23."
    if not isinstance(minute, int) or not 0 <= minute <= 59:
        errors["minute"] = "A minute is 0 to 59."
    days = weekdays if isinstance(weekdays, list) else None
    if days is None or any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= 6 for d in days):
        errors["weekdays"] = "Weekdays are numbers 0 (Monday) to 6 (Sunday); none: every day."
    if not isinstance(retention, int) or not 1 <= retention <= MAX_RETENTION:
        errors["retention"] = f"Keep 1 to {MAX_RETENTION} scheduled snapshots."
    if errors:
        raise ValidationError(errors)
    return sorted(set(days or []))


@audited("schedule.create")
@transaction.atomic
def schedule_create(
    *,
    actor,
    action: str,
    hour: int,
    minute: int,
    weekdays: list | None = None,
    retention: int = 3,
    machine: Machine | None = None,
    lab: Lab | None = None,
) -> ScheduledAction:
    """A schedule on a machine (its operators may) or on a lab (the lab's operators may)."""
    if (machine is None) == (lab is None):
        raise ValidationError("A schedule is on a machine or on a lab.")
    if machine is not None:
        policy.require(actor, machine, "schedule")
        if action == Action.SNAPSHOT and machine.adopted:
            raise ValidationError({"action": f"{machine.name} was adopted: the portal takes no snapshots of it."})
    else:
        assert lab is not None
        lab_require(actor, lab, access.OPERATE)
    days = _check_fields(action, hour, minute, weekdays if weekdays is not None else [], retention)
    target = Q(machine=machine) if machine is not None else Q(lab=lab)
    if ScheduledAction.objects.filter(target).count() >= MAX_PER_TARGET:
        raise ValidationError(f"At most {MAX_PER_TARGET} schedules each; delete one first.")
    return ScheduledAction.objects.create(
        machine=machine,
        lab=lab,
        action=action,
        hour=hour,
        minute=minute,
        weekdays=days,
        retention=retention,
        created_by=actor,
    )


@audited("schedule.delete", obj_kwarg="schedule")
def schedule_delete(*, schedule: ScheduledAction, actor) -> None:
    """Its operators remove it (its scheduled snapshots stay, as any snapshot)."""
    if schedule.machine is not None:
        policy.require(actor, schedule.machine, "schedule")
    else:
        assert schedule.lab is not None
        lab_require(actor, schedule.lab, access.OPERATE)
    schedule.delete()


def due_at(schedule: ScheduledAction, now: datetime) -> datetime | None:
    """The set time this schedule should run for at `now` (None: nothing due). Local wall time in TIME_ZONE."""
    tz = ZoneInfo(settings.TIME_ZONE)
    since = schedule.last_run or schedule.created
    local = now.astimezone(tz)
    for back in range(8):  # the latest matching day within a week
        day = (local - timedelta(days=back)).date()
        at = datetime(day.year, day.month, day.day, schedule.hour, schedule.minute, tzinfo=tz)
        if at > now or (schedule.weekdays and day.weekday() not in schedule.weekdays):
            continue
        return at if at > since else None
    return None


def schedules_run(now: datetime | None = None) -> int:
    """The periodic check: run every enabled schedule that is due, once; prune snapshots past retention.
    Returns how many schedules ran."""
    now = now or timezone.now()
    ran = 0
    for schedule in ScheduledAction.objects.filter(enabled=True).select_related("machine", "lab", "created_by"):
        at = due_at(schedule, now)
        if schedule.action == Action.SNAPSHOT:
            _prune(schedule)
        if at is None:
            continue
        # Claim this set time: a second check (or a second worker) finds last_run moved and leaves it.
        claimed = ScheduledAction.objects.filter(pk=schedule.pk, last_run=schedule.last_run, enabled=True)
        if not claimed.update(last_run=now):
            continue
        if now - at > timedelta(minutes=settings.PORTAL_SCHEDULE_CATCH_UP_MINUTES):
            result = f"{at:%Y-%m-%d %H:%M} skipped: the worker was away until {now:%H:%M}"
        else:
            result = _run(schedule, at)
            ran += 1
        ScheduledAction.objects.filter(pk=schedule.pk).update(last_result=result[:2000])
        audit.record("schedule.run", schedule, user=_actor(schedule), detail=result)
    return ran


def _actor(schedule: ScheduledAction) -> leases.SystemActor:
    return leases.SystemActor(f"schedule {schedule.pk} ({schedule.created_by.get_username()})")


def _targets(schedule: ScheduledAction) -> list[Machine]:
    if schedule.machine is not None:
        return list(Machine.objects.select_related("hypervisor", "owner", "project").filter(pk=schedule.machine.pk))
    assert schedule.lab is not None
    machines = Machine.objects.filter(lab_membership__lab_id=schedule.lab.pk).select_related(
        "hypervisor", "owner", "project"
    )
    return list(machines.order_by("name"))


def _run(schedule: ScheduledAction, at: datetime) -> str:
    """Act on each target the creator may still operate; returns what happened, machine by machine."""
    creator, actor = schedule.created_by, _actor(schedule)
    said = []
    for machine in _targets(schedule):
        if not access.can(creator, machine, access.OPERATE) or (
            schedule.lab is not None and lab_level(creator, schedule.lab) < 2
        ):
            said.append(f"{machine.name}: {creator.get_username()} may no longer operate it")
            continue
        try:
            with transaction.atomic():
                what = _act(schedule, machine, actor, at)
                machine.log(
                    "schedule", f"{schedule.get_action_display()} at {at:%H:%M} (schedule {schedule.pk}): {what}"
                )
        except (services.MachineError, ValidationError, PermissionDenied) as e:
            why = " ".join(getattr(e, "messages", None) or [str(e)])
            machine.log(
                "schedule", f"{schedule.get_action_display()} (schedule {schedule.pk}) refused: {why}", "warning"
            )
            said.append(f"{machine.name}: refused: {why}")
        else:
            said.append(f"{machine.name}: {what}")
    return "; ".join(said) or "no machines"


def _act(schedule: ScheduledAction, machine: Machine, actor, at: datetime) -> str:
    if schedule.action == Action.POWER_ON:
        if machine.power_state == PowerState.RUNNING:
            return "already running"
        services.machine_power(machine=machine, action=PowerAction.START, actor=actor)
        return "start queued"
    if schedule.action == Action.POWER_OFF:
        if machine.power_state == PowerState.OFF:
            return "already off"
        services.machine_power(machine=machine, action=PowerAction.SHUTDOWN, actor=actor)
        return "shut-down queued"
    memory = (
        services.snapshot_method(machine) == MachineSnapshot.Kind.INTERNAL and machine.power_state == PowerState.RUNNING
    )
    name = f"sched{schedule.pk}-{timezone.localtime(at):%Y%m%d-%H%M}"
    services.snapshot_create(
        machine=machine,
        name=name,
        description=f"taken by schedule {schedule.pk}",
        memory=memory,
        actor=actor,
        automatic=True,
    )
    return f"snapshot {name} queued"


def _prune(schedule: ScheduledAction) -> None:
    """Past the retention count, delete the oldest of this schedule's snapshots: one per machine each check."""
    for machine in _targets(schedule):
        mine = MachineSnapshot.objects.filter(machine=machine, name__startswith=f"sched{schedule.pk}-")
        ready = mine.filter(status=MachineSnapshot.Status.READY)
        if ready.count() <= schedule.retention:
            continue
        oldest = ready.order_by("created", "pk").first()
        if oldest is None or machine.operation:
            continue
        try:
            with transaction.atomic():
                services.snapshot_delete(machine=machine, snapshot=oldest, actor=_actor(schedule))
                machine.log(
                    "schedule", f"snapshot {oldest.name} deleted: schedule {schedule.pk} keeps {schedule.retention}"
                )
        except (services.MachineError, ValidationError, PermissionDenied) as e:
            log.info("schedule %s: pruning %s waits: %s", schedule.pk, oldest.name, e)
