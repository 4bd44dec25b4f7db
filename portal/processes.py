"""Stopping the processes the portal's scripts, benchmarks and tests start: each in its own process
group, stopped by that group, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def exited(proc: subprocess.Popen) -> bool:
    """Whether the process ended, without reaping it: while it is an unreaped zombie its pid (and so its
    group's id) cannot be given to another process, so signalling the group stays safe."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return proc.poll() is not None


def stop_groups(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each one's group; after `grace` seconds (or once its leader is gone), SIGKILL the group
    too, so a member that ignored SIGTERM (a child stuck before exec, say) does not outlive it. A leader
    already reaped (returncode set) is left alone: its id may belong to someone else by now."""
    live = [p for p in procs if p.returncode is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        while not exited(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stragglers of the group, if any (the leader is not reaped yet)
        proc.wait()
