"""Connections to libvirt: opened within a bounded time (a TCP reachability check, then a timed
`open`), kept one per worker thread and URI with libvirt keepalive so a dead peer is noticed, reopened
after a failure; a spare per URI for the next serial console; every libvirtError sorted into retryable
(HypervisorUnavailable) or fatal (HypervisorFatalError) by `translate`."""

from __future__ import annotations

import logging
import socket
import threading
from urllib.parse import urlsplit

import libvirt

from hypervisors.drivers.base import HypervisorFatalError, HypervisorUnavailable

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


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast, within `timeout`, when a remote hypervisor's port does not answer.

    libvirt itself can wait minutes on a host that drops packets.
    """
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if not parts.hostname or transport not in TRANSPORT_PORTS:
        return
    port = parts.port or TRANSPORT_PORTS[transport]
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise HypervisorUnavailable(f"cannot reach {parts.hostname}:{port}: {reason}") from None


def _connections() -> dict:
    if not hasattr(_local, "conns"):
        _local.conns = {}
    return _local.conns


def _open(uri: str, timeout: float) -> libvirt.virConnect:
    """libvirt.open() bounded by `timeout`: a peer that accepts but never answers would block for ever."""
    result: dict = {}
    done = threading.Event()
    abandoned = threading.Event()

    def target() -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            result["error"] = e
        else:
            if abandoned.is_set():
                close_quietly(conn)
            result["conn"] = conn
        done.set()

    threading.Thread(target=target, name="libvirt-open", daemon=True).start()
    if not done.wait(timeout):
        abandoned.set()
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
