"""`manage.py serve`, as `make run` starts it: every process in its own group; one that dies stops
the rest, and nothing outlives serve."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from django.conf import settings

from portal.processes import stop_groups

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_one_dead_process_stops_them_all_and_nothing_is_left(tmp_path):
    data = tmp_path / "data"
    env = {
        **os.environ,
        "PORTAL_DATA_DIR": str(data),
        "PORTAL_PORT": str(free_port()),
        "PORTAL_CONSOLE_PORT": str(free_port()),
        "PORTAL_BMC_PORT_RANGE": "17390-17399",
        "PORTAL_WEB_WORKERS": "1",
    }
    env.pop("PYTEST_VERSION", None)  # a real data directory, not the tests' one
    manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True, timeout=120)
    serve = subprocess.Popen(
        [*manage, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        pids, lines = {}, []
        deadline = time.monotonic() + 60
        while len(pids) < 4:
            line = serve.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
            if m := re.match(r"started (\w+) \(pid (\d+)\)", line):
                pids[m[1]] = int(m[2])
        # The web server answers, then the console proxy dies: serve stops the others and exits non-zero.
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(env["PORTAL_PORT"])), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the web server never listened"
                time.sleep(0.2)
        gunicorn_workers = [
            int(p)
            for p in subprocess.run(["pgrep", "-g", str(pids["web"])], capture_output=True, text=True).stdout.split()
        ]
        os.kill(pids["console"], signal.SIGKILL)
        assert serve.wait(timeout=30) != 0
        rest = serve.stdout.read()
        assert "console exited; stopping the rest" in rest and "stopped web" in rest, rest
        leftovers = [p for p in [*pids.values(), *gunicorn_workers] if alive(p)]
        assert not leftovers, leftovers
    finally:
        stop_groups([serve], grace=5)
