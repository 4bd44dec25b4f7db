"""Huey entry points for labs: thin wrappers that pass ids to services."""

import logging
import threading

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task, on_startup

log = logging.getLogger(__name__)
_recovered = threading.Lock()


@db_task()
def inventory_import_apply_task(import_id: int) -> None:
    from labs.importer import inventory_import_apply_run

    inventory_import_apply_run(import_id)


@on_startup()
def resume_dead_imports() -> None:
    """Once per worker process, as its first thread starts: resume the imports a dead worker was applying."""
    if not _recovered.acquire(blocking=False):
        return
    from labs.importer import inventory_imports_resume_dead

    try:
        inventory_imports_resume_dead()
    except Exception:  # the database may be away a moment; the import stays applying, said on its page
        log.exception("resuming dead workers' imports")


@db_task()
def schedules_check_task() -> None:
    from labs.schedules import schedules_run

    schedules_run()


@db_periodic_task(crontab(minute="*"))
def schedules_run_task() -> None:
    """Scheduled actions (labs/schedules.py): what is due this minute, or was missed while no worker ran. Huey
    looks at its periodic tasks once a minute at the second its consumer started, so this also asks for a check
    one second into the next minute: a schedule runs at its minute, not up to a minute late (each set time runs
    once, however many checks see it)."""
    import time

    from labs.schedules import schedules_run

    schedules_run()
    schedules_check_task.schedule(delay=61 - time.time() % 60)
