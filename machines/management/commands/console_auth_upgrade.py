from django.core.management.base import BaseCommand

from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine


class Command(BaseCommand):
    help = (
        "Give every machine's VNC server a password (machines defined before the portal set them): queued "
        "for the worker, written to each domain's config; running machines get it at their next cold start."
    )

    def add_arguments(self, parser):
        parser.add_argument("--now", action="store_true", help="do it in this process and report, instead of queueing")

    def handle(self, *args, now: bool, **options):
        if not now:
            hypervisors = services.console_auth_upgrade()
            self.stdout.write(
                f"Queued for the machines of {len(hypervisors)} hypervisor(s): "
                f"{', '.join(h.name for h in hypervisors) or 'none'}."
            )
        else:
            for hv in Hypervisor.objects.filter(machines__isnull=False).distinct():
                c = services.console_auth_upgrade_run(hv.pk)
                self.stdout.write(
                    f"{hv.name}: password added to {c['added']}, already there on {c['had']}, "
                    f"{c['missing']} without a domain."
                )
        running = Machine.objects.filter(observed__console_unprotected=True).count()
        self.stdout.write(
            "Machines that run now keep a VNC server without a password until their next cold start "
            "(shut down, then start; a reboot from inside is not enough)"
            + (f": {running} as last seen by the reconcile." if now or running else ".")
        )
