"""The console proxy: websockify with the portal's single-use tokens.

Each connection asks for /console/<machine id>?token=<token> (the graphical
console, VNC) or /serial/<machine id>?token=<token> (the serial console, for
xterm.js). Before the websocket handshake the handler checks the Origin header,
spends the token (a token is for one kind of console), checks the session caps,
and for VNC asks the hypervisor where the machine's VNC server listens *now*
(ports are reused, so never trust an old answer). A serial session is a
libvirt console stream on its own connection to the hypervisor. The token is
removed from the path before anything is logged.

Latency (issue 18). Once the token is spent (which names the machine), the two
things that do not depend on each other run at the same time: recording the
session under the caps (the database) and reaching the console (the hypervisor
visit, the TCP connection and the RFB authentication; for serial, the libvirt
console stream). A refusal of either closes what the other made. The proxy's
libvirt calls for VNC run on a few long-lived threads per hypervisor URI, so
the driver's per-thread connection cache (hypervisors/drivers) keeps their
connections open from one console to the next, with libvirt keepalive; the
driver reopens a connection that died, and a changed URI gets threads (and a
connection) of its own. Nothing about the machine is cached: the address and
the password come from the hypervisor at every connect.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import HTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.db import close_old_connections
from websockify import websocketproxy, websocketserver

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError
from hypervisors.models import ConsoleAddressRefused, Hypervisor
from machines import consoles, rfb
from machines.consoles import ConsoleDenied
from machines.rfb_filter import FilteredSocket, ViolatedProtocol

log = logging.getLogger("portal.console")

PATH_RE = re.compile(r"^/(console|serial)/(\d+)/?$")
KINDS = {"console": "vnc", "serial": "serial"}
WATCH_INTERVAL = 2.0  # seconds between checks that an open session is still allowed
# The longest a connection waits for its console to be reached (a hypervisor visit, the VNC handshake, a
# serial stream): past it the session is refused, and the shared threads are not held by a dead host.
REACH_TIMEOUT = settings.PORTAL_CONNECT_TIMEOUT + 10.0


def _dial_host(host: str, machine) -> str:
    """Where to reach the VNC server that listens on `host` (Hypervisor.console_dial_host: never a remote
    hypervisor's loopback, which here would be the portal's own and another machine's console)."""
    try:
        return machine.hypervisor.console_dial_host(host)
    except ConsoleAddressRefused as e:
        raise ConsoleDenied(str(e)) from None


# What a connection does beside its own thread (reaching the console while the session is recorded).
_beside = ThreadPoolExecutor(max_workers=32, thread_name_prefix="console-open")
# The proxy's libvirt calls, per hypervisor URI: on these threads the driver's per-thread connection stays open.
HYPERVISOR_THREADS = 2
_hypervisor_pools: dict[str, ThreadPoolExecutor] = {}
_hypervisor_pools_lock = threading.Lock()


PRUNE_EVERY = 300.0  # seconds between looks for pools whose hypervisor was deleted or moved to another URI
_pruned = [time.monotonic()]


def on_hypervisor(uri: str, fn, *args):
    """fn(driver, *args) with a driver for `uri`, run on one of the proxy's long-lived threads for that URI (so
    its libvirt connection is already open); returns what fn returns, raises what it raises."""
    with _hypervisor_pools_lock:
        pool = _hypervisor_pools.get(uri)
        if pool is None:
            pool = _hypervisor_pools[uri] = ThreadPoolExecutor(HYPERVISOR_THREADS, thread_name_prefix="console-hv")

    return pool.submit(lambda: fn(get_driver(uri), *args)).result(timeout=REACH_TIMEOUT)


def prune_hypervisor_pools() -> list[str]:
    """Stop the threads (and so close the connections) kept for URIs no hypervisor has any more; returns them."""
    _pruned[0] = time.monotonic()
    known = set(Hypervisor.objects.values_list("uri", flat=True))
    with _hypervisor_pools_lock:
        gone = {uri: _hypervisor_pools.pop(uri) for uri in list(_hypervisor_pools) if uri not in known}
    for pool in gone.values():
        pool.shutdown(wait=False)  # its threads end once idle; their cached connections close as they are collected
    return sorted(gone)


def _discard(future: Future) -> None:
    """Close whatever socket `future` brings, now or when it comes: its connection was refused meanwhile."""

    def close(done: Future) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    future.add_done_callback(close)


_vnc_locks: dict[int, threading.Lock] = {}
_vnc_locks_lock = threading.Lock()


def _vnc_lock(machine_id: int) -> threading.Lock:
    """One lock per machine: a session's password rotation and its authentication happen under it, so two
    sessions starting at once cannot invalidate each other's password."""
    with _vnc_locks_lock:
        return _vnc_locks.setdefault(machine_id, threading.Lock())


def vnc_connect(machine) -> socket.socket:
    """A socket to the machine's VNC server, authenticated by the proxy and ready for the client's
    ClientInit: the hypervisor gives the server a fresh password for a few seconds (and says where it
    listens now: ports are reused), and the proxy answers the server's challenge with it. The password is
    never stored, logged or sent to the browser."""
    with _vnc_lock(machine.pk):
        opened = on_hypervisor(machine.hypervisor.uri, lambda driver: driver.vnc_open(str(machine.uuid)))
        if opened is None:
            raise ConsoleDenied("the machine is not running (no VNC server)")
        host, port, password = opened
        tsock = socket.create_connection((_dial_host(host, machine), port), timeout=10)
        try:
            tsock.setsockopt(socket.SOL_TCP, socket.TCP_NODELAY, 1)
            security = rfb.authenticate_to_server(rfb.SocketChannel(tsock), password)
        except BaseException:
            tsock.close()
            raise
    if security != rfb.SEC_VNC:
        log.warning(
            "machine %s (%s): its VNC server accepts clients without a password (defined before the "
            "portal set them); it gets one at its next cold start",
            machine.pk,
            machine.domain_name,
        )
    return tsock


class ConsoleHandler(websocketproxy.ProxyRequestHandler):
    path: str  # the request's path, as http.server sets it (the query string is dropped from it on upgrade)

    def __init__(self, *args, **kwargs):
        self.session_id: int | None = None
        self.vnc_sock: socket.socket | None = None  # authenticated to the VNC server before the upgrade
        self.serial: Future[socket.socket] | None = None  # the serial console's socket, opened beside the handshake
        self.kind = "vnc"
        self.token = None  # the spent token, once _authorise has it: whose connection the audit records
        self.view_only = False
        self.take_over = False  # serial: disconnect whoever has the port (the page's Reconnect, Take over)
        self.proxied = False
        # A graphical session's socket to the VNC server as websockify writes to it: a FilteredSocket
        # (machines/rfb_filter.py). Setting its `view_only` from another thread takes effect at the client's
        # next message.
        self.filter_socket: FilteredSocket | None = None
        super().__init__(*args, **kwargs)

    # Logging: never the query string (it holds the token).
    def log_message(self, format, *args):
        log.info("%s %s", self.client_address[0], format % args)

    def log_request(self, code="-", size="-"):
        log.info('%s "%s %s" %s', self.client_address[0], self.command, urlsplit(self.path).path, code)

    def handle_upgrade(self):
        close_old_connections()
        client = self.client_address[0]
        parts = urlsplit(self.path)
        self.path = parts.path  # from here on, nothing can log the token
        query = parse_qs(parts.query)
        self.take_over = query.get("take_over") == ["1"]
        try:
            self._authorise(client, parts.path, query.get("token", [""])[0])
        except ConsoleDenied as e:
            log.warning("%s refused console %s: %s", client, parts.path, e)
            self._record(client, parts.path, "refused", str(e), e.token)
            self.send_error(403, "Console refused")
            return
        except HypervisorError as e:
            log.warning("%s console %s: hypervisor error: %s", client, parts.path, e)
            self._record(client, parts.path, "failed", f"hypervisor error: {e}")
            self.send_error(503, "Hypervisor unavailable")
            return
        mode = " (view only)" if self.view_only else ""
        self._record(client, parts.path, "success", f"session {self.session_id} opened{mode}")
        try:
            websocketserver.WebSocketRequestHandlerMixIn.handle_upgrade(self)
        finally:
            if not self.proxied:  # the websocket handshake failed after the token was spent
                consoles.console_session_close(self.session_id)
                if self.vnc_sock is not None:
                    self.vnc_sock.close()
                if self.serial is not None:
                    _discard(self.serial)

    def _record(self, client: str, path: str, outcome: str, detail: str, token=None) -> None:
        """The audit record of this connection (consoles.console_connection_record); the audit is not the
        console: a database error here is logged, and the connection goes on as decided."""
        match = PATH_RE.match(path)
        try:
            consoles.console_connection_record(
                machine_id=int(match.group(2)) if match else None,
                token=token or self.token,
                client=client,
                kind=KINDS[match.group(1)] if match else self.kind,
                outcome=outcome,
                detail=detail,
            )
        except Exception:
            log.exception("%s console %s: cannot record it in the audit trail", client, path)

    def _authorise(self, client: str, path: str, raw_token: str) -> None:
        origin = self.headers.get("Origin", "")
        if origin not in settings.PORTAL_CONSOLE_ALLOWED_ORIGINS:
            raise ConsoleDenied(f"origin {origin or '(none)'} is not allowed")
        match = PATH_RE.match(path)
        if not match:
            raise ConsoleDenied("bad path")
        self.kind = KINDS[match.group(1)]
        # A reconnect within the grace needs the token's reconnect secret, offered as a websocket subprotocol.
        reconnect = consoles.reconnect_from_protocols(self.headers.get("Sec-WebSocket-Protocol", ""))
        started = time.perf_counter()
        token = self.token = consoles.console_token_consume(
            raw=raw_token, machine_id=int(match.group(2)), client=client, kind=self.kind, reconnect=reconnect
        )
        self.view_only = token.view_only
        spent = time.perf_counter()
        # The token named the machine: reach its console while the session is recorded under the caps. VNC: one
        # visit to the hypervisor, before the upgrade (a stopped machine is refused with a 403), says where the
        # server listens now and sets the password the proxy then answers with. Serial: the console stream, whose
        # failure (another client has the port) the page hears after the upgrade; a take-over disconnects
        # someone, so it waits until this session has passed the caps.
        reaching: Future[socket.socket] | None = None
        if self.kind == "vnc":
            reaching = _beside.submit(vnc_connect, token.machine)
        elif not self.take_over:
            reaching = self.serial = _beside.submit(self._open_serial, token.machine)
        try:
            self.session_id = consoles.console_session_open(token=token, client=client, proxy_pid=os.getpid()).pk
        except BaseException:
            if reaching is not None:
                _discard(reaching)
            raise
        recorded = time.perf_counter()
        if self.kind == "serial" and self.take_over:
            self.serial = _beside.submit(self._open_serial, token.machine)
        if reaching is not None and self.kind == "vnc":
            try:
                self.vnc_sock = reaching.result(timeout=REACH_TIMEOUT)
            except (ConsoleDenied, HypervisorError):
                consoles.console_session_close(self.session_id)
                raise
            except Exception as e:  # OSError, RFB errors: the server is there but will not have us
                consoles.console_session_close(self.session_id)
                raise HypervisorError(f"cannot reach the VNC server: {getattr(e, 'strerror', None) or e}") from e
        ready = time.perf_counter()
        where = "%s:%s" % self.vnc_sock.getpeername()[:2] if self.vnc_sock else "its serial port"  # noqa: UP031
        log.info(
            "%s %s console of machine %s for user %s%s -> %s; ready in %.1f ms (token %.1f, session %.1f, "
            "console beside it %.1f)",
            client,
            "graphical" if self.kind == "vnc" else "serial",
            token.machine_id,
            token.user_id,
            " (view only)" if self.view_only else "",
            where,
            1000 * (ready - started),
            1000 * (spent - started),
            1000 * (recorded - spent),
            1000 * (ready - spent),
        )

    def _open_serial(self, machine) -> socket.socket:
        return get_driver(machine.hypervisor.uri).serial_console(str(machine.uuid), take_over=self.take_over)

    def _connect_target(self) -> socket.socket:
        target = self.serial.result(timeout=REACH_TIMEOUT) if self.serial is not None else self.vnc_sock
        if target is None:  # not reached: _authorise raised before it had a console
            raise HypervisorError("the console was not reached")
        return target

    def _accept_vnc_client(self, target: FilteredSocket) -> None:
        """The browser's side of the RFB handshake (security None; the proxy authenticated to the server);
        what the browser sent beyond it is the start of its messages, and goes through the filter."""
        channel = rfb.FramesChannel(self)
        rfb.accept_client(channel)
        if channel.leftover:
            target.send(channel.leftover)

    def new_websocket_client(self):
        self.proxied = True
        try:
            tsock = self._connect_target()
        except Exception as e:  # OSError, HypervisorError, RFB errors, or anything the driver did not expect
            consoles.console_session_close(self.session_id)
            log.warning("console session %s: cannot reach the %s console: %s", self.session_id, self.kind, e)
            self._record(
                self.client_address[0], self.path, "failed", f"session {self.session_id}: cannot reach it: {e}"
            )
            raise self.CClose(1011, f"cannot reach the console: {getattr(e, 'strerror', None) or e}"[:120]) from None
        tsock.settimeout(None)
        # Every graphical session's client messages go through the filter, from the client's ClientInit on;
        # the session watcher flips its view_only when the user's role is lowered. (Serial: never view-only.)
        target = FilteredSocket(tsock, view_only=self.view_only) if self.kind == "vnc" else tsock
        if isinstance(target, FilteredSocket):
            self.filter_socket = target
        stop = threading.Event()
        threading.Thread(target=self._watch, args=(tsock, stop), daemon=True).start()
        try:
            if isinstance(target, FilteredSocket):
                self._accept_vnc_client(target)
            self.do_proxy(target)
        except rfb.PeerClosed as e:
            log.info("console session %s ended: %s", self.session_id, e)
        except ViolatedProtocol as e:
            log.warning("console session %s closed: %s", self.session_id, e)
        finally:
            stop.set()
            try:
                tsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tsock.close()
            if isinstance(target, FilteredSocket) and target.dropped:
                log.info("console session %s: %d input messages dropped (view only)", self.session_id, target.dropped)
            consoles.console_session_close(self.session_id)
            close_old_connections()

    def _watch(self, tsock: socket.socket, stop: threading.Event) -> None:
        """Every WATCH_INTERVAL, ask what the session may do now: turn it view-only when the user's role
        was lowered (flipping the filter that websockify sends through), and end it on logout, a lost
        role, deletion or its maximum lifetime (PORTAL_CONSOLE_MAX_SESSION)."""
        while not stop.wait(WATCH_INTERVAL):
            try:
                mode, why = consoles.console_session_mode(self.session_id)
            except Exception:  # a database hiccup: keep the session and ask again at the next interval
                log.exception("console session %s: cannot check it", self.session_id)
                continue
            finally:
                close_old_connections()
            if mode == consoles.VIEW_NOW and not self.view_only:
                target = self.filter_socket
                if target is not None and hasattr(target, "view_only"):  # a graphical session's filter (serial: none)
                    target.view_only = True
                    self.view_only = True
                    log.info("console session %s now view-only: %s", self.session_id, why)
                    continue
                mode, why = consoles.END_NOW, f"{why} (and its input cannot be filtered)"
            if mode == consoles.END_NOW:
                log.info("console session %s ended: %s", self.session_id, why)
                try:
                    tsock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return


class ConsoleProxyServer(ThreadingMixIn, HTTPServer):
    """websockify's handler on a threaded server: one process, one thread per console."""

    daemon_threads = True
    # What websockify's handler reads from its server.
    only_upgrade = True
    verbose = False
    run_once = False
    record = None
    heartbeat = None
    handler_id = 0
    target_host = "vnc"
    target_port = "-"
    token_plugin = None
    auth_plugin = None
    unix_target = None
    wrap_cmd = None
    ssl_target = None
    unix_listen = None

    def __init__(self, host: str, port: int) -> None:
        self.logger = log
        super().__init__((host, port), ConsoleHandler)

    def service_actions(self) -> None:
        """Between requests (serve_forever's loop, every half second): drop the pools of URIs that are gone,
        every PRUNE_EVERY seconds. Here, not in on_hypervisor, so a console's libvirt call never waits on the
        database and the driver seam stays free of it."""
        if time.monotonic() - _pruned[0] > PRUNE_EVERY:
            prune_hypervisor_pools()
