"""Huey entry points for workflow runs: thin wrappers that pass ids to services. A run holds its worker thread
for as long as ansible-playbook runs; any worker of any process may take it (embedded queue or Redis)."""

import logging
import threading

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task, on_startup

log = logging.getLogger(__name__)
_recovered = threading.Lock()


@db_task()
def workflow_run_task(run_id: int) -> None:
    from workflows.services import workflow_run_execute

    workflow_run_execute(run_id)


@on_startup()
def end_dead_workers_runs() -> None:
    """Once per worker process, as its first thread starts: runs a dead worker left running end as error."""
    if not _recovered.acquire(blocking=False):
        return
    from workflows.services import workflow_runs_recover

    try:
        workflow_runs_recover()
    except Exception:  # the database may be away a moment; the run stays running until the next start
        log.exception("ending dead workers' workflow runs")


@db_periodic_task(crontab(minute="*/5"))
def workflow_runs_expire_task() -> None:
    """Runs whose worker was lost elsewhere (long past their deadline) end as error."""
    from workflows.services import workflow_runs_expire

    workflow_runs_expire()
