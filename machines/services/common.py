"""What every machine service shares: the refusal they raise, queueing a task once the request commits,
and the one-operation-at-a-time claim on a machine."""

from __future__ import annotations

from collections.abc import Callable

from django.db import transaction
from django.utils import timezone

from machines.models import Machine
from machines.policy import RULES, statuses_text
from portal.refusals import Refusal


class MachineError(Refusal):
    """The request cannot be done now; the message is for the user."""


def _enqueue(task: Callable, *args) -> None:
    """Queue the task once the transaction that asked for it commits (a rolled-back request queues nothing)."""
    transaction.on_commit(lambda: task(*args))


def _claim_operation(machine: Machine, operation: str, action: str = "") -> None:
    """One operation at a time per machine: claim it or raise. `action` names its rule in machines.policy
    (left out: the operation's name is the action's)."""
    action = action or operation
    if machine.status not in RULES[action].statuses:
        raise MachineError(
            f"{machine.name} is {machine.get_status_display().lower()}; this needs it {statuses_text(action)}."
        )
    n = Machine.objects.filter(pk=machine.pk, operation="", status__in=RULES[action].statuses).update(
        operation=operation, operation_started=timezone.now()
    )
    if n != 1:
        raise MachineError(f"{machine.name} is busy with another operation; try again when it is done.")
    machine.operation = operation


def _release_operation(machine: Machine) -> None:
    """The other half of _claim_operation: the machine takes the next operation."""
    Machine.objects.filter(pk=machine.pk).update(operation="", operation_started=None)
