"""Huey entry points for labs: thin wrappers that pass ids to services."""

from huey.contrib.djhuey import db_task


@db_task()
def inventory_import_apply_task(import_id: int) -> None:
    from labs.importer import inventory_import_apply_run

    inventory_import_apply_run(import_id)
