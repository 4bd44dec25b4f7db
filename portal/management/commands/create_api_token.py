from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from portal.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it (and nothing else)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="created by manage.py")
        parser.add_argument(
            "--expires-days", type=int, default=None, help="days until it stops working (default: never)"
        )
        parser.add_argument("--read-only", action="store_true", help="GET, HEAD and OPTIONS only")

    def handle(self, *args, username: str, name: str, expires_days: int | None, read_only: bool, **options):
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user named {username!r}") from None
        if expires_days is not None and expires_days < 1:
            raise CommandError("--expires-days is at least 1")
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        _, raw = ApiToken.issue(user=user, name=name, expires_at=expires_at, read_only=read_only)
        self.stdout.write(raw)
