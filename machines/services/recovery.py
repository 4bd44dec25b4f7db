"""After a worker dies: the attempts it held (machines.attempts) are found when a worker starts and resumed,
since every step is idempotent and keyed by the machine's UUID; a move it was making is called off (the source
keeps the machine). Attempts of live workers, or of workers on other hosts, are left to them and to the
reconcile's deadline."""

from __future__ import annotations

import logging

from machines import attempts, tasks
from machines.models import Machine
from machines.services.common import _enqueue, _release_operation
from machines.states import Status

log = logging.getLogger(__name__)

_RESUME = {
    Status.PROVISIONING: tasks.machine_provision_task,
    Status.REBUILDING: tasks.machine_provision_task,  # the old disk is gone once a rebuild's attempt ran
    Status.RESIZING: tasks.machine_grow_disk_task,
    Status.DELETING: tasks.machine_delete_task,
}


def machines_resume_dead_attempts() -> list[str]:
    """Resume (or, for a move, call off) every attempt whose worker process is gone; what was done, a line each."""
    done = []
    for machine in Machine.objects.exclude(attempt_id="").select_related("moving_to"):
        owner = attempts.owner_of(machine.attempt_id)
        if owner is None or owner.alive():
            continue
        # Take it from the dead attempt first: exactly one starting worker resumes it.
        if not Machine.objects.filter(pk=machine.pk, attempt_id=machine.attempt_id).update(attempt_id=""):
            continue
        status = machine.get_status_display().lower()
        if machine.status in _RESUME:
            machine.log("recover", f"the worker that had it {status} stopped (pid {owner.pid}); resumed", "warning")
            _enqueue(_RESUME[Status(machine.status)], machine.pk)
            done.append(f"{machine.name}: {status}, resumed")
        elif machine.moving_to_id is not None:
            target = machine.moving_to.name if machine.moving_to else "?"
            Machine.objects.filter(pk=machine.pk).update(moving_to=None)
            _release_operation(machine)
            machine.log(
                "migrate",
                f"the move to {target} was interrupted (its worker stopped); {machine.hypervisor.name} keeps it"
                f" (what reached {target} is left for the sweeper)",
                "warning",
            )
            done.append(f"{machine.name}: move called off")
    for line in done:
        log.warning("recovered %s", line)
    return done
