"""Fetching a file over http(s) for an image import: the portal's only outgoing HTTP client.

Each hop (the URL, then every redirect) is resolved once; each address is checked against the refused ranges
(loopback, link-local, private, multicast, unspecified, reserved and otherwise not globally routable, an
IPv4 address inside IPv6 judged as that IPv4 address) unless an allowed network names it, and the connection
goes to the address that was checked: no second lookup that a rebinding DNS server could answer differently.
The whole fetch has a deadline, kept by a timer that shuts the socket (a server that drips a byte at a time
never trips a per-read timeout), and the body a size cap. No proxy from the environment is used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
READ_TIMEOUT = 30.0  # seconds any single read may wait
CHUNK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """The fetch failed; the message is for the user."""


class FetchRefused(FetchError):
    """The destination, the size or the time is not allowed."""


def parse_networks(values: Iterable[str]) -> list[Network]:
    """CIDRs (a bare address is a /32 or /128); ValueError on anything else."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to an IPv4 host (mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: IPAddress) -> str | None:
    """Why the address is refused (its kind), or None for a public address."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        if (kind := _kind(inner)) or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped):
            return kind  # a mapped address is that IPv4 address; a tunnelled one must pass as both
    for attr, kind in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attr):
            return kind
    if not ip.is_global:
        return "non-public"
    return None


def refusal(address: str, allowed: Iterable[Network]) -> str | None:
    """Why `address` may not be reached (for the user), or None if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone index (fe80::1%eth0) is link-local anyway
    inner = _embedded_ipv4(ip)
    if any(ip in net or (inner is not None and inner in net) for net in allowed):
        return None
    kind = _kind(ip)
    if kind is None:
        return None
    return (
        f"{address} is a {kind} address; imports reach only public addresses unless "
        "PORTAL_IMPORT_ALLOWED_NETWORKS names it"
    )


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order, once. getaddrinfo has no timeout of its own: it
    runs in a thread the import stops waiting for."""
    found: dict[str, object] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            found["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise FetchRefused(f"resolving {host} took too long (over {timeout:.0f} s)")
    if "error" in found:
        error = found["error"]
        raise FetchError(f"cannot resolve {host}: {getattr(error, 'strerror', None) or error}")
    infos = found["infos"]
    assert isinstance(infos, list)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _checked_address(host: str, port: int, allowed: list[Network], timeout: float) -> str:
    """The first address of `host` that may be reached; refused if none may (naming the first refusal)."""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        addresses = _resolve(host, port, timeout)
    reasons = []
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is None:
            return address
        reasons.append(reason if address == host else f"{host} resolves to {reason}")
    raise FetchRefused(reasons[0] if reasons else f"{host} has no address")


class _Hop:
    """One request to one checked address, whose socket a deadline timer can shut."""

    def __init__(
        self,
        url: str,
        allowed: list[Network],
        timeout: float,
        schemes: tuple[str, ...] = ("http", "https"),
        context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            names = " and ".join(f"{scheme}://" for scheme in schemes)
            raise FetchRefused(f"only {names} URLs are imported, not {url[:100]!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError(f"bad port in {url[:100]!r}") from None
        self.address = _checked_address(parts.hostname, port, allowed, timeout)
        self.sock: socket.socket | None = None
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname, port, timeout=timeout, context=context or ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        # Connect to the checked address, never the name again; TLS still verifies the certificate for the name.
        conn._create_connection = self._connect  # type: ignore[attr-defined]
        self.conn = conn
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def _connect(self, address: tuple[str, int], timeout: float, source_address=None) -> socket.socket:
        # A socket of the address's family connected to it directly: no name lookup at all.
        ip = ipaddress.ip_address(self.address.split("%", 1)[0])
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        self.sock = sock
        try:
            sock.settimeout(timeout)
            sock.connect((self.address, address[1]))
        except BaseException:
            sock.close()
            raise
        return sock

    def abort(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def get(self) -> http.client.HTTPResponse:
        self.conn.connect()
        # Over https, the TLS socket: wrapping detached the plain one from its descriptor, so a deadline that shut
        # only the plain one would let a dripping https body run on (the response keeps the TLS socket open).
        self.sock = self.conn.sock
        self.conn.request("GET", self.path, headers={"User-Agent": "ansistack-portal", "Accept-Encoding": "identity"})
        return self.conn.getresponse()


def _expire(expired: threading.Event, hop: _Hop) -> None:
    expired.set()
    hop.abort()


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def fetch(
    url: str,
    sink: Callable[[bytes], None],
    *,
    allowed_networks: Iterable[Network],
    timeout_s: float,
    max_bytes: int,
    on_length: Callable[[int], object] | None = None,
    schemes: tuple[str, ...] = ("http", "https"),
    context: ssl.SSLContext | None = None,
) -> int:
    """GET `url` (following up to MAX_REDIRECTS redirects, each hop checked) into `sink`; return the byte count.
    Raises FetchRefused past the deadline or the size cap, or for a refused destination; FetchError otherwise.
    `schemes` are those every hop may use (a redirect from https to http is refused where only https is);
    `context` verifies https (default: the system's CAs)."""
    allowed = list(allowed_networks)
    deadline = time.monotonic() + timeout_s
    expired = threading.Event()
    for _ in range(MAX_REDIRECTS + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused(f"the import took longer than its limit of {timeout_s:g} s")
        hop = _Hop(url, allowed, timeout=min(READ_TIMEOUT, remaining), schemes=schemes, context=context)
        timer = threading.Timer(remaining, _expire, args=(expired, hop))
        timer.daemon = True
        timer.start()
        try:
            response = hop.get()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise FetchError(f"the server answered {response.status} {response.reason}")
            return _read_body(response, sink, max_bytes=max_bytes, on_length=on_length, expired=expired)
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise FetchRefused(f"the import took longer than its limit of {timeout_s:g} s") from None
            raise FetchError(f"the download failed: {e or type(e).__name__}") from None
        finally:
            timer.cancel()
            hop.conn.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def _read_body(
    response: http.client.HTTPResponse,
    sink: Callable[[bytes], None],
    *,
    max_bytes: int,
    on_length: Callable[[int], object] | None,
    expired: threading.Event,
) -> int:
    length = response.getheader("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > max_bytes:
        raise FetchRefused(f"the file ({total} bytes) is over the import limit of {_size(max_bytes)}")
    if on_length:
        on_length(total or 0)
    received = 0
    # read1: at most one socket read per call, so the deadline and the cap are checked as the bytes come.
    while chunk := response.read1(CHUNK):
        received += len(chunk)
        if received > max_bytes:
            raise FetchRefused(f"the file is over the import limit of {_size(max_bytes)}")
        sink(chunk)
    if expired.is_set():
        raise OSError("deadline")  # the timer shut the socket: what looked like the end is not
    if total is not None and received != total:
        raise FetchError(f"the server sent {received} of {total} bytes")
    return received
