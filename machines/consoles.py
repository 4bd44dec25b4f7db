"""Console tokens: random, stored hashed, bound to a user and a machine, short-lived, single-use.

The console proxy consumes them; nothing else accepts them. A reconnect from the
same address within a few seconds is allowed, since noVNC reconnects after a
resize or a network blip.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from machines.access import OPERATE, can, can_use
from machines.models import ConsoleSession, ConsoleToken, Machine
from portal.audit import audited


class ConsoleDenied(Exception):
    """Why a console connection is refused (for the proxy's log; never contains the token)."""


KINDS = ("vnc", "serial")
# libvirt lends the serial port to one client: a watcher holding it would lock out the people who work on it.
SERIAL_NEEDS_OPERATE = "the serial console is for those who operate the machine; its log is on the machine page"


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@audited("console.open", obj_kwarg="machine")
@transaction.atomic
def console_token_issue(*, machine: Machine, user, session_key: str = "", kind: str = "vnc") -> tuple[str, datetime]:
    """A new token for `user` on `machine`'s graphical (`vnc`) or `serial` console; the raw value is
    returned once and never stored."""
    if kind not in KINDS:
        raise ValueError(f"no console of kind {kind!r}")
    if not can_use(user, machine):
        raise ConsoleDenied("no access to this machine")
    if kind == "serial" and not can(user, machine, OPERATE):
        raise ConsoleDenied(SERIAL_NEEDS_OPERATE)
    raw = secrets.token_urlsafe(32)
    expires = timezone.now() + timedelta(seconds=settings.PORTAL_CONSOLE_TOKEN_TTL)
    ConsoleToken.objects.create(key_hash=_hash(raw), machine=machine, user=user, session_key=session_key or "",
                                expires_at=expires, view_only=not can(user, machine, OPERATE), kind=kind)  # fmt: skip
    # Old tokens are useless after their minute; keep the table small.
    ConsoleToken.objects.filter(expires_at__lt=timezone.now() - timedelta(hours=1)).delete()
    return raw, expires


def console_token_consume(*, raw: str, machine_id: int, client: str, kind: str = "vnc") -> ConsoleToken:
    """Spend a token for a connection to machine_id's `kind` of console from `client`, or raise ConsoleDenied."""
    now = timezone.now()
    token = ConsoleToken.objects.select_related("machine", "user").filter(key_hash=_hash(raw or "")).first()
    if token is None:
        raise ConsoleDenied("unknown token")
    if token.machine_id != machine_id:
        raise ConsoleDenied(f"token is for machine {token.machine_id}, not {machine_id}")
    if token.kind != kind:
        raise ConsoleDenied(f"token is for the {token.kind} console, not the {kind} one")
    claimed = ConsoleToken.objects.filter(pk=token.pk, used_at__isnull=True, expires_at__gt=now).update(
        used_at=now, used_by=client)
    if not claimed:
        token.refresh_from_db()
        if token.used_at is None:
            raise ConsoleDenied("token expired unused")
        grace = timedelta(seconds=settings.PORTAL_CONSOLE_RECONNECT_GRACE)
        if token.used_by != client or now - token.used_at > grace:
            raise ConsoleDenied("token already used")
    if not can_use(token.user, token.machine):
        raise ConsoleDenied("the user no longer has access to the machine")
    token.view_only = token.view_only or not can(token.user, token.machine, OPERATE)  # a role lowered since
    if token.kind == "serial" and token.view_only:
        raise ConsoleDenied(SERIAL_NEEDS_OPERATE)
    return token


def console_session_open(*, token: ConsoleToken, client: str, proxy_pid: int) -> ConsoleSession:
    """Record a session, refusing it over the per-machine or per-user cap."""
    live = ConsoleSession.objects.filter(ended__isnull=True, proxy_pid=proxy_pid)
    if live.filter(machine_id=token.machine_id).count() >= settings.PORTAL_CONSOLE_MAX_PER_MACHINE:
        raise ConsoleDenied(f"machine {token.machine_id} already has {settings.PORTAL_CONSOLE_MAX_PER_MACHINE} console sessions")
    if live.filter(user_id=token.user_id).count() >= settings.PORTAL_CONSOLE_MAX_PER_USER:
        raise ConsoleDenied(f"user {token.user_id} already has {settings.PORTAL_CONSOLE_MAX_PER_USER} console sessions")
    return ConsoleSession.objects.create(machine_id=token.machine_id, user_id=token.user_id, token=token, client=client,
                                         proxy_pid=proxy_pid)  # fmt: skip


def console_session_still_allowed(session_id: int) -> bool:
    """Checked while a session runs: ends it on logout, deletion or a change of owner."""
    session = ConsoleSession.objects.select_related("machine", "user").filter(pk=session_id).first()
    return session is not None and not session.revoked and can_use(session.user, session.machine)


def console_session_close(session_id: int) -> None:
    ConsoleSession.objects.filter(pk=session_id, ended__isnull=True).update(ended=timezone.now())


@receiver(user_logged_out)
def _revoke_on_logout(sender, request, user, **kwargs) -> None:
    """A logout kills the user's unused tokens and open consoles."""
    if user is None:
        return
    ConsoleToken.objects.filter(user=user).delete()
    ConsoleSession.objects.filter(user=user, ended__isnull=True).update(revoked=True)
