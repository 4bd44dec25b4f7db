"""Huey entry points for hypervisors: thin wrappers around services."""

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task

from hypervisors.models import Hypervisor


@db_task()
def hypervisor_sync_task(hypervisor_id: int) -> str:
    from hypervisors.services import hypervisor_sync

    return hypervisor_sync(hypervisor_id)


@db_periodic_task(crontab(minute="*"))
def hypervisor_sync_all_task() -> None:
    """Every minute, schedule a sync of each hypervisor every PORTAL_SYNC_INTERVAL seconds.

    crontab's finest step is a minute; spreading the syncs over it keeps a dead
    hypervisor from looking online for longer than about half a minute.
    """
    interval = settings.PORTAL_SYNC_INTERVAL
    for pk in Hypervisor.objects.values_list("pk", flat=True):
        for delay in range(0, 60, interval):
            if delay:
                hypervisor_sync_task.schedule((pk,), delay=delay)
            else:
                hypervisor_sync_task(pk)
