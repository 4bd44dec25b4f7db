import os
import subprocess
import sys
import time

from portal.processes import stop_groups


def test_a_group_member_that_ignores_sigterm_does_not_outlive_its_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The leader exits on SIGTERM; its child ignores it, like a child stuck between fork and exec.
    script = (
        f"import os, signal, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        f"time.sleep(600)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    time.sleep(0.3)  # the child has set its handler
    started = time.monotonic()
    stop_groups([leader], grace=5)
    assert leader.returncode is not None and time.monotonic() - started < 5  # the leader went at once
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the child outlived its group"
        time.sleep(0.05)
