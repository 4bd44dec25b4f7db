"""SSH keys from where people keep them: a URL (`https://…/<user>.keys`) or a short name (`gh:<user>`,
`lp:<user>`), as AnsiStack's vm_keys_links and MAAS allow.

Saving a source or asking for a refresh queues a fetch; only the worker fetches, through the portal's one HTTP
client (portal/http_fetch.py: every hop's destination checked after DNS, PORTAL_IMPORT_ALLOWED_NETWORKS, a
deadline, a size cap), https only on every hop unless PORTAL_SSH_KEY_ALLOW_HTTP. Every line of the answer is
validated; invalid lines are skipped and reported, and an answer without one valid key is an error that keeps
the keys fetched before.
"""

from __future__ import annotations

import ipaddress
import ssl
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from portal import audit, http_fetch, sshkeys
from portal.audit import audited
from portal.models import AuditEvent, SshKey
from portal.refusals import Refusal

REPORTED_LINES = 3  # invalid lines named in a report; the rest are counted
FETCHES_PER_MINUTE = 10  # fetches one user may queue (sources added, refreshes): each may hold a worker thread
FAILED = "Fetching "  # how fetch_error begins for a failed fetch (else it notes the lines a good one skipped)


class KeySourceRefused(Refusal):
    """The key cannot be refreshed; the message is for the user."""


class KeyFetchFailed(Exception):
    """The fetch brought no usable keys; the message is for the user."""


def _allowed_networks() -> list:
    return http_fetch.parse_networks(settings.PORTAL_IMPORT_ALLOWED_NETWORKS)


def validate_source(text: str) -> str:
    """A source as the account form takes it, normalised: sshkeys.parse_source's rules under this portal's
    settings, and no address literal the worker would refuse (names are checked by the worker, after DNS).
    Raises sshkeys.InvalidKeySource."""
    source = sshkeys.parse_source(text, allow_http=settings.PORTAL_SSH_KEY_ALLOW_HTTP)
    host = urlsplit(sshkeys.source_url(source)).hostname or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return source
    reason = http_fetch.refusal(host, _allowed_networks())
    if reason:
        raise sshkeys.InvalidKeySource(f"Refused: {reason}.")
    return source


@transaction.atomic
def ssh_key_add(*, user, name: str, public_key: str = "", source: str = "") -> SshKey:
    """Keep a pasted key, or a source whose keys the worker fetches once this commits. The caller has validated
    the key or the source (the account form); a duplicate name raises IntegrityError."""
    if source:
        _check_rate(user)
    key = SshKey.objects.create(user=user, name=name, public_key="" if source else public_key, source=source)
    if source:
        _queue_fetch(key.pk)
    return key


@audited("ssh_key.refresh", obj_kwarg="key")
def ssh_key_refresh(*, key: SshKey) -> None:
    """Queue a new fetch of a source's keys."""
    if not key.source:
        raise KeySourceRefused(f"{key.name} is a pasted key; only keys from a URL or a short name are refreshed.")
    _check_rate(key.user)
    _queue_fetch(key.pk)


def _check_rate(user) -> None:
    """At most FETCHES_PER_MINUTE fetches queued by one user in a minute, counted from the audit trail (which
    every web process shares): a fetch may take PORTAL_SSH_KEY_TIMEOUT of a worker thread."""
    queued = AuditEvent.objects.filter(
        Q(action="ssh_key.refresh") | Q(action="ssh_key.add", detail__startswith="source="),
        user=user,
        outcome=AuditEvent.Outcome.SUCCESS,
        created__gte=timezone.now() - timedelta(minutes=1),
    ).count()
    if queued >= FETCHES_PER_MINUTE:
        raise KeySourceRefused(f"You queued {queued} key fetches in the last minute; try again in a minute.")


def _queue_fetch(key_id: int) -> None:
    from portal.tasks import ssh_key_fetch_task

    transaction.on_commit(lambda: ssh_key_fetch_task(key_id))


def tls_context() -> ssl.SSLContext:
    """The system's CAs, and PORTAL_SSH_KEY_CA_FILE's too where it is set (read at each fetch)."""
    context = ssl.create_default_context()
    if settings.PORTAL_SSH_KEY_CA_FILE:
        try:
            context.load_verify_locations(cafile=settings.PORTAL_SSH_KEY_CA_FILE)
        except (OSError, ssl.SSLError) as e:
            raise KeyFetchFailed(f"PORTAL_SSH_KEY_CA_FILE cannot be loaded: {e}") from None
    return context


def fetch_keys(source: str) -> tuple[list[str], list[str]]:
    """Fetch a source: its valid keys, normalised and without repeats, and a report of each invalid line.
    Raises http_fetch.FetchError (FetchRefused for a refused destination, size or time) or KeyFetchFailed."""
    try:
        source = sshkeys.parse_source(source, allow_http=settings.PORTAL_SSH_KEY_ALLOW_HTTP)  # the rules of now
    except sshkeys.InvalidKeySource as e:
        raise http_fetch.FetchRefused(str(e)) from None
    chunks: list[bytes] = []
    http_fetch.fetch(
        sshkeys.source_url(source),
        chunks.append,
        allowed_networks=_allowed_networks(),
        timeout_s=settings.PORTAL_SSH_KEY_TIMEOUT,
        max_bytes=settings.PORTAL_SSH_KEY_MAX_BYTES,
        schemes=("https", "http") if settings.PORTAL_SSH_KEY_ALLOW_HTTP else ("https",),
        context=tls_context(),
    )
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFetchFailed("the answer is not UTF-8 text") from None
    keys: list[str] = []
    invalid: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = sshkeys.validate_ssh_key(line)
        except sshkeys.InvalidSSHKey as e:
            invalid.append(f"line {number}: {e}")
            continue
        if key not in keys:
            keys.append(key)
    if not keys:
        if not invalid:
            raise KeyFetchFailed("the answer holds no SSH key")
        raise KeyFetchFailed(f"the answer holds no valid SSH key ({_skipped(invalid)})")
    return keys, invalid


def _skipped(invalid: list[str]) -> str:
    named = "; ".join(invalid[:REPORTED_LINES])
    more = f"; and {len(invalid) - REPORTED_LINES} more" if len(invalid) > REPORTED_LINES else ""
    lines = "line was" if len(invalid) == 1 else "lines were"
    return f"{len(invalid)} {lines} not a valid key: {named}{more}"


def ssh_key_fetch(key_id: int) -> None:
    """Worker: fetch a source's keys into the key's row (public_key, fetched; fetch_error says what went wrong,
    skipped lines included), and audit the result. A failure keeps the keys fetched before."""
    key = SshKey.objects.filter(pk=key_id).first()
    if key is None or not key.source:
        return  # removed (or pasted) since the fetch was queued
    rows = SshKey.objects.filter(pk=key.pk, source=key.source)  # not a row that changed meanwhile
    url = sshkeys.source_url(key.source)
    try:
        keys, invalid = fetch_keys(key.source)
    except (http_fetch.FetchError, KeyFetchFailed, OSError, ValueError) as e:
        held = len(key.public_key.splitlines())
        kept = f"; the {_keys(held)} fetched before kept" if held else ""
        error = f"{FAILED}{url} failed: {e}{kept}."
        rows.update(fetch_error=error[:2000])
        outcome = "refused" if isinstance(e, http_fetch.FetchRefused) else "failed"
        audit.record("ssh_key.fetch", key, outcome=outcome, detail=error)
        return
    note = f"{_skipped(invalid)} (skipped)." if invalid else ""
    rows.update(public_key="\n".join(keys), fetched=timezone.now(), fetch_error=note[:2000])
    audit.record("ssh_key.fetch", key, detail=f"{_keys(len(keys))} from {url}" + (f"; {note}" if note else ""))


def last_fetch_failed(key: SshKey) -> bool:
    """Whether fetch_error holds a failure (its keys are those from before), not a note of skipped lines."""
    return key.fetch_error.startswith(FAILED)


def _keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"
