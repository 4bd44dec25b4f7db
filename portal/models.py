import hashlib
import secrets
from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models.signals import pre_save
from django.dispatch import receiver
from django.utils import timezone

TOKEN_PREFIX_LEN = 8


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A personal API token. Only its hash is stored; the raw key is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=TOKEN_PREFIX_LEN, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
    # Chosen at creation: when the token stops working (empty: never), and whether it may only read.
    expires_at = models.DateTimeField(null=True, blank=True)
    read_only = models.BooleanField(default=False, help_text="Only GET, HEAD and OPTIONS requests.")

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.user} {self.prefix}… {self.name}".strip()

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @classmethod
    def issue(
        cls, *, user, name: str = "", expires_at: datetime | None = None, read_only: bool = False
    ) -> tuple["ApiToken", str]:
        """Create a token; return it with the raw key, which is never stored."""
        raw = secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user,
            name=name,
            prefix=raw[:TOKEN_PREFIX_LEN],
            key_hash=hash_token(raw),
            expires_at=expires_at,
            read_only=read_only,
        )
        return token, raw


def credentials_changed(user, update_fields=None) -> bool:
    """Whether a User about to be saved has a new password or is being deactivated (for pre_save receivers).
    A save of other fields only (a log-in writes last_login) costs no query."""
    if user.pk is None or (update_fields is not None and not {"password", "is_active"} & set(update_fields)):
        return False
    before = type(user).objects.filter(pk=user.pk).values("password", "is_active").first()
    return before is not None and (before["password"] != user.password or (before["is_active"] and not user.is_active))


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def _revoke_api_tokens_on_new_credentials(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    """A changed password or a deactivated account revokes the user's API tokens: they were issued to
    whoever knew the old password."""
    if not raw and credentials_changed(instance, update_fields):
        ApiToken.objects.filter(user=instance).delete()


class FailedLogin(models.Model):
    """A failed log-in or unknown API token, kept while it counts towards a lock (portal/throttle.py)."""

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    username = models.CharField(max_length=150, blank=True)  # as typed, lower case; empty for a token
    address = models.GenericIPAddressField(null=True, blank=True)
    kind = models.CharField(max_length=8, choices=[("password", "password"), ("token", "API token")])

    class Meta:
        indexes = [
            models.Index(fields=["username", "address", "created"], name="failedlogin_pair"),
            models.Index(fields=["address", "created"], name="failedlogin_address"),
        ]

    def __str__(self) -> str:
        return f"{self.created:%Y-%m-%d %H:%M:%S} {self.kind} {self.username or '-'} from {self.address}"


class AuditRowImmutable(Exception):
    """An audit row was to be changed or deleted: the trail is append-only, for code as for people."""


class AuditEventQuerySet(models.QuerySet):
    """Bulk changes refused like a row's own: no update(), no delete() through the model's manager. (A user's
    deletion still empties `user` on their rows: Django does that through the base manager, and `username`
    keeps the name.)"""

    def update(self, **kwargs):
        raise AuditRowImmutable("audit rows cannot be changed")

    def delete(self):
        raise AuditRowImmutable("audit rows cannot be deleted")


class AuditEvent(models.Model):
    """Append-only: every change, login and reveal, with who, from where and the outcome. A row is written
    once: saving it again or deleting it raises AuditRowImmutable."""

    class Outcome(models.TextChoices):
        SUCCESS = "success", "Success"
        REFUSED = "refused", "Refused"
        FAILED = "failed", "Failed"

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    username = models.CharField(max_length=150, blank=True)  # kept when the user is deleted
    address = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=40, db_index=True)
    object_type = models.CharField(max_length=60, blank=True, db_index=True)
    object_id = models.CharField(max_length=40, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.SUCCESS)
    detail = models.TextField(blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self) -> str:
        return (
            f"{self.created:%Y-%m-%d %H:%M:%S} {self.username or '-'} {self.action} {self.object_repr} {self.outcome}"
        )

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise AuditRowImmutable("audit rows cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditRowImmutable("audit rows cannot be deleted")


class SshKey(models.Model):
    """A public key kept in a user's profile and offered on every new machine."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys")
    name = models.CharField(max_length=100)
    public_key = models.TextField(blank=True)  # one key, or for a `source`, every key it last gave (one per line)
    # Where the keys are fetched from, as AnsiStack's vm_keys_links and MAAS allow: an https URL
    # (`https://github.com/<user>.keys`) or a short name (`gh:<user>`, `lp:<user>`). Empty: a pasted key.
    source = models.CharField(max_length=300, blank=True)
    fetched = models.DateTimeField(null=True, blank=True, editable=False)
    fetch_error = models.TextField(blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="ssh_key_name_unique_per_user")]

    def __str__(self) -> str:
        return f"{self.name} ({self.user})"


class Heartbeat(models.Model):
    """When a background process (the Huey worker) last showed it runs."""

    name = models.CharField(max_length=40, unique=True)
    seen = models.DateTimeField()
    detail = models.CharField(max_length=200, blank=True)  # e.g. the host and pid

    def __str__(self) -> str:
        return f"{self.name} seen {self.seen:%Y-%m-%d %H:%M:%S}"
