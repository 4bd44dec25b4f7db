import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from hypervisors import networks, services
from hypervisors.models import Hypervisor


class Command(BaseCommand):
    help = "First-start set-up: register the local hypervisor and create the first admin. Idempotent."

    def handle(self, *args, **options):
        self._local_hypervisor()
        self._admin()
        call_command("workflow_examples", stdout=self.stdout)

    def _local_hypervisor(self) -> None:
        if Hypervisor.objects.filter(name="local").exists():
            return
        uri = settings.PORTAL_LOCAL_HYPERVISOR_URI
        hv = services.hypervisor_create(name="local", uri=uri)
        self.stdout.write(f"Registered hypervisor 'local' ({uri}).")
        # Every user's default NIC: guests on it reach each other, DHCP and DNS, and nothing of this host.
        networks.network_create(hypervisor=hv, spec=networks.tenant_spec())
        self.stdout.write(f"Queued the tenant network {settings.PORTAL_TENANT_NETWORK} on 'local'.")

    @transaction.atomic
    def _admin(self) -> None:
        User = get_user_model()
        username = os.getenv("PORTAL_ADMIN_USER", "admin")
        password = os.getenv("PORTAL_ADMIN_PASSWORD", "")
        user = User.objects.filter(username=username).first()
        if password:
            _check(password, user if user is not None else User(username=username))
        if user is not None:
            if password and not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])
                self.stdout.write(f"Password of admin '{username}' set from PORTAL_ADMIN_PASSWORD.")
            return
        if User.objects.filter(is_superuser=True).exists() and not os.getenv("PORTAL_ADMIN_USER"):
            return
        generated = not password
        if generated:
            password = _generated(User(username=username))
        User.objects.create_superuser(username=username, email="", password=password)
        if generated:
            # Printed once: it is not stored anywhere but as a hash.
            self.stdout.write(self.style.WARNING(f"Created admin '{username}' with password: {password}"))
            self.stdout.write("Keep it now; it is not shown again. Change it under Admin > Users.")
        else:
            self.stdout.write(f"Created admin '{username}' with the password from PORTAL_ADMIN_PASSWORD.")


def _check(password: str, user) -> None:
    """PORTAL_ADMIN_PASSWORD passes AUTH_PASSWORD_VALIDATORS, like any password set in the portal, or no admin."""
    try:
        password_validation.validate_password(password, user)
    except ValidationError as e:
        raise CommandError("PORTAL_ADMIN_PASSWORD is refused: " + " ".join(e.messages)) from None


def _generated(user) -> str:
    """A random password that the validators accept (one of 16 URL-safe characters failing them is all but
    impossible, but the admin is never created with one that does)."""
    while True:
        password = secrets.token_urlsafe(12)
        try:
            password_validation.validate_password(password, user)
        except ValidationError:
            continue
        return password
