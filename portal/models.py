import hashlib
import secrets

from django.conf import settings
from django.db import models

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

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.user} {self.prefix}… {self.name}".strip()

    @classmethod
    def issue(cls, *, user, name: str = "") -> tuple["ApiToken", str]:
        """Create a token; return it with the raw key, which is never stored."""
        raw = secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=raw[:TOKEN_PREFIX_LEN], key_hash=hash_token(raw))
        return token, raw
