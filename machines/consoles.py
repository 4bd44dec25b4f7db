"""Console tokens and sessions.

A token is random, stored hashed, bound to a user and a machine, short-lived and single-use; the
console proxy spends it, nothing else accepts it. With it comes a reconnect secret, which the page
keeps in memory and sends in the websocket's Sec-WebSocket-Protocol header (never in the URL, where
the token is): within PORTAL_CONSOLE_RECONNECT_GRACE seconds of the first connection a spent token
connects again only with it. The grace is bound to whoever received the token, not to an address,
since behind a reverse proxy every client is 127.0.0.1. The secret is an HMAC of the token under the
portal's secret key, so it is stored nowhere and cannot be derived from the token alone.

Sessions are capped (per machine, operating and view-only ones apart, and per user) under a lock,
and checked while they run (console_session_mode): a lowered role makes a graphical session
view-only (and ends a serial one), a lost role, a logout or a deletion ends it, and so does
PORTAL_CONSOLE_MAX_SESSION.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import pre_save
from django.dispatch import receiver
from django.utils import timezone
from django.utils.crypto import salted_hmac

from machines.access import OPERATE, can, can_use
from machines.models import ConsoleSession, ConsoleToken, Machine
from portal.audit import audited, record
from portal.models import credentials_changed
from portal.refusals import Refusal


class ConsoleDenied(Refusal):
    """Why a console connection is refused (for the proxy's log and the audit; never contains the token).
    `token`: the token row when the refusal knows it (expired, spent, another machine), for whose it was."""

    def __init__(self, message: str, *, token: ConsoleToken | None = None) -> None:
        super().__init__(message)
        self.token = token


KINDS = ("vnc", "serial")
# libvirt lends the serial port to one client: a watcher holding it would lock out the people who work on it.
SERIAL_NEEDS_OPERATE = "the serial console is for those who operate the machine; its log is on the machine page"
# The websocket subprotocol that carries the reconnect secret: "portal-reconnect.<secret>", offered after
# "binary" (the one the proxy picks). Headers stay out of URLs and access logs, where the token is.
RECONNECT_PROTOCOL = "portal-reconnect."
# What an open session may do now (console_session_mode).
OPERATE_NOW, VIEW_NOW, END_NOW = "operate", "view", "end"


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def console_reconnect_secret(raw: str) -> str:
    """The reconnect secret that goes with token `raw`: only the token's receiver gets it."""
    return salted_hmac("machines.consoles.reconnect", raw, algorithm="sha256").hexdigest()


def reconnect_from_protocols(header: str) -> str:
    """The reconnect secret offered in a Sec-WebSocket-Protocol header, or ""."""
    for offered in header.split(","):
        offered = offered.strip()
        if offered.startswith(RECONNECT_PROTOCOL):
            return offered[len(RECONNECT_PROTOCOL) :]
    return ""


@audited("console.open", obj_kwarg="machine")
@transaction.atomic
def console_token_issue(*, machine: Machine, user, session_key: str = "", kind: str = "vnc") -> tuple[str, datetime]:
    """A new token for `user` on `machine`'s graphical (`vnc`) or `serial` console; the raw value is
    returned once and never stored. Its reconnect secret is console_reconnect_secret(raw)."""
    if kind not in KINDS:
        raise ValueError(f"no console of kind {kind!r}")
    if not can_use(user, machine):
        raise ConsoleDenied("no access to this machine")
    if kind == "serial" and not can(user, machine, OPERATE):
        raise ConsoleDenied(SERIAL_NEEDS_OPERATE)
    raw = secrets.token_urlsafe(32)
    expires = timezone.now() + timedelta(seconds=settings.PORTAL_CONSOLE_TOKEN_TTL)
    ConsoleToken.objects.create(
        key_hash=_hash(raw),
        machine=machine,
        user=user,
        session_key=session_key or "",
        expires_at=expires,
        view_only=not can(user, machine, OPERATE),
        kind=kind,
    )
    # Old tokens are useless after their minute; keep the table small.
    ConsoleToken.objects.filter(expires_at__lt=timezone.now() - timedelta(hours=1)).delete()
    return raw, expires


def console_token_consume(
    *, raw: str, machine_id: int, client: str, kind: str = "vnc", reconnect: str = ""
) -> ConsoleToken:
    """Spend a token for a connection to machine_id's `kind` of console from `client`, or raise ConsoleDenied.
    A spent token connects again within the grace only with its reconnect secret (`reconnect`)."""
    now = timezone.now()
    token = ConsoleToken.objects.select_related("machine__hypervisor", "user").filter(key_hash=_hash(raw or "")).first()
    if token is None:
        raise ConsoleDenied("unknown token")
    if token.machine_id != machine_id:
        raise ConsoleDenied(f"token is for machine {token.machine_id}, not {machine_id}", token=token)
    if token.kind != kind:
        raise ConsoleDenied(f"token is for the {token.kind} console, not the {kind} one", token=token)
    if reconnect and not hmac.compare_digest(reconnect, console_reconnect_secret(raw)):
        raise ConsoleDenied("wrong reconnect secret", token=token)
    claimed = ConsoleToken.objects.filter(pk=token.pk, used_at__isnull=True, expires_at__gt=now).update(
        used_at=now, used_by=client
    )
    if not claimed:
        token.refresh_from_db()
        if token.used_at is None:
            raise ConsoleDenied("token expired unused", token=token)
        if not reconnect:
            raise ConsoleDenied("token already used (a reconnect needs its reconnect secret)", token=token)
        if now - token.used_at > timedelta(seconds=settings.PORTAL_CONSOLE_RECONNECT_GRACE):
            raise ConsoleDenied("token already used (the reconnect grace is over)", token=token)
        # A reconnect replaces the token's earlier connection: one token never holds two sessions at once.
        ConsoleSession.objects.filter(token=token, ended__isnull=True).update(revoked=True)
    if not can_use(token.user, token.machine):
        raise ConsoleDenied("the user no longer has access to the machine", token=token)
    token.view_only = token.view_only or not can(token.user, token.machine, OPERATE)  # a role lowered since
    if token.kind == "serial" and token.view_only:
        raise ConsoleDenied(SERIAL_NEEDS_OPERATE, token=token)
    return token


def console_connection_record(
    *, machine_id: int | None, token: ConsoleToken | None, client: str, kind: str, outcome: str, detail: str
) -> None:
    """The audit record of a connection to the proxy (`console.connect`): opened, refused with the reason, or
    failed. The proxy serves no Django request: the user is the token's (none for an unknown token) and the
    address the client's as the proxy sees it. Never the token itself."""
    # The machine asked for (a token for another one is refused against the one it was tried on).
    machine = token.machine if token is not None and token.machine_id == machine_id else None
    if machine is None and machine_id is not None:
        machine = Machine.objects.filter(pk=machine_id).only("pk", "name").first()
    what = "serial console" if kind == "serial" else "graphical console"
    user = token.user if token is not None else None
    record("console.connect", machine, outcome=outcome, detail=f"{what}: {detail}", user=user, address=client)


@transaction.atomic
def console_session_open(*, token: ConsoleToken, client: str, proxy_pid: int) -> ConsoleSession:
    """Record a session, refusing it over the per-machine (operating and view-only apart) or per-user cap.
    Counting and inserting happen under one lock, so simultaneous connections cannot all pass."""
    # PostgreSQL: the machine's row lock, then the user's (always in this order, so openers never deadlock),
    # held to the commit. SQLite ignores FOR UPDATE, but its transactions here are BEGIN IMMEDIATE
    # (config/settings.py): the database's write lock is taken before the count.
    list(Machine.objects.select_for_update().filter(pk=token.machine_id).values_list("pk", flat=True))
    list(get_user_model().objects.select_for_update().filter(pk=token.user_id).values_list("pk", flat=True))
    live = ConsoleSession.objects.filter(ended__isnull=True, proxy_pid=proxy_pid)
    view_only = token.view_only
    cap = settings.PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE if view_only else settings.PORTAL_CONSOLE_MAX_PER_MACHINE
    if live.filter(machine_id=token.machine_id, view_only=view_only).count() >= cap:
        what = "view-only" if view_only else "operating"
        raise ConsoleDenied(f"machine {token.machine_id} already has {cap} {what} console sessions")
    if live.filter(user_id=token.user_id).count() >= settings.PORTAL_CONSOLE_MAX_PER_USER:
        raise ConsoleDenied(f"user {token.user_id} already has {settings.PORTAL_CONSOLE_MAX_PER_USER} console sessions")
    return ConsoleSession.objects.create(
        machine_id=token.machine_id,
        user_id=token.user_id,
        token=token,
        client=client,
        proxy_pid=proxy_pid,
        kind=token.kind,
        view_only=view_only,
    )


def console_session_mode(session_id: int | None) -> tuple[str, str]:
    """What an open session may do now, and why: OPERATE_NOW, VIEW_NOW (a lowered role: recorded on the
    session, which stays view-only) or END_NOW (logout, lost access, deletion, maximum lifetime; a serial
    session also ends when its user may no longer operate)."""
    session = None
    if session_id is not None:
        session = ConsoleSession.objects.select_related("machine", "user").filter(pk=session_id).first()
    if session is None or session.revoked or session.ended is not None:
        return END_NOW, "revoked"
    if not can_use(session.user, session.machine):
        return END_NOW, "the user no longer has access to the machine"
    if timezone.now() - session.started >= timedelta(seconds=settings.PORTAL_CONSOLE_MAX_SESSION):
        return END_NOW, f"its maximum lifetime of {settings.PORTAL_CONSOLE_MAX_SESSION} s is over"
    if session.view_only:
        return VIEW_NOW, "view-only"
    if can(session.user, session.machine, OPERATE):
        return OPERATE_NOW, ""
    if session.kind == "serial":
        return END_NOW, SERIAL_NEEDS_OPERATE
    ConsoleSession.objects.filter(pk=session.pk).update(view_only=True)
    return VIEW_NOW, "the user's role no longer allows operating the machine"


def console_session_close(session_id: int | None) -> None:
    """End the session (None: none was opened, nothing to end)."""
    if session_id is not None:
        ConsoleSession.objects.filter(pk=session_id, ended__isnull=True).update(ended=timezone.now())


@receiver(user_logged_out)
def _revoke_on_logout(sender, request, user, **kwargs) -> None:
    """A logout kills the user's unused tokens and open consoles."""
    if user is None:
        return
    ConsoleToken.objects.filter(user=user).delete()
    ConsoleSession.objects.filter(user=user, ended__isnull=True).update(revoked=True)


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def _revoke_on_new_credentials(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    """A changed password or a deactivated account ends the user's consoles and kills their unused tokens,
    as a logout does: whoever held the old password must not keep a console open with it."""
    if raw or not credentials_changed(instance, update_fields):
        return
    ConsoleToken.objects.filter(user=instance).delete()
    ConsoleSession.objects.filter(user=instance, ended__isnull=True).update(revoked=True)
