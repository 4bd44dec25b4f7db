"""Huey entry points of the portal itself: the worker's heartbeat."""

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, on_startup


@on_startup()
def worker_started() -> None:
    """Each worker thread, as it starts: the dashboard knows at once that the worker runs."""
    from portal.queue import beat

    beat()


@db_periodic_task(crontab(minute="*"))
def worker_heartbeat_task() -> None:
    from portal.queue import beat

    beat()
