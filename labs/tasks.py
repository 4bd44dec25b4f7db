"""Huey entry points for labs: thin wrappers that pass ids to services."""

import logging
import threading

from huey.contrib.djhuey import db_task, on_startup

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
