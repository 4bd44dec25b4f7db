"""The worker's heartbeat: a thread of the consumer process, not a queued task, so a worker busy with
long tasks still shows it runs. And the fetch of an SSH key source (portal.keysources)."""

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections
from huey.contrib.djhuey import db_task, on_startup

log = logging.getLogger(__name__)
_started = threading.Lock()


@on_startup()
def worker_started() -> None:
    """Each worker thread, as it starts: the dashboard knows at once that the worker runs; the first one
    also starts the beat."""
    from portal.queue import beat

    if _started.acquire(blocking=False):
        start_heartbeat()  # first, so a failed beat here (the database away a moment) cannot stop the beating
    try:
        beat()
    except Exception:
        log.exception("worker heartbeat at start")


def start_heartbeat() -> None:
    threading.Thread(target=_beat_forever, name="portal-heartbeat", daemon=True).start()


def _beat_forever() -> None:
    from portal.queue import beat

    while True:
        time.sleep(settings.PORTAL_WORKER_HEARTBEAT)
        try:
            beat()
        except Exception:  # the database may be away for a moment; the next beat tries again
            log.exception("worker heartbeat")
        finally:
            close_old_connections()


@db_task()
def ssh_key_fetch_task(key_id: int) -> None:
    from portal.keysources import ssh_key_fetch

    ssh_key_fetch(key_id)
