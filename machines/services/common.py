"""What every machine service shares: the refusal they raise, queueing a task once the request commits,
and the one-operation-at-a-time claim on a machine."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.db.models.lookups import LessThan
from django.utils import timezone
from huey.exceptions import RetryTask

from hypervisors.models import Hypervisor
from machines import attempts
from machines.models import Machine
from machines.policy import RULES, statuses_text
from machines.states import Status
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


def _claim_attempt(machine: Machine, statuses) -> bool:
    """Claim the machine for this worker run (machines.attempts): it must be in `statuses`, and its hypervisor
    must have fewer than PORTAL_HYPERVISOR_CONCURRENCY attempts running (one UPDATE decides both, so concurrent
    workers cannot pass the cap together; the hypervisor's row lock serialises them on PostgreSQL). False: the
    machine is not in those statuses (a stale delivery). At the cap: RetryTask, a moment later."""
    attempt = attempts.new_id()
    running = (
        Machine.objects.filter(hypervisor_id=OuterRef("hypervisor_id"))
        .exclude(attempt_id="")
        .exclude(pk=OuterRef("pk"))
        .order_by()
        .values("hypervisor_id")
        .annotate(n=Count("pk"))
        .values("n")
    )
    with transaction.atomic():
        Hypervisor.objects.select_for_update().filter(pk=machine.hypervisor_id).first()
        claimed = (
            Machine.objects.filter(pk=machine.pk, status__in=statuses)
            .filter(
                LessThan(
                    Coalesce(Subquery(running, output_field=IntegerField()), 0), settings.PORTAL_HYPERVISOR_CONCURRENCY
                )
            )
            .update(attempt_id=attempt)
        )
    if claimed:
        machine.attempt_id = attempt
        return True
    if not Machine.objects.filter(pk=machine.pk, status__in=statuses).exists():
        return False
    raise RetryTask(delay=2)  # the hypervisor runs as many operations as it may: wait for a slot


def _release_attempt(machine: Machine) -> None:
    Machine.objects.filter(pk=machine.pk, attempt_id=machine.attempt_id).exclude(attempt_id="").update(attempt_id="")


def _attempt_fence(machine: Machine) -> Callable[[], None]:
    """The check provisioning makes before each step: the attempt still owns the machine."""

    def check() -> None:
        if not Machine.objects.filter(pk=machine.pk, attempt_id=machine.attempt_id).exists():
            raise attempts.Fenced(f"machine {machine.pk}: attempt {machine.attempt_id} no longer owns it")

    return check


def _owned_by_newer(machine: Machine) -> bool:
    """After a fenced attempt: whether someone else now owns the machine (another attempt runs, or one finished
    and made it active), so what is on the hypervisor is theirs and must stay. A machine deleted, failed, or
    waiting for an attempt not begun yet (which makes everything again) is nobody's."""
    current = Machine.objects.filter(pk=machine.pk).values("status", "attempt_id").first()
    if current is None:
        return False
    return bool(current["attempt_id"]) or current["status"] == Status.ACTIVE
