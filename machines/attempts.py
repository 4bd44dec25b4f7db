"""Attempts: the worker's claim on a machine while it provisions, rebuilds, grows, deletes or moves it.

Huey does not redeliver a task whose worker died, and the reconcile fails a machine busy past its deadline
while the task may still be running. So each run claims the machine with an attempt id (`Machine.attempt_id`,
set by a compare-and-swap that also holds to the hypervisor's concurrency cap) and checks, before every
provisioning step and at its end, that the id is still its own (`fence`). A fenced attempt stops; when no
newer attempt owns the machine, it removes what it made. The id names the worker process (host, pid and the
process's start time), so a worker that starts finds the attempts of dead workers on its host and resumes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class Fenced(Exception):
    """This attempt no longer owns the machine (timed out, deleted, or taken over)."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)

    def alive(self) -> bool:
        """Whether the process that made the attempt still runs (on this host; elsewhere: assumed alive)."""
        if self.host != socket.gethostname():
            return True  # another machine's worker: its own start finds it, or the deadline does
        return _start_time(self.pid) == self.started


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: count from after it.
    return stat.rsplit(")", 1)[-1].split()[19]


def new_id() -> str:
    """An id for an attempt made by this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}:{uuid.uuid4().hex[:12]}"


def owner_of(attempt_id: str) -> Owner | None:
    parts = attempt_id.split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return Owner(parts[0], int(parts[1]), parts[2])


# The check of the attempt running in this thread, which provisioning calls before each step.
_fence: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("attempt_fence", default=None)


@contextlib.contextmanager
def fenced(check: Callable[[], None]) -> Iterator[None]:
    token = _fence.set(check)
    try:
        yield
    finally:
        _fence.reset(token)


def fence() -> None:
    """Raise Fenced if the attempt running here lost the machine (no-op outside an attempt)."""
    check = _fence.get()
    if check is not None:
        check()
