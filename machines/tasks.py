"""Huey entry points for machines: thin wrappers that pass ids to services."""

import logging
import threading

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task, on_startup

log = logging.getLogger(__name__)
_recovered = threading.Lock()


@db_task()
def machine_provision_task(machine_id: int) -> None:
    from machines.services import machine_provision_run

    machine_provision_run(machine_id)


@db_task()
def machine_rebuild_task(machine_id: int) -> None:
    from machines.services import machine_rebuild_run

    machine_rebuild_run(machine_id)


@db_task()
def machine_delete_task(machine_id: int, keep_disks: bool | None = None) -> None:
    from machines.services import machine_delete_run

    machine_delete_run(machine_id, keep_disks=keep_disks)


@db_task()
def machine_adopt_task(machine_id: int) -> None:
    from machines.services import machine_adopt_run

    machine_adopt_run(machine_id)


@db_task()
def machine_grow_disk_task(machine_id: int) -> None:
    from machines.services import machine_grow_disk_run

    machine_grow_disk_run(machine_id)


@db_task()
def machine_change_task(machine_id: int, hardware: bool, new_name: str) -> None:
    from machines.services import machine_change_run

    machine_change_run(machine_id, hardware, new_name)


@db_task()
def machine_devices_task(machine_id: int, op: str, arg: dict) -> None:
    from machines.services import machine_devices_run

    machine_devices_run(machine_id, op, arg)


@db_task()
def machine_autostart_task(machine_id: int) -> None:
    from machines.services import machine_set_autostart_run

    machine_set_autostart_run(machine_id)


@db_task()
def machine_power_task(machine_id: int, action: str) -> None:
    from machines.services import machine_power_run

    machine_power_run(machine_id, action)


@db_task()
def machine_serial_log_task(machine_id: int) -> None:
    from machines.services import machine_serial_log_run

    machine_serial_log_run(machine_id)


@db_periodic_task(crontab(minute="*"))
def machines_reconcile_task() -> None:
    from machines.services import machines_reconcile

    machines_reconcile()


@db_task()
def machine_change_media_task(machine_id: int, slot: int, image_id: int | None) -> None:
    from machines.services import machine_change_media_run

    machine_change_media_run(machine_id, slot, image_id)


@db_task()
def machine_boot_cdrom_task(machine_id: int) -> None:
    from machines.services import machine_boot_cdrom_run

    machine_boot_cdrom_run(machine_id)


@db_task()
def machine_screenshot_task(machine_id: int) -> None:
    from machines.services import machine_screenshot_run

    machine_screenshot_run(machine_id)


@db_task()
def machine_boot_device_task(machine_id: int, device: str, persistent: bool) -> None:
    from machines.services import machine_set_boot_device_run

    machine_set_boot_device_run(machine_id, device, persistent)


@db_task()
def hypervisor_reconcile_task(hypervisor_id: int) -> None:
    from machines.services import hypervisor_reconcile_run

    hypervisor_reconcile_run(hypervisor_id)


@db_task()
def console_auth_upgrade_task(hypervisor_id: int) -> None:
    from machines.services import console_auth_upgrade_run

    console_auth_upgrade_run(hypervisor_id)


@db_task()
def machine_migrate_task(machine_id: int, target_id: int, restart: bool = False, live: bool = False) -> None:
    from machines.services import machine_migrate_run

    machine_migrate_run(machine_id, target_id, restart, live)


@on_startup()
def resume_dead_attempts() -> None:
    """Once per worker process, as its first thread starts: resume what a dead worker left busy."""
    if not _recovered.acquire(blocking=False):
        return
    from machines.services import machines_resume_dead_attempts

    try:
        machines_resume_dead_attempts()
    except Exception:  # the database may be away a moment: the reconcile tries again within the minute
        log.exception("resuming dead workers' attempts")


@db_periodic_task(crontab(minute="*/5"))
def hypervisors_sweep_task() -> None:
    from machines.services import hypervisors_sweep

    hypervisors_sweep()


@db_task()
def hypervisor_sweep_task(hypervisor_id: int) -> None:
    from machines.services import hypervisor_sweep_run

    hypervisor_sweep_run(hypervisor_id)


@db_task()
def hypervisor_orphans_remove_task(hypervisor_id: int, keys: list[str], actor_id: int | None = None) -> None:
    from machines.services import hypervisor_orphans_remove_run

    hypervisor_orphans_remove_run(hypervisor_id, keys, actor_id)


@db_task()
def machine_snapshot_task(snapshot_id: int) -> None:
    from machines.services import snapshot_create_run

    snapshot_create_run(snapshot_id)


@db_task()
def machine_snapshot_revert_task(snapshot_id: int) -> None:
    from machines.services import snapshot_revert_run

    snapshot_revert_run(snapshot_id)


@db_task()
def machine_snapshot_delete_task(snapshot_id: int) -> None:
    from machines.services import snapshot_delete_run

    snapshot_delete_run(snapshot_id)


@db_task()
def leases_enforce_task() -> None:
    from machines.services import leases_enforce

    leases_enforce()


@db_periodic_task(crontab(minute="*"))
def leases_check_task() -> None:
    """Leases every minute, and every PORTAL_LEASE_CHECK_INTERVAL seconds within it (crontab's finest step is a
    minute); each check does only what is due, so an extra one does nothing twice."""
    from django.conf import settings

    from machines.services import leases_enforce

    leases_enforce()
    for delay in range(settings.PORTAL_LEASE_CHECK_INTERVAL, 60, settings.PORTAL_LEASE_CHECK_INTERVAL):
        leases_enforce_task.schedule(delay=delay)


@db_task()
def machine_clone_task(source_id: int, clone_ids: list[int], linked: bool, snapshot_id: int | None = None) -> None:
    from machines.services import machine_clone_run

    machine_clone_run(source_id, clone_ids, linked, snapshot_id)


@db_task()
def machine_save_image_task(machine_id: int, image_id: int) -> None:
    from machines.services import image_from_machine_run

    image_from_machine_run(machine_id, image_id)
