import os
import signal

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from machines.console_proxy import ConsoleProxyServer
from machines.models import ConsoleSession


class Command(BaseCommand):
    help = "Run the console proxy (websockify with single-use portal tokens) in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.PORTAL_CONSOLE_HOST)
        parser.add_argument("--port", type=int, default=settings.PORTAL_CONSOLE_PORT)

    def handle(self, *args, host: str, port: int, **options):
        # Sessions of an earlier proxy process ended with it.
        ConsoleSession.objects.filter(ended__isnull=True).exclude(proxy_pid=os.getpid()).update(ended=timezone.now())
        server = ConsoleProxyServer(host, port)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        self.stdout.write(
            f"Console proxy on {host}:{port}; origins allowed: {', '.join(settings.PORTAL_CONSOLE_ALLOWED_ORIGINS)}"
        )
        self.stdout.flush()
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
