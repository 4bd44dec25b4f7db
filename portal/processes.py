"""Stopping the processes the portal's scripts, benchmarks and tests start: each in its own process
group, stopped by that group, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_groups(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each one's group; after `grace` seconds (or once its leader is gone), SIGKILL the group
    too, so a member that ignored SIGTERM (a child stuck before exec, say) does not outlive it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stragglers of the group, if any
        proc.wait()
