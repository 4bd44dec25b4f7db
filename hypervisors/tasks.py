"""Huey entry points for hypervisors: thin wrappers around services."""

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task

from hypervisors.models import Hypervisor


@db_task()
def hypervisor_sync_task(hypervisor_id: int) -> str:
    from hypervisors.services import hypervisor_sync

    return hypervisor_sync(hypervisor_id)


def hypervisor_sync_over_the_minute(hypervisor_id: int) -> None:
    """Sync now and every PORTAL_SYNC_INTERVAL seconds until the next periodic run takes over.

    crontab's finest step is a minute; spreading syncs over it keeps a dead
    hypervisor from looking online for longer than about half a minute.
    """
    hypervisor_sync_task(hypervisor_id)
    for delay in range(settings.PORTAL_SYNC_INTERVAL, 60, settings.PORTAL_SYNC_INTERVAL):
        hypervisor_sync_task.schedule((hypervisor_id,), delay=delay)


@db_periodic_task(crontab(minute="*"))
def hypervisor_sync_all_task() -> None:
    for pk in Hypervisor.objects.values_list("pk", flat=True):
        hypervisor_sync_over_the_minute(pk)


@db_task()
def image_validate_task(image_id: int) -> None:
    from hypervisors.images import image_validate

    image_validate(image_id)


@db_task()
def image_import_task(image_id: int) -> None:
    from hypervisors.images import image_import

    image_import(image_id)


@db_task()
def image_register_task(image_id: int) -> None:
    from hypervisors.images import image_fetch_volume

    image_fetch_volume(image_id)


@db_task()
def network_create_task(hypervisor_id: int, spec: dict) -> str:
    from hypervisors.networks import network_create_run

    return network_create_run(hypervisor_id, spec)


@db_task()
def network_delete_task(hypervisor_id: int, name: str) -> None:
    from hypervisors.networks import network_delete_run

    network_delete_run(hypervisor_id, name)
