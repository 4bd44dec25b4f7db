import re

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from portal import audit, throttle
from portal.models import TOKEN_PREFIX_LEN, ApiToken, hash_token


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>` against hashed ApiToken rows. An expired token is refused; a read-only one
    may only read, whatever the view (the check is here, so no viewset can forget it)."""

    def authenticate(self, request):
        self.address = audit.client_address(request)
        result = super().authenticate(request)
        if result is not None and result[1].read_only and request.method not in permissions.SAFE_METHODS:
            user, token = result
            detail = f"read-only token: {request.method} {request.path}"
            audit.record("login.token", token, outcome="refused", detail=detail, user=user)
            raise exceptions.PermissionDenied(
                f"This token is read-only: it may use GET, HEAD and OPTIONS, not {request.method}."
            )
        return result

    def authenticate_credentials(self, key: str):
        address = getattr(self, "address", None)
        lock = throttle.lock_for(address=address)
        if lock is not None:  # refused before the key is looked up: a locked address learns nothing more
            audit.record("login.token", outcome="refused", detail=f"locked out: {lock.reason}")
            raise LockedOut(lock)
        try:
            token = ApiToken.objects.select_related("user").get(key_hash=hash_token(key))
        except ApiToken.DoesNotExist:
            audit.record("login.token", outcome="refused", detail=_unknown(key))
            # Only a key that matches no token counts towards a lock: an expired or revoked one was not guessed,
            # and a forgotten cron job using one must not lock its whole address out.
            throttle.failure_record(address=address, kind="token")
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        if not token.user.is_active:
            audit.record("login.token", token, outcome="refused", detail="user inactive", username=token.user.username)
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        if token.expired:
            audit.record("login.token", token, outcome="refused", detail="token expired", username=token.user.username)
            raise exceptions.AuthenticationFailed("Token expired.")
        ApiToken.objects.filter(pk=token.pk).update(last_used=timezone.now())
        return token.user, token


class LockedOut(exceptions.Throttled):
    """429, with Retry-After, and the same words as the login page."""

    def __init__(self, lock: throttle.Lock) -> None:
        exceptions.APIException.__init__(self, lock.message(), "locked_out")
        self.wait = lock.seconds


def _unknown(key: str) -> str:
    """What the audit keeps of a key that matched no token: its prefix, as token lists show it, when it has a
    token's shape (never more of it); of anything else (a password pasted by mistake) only its length."""
    if re.fullmatch(r"[A-Za-z0-9_-]{43}", key):
        return f"unknown token {key[:TOKEN_PREFIX_LEN]}…"
    return f"not a portal token ({len(key)} characters)"
