from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from workflows.services import workflow_examples_register


class Command(BaseCommand):
    help = (
        "Register the example workflows shipped in workflows/examples/ for everyone, or bring them up to date."
        " Idempotent; prints what changed (-v 2: also what did not)."
    )

    def handle(self, *args, **options):
        try:
            done = workflow_examples_register()
        except ValidationError as e:
            raise CommandError("an example workflow is refused: " + "; ".join(e.messages)) from None
        for line in done:
            if options["verbosity"] > 1 or not line.endswith(": unchanged"):
                self.stdout.write(f"Example workflow {line}.")
