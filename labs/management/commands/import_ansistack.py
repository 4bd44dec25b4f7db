from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from labs import ansistack, importer
from labs.models import InventoryImport
from machines.models import Project
from portal.refusals import Refusal


class Command(BaseCommand):
    help = (
        "Import AnsiStack inventory files (inventory-phys.yaml, inventory-vms.yaml, ...): print the plan, and "
        "unless --dry-run apply it (register hypervisors, define networks, import images, create or adopt "
        "machines into a lab). A second run changes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="+", help="AnsiStack inventory files (YAML)")
        parser.add_argument("--vars", help="a vars file with vm_image_data (AnsiStack's infrastructure/vars/main.yml)")
        parser.add_argument("--owner", required=True, help="the user the machines belong to")
        parser.add_argument("--project", default="", help="the project the machines land in")
        parser.add_argument("--lab", default="", help="the lab's name (default: the machines' inventory file's)")
        parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")

    def handle(self, *args, **options):
        owner = get_user_model().objects.filter(username=options["owner"]).first()
        if owner is None:
            raise CommandError(f"No user {options['owner']}.")
        project = None
        if options["project"]:
            project = Project.objects.filter(name=options["project"]).first()
            if project is None:
                raise CommandError(f"No project {options['project']}.")
        files = [self._read(p) for p in options["files"]]
        vars_file = self._read(options["vars"]) if options["vars"] else None
        if options["dry_run"]:
            plan = ansistack.plan_inventory(
                files, vars_file=vars_file, owner=owner, lab=options["lab"], project=project
            )
            self._lines(ansistack.report_lines(plan.as_dict()))
            self.stdout.write(f"dry run: {ansistack.count_steps(plan.as_dict())} steps planned, nothing changed")
            return
        try:
            imp = importer.inventory_import_create(
                actor=owner, files=files, vars_file=vars_file, owner=owner, project=project, lab_name=options["lab"]
            )
        except (ValidationError, Refusal) as e:
            raise CommandError("; ".join(getattr(e, "messages", None) or [str(e)])) from None
        self._lines(ansistack.report_lines(imp.plan))
        self.stdout.write("applying:")
        # This process is no web request: it applies the plan itself rather than waiting for a worker.
        InventoryImport.objects.filter(pk=imp.pk).update(status=InventoryImport.Status.APPLYING)
        importer.inventory_import_apply_run(imp.pk)
        imp.refresh_from_db()
        self._lines(imp.report)
        self.stdout.write(f"import {imp.pk}: {imp.get_status_display().lower()}, {imp.done_steps} steps")

    def _read(self, path: str) -> dict:
        try:
            return {"name": Path(path).name, "text": Path(path).read_text()}
        except (OSError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read {path}: {e}") from None

    def _lines(self, lines: list[str]) -> None:
        for line in lines:
            self.stdout.write(line)
