"""Leases: a machine's owner (or a project admin) sets or extends its end within the project's maximum; the
worker's periodic check (leases_enforce) warns the owner ahead, shuts the machine down at the end, powers it
off if the guest ignored that, and deletes it PORTAL_LEASE_DELETE_AFTER_HOURS later. Deletion protection wins:
a protected machine is warned and nothing more.

Each step is claimed by a compare-and-swap on the machine's row in the same transaction as the service it
calls (machine_power, machine_delete), so a worker that dies mid-way has done a step whole or not at all, a
second check (or a second worker) does nothing twice, and a machine busy with another operation is tried
again at the next check.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from machines import access, leases, policy
from machines.models import Machine
from machines.services.common import MachineError
from machines.services.lifecycle import machine_delete
from machines.services.operations import machine_power
from machines.states import PowerAction, PowerState, Status
from portal import audit
from portal.audit import audited

log = logging.getLogger(__name__)
LEASE = leases.SystemActor("portal (lease)")


@audited("machine.lease", obj_kwarg="machine")
@transaction.atomic
def machine_extend_lease(*, machine: Machine, actor, until: datetime | None, now: datetime | None = None) -> None:
    """Set the machine's lease end (None: no lease) within the project's maximum (staff: any). A machine shut
    down by its lease and not deleted yet is kept: the next delete waits for the new end."""
    policy.require(actor, machine, "lease")
    now = now or timezone.now()
    leases.check(until, project=machine.project, actor=actor, now=now)
    Machine.objects.filter(pk=machine.pk).update(expires_at=until, expiry_warned=None, expired_off=None)
    machine.expires_at, machine.expiry_warned, machine.expired_off = until, None, None
    machine.log("lease", f"lease ends {until:%Y-%m-%d %H:%M %Z}" if until else "no lease")


def expiring_soon(user, now: datetime | None = None) -> QuerySet[Machine]:
    """The machines the user sees whose lease ends within PORTAL_LEASE_WARN_HOURS (or has ended), soonest
    first: the dashboard's list."""
    now = now or timezone.now()
    horizon = now + timedelta(hours=settings.PORTAL_LEASE_WARN_HOURS)
    qs = access.for_lists(access.machines_for(user)).filter(expires_at__isnull=False, expires_at__lte=horizon)
    return qs.exclude(status=Status.DELETING).order_by("expires_at")


def leases_enforce(now: datetime | None = None) -> dict[str, int]:
    """The periodic check: warn, shut down, power off and delete what is due. Returns how many of each."""
    now = now or timezone.now()
    done = {"warned": 0, "shut_down": 0, "powered_off": 0, "deleted": 0}
    leased = Machine.objects.filter(expires_at__isnull=False).select_related("hypervisor", "owner", "project")
    horizon = now + timedelta(hours=settings.PORTAL_LEASE_WARN_HOURS)
    for machine in leased.filter(expiry_warned__isnull=True, expires_at__lte=horizon).exclude(status=Status.DELETING):
        done["warned"] += _warn(machine, now)
    for machine in leased.filter(expires_at__lte=now, expired_off__isnull=True, deletion_protection=False):
        done["shut_down"] += _shut_down(machine, now)
    stubborn = now - timedelta(seconds=settings.PORTAL_LEASE_POWEROFF_AFTER)
    for machine in leased.filter(
        expired_off__lte=stubborn, deletion_protection=False, power_state=PowerState.RUNNING, status=Status.ACTIVE
    ):
        done["powered_off"] += _act(machine, PowerAction.POWEROFF, "powered off: the guest ignored the shut-down")
    gone = now - timedelta(hours=settings.PORTAL_LEASE_DELETE_AFTER_HOURS)
    for machine in leased.filter(expired_off__lte=gone, expires_at__lte=now, deletion_protection=False).exclude(
        status=Status.DELETING
    ):
        done["deleted"] += _delete(machine)
    return done


def _warn(machine: Machine, now: datetime) -> int:
    """Warn once (the row's mark is set first: a worker dying before the mail loses that mail, never sends two)."""
    if not Machine.objects.filter(pk=machine.pk, expiry_warned__isnull=True).update(expiry_warned=now):
        return 0
    assert machine.expires_at is not None
    when = f"{timezone.localtime(machine.expires_at):%Y-%m-%d %H:%M %Z}"
    fate = (
        "It is protected from deletion, so it will be neither shut down nor deleted."
        if machine.deletion_protection
        else f"It will then be shut down, and deleted {settings.PORTAL_LEASE_DELETE_AFTER_HOURS:g} hours later."
    )
    text = f"The lease of machine {machine.name} ends {when}. {fate} Extend the lease on the machine's page."
    sent = "no e-mail address"
    if machine.owner.email:
        try:
            send_mail(f"Machine {machine.name}: its lease ends {when}", text, None, [machine.owner.email])
            sent = f"mailed {machine.owner.email}"
        except (OSError, ValueError) as e:  # SMTP down or refused: the page and the dashboard still say it
            sent = f"the e-mail failed: {e}"
            log.warning("machine %s: the lease warning e-mail failed: %s", machine.pk, e)
    machine.log("lease", f"lease ends {when}; the owner was warned ({sent})", level="warning")
    audit.record("machine.lease_warn", machine, user=LEASE, detail=sent)
    return 1


def _shut_down(machine: Machine, now: datetime) -> int:
    """The lease's end: mark the machine and queue its shut-down in one transaction (a busy machine, or one
    not active, is marked when it can be; a machine already off is only marked)."""
    if machine.status not in (Status.ACTIVE, Status.ERROR):
        return 0  # provisioning, rebuilding, resizing, deleting: a later check
    try:
        with transaction.atomic():
            if not Machine.objects.filter(pk=machine.pk, expired_off__isnull=True).update(expired_off=now):
                return 0
            if machine.status == Status.ACTIVE and machine.power_state == PowerState.RUNNING:
                machine_power(machine=machine, action=PowerAction.SHUTDOWN, actor=LEASE)
                machine.log("lease", "the lease ended: shutting down", level="warning")
            else:
                machine.log("lease", "the lease ended; the machine is not running", level="warning")
                audit.record("machine.lease_end", machine, user=LEASE, detail="already off")
    except (MachineError, ValidationError) as e:
        log.info("machine %s: the lease's shut-down waits: %s", machine.pk, e)
        return 0
    return 1


def _act(machine: Machine, action: str, message: str) -> int:
    try:
        with transaction.atomic():
            machine_power(machine=machine, action=action, actor=LEASE)
            machine.log("lease", message, level="warning")
    except (MachineError, ValidationError) as e:
        log.info("machine %s: the lease's %s waits: %s", machine.pk, action, e)
        return 0
    return 1


def _delete(machine: Machine) -> int:
    try:
        with transaction.atomic():
            machine.log("lease", "the lease ended: deleting the machine", level="warning")
            machine_delete(machine=machine, actor=LEASE)
    except (MachineError, ValidationError) as e:
        log.info("machine %s: the lease's delete waits: %s", machine.pk, e)
        return 0
    return 1
