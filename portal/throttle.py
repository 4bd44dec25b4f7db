"""Throttling of failed log-ins, for the login pages (the portal's and the admin's) and the API token header.

Failed attempts are rows (FailedLogin), so every web process sees the same counts, on SQLite as on PostgreSQL.
Within the last PORTAL_LOGIN_LOCKOUT_MINUTES, PORTAL_LOGIN_MAX_FAILURES for one user name from one address lock
that pair; PORTAL_LOGIN_MAX_FAILURES_PER_USER from all addresses lock the user name (guesses spread over many
addresses); PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS lock the address (one address trying many names, or tokens). A
lock ends when the oldest failure that made it leaves the window: a sliding window, so a guesser gets that many
tries per window and no more. A locked attempt is refused before the password is looked at, and is not counted
(the lock ends on time whatever a script keeps sending). A successful log-in clears its user name's failures from
its address, so a user who mistyped is not a step nearer a lock the next time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.utils import timezone

from portal import audit


@dataclass(frozen=True)
class Lock:
    until: datetime
    reason: str  # e.g. "5 failed log-ins for alice from 10.0.0.7 in 15 minutes"

    @property
    def seconds(self) -> int:
        return max(1, math.ceil((self.until - timezone.now()).total_seconds()))

    def message(self) -> str:
        minutes = math.ceil(self.seconds / 60)
        return f"Too many failed attempts; try again in {minutes} minute{'' if minutes == 1 else 's'}."


def _window() -> timedelta:
    return timedelta(minutes=settings.PORTAL_LOGIN_LOCKOUT_MINUTES)


def _name(username: str) -> str:
    return username.strip().lower()[:150]  # "Alice" and "alice " count as the same guesses


def lock_for(*, username: str = "", address: str | None = None) -> Lock | None:
    """The lock on this user name, address or pair, if any (the one that lasts longest)."""
    from portal.models import FailedLogin

    window = _window()
    recent = FailedLogin.objects.filter(created__gte=timezone.now() - window)
    name = _name(username)
    checks = []
    if address:
        checks.append(
            (recent.filter(address=address), settings.PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS, f"from {address}")
        )
    if name:
        checks.append((recent.filter(username=name), settings.PORTAL_LOGIN_MAX_FAILURES_PER_USER, f"for {name}"))
        if address:
            pair = recent.filter(username=name, address=address)
            checks.append((pair, settings.PORTAL_LOGIN_MAX_FAILURES, f"for {name} from {address}"))
    locks = []
    for failures, limit, scope in checks:
        times = list(failures.order_by("-created").values_list("created", flat=True)[:limit])
        if len(times) >= limit:
            minutes = settings.PORTAL_LOGIN_LOCKOUT_MINUTES
            locks.append(Lock(times[-1] + window, f"{len(times)} failed log-ins {scope} in {minutes} minutes"))
    return max(locks, key=lambda lock: lock.until, default=None)


def failure_record(*, username: str = "", address: str | None = None, kind: str) -> None:
    """Count a failed attempt; when it starts a lock, the audit trail says so (`login.lockout`)."""
    from portal.models import FailedLogin

    FailedLogin.objects.filter(created__lt=timezone.now() - _window()).delete()  # nothing older counts
    FailedLogin.objects.create(username=_name(username), address=address, kind=kind)
    # An attempt that reached here was not locked out, so a lock now is the one this failure started.
    lock = lock_for(username=username, address=address)
    if lock is not None:
        detail = f"{lock.reason}: locked for {math.ceil(lock.seconds / 60)} minutes"
        audit.record("login.lockout", outcome="refused", detail=detail, username=_name(username), address=address)


def failures_clear(*, username: str, address: str | None) -> None:
    from portal.models import FailedLogin

    FailedLogin.objects.filter(username=_name(username), address=address).delete()


class LoginThrottleBackend:
    """First of AUTHENTICATION_BACKENDS: refuses a locked-out log-in before any backend checks its password.
    It authenticates nobody and has no get_user(), so sessions never name it."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None or not username:
            return None  # no address to judge by (e.g. the test client's login())
        lock = lock_for(username=username, address=audit.client_address(request))
        if lock is not None:
            request.login_lock = lock  # read by the forms below, the audit and _failed
            raise PermissionDenied(lock.message())  # authenticate() stops here and sends user_login_failed
        return None


def lock_of(request) -> Lock | None:
    """The lock that refused this request's log-in, if one did."""
    return getattr(request, "login_lock", None)


class _SaysWhenLocked:
    def get_invalid_login_error(self):
        lock = lock_of(getattr(self, "request", None))
        if lock is not None:
            return forms.ValidationError(lock.message(), code="locked_out")
        return super().get_invalid_login_error()  # type: ignore[misc]


class ThrottledAuthenticationForm(_SaysWhenLocked, AuthenticationForm):
    """The login page's form: a locked-out attempt says when to try again."""


class ThrottledAdminAuthenticationForm(_SaysWhenLocked, AdminAuthenticationForm):
    """The admin's login form, likewise."""


@receiver(user_login_failed)
def _failed(sender, credentials, request=None, **kwargs) -> None:
    if request is None or lock_of(request) is not None:
        return  # no address, or refused by a lock: not a guess that was checked
    username = str(credentials.get("username", ""))
    failure_record(username=username, address=audit.client_address(request), kind="password")


@receiver(user_logged_in)
def _succeeded(sender, request, user, **kwargs) -> None:
    if request is not None:
        failures_clear(username=user.get_username(), address=audit.client_address(request))
