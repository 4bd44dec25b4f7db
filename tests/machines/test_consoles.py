"""Console tokens and sessions (machines/consoles.py) and the proxy's session watcher.

The grace for a reconnect is bound to the token's reconnect secret, never to an address (behind a
reverse proxy every client is 127.0.0.1); the caps are atomic and count viewers apart; a session
follows its user's role and ends at its maximum lifetime.
"""

import socket
import threading
import time
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from machines import console_proxy, consoles
from machines.consoles import ConsoleDenied
from machines.models import ConsoleSession, ConsoleToken, Machine, Membership
from machines.states import Status
from portal.models import ApiToken
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

LOCAL = "127.0.0.1"  # what the proxy sees for every client behind a reverse proxy


@pytest.fixture
def machine(db):
    owner = UserFactory(username="console-owner")
    project = ProjectFactory(name="console-team")
    return MachineFactory(
        name="con1",
        owner=owner,
        hypervisor=HypervisorFactory(),
        project=project,
        deploy_type="network",
        status=Status.ACTIVE,
    )


def member(machine: Machine, name: str, role: str):
    user = UserFactory(username=name)
    Membership.objects.create(project=machine.project, user=user, role=role)
    return user


def spend(raw: str, machine: Machine, reconnect: str = "", kind: str = "vnc") -> ConsoleToken:
    return consoles.console_token_consume(raw=raw, machine_id=machine.pk, client=LOCAL, kind=kind, reconnect=reconnect)


def open_session(machine: Machine, user, kind: str = "vnc", pid: int = 4242) -> ConsoleSession:
    raw, _ = consoles.console_token_issue(machine=machine, user=user, kind=kind)
    return consoles.console_session_open(token=spend(raw, machine, kind=kind), client=LOCAL, proxy_pid=pid)


# --- the reconnect grace -----------------------------------------------------------------


@pytest.mark.django_db
def test_a_spent_token_reconnects_from_the_same_address_only_with_its_secret(machine, settings):
    settings.PORTAL_CONSOLE_RECONNECT_GRACE = 10
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    secret = consoles.console_reconnect_secret(raw)
    spend(raw, machine)  # the first connection needs the token only
    # Within the grace and from the same address (as every client is behind a reverse proxy): the token alone,
    # as a proxy log or a look over the shoulder would give it, is refused...
    with pytest.raises(ConsoleDenied, match="needs its reconnect secret"):
        spend(raw, machine)
    with pytest.raises(ConsoleDenied, match="wrong reconnect secret"):
        spend(raw, machine, reconnect=secret[:-1] + ("0" if secret[-1] != "0" else "1"))
    # ...and the page that received the token gets back in with its secret, from any address.
    assert spend(raw, machine, reconnect=secret).machine_id == machine.pk
    consoles.console_token_consume(raw=raw, machine_id=machine.pk, client="192.0.2.7", reconnect=secret)
    # After the grace, not even with it.
    ConsoleToken.objects.update(used_at=timezone.now() - timedelta(seconds=11))
    with pytest.raises(ConsoleDenied, match="grace is over"):
        spend(raw, machine, reconnect=secret)


@pytest.mark.django_db
def test_a_reconnect_secret_belongs_to_one_token_and_is_checked_on_first_use_too(machine):
    first, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    second, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    assert consoles.console_reconnect_secret(first) != consoles.console_reconnect_secret(second)
    assert consoles.console_reconnect_secret(first) not in (first, second)
    with pytest.raises(ConsoleDenied, match="wrong reconnect secret"):
        spend(second, machine, reconnect=consoles.console_reconnect_secret(first))
    assert ConsoleToken.objects.filter(used_at__isnull=True).count() == 2  # a refused secret spends nothing
    spend(second, machine, reconnect=consoles.console_reconnect_secret(second))
    # Nothing stored lets anyone derive it: the table holds hashes of the tokens only.
    stored = " ".join(f"{t.key_hash} {t.session_key}" for t in ConsoleToken.objects.all())
    assert consoles.console_reconnect_secret(second) not in stored and second not in stored


def test_the_secret_is_read_from_the_websocket_subprotocols():
    assert consoles.reconnect_from_protocols("binary, portal-reconnect.abc-_1") == "abc-_1"
    assert consoles.reconnect_from_protocols("portal-reconnect.xyz,binary") == "xyz"
    assert consoles.reconnect_from_protocols("binary") == ""
    assert consoles.reconnect_from_protocols("") == ""


@pytest.mark.django_db
def test_the_console_page_and_the_api_hand_out_the_reconnect_secret(machine, client):
    client.force_login(machine.owner)
    body = client.post(reverse("machines:console-token", args=[machine.pk])).json()
    assert body["reconnect"] == consoles.console_reconnect_secret(body["token"])

    _, api_key = ApiToken.issue(user=machine.owner)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {api_key}")
    url = api.post(f"/api/v1/machines/{machine.pk}/console/").json()["url"]
    fragment = dict(part.split("=", 1) for part in url.split("#", 1)[1].split("&"))
    assert fragment["m"] == str(machine.pk) and fragment["r"] == consoles.console_reconnect_secret(fragment["t"])


# --- caps ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_viewers_cannot_lock_an_operator_out(machine, settings):
    settings.PORTAL_CONSOLE_MAX_PER_MACHINE, settings.PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE = 1, 2
    viewers = [member(machine, f"viewer{i}", "viewer") for i in range(3)]
    opened = [open_session(machine, viewers[0]), open_session(machine, viewers[1])]
    assert [s.view_only for s in opened] == [True, True]
    with pytest.raises(ConsoleDenied, match="already has 2 view-only console sessions"):
        open_session(machine, viewers[2])
    operator = member(machine, "op", "operator")
    assert open_session(machine, operator).view_only is False  # the viewers' cap is full, the operators' is not
    with pytest.raises(ConsoleDenied, match="already has 1 operating console sessions"):
        open_session(machine, machine.owner)
    with pytest.raises(ConsoleDenied, match="already has 1 operating"):  # serial sessions operate
        open_session(machine, machine.owner, kind="serial")
    # Sessions of another proxy process (a dead one's leftovers) and ended ones do not count.
    assert open_session(machine, machine.owner, pid=1).pk
    consoles.console_session_close(opened[0].pk)
    assert open_session(machine, viewers[2]).view_only is True


@pytest.mark.django_db
def test_the_per_user_cap_counts_all_of_a_users_sessions(machine, settings):
    settings.PORTAL_CONSOLE_MAX_PER_USER = 2
    other = MachineFactory(
        name="con2", owner=machine.owner, hypervisor=machine.hypervisor, deploy_type="network", status=Status.ACTIVE
    )
    open_session(machine, machine.owner)
    open_session(other, machine.owner)
    with pytest.raises(ConsoleDenied, match="user .* already has 2 console sessions"):
        open_session(other, machine.owner)


def _open_at_once(tokens: list[ConsoleToken], pid: int) -> tuple[int, list[str]]:
    """Open one session per token from as many threads at the same instant; (opened, refusals)."""
    barrier = threading.Barrier(len(tokens))
    opened, refused, lock = [], [], threading.Lock()

    def one(token):
        try:
            barrier.wait()
            consoles.console_session_open(token=token, client=LOCAL, proxy_pid=pid)
            with lock:
                opened.append(token.pk)
        except ConsoleDenied as e:
            with lock:
                refused.append(str(e))
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return len(opened), refused


@pytest.mark.engines
@pytest.mark.django_db(transaction=True)
def test_simultaneous_connections_get_exactly_the_cap(machine, settings):
    """Real threads on the real database file (SQLite in WAL mode, as the proxy runs), each with its own
    connection. The insert is slowed down so that, were counting and inserting not under one lock, every
    thread would count before any inserts: the old code let all twelve in."""
    assert connection.vendor != "sqlite" or connection.settings_dict["NAME"] != ":memory:", "needs a shared database"
    settings.PORTAL_CONSOLE_MAX_PER_MACHINE, settings.PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE = 2, 3
    settings.PORTAL_CONSOLE_MAX_PER_USER = 100
    viewer = member(machine, "many-eyes", "viewer")

    def tokens(user, n):
        return [spend(consoles.console_token_issue(machine=machine, user=user)[0], machine) for _ in range(n)]

    operating, viewing = tokens(machine.owner, 12), tokens(viewer, 12)
    create = ConsoleSession.objects.create

    def slow_create(**kwargs):
        time.sleep(0.05)
        return create(**kwargs)

    with mock.patch.object(ConsoleSession.objects, "create", side_effect=slow_create):
        got, refused = _open_at_once(operating, pid=7001)
        assert got == 2 and len(refused) == 10, (got, refused)
        assert all("already has 2 operating console sessions" in r for r in refused)
        got, refused = _open_at_once(viewing, pid=7001)
        assert got == 3 and len(refused) == 9, (got, refused)
    live = ConsoleSession.objects.filter(machine=machine, proxy_pid=7001, ended__isnull=True)
    assert live.filter(view_only=False).count() == 2 and live.filter(view_only=True).count() == 3


# --- what an open session may do -------------------------------------------------------------


@pytest.mark.django_db
def test_a_lowered_role_turns_a_graphical_session_view_only_and_ends_a_serial_one(machine):
    operator = member(machine, "demoted", "operator")
    graphical, serial = open_session(machine, operator), open_session(machine, operator, kind="serial")
    assert consoles.console_session_mode(graphical.pk) == (consoles.OPERATE_NOW, "")
    assert consoles.console_session_mode(serial.pk)[0] == consoles.OPERATE_NOW
    Membership.objects.filter(user=operator).update(role="viewer")
    assert consoles.console_session_mode(graphical.pk)[0] == consoles.VIEW_NOW
    assert ConsoleSession.objects.get(pk=graphical.pk).view_only  # recorded: it now counts as a viewer's
    assert consoles.console_session_mode(serial.pk) == (consoles.END_NOW, consoles.SERIAL_NEEDS_OPERATE)
    # Raised again: the open session stays view-only (the next connection operates).
    Membership.objects.filter(user=operator).update(role="operator")
    assert consoles.console_session_mode(graphical.pk)[0] == consoles.VIEW_NOW
    # Removed from the project: ended.
    Membership.objects.filter(user=operator).delete()
    assert consoles.console_session_mode(graphical.pk) == (
        consoles.END_NOW,
        "the user no longer has access to the machine",
    )


@pytest.mark.django_db
def test_sessions_end_at_their_maximum_lifetime_and_on_logout(machine, settings, client):
    settings.PORTAL_CONSOLE_MAX_SESSION = 3600
    session = open_session(machine, machine.owner)
    ConsoleSession.objects.filter(pk=session.pk).update(started=timezone.now() - timedelta(seconds=3599))
    assert consoles.console_session_mode(session.pk)[0] == consoles.OPERATE_NOW
    ConsoleSession.objects.filter(pk=session.pk).update(started=timezone.now() - timedelta(seconds=3600))
    assert consoles.console_session_mode(session.pk) == (consoles.END_NOW, "its maximum lifetime of 3600 s is over")

    fresh = open_session(machine, machine.owner)
    client.force_login(machine.owner)
    client.post("/logout/")
    assert consoles.console_session_mode(fresh.pk) == (consoles.END_NOW, "revoked")
    assert consoles.console_session_mode(None)[0] == consoles.END_NOW


# --- the proxy's watcher ---------------------------------------------------------------------


class Filter:
    """What websockify sends through: the proxy's filter object, whose view_only another thread flips."""

    def __init__(self) -> None:
        self.view_only = False


def watch(session: ConsoleSession, target, monkeypatch):
    """Run ConsoleHandler._watch on a socket pair as the proxy does; yields (handler, the far end)."""
    monkeypatch.setattr(console_proxy, "WATCH_INTERVAL", 0.05)
    handler = console_proxy.ConsoleHandler.__new__(console_proxy.ConsoleHandler)  # no request to handle
    handler.session_id, handler.view_only, handler.filter_socket = session.pk, False, target
    near, far = socket.socketpair()
    stop = threading.Event()
    thread = threading.Thread(target=handler._watch, args=(near, stop), daemon=True)
    thread.start()
    return handler, far, stop, thread


@pytest.mark.django_db(transaction=True)
def test_the_watcher_flips_the_filter_when_the_role_is_lowered(machine, monkeypatch, caplog):
    operator = member(machine, "flipped", "operator")
    session = open_session(machine, operator)
    target = Filter()
    handler, far, stop, thread = watch(session, target, monkeypatch)
    try:
        time.sleep(0.3)
        assert target.view_only is False
        Membership.objects.filter(user=operator).update(role="viewer")
        deadline = time.monotonic() + 5
        while not target.view_only and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.view_only is True and handler.view_only is True
        assert f"console session {session.pk} now view-only" in caplog.text
        assert thread.is_alive()  # still watching (a removed role would end it)
        Membership.objects.filter(user=operator).delete()
        thread.join(5)
        assert not thread.is_alive() and far.recv(1) == b""  # the proxy's side of the VNC socket was shut
    finally:
        stop.set()
        far.close()


@pytest.mark.django_db(transaction=True)
def test_the_watcher_ends_a_session_it_cannot_filter_and_one_past_its_lifetime(machine, monkeypatch, settings):
    operator = member(machine, "unfiltered", "operator")
    session = open_session(machine, operator)
    _, far, stop, thread = watch(session, object(), monkeypatch)  # (a socket: no view_only to flip)
    Membership.objects.filter(user=operator).update(role="viewer")
    thread.join(5)
    assert not thread.is_alive() and far.recv(1) == b""
    far.close()

    settings.PORTAL_CONSOLE_MAX_SESSION = 1
    session = open_session(machine, machine.owner)
    _, far, stop, thread = watch(session, Filter(), monkeypatch)
    started = time.monotonic()
    thread.join(5)
    assert not thread.is_alive() and far.recv(1) == b"" and 0.9 < time.monotonic() - started < 3
    far.close()


def test_a_reconnect_replaces_the_tokens_earlier_session(machine):
    """The reconnect secret brings a dropped connection back; it never opens a second console beside it."""
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    first = consoles.console_session_open(token=spend(raw, machine), client="127.0.0.1", proxy_pid=1)
    assert consoles.console_session_mode(first.pk)[0] != "end"
    again = spend(raw, machine, reconnect=consoles.console_reconnect_secret(raw))
    first.refresh_from_db()
    assert first.revoked and consoles.console_session_mode(first.pk)[0] == "end"  # its watcher closes it
    second = consoles.console_session_open(token=again, client="127.0.0.1", proxy_pid=1)
    assert consoles.console_session_mode(second.pk)[0] != "end"
