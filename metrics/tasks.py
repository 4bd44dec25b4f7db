"""Huey entry points for metrics: the hourly rollup and retention."""

from huey import crontab
from huey.contrib.djhuey import db_periodic_task


@db_periodic_task(crontab(minute="5"))
def metrics_rollup_task() -> None:
    """Every hour, a few minutes past (the last hour's minute points are in by then): hour points, usage rows,
    retention (metrics/rollup.py)."""
    from metrics.rollup import rollup

    rollup()
