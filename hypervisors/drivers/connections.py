"""Connections to libvirt: opened within a bounded time (a TCP reachability check, then a timed
`open`), kept one per worker thread and URI with libvirt keepalive so a dead peer is noticed, reopened
after a failure; a spare per URI for the next serial console; every libvirtError sorted into retryable
(HypervisorUnavailable) or fatal (HypervisorFatalError) by `translate`."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from urllib.parse import urlsplit

import libvirt

from hypervisors.drivers.base import HypervisorFatalError, HypervisorUnavailable
from hypervisors.drivers.ssh import libvirt_uri

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5  # seconds between keepalive probes
KEEPALIVE_COUNT = 3  # unanswered probes before libvirt closes the connection
CONNECT_TIMEOUT = 8.0  # seconds to reach a remote hypervisor's port

# Default ports per transport, for the reachability check before libvirt.open().
TRANSPORT_PORTS = {"ssh": 22, "tcp": 16509, "tls": 16514, "libssh": 22, "libssh2": 22}

_UNAVAILABLE_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_AUTH_CANCELLED,
}

# Per-thread connection cache: {uri: virConnect}.
_local = threading.local()
_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def _ensure_event_loop() -> None:
    """Keepalive needs libvirt's event loop running in this process."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def translate(e: libvirt.libvirtError) -> HypervisorUnavailable | HypervisorFatalError:
    """Sort a libvirtError into retryable and fatal."""
    message = e.get_error_message() or str(e)
    if e.get_error_code() in _UNAVAILABLE_CODES:
        return HypervisorUnavailable(message)
    return HypervisorFatalError(message)


def _peer(uri: str) -> tuple[str, int, str] | None:
    """(host, port, transport) of a remote hypervisor's libvirt port; None for local and other transports."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if not parts.hostname or transport not in TRANSPORT_PORTS:
        return None
    return parts.hostname, parts.port or TRANSPORT_PORTS[transport], transport


# libvirt's RPC: a call of REMOTE_PROC_AUTH_LIST (66) of the remote program (0x20008086, version 1), serial 0,
# no arguments: the first thing every client asks, answered before any open, so a daemon that answers it
# is one that talks; the answer is read and the socket closed, nothing else is said.
_AUTH_LIST_CALL = struct.pack(">IIIIIII", 28, 0x20008086, 1, 66, 0, 0, 0)


def _answers(sock: socket.socket, host: str, transport: str) -> None:
    """Wait (on the socket's timeout) for the peer to say something in its own protocol: an SSH banner, a
    TLS handshake's answer (an alert for a missing client certificate is an answer), libvirt's RPC reply."""
    if transport == "tcp":
        sock.sendall(_AUTH_LIST_CALL)
        if not sock.recv(4):
            raise ConnectionResetError("closed without an answer")
    elif transport == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False) as tls:
                tls.do_handshake()
        except ssl.SSLError:
            pass  # it answered (refusing us is an answer)
    elif not sock.recv(4):  # ssh: the server speaks first
        raise ConnectionResetError("closed without an answer")


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast, within `timeout`, when a remote hypervisor's port does not answer: neither a TCP connect nor
    the first words of its protocol (a host that accepts and never answers would otherwise hold libvirt's
    open for ever). Runs in the calling thread on a socket timeout: nothing is left behind.

    libvirt itself can wait minutes on a host that drops packets.
    """
    peer = _peer(uri)
    if peer is None:
        return
    host, port, transport = peer
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise HypervisorUnavailable(f"cannot reach {host}:{port}: {reason}") from None
    try:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        _answers(sock, host, transport)
    except OSError as e:
        reason = "accepted the connection but did not answer" if isinstance(e, TimeoutError) else str(e)
        raise HypervisorUnavailable(f"cannot reach {host}:{port}: {reason}") from None
    finally:
        sock.close()


def _sockets_to(host: str, port: int) -> set[int]:
    """This process's file descriptors of TCP sockets connected to host:port (Linux: /proc/self/fd)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return set()
    found = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    for name in names:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    peer = sock.getpeername()
                    if peer[1] == port and peer[0] in addresses:
                        found.add(fd)
        except OSError:
            continue
    return found


def _cut(fds: set[int]) -> None:
    """Shut these sockets down (not close: their owner, libvirt, closes them), so a call waiting on one ends."""
    for fd in fds:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            continue


def _connections() -> dict:
    if not hasattr(_local, "conns"):
        _local.conns = {}
    return _local.conns


# URIs whose abandoned open (past its timeout) still runs: no other one is started meanwhile, so at most one
# thread per URI waits on a peer that went silent after the reachability check (for TCP and TLS the sockets
# are shut down and it ends at once; over SSH libvirt talks to the ssh process, which keeps it waiting).
_opening: set[str] = set()
_opening_lock = threading.Lock()


def _open(uri: str, timeout: float) -> libvirt.virConnect:
    """libvirt.open() bounded by `timeout`: a peer that accepts but never answers would block for ever. On
    timeout the sockets this open made to the peer are shut down, which ends libvirt's wait and its thread."""
    peer = _peer(uri)
    with _opening_lock:
        if uri in _opening:
            raise HypervisorUnavailable("an earlier connection attempt is still waiting for an answer")
    before = _sockets_to(peer[0], peer[1]) if peer else set()
    opened = libvirt_uri(uri)  # qemu+ssh: the portal's own ssh client, key and known_hosts
    result: dict = {}
    done = threading.Event()
    abandoned = threading.Event()

    def target() -> None:
        try:
            conn = libvirt.open(opened)
        except libvirt.libvirtError as e:
            result["error"] = e
        else:
            if abandoned.is_set():
                close_quietly(conn)
            result["conn"] = conn
        finally:
            with _opening_lock:
                if abandoned.is_set():
                    _opening.discard(uri)
                done.set()

    threading.Thread(target=target, name="libvirt-open", daemon=True).start()
    if not done.wait(timeout):
        with _opening_lock:
            abandoned.set()
            if not done.is_set():
                _opening.add(uri)
        if peer:
            _cut(_sockets_to(peer[0], peer[1]) - before)
            done.wait(1.0)
        raise HypervisorUnavailable(f"libvirt did not answer within {timeout:g} s")
    if "error" in result:
        e = result["error"]
        raise HypervisorUnavailable(e.get_error_message() or str(e))
    return result["conn"]


def connect(uri: str, timeout: float = CONNECT_TIMEOUT) -> libvirt.virConnect:
    """This thread's open connection to `uri`, reopened if it died."""
    conns = _connections()
    conn = conns.get(uri)
    if conn is not None:
        try:
            if conn.isAlive():
                return conn
        except libvirt.libvirtError:
            pass
        conns.pop(uri, None)
        close_quietly(conn)
    conn = conns[uri] = new_connection(uri, timeout)
    return conn


def new_connection(uri: str, timeout: float = CONNECT_TIMEOUT) -> libvirt.virConnect:
    """A connection of its own (the caller closes it), with keepalive on libvirt's event loop."""
    _ensure_event_loop()
    check_reachable(uri, timeout)
    conn = _open(uri, timeout)
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    except libvirt.libvirtError:
        pass  # drivers without a network connection (test://) have no keepalive
    return conn


def close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def abort_quietly(stream: libvirt.virStream) -> None:
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass


# One spare connection per URI for the next serial console (each console stream needs a connection of
# its own, closed with it): opening one costs a handshake (SSH or TLS on a remote host) on the console's
# critical path, so a spare is opened beside each console that takes one. Spares keep keepalive on and
# are checked alive when taken; a dead one is closed and a new connection opened as before.
_spares: dict[str, libvirt.virConnect] = {}
_spares_lock = threading.Lock()


def take_connection(uri: str, timeout: float = CONNECT_TIMEOUT) -> libvirt.virConnect:
    """A connection of its own, like new_connection: the spare for `uri` when it is alive, else a new one;
    either way a new spare is opened in the background for the next caller. Not for libvirt's test driver,
    which opens in-process and whose state lives as long as any connection to it (a spare would keep it)."""
    if uri.startswith("test:"):
        return new_connection(uri, timeout)
    with _spares_lock:
        spare = _spares.pop(uri, None)
    threading.Thread(target=_open_spare, args=(uri, timeout), daemon=True, name="libvirt-spare").start()
    if spare is not None:
        try:
            if spare.isAlive():
                return spare
        except libvirt.libvirtError:
            pass
        close_quietly(spare)
    return new_connection(uri, timeout)


def _open_spare(uri: str, timeout: float) -> None:
    try:
        conn = new_connection(uri, timeout)
    except (libvirt.libvirtError, HypervisorUnavailable, HypervisorFatalError, OSError) as e:
        log.debug("no spare connection to %s: %s", uri, e)
        return
    with _spares_lock:
        if uri not in _spares:
            _spares[uri] = conn
            return
    close_quietly(conn)  # another one got there first


def drop_connection(uri: str) -> None:
    """Close this thread's connection to `uri` (the next call reopens it)."""
    conn = _connections().pop(uri, None)
    if conn is not None:
        close_quietly(conn)
