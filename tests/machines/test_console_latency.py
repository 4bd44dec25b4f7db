"""Console latency (issue 18) without giving anything up: the token issued with the console page keeps every
guarantee of the one the page asked for by POST; the page opens its websocket from the head; the proxy reaches the
console while it records the session, and its libvirt calls reuse one warm connection per hypervisor."""

import re
import socket
import threading
import time
from unittest import mock

import pytest
from django.urls import reverse

from hypervisors.drivers import connections
from machines import console_proxy, consoles
from machines.consoles import ConsoleDenied
from machines.models import ConsoleSession, ConsoleToken, Membership
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

# What Chromium sends for a click on a link of the portal's own pages, and for a URL typed or reloaded.
SAME_ORIGIN = {
    "HTTP_SEC_FETCH_SITE": "same-origin",
    "HTTP_SEC_FETCH_MODE": "navigate",
    "HTTP_SEC_FETCH_DEST": "document",
}
TYPED = {**SAME_ORIGIN, "HTTP_SEC_FETCH_SITE": "none"}


@pytest.fixture
def machine(db):
    return MachineFactory(
        name="lat1",
        owner=UserFactory(username="lat-owner"),
        hypervisor=HypervisorFactory(),
        project=ProjectFactory(name="lat-team"),
        deploy_type="network",
        status=Status.ACTIVE,
    )


def page_key(client, machine, view="console", **headers) -> tuple[dict | None, object]:
    """The key the console page came with (None: it asks by POST), and the response."""
    response = client.get(reverse(f"machines:{view}", args=[machine.pk]), **headers)
    assert response.status_code == 200
    return response.context["config"]["key"], response


# --- the token that comes with the page -------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("headers", [SAME_ORIGIN, TYPED], ids=["link", "typed"])
def test_the_console_page_comes_with_a_token_as_good_as_the_posted_one(client, machine, headers):
    client.force_login(machine.owner)
    key, response = page_key(client, machine, **headers)
    assert response["Cache-Control"] == "no-store"  # never kept: Back or a reload gets a fresh page and token
    html = response.content.decode()
    assert key["token"] in html and 'id="console-config"' in html  # for the page's early script, in memory only
    token = ConsoleToken.objects.get()
    assert token.key_hash != key["token"] and key["token"] not in token.key_hash  # stored hashed
    assert (token.user, token.machine_id, token.kind, token.view_only) == (machine.owner, machine.pk, "vnc", False)
    assert key["reconnect"] == consoles.console_reconnect_secret(key["token"])
    assert (token.expires_at - token.created).total_seconds() <= 60  # PORTAL_CONSOLE_TOKEN_TTL
    assert token.session_key == client.session.session_key  # bound to the portal session it was issued to
    assert AuditEvent.objects.filter(action="console.open", outcome="success").count() == 1
    # Spent once by the proxy; then only with its reconnect secret (within the grace), for that machine only.
    with pytest.raises(ConsoleDenied, match="not 999"):
        consoles.console_token_consume(raw=key["token"], machine_id=999, client="127.0.0.1")
    with pytest.raises(ConsoleDenied, match="serial console, not the vnc|vnc console, not the serial"):
        consoles.console_token_consume(raw=key["token"], machine_id=machine.pk, client="127.0.0.1", kind="serial")
    assert consoles.console_token_consume(raw=key["token"], machine_id=machine.pk, client="127.0.0.1").pk == token.pk
    with pytest.raises(ConsoleDenied, match="already used"):
        consoles.console_token_consume(raw=key["token"], machine_id=machine.pk, client="127.0.0.1")


@pytest.mark.django_db
def test_a_page_token_dies_on_logout_like_any_other(client, machine):
    client.force_login(machine.owner)
    key, _ = page_key(client, machine, **SAME_ORIGIN)
    client.post("/logout/")
    with pytest.raises(ConsoleDenied, match="unknown token"):
        consoles.console_token_consume(raw=key["token"], machine_id=machine.pk, client="127.0.0.1")


@pytest.mark.django_db
def test_viewers_get_a_view_only_page_token_and_no_serial_one(client, machine):
    viewer = UserFactory(username="lat-viewer")
    Membership.objects.create(project=machine.project, user=viewer, role="viewer")
    client.force_login(viewer)
    key, _ = page_key(client, machine, **SAME_ORIGIN)
    assert key["view_only"] is True and ConsoleToken.objects.get().view_only
    key, response = page_key(client, machine, "serial", **SAME_ORIGIN)
    assert key is None and ConsoleToken.objects.count() == 1  # the page's POST then says why
    assert response.context["config"]["kind"] == "serial"


@pytest.mark.django_db
def test_the_serial_page_comes_with_a_serial_token(client, machine):
    client.force_login(machine.owner)
    key, _ = page_key(client, machine, "serial", **TYPED)
    assert ConsoleToken.objects.get().kind == "serial"
    assert consoles.console_token_consume(raw=key["token"], machine_id=machine.pk, client="::1", kind="serial")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "headers",
    [
        {},  # a browser that sends no Sec-Fetch headers (and the test client)
        {**SAME_ORIGIN, "HTTP_SEC_FETCH_SITE": "cross-site"},  # a link or a GET from another site
        {**SAME_ORIGIN, "HTTP_SEC_FETCH_SITE": "same-site"},  # another host under the same site
        {**SAME_ORIGIN, "HTTP_SEC_FETCH_DEST": "iframe"},  # framed (refused by X-Frame-Options anyway)
        {**SAME_ORIGIN, "HTTP_SEC_FETCH_MODE": "no-cors", "HTTP_SEC_FETCH_DEST": "image"},  # <img src=...>
        {**SAME_ORIGIN, "HTTP_SEC_PURPOSE": "prefetch"},  # nobody would spend it
        {**SAME_ORIGIN, "HTTP_PURPOSE": "prefetch"},
    ],
    ids=["no-headers", "cross-site", "same-site", "iframe", "image", "sec-purpose", "purpose"],
)
def test_anything_but_the_users_own_navigation_gets_no_token_with_the_page(client, machine, headers):
    client.force_login(machine.owner)
    key, response = page_key(client, machine, **headers)
    assert key is None and not ConsoleToken.objects.exists() and not AuditEvent.objects.filter(action="console.open")
    assert b'"key": null' in response.content
    # The page then asks by POST (CSRF-checked), as before.
    assert client.post(reverse("machines:console-token", args=[machine.pk])).json()["token"]


@pytest.mark.django_db
def test_the_one_time_url_page_carries_no_token(client):
    response = client.get(reverse("console-standalone"), **TYPED)
    assert response.context["config"]["machineId"] is None and "key" not in response.context["config"]
    assert not ConsoleToken.objects.exists()


# --- the page's early script --------------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_opens_its_websocket_from_the_head(client, machine):
    """The config and the script that opens the websocket come before the page's modules, in the head."""
    client.force_login(machine.owner)
    for view in ("console", "serial"):
        html = client.get(reverse(f"machines:{view}", args=[machine.pk]), **SAME_ORIGIN).content.decode()
        assert html.index('id="console-config"') < html.index("portalConsoleEarly") < html.index("</head>")
        assert re.search(r'<script type="module" async src="/static/(console|serial)(\.[0-9a-f]+)?\.js">', html)


# --- the proxy: reaching the console while the session is recorded -----------------------------


def handler_for(kind: str = "console"):
    """A ConsoleHandler with no request, as _authorise sees one (Origin allowed)."""
    from django.conf import settings

    handler = console_proxy.ConsoleHandler.__new__(console_proxy.ConsoleHandler)
    handler.session_id, handler.vnc_sock, handler.serial, handler.take_over = None, None, None, False
    handler.kind, handler.view_only, handler.machine = "vnc", False, None
    handler.headers = {"Origin": settings.PORTAL_CONSOLE_ALLOWED_ORIGINS[0]}
    return handler


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on the loopback (the proxy logs where its VNC socket goes)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return near, far


SLOW = 0.3  # seconds each of the two independent steps takes in these tests


@pytest.mark.django_db(transaction=True)
def test_the_proxy_reaches_the_vnc_server_while_it_records_the_session(machine):
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    near, far = tcp_pair()
    open_session = consoles.console_session_open

    def slow_session(**kwargs):
        time.sleep(SLOW)
        return open_session(**kwargs)

    def slow_vnc(m):
        assert m.pk == machine.pk
        time.sleep(SLOW)
        return near

    handler = handler_for()
    with (
        mock.patch.object(console_proxy, "vnc_connect", slow_vnc),
        mock.patch.object(consoles, "console_session_open", slow_session),
    ):
        started = time.monotonic()
        handler._authorise("127.0.0.1", f"/console/{machine.pk}", raw)
        took = time.monotonic() - started
    assert handler.vnc_sock is near and ConsoleSession.objects.filter(pk=handler.session_id, ended=None).exists()
    assert SLOW <= took < 2 * SLOW - 0.05, f"one after another ({took:.2f} s), not side by side"
    near.close()
    far.close()


@pytest.mark.django_db(transaction=True)
def test_a_session_refused_by_the_caps_closes_the_vnc_connection_made_beside_it(machine, settings):
    settings.PORTAL_CONSOLE_MAX_PER_MACHINE = 1
    first, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    consoles.console_session_open(
        token=consoles.console_token_consume(raw=first, machine_id=machine.pk, client="127.0.0.1"),
        client="127.0.0.1",
        proxy_pid=console_proxy.os.getpid(),
    )
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    near, far = tcp_pair()
    made = threading.Event()

    def slow_vnc(m):
        time.sleep(SLOW)  # still connecting when the cap refuses the session
        made.set()
        return near

    with mock.patch.object(console_proxy, "vnc_connect", slow_vnc):
        with pytest.raises(ConsoleDenied, match="already has 1 operating"):
            handler_for()._authorise("127.0.0.1", f"/console/{machine.pk}", raw)
    assert made.wait(5)
    far.settimeout(5)
    assert far.recv(1) == b""  # the proxy closed its side once the connection came
    far.close()
    assert ConsoleSession.objects.filter(ended=None).count() == 1  # only the first one


@pytest.mark.django_db(transaction=True)
def test_a_vnc_server_that_cannot_be_reached_ends_the_session_recorded_beside_it(machine):
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
    with mock.patch.object(console_proxy, "vnc_connect", side_effect=ConnectionRefusedError(111, "Connection refused")):
        with pytest.raises(console_proxy.HypervisorError, match="cannot reach the VNC server: Connection refused"):
            handler_for()._authorise("127.0.0.1", f"/console/{machine.pk}", raw)
    assert ConsoleSession.objects.get().ended is not None
    with mock.patch.object(console_proxy, "vnc_connect", side_effect=ConsoleDenied("the machine is not running")):
        raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner)
        with pytest.raises(ConsoleDenied, match="not running"):
            handler_for()._authorise("127.0.0.1", f"/console/{machine.pk}", raw)
    assert not ConsoleSession.objects.filter(ended=None).exists()


@pytest.mark.django_db(transaction=True)
def test_a_serial_take_over_waits_until_the_session_passed_the_caps(machine, settings):
    """Opening the port with take-over disconnects whoever has it: never for a connection the caps refuse."""
    settings.PORTAL_CONSOLE_MAX_PER_MACHINE = 0
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner, kind="serial")
    handler = handler_for()
    handler.take_over = True
    with mock.patch.object(console_proxy.ConsoleHandler, "_open_serial") as opened:
        with pytest.raises(ConsoleDenied, match="already has 0 operating"):
            handler._authorise("127.0.0.1", f"/serial/{machine.pk}", raw)
    assert not opened.called and handler.serial is None


@pytest.mark.django_db(transaction=True)
def test_the_serial_port_opens_while_the_session_is_recorded(machine):
    raw, _ = consoles.console_token_issue(machine=machine, user=machine.owner, kind="serial")
    near, far = socket.socketpair()
    started = threading.Event()

    def open_serial(self, machine):
        started.set()
        return near

    handler = handler_for()
    with mock.patch.object(console_proxy.ConsoleHandler, "_open_serial", open_serial):
        handler._authorise("127.0.0.1", f"/serial/{machine.pk}", raw)
    assert started.is_set() and handler._connect_target() is near
    near.close()
    far.close()


# --- warm libvirt connections ----------------------------------------------------------------


@pytest.mark.django_db
def test_the_proxys_libvirt_calls_reuse_one_open_connection_per_hypervisor():
    """Each browser connection has a thread of its own, and the driver caches connections per thread: the proxy's
    calls go to a few long-lived threads per URI instead, whose connections stay open (and are reopened by the
    driver when they die)."""
    seen = []

    def from_a_connection_thread():
        seen.append(console_proxy.on_hypervisor("test:///default", lambda driver: (driver.conn, threading.get_ident())))

    for _ in range(3):  # one after another, as consoles open: each from a new thread, as the proxy's handlers are
        thread = threading.Thread(target=from_a_connection_thread)
        thread.start()
        thread.join(10)
    assert len({id(conn) for conn, _ in seen}) == 1 and len({ident for _, ident in seen}) == 1
    assert all(conn.isAlive() for conn, _ in seen)
    # A connection that died is reopened by the driver at the next call, on the same thread.
    console_proxy.on_hypervisor("test:///default", lambda driver: connections.drop_connection(driver.uri))
    conn, _ = console_proxy.on_hypervisor("test:///default", lambda driver: (driver.conn, None))
    assert conn is not seen[0][0] and conn.isAlive()
    # Errors come back to the caller as they were raised.
    with pytest.raises(ZeroDivisionError):
        console_proxy.on_hypervisor("test:///default", lambda driver: 1 / 0)


@pytest.mark.django_db
def test_the_threads_kept_for_a_hypervisor_that_is_gone_are_stopped():
    HypervisorFactory(uri="test:///default")
    console_proxy.on_hypervisor("test:///default", lambda driver: None)
    console_proxy.on_hypervisor("test:///gone", lambda driver: None)
    try:
        assert console_proxy.prune_hypervisor_pools() == ["test:///gone"]
        assert set(console_proxy._hypervisor_pools) >= {"test:///default"}
        assert "test:///gone" not in console_proxy._hypervisor_pools
    finally:
        with console_proxy._hypervisor_pools_lock:
            pool = console_proxy._hypervisor_pools.pop("test:///gone", None)
        if pool is not None:
            pool.shutdown()


def test_the_proxy_server_prunes_between_requests_and_a_console_call_never_does(monkeypatch):
    pruned = []
    monkeypatch.setattr(console_proxy, "prune_hypervisor_pools", lambda: pruned.append(1))
    monkeypatch.setattr(console_proxy, "_pruned", [time.monotonic() - console_proxy.PRUNE_EVERY - 1])
    # A console's libvirt call, however long after the last prune, does not touch the database.
    assert console_proxy.on_hypervisor("test:///default", lambda driver: 42) == 42
    assert pruned == []
    server = console_proxy.ConsoleProxyServer("127.0.0.1", 0)
    try:
        server.service_actions()
        assert pruned == [1]
    finally:
        server.server_close()
