"""Run every portal process in the foreground; one Ctrl-C stops them all.

Each child runs in its own process group and is stopped by that group, never by name.
If one child dies, the others are stopped too, so a half-running portal never lingers.
"""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from portal.processes import exited, stop_groups

STOP_GRACE = 10  # seconds a child gets after SIGTERM before SIGKILL


def portal_processes() -> dict[str, list[str]]:
    py = sys.executable
    manage = str(settings.BASE_DIR / "manage.py")
    bind = f"{settings.PORTAL_HOST}:{settings.PORTAL_PORT}"
    if ":" in settings.PORTAL_HOST:
        bind = f"[{settings.PORTAL_HOST}]:{settings.PORTAL_PORT}"
    return {
        "web": [
            py,
            "-m",
            "gunicorn",
            "config.wsgi",
            "--bind",
            bind,
            "--workers",
            os.getenv("PORTAL_WEB_WORKERS", "2"),
            "--threads",
            "4",
            "--access-logfile",
            "-",
            "--forwarded-allow-ips",
            os.getenv("PORTAL_FORWARDED_ALLOW_IPS", "127.0.0.1"),
        ],
        "worker": [py, manage, "run_huey", "--flush-locks"],
        "console": [py, manage, "console_proxy"],
        "bmc": [py, manage, "bmc_server"],
    }


class Command(BaseCommand):
    help = "Start the web server, the worker, the console proxy and the BMC server in the foreground until Ctrl-C."

    def handle(self, *args, **options):
        children: dict[str, subprocess.Popen] = {}
        stopping = False

        def stop(signum, _frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        for name, argv in portal_processes().items():
            children[name] = subprocess.Popen(argv, cwd=settings.BASE_DIR, start_new_session=True)
            self.stdout.write(f"started {name} (pid {children[name].pid})")
        self.stdout.write(f"Portal on http://{settings.PORTAL_HOST}:{settings.PORTAL_PORT}/ ; Ctrl-C stops it.")
        self.stdout.flush()
        failed = ""
        while not stopping:
            for name, proc in children.items():
                if exited(proc):  # not reaped: stop_groups can still signal what is left of its group
                    self.stderr.write(f"{name} exited; stopping the rest")
                    failed = failed or name
                    stopping = True
            time.sleep(0.5)
        self._stop_all(children)
        sys.exit((children[failed].returncode or 1) if failed else 0)

    def _stop_all(self, children: dict[str, subprocess.Popen]) -> None:
        stop_groups(list(children.values()), grace=STOP_GRACE)
        for name in children:
            self.stdout.write(f"stopped {name}")
