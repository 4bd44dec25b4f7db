"""Every file a portal process creates in its data directory is readable by the portal's user only: a fresh
data directory, a process that migrates the database, accepts an upload and queues it for the worker (the
queue's database) and spools another, then every file and directory checked."""

import os
import stat
import subprocess
import sys

from django.conf import settings

START_UPLOAD_AND_QUEUE = """
from django.core.management import call_command
call_command("migrate", "--noinput", verbosity=0)
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from huey.contrib.djhuey import HUEY
from hypervisors import images

image = images.image_create_from_upload(
    name="modes", kind="disk", fmt="raw", uploaded=SimpleUploadedFile("disk.raw", b"\\0" * 4096)
)
assert HUEY.pending_count() == 1, HUEY.pending_count()  # the validation task sits in the queue's database
spool = TemporaryFileUploadHandler()  # what a large upload is streamed to
spool.new_file("file", "disk.raw", "application/octet-stream", 10)
spool.receive_data_chunk(b"x" * 10, 0)
import os
print(image.file_name, oct(os.stat(spool.file.temporary_file_path()).st_mode))  # removed when the process ends
"""


def _run(env: dict, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_each_file_a_run_creates_is_the_portals_users_only(tmp_path):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORTAL_REDIS_URL", "PORTAL_SECRET_KEY")}
    env |= {"PORTAL_DATA_DIR": str(data), "PORTAL_HUEY_IMMEDIATE": "False"}
    env.pop("PYTEST_VERSION", None)  # as a deployment runs: no test settings
    before = os.umask(0o022)  # the usual umask of whoever starts the portal; the portal must not depend on it
    try:
        image_file, spooled_mode = _run(env, "shell", "-c", START_UPLOAD_AND_QUEUE).splitlines()[-1].split()
    finally:
        os.umask(before)
    made = [data, *data.rglob("*")]
    names = {p.relative_to(data).as_posix() for p in made if p != data}
    for expected in ("secret_key", "portal.sqlite3", "huey.sqlite3", f"images/{image_file}", "uploads"):
        assert expected in names, sorted(names)[:20]
    assert int(spooled_mode, 8) & 0o077 == 0, spooled_mode
    open_to_others = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in made if p.stat().st_mode & 0o077]
    assert open_to_others == [], open_to_others[:10]
