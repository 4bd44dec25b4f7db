import re

from django.utils import timezone
from rest_framework import authentication, exceptions

from portal import audit
from portal.models import TOKEN_PREFIX_LEN, ApiToken, hash_token


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>` against hashed ApiToken rows."""

    def authenticate_credentials(self, key: str):
        try:
            token = ApiToken.objects.select_related("user").get(key_hash=hash_token(key))
        except ApiToken.DoesNotExist:
            audit.record("login.token", outcome="refused", detail=_unknown(key))
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        if not token.user.is_active:
            audit.record("login.token", token, outcome="refused", detail="user inactive", username=token.user.username)
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        ApiToken.objects.filter(pk=token.pk).update(last_used=timezone.now())
        return token.user, token


def _unknown(key: str) -> str:
    """What the audit keeps of a key that matched no token: its prefix, as token lists show it, when it has a
    token's shape (never more of it); of anything else (a password pasted by mistake) only its length."""
    if re.fullmatch(r"[A-Za-z0-9_-]{43}", key):
        return f"unknown token {key[:TOKEN_PREFIX_LEN]}…"
    return f"not a portal token ({len(key)} characters)"
