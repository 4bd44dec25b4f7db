from django.conf import settings
from django.core.management.base import BaseCommand

from machines.bmc_server import BmcManager


class Command(BaseCommand):
    help = "Serve the virtual BMCs of network-boot machines, following the database, until Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=2.0, help="seconds between database checks")

    def handle(self, *args, interval: float, **options):
        self.stdout.write(f"BMC server: ports {settings.PORTAL_BMC_PORT_RANGE} on {settings.PORTAL_BMC_ADDRESS}")
        self.stdout.flush()
        BmcManager().run(interval)
