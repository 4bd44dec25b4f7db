"""The import client refuses destinations that are not public on every hop, after DNS, connects to the address
it checked, and keeps an overall deadline and a size cap."""

import socket
import ssl
import subprocess
import threading
import time

import pytest

from portal import http_fetch
from portal.http_fetch import FetchError, FetchRefused, fetch, parse_networks, refusal
from tests.fake_http import FakeHttpServer, body, drip_body, drip_headers, redirect

ALLOWED = parse_networks(["127.0.0.2/32"])  # the test server's address; 127.0.0.1 stays refused
MIB = 1 << 20


@pytest.fixture
def server():
    s = FakeHttpServer("127.0.0.2")
    yield s
    s.close()


@pytest.fixture
def loopback_server():
    """A server on 127.0.0.1 that must never be reached."""
    s = FakeHttpServer("127.0.0.1")
    s.routes["/secret"] = body(b"metadata")
    yield s
    s.close()


def _get(url: str, *, timeout_s: float = 10, max_bytes: int = 64 * MIB, allowed=ALLOWED) -> bytes:
    chunks: list[bytes] = []
    fetch(url, chunks.append, allowed_networks=allowed, timeout_s=timeout_s, max_bytes=max_bytes)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to refuse, not to bind
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_addresses_that_are_not_public_are_refused(address, kind):
    reason = refusal(address, [])
    assert reason is not None and f"a {kind} address" in reason and "PORTAL_IMPORT_ALLOWED_NETWORKS" in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_pass(address):
    assert refusal(address, []) is None


def test_the_allow_list_names_networks_also_through_a_mapped_address():
    allowed = parse_networks(["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"])
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "10.20.30.40", "fd12::1"):
        assert refusal(address, allowed) is None
    assert "loopback" in (refusal("127.0.0.2", allowed) or "")
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])


def test_an_allowed_server_is_fetched(server):
    server.routes["/img"] = body(b"image-bytes")
    assert _get(f"{server.url}/img") == b"image-bytes"


def test_with_the_default_empty_list_loopback_is_refused_before_connecting(server):
    server.routes["/img"] = body(b"image-bytes")
    with pytest.raises(FetchRefused, match="127.0.0.2 is a loopback address"):
        _get(f"{server.url}/img", allowed=[])
    assert server.requests == []


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://127.0.0.1:{port}/secret", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[::1]:{port}/secret", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/secret", "::ffff:127.0.0.1 is a loopback address"),
    ],
)
def test_a_redirect_chain_to_a_refused_address_stops_at_that_hop(server, loopback_server, target, message):
    server.routes["/a"] = redirect("/b")  # a relative redirect on the same allowed host, then away
    server.routes["/b"] = redirect(target.format(port=loopback_server.port), status=307)
    with pytest.raises(FetchRefused, match=message):
        _get(f"{server.url}/a")
    assert [p for p, _ in server.requests] == ["/a", "/b"]
    assert loopback_server.requests == []


def test_a_redirect_to_a_name_resolving_to_a_private_address_is_refused(server, monkeypatch):
    def resolve(host, port, *args, **kwargs):
        assert host == "intranet.example"  # the first hop is an address: no lookup
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]

    monkeypatch.setattr(http_fetch.socket, "getaddrinfo", resolve)
    server.routes["/a"] = redirect("http://intranet.example/disk.qcow2")
    with pytest.raises(FetchRefused, match="intranet.example resolves to 10.1.2.3 is a private address"):
        _get(f"{server.url}/a")


def test_the_connection_goes_to_the_address_that_was_checked(server, monkeypatch):
    """A rebinding DNS server answers the check with an allowed address and any later lookup with a private one:
    the portal looks up once and connects to what it checked."""
    server.routes["/img"] = body(b"from-the-checked-address")
    answers = iter(["127.0.0.2"])
    calls = []

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "10.9.9.9"), port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert _get(f"http://images.example:{server.port}/img") == b"from-the-checked-address"
    assert calls == ["images.example"]
    assert server.requests[0][1]["host"] == f"images.example:{server.port}"


def test_a_name_with_one_refused_and_one_allowed_address_uses_the_allowed_one(server, monkeypatch):
    server.routes["/img"] = body(b"ok")

    def resolve(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert _get(f"http://mixed.example:{server.port}/img") == b"ok"


def test_too_many_redirects_are_refused(server):
    server.routes["/loop"] = redirect("/loop")
    with pytest.raises(FetchRefused, match="more than 5 redirects"):
        _get(f"{server.url}/loop")


def test_only_http_and_https_are_followed(server):
    server.routes["/a"] = redirect("file:///etc/passwd")
    with pytest.raises(FetchRefused, match="only http:// and https://"):
        _get(f"{server.url}/a")


def test_a_dripping_body_hits_the_overall_deadline(server):
    server.routes["/slow"] = drip_body(10_000, every=0.05)  # each byte well within the 30 s read timeout
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="longer than its limit of 1.5 s"):
        _get(f"{server.url}/slow", timeout_s=1.5)
    assert time.monotonic() - started < 4


def test_dripping_headers_hit_the_overall_deadline(server):
    server.routes["/slow"] = drip_headers(every=0.05)
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="longer than its limit of 1 s"):
        _get(f"{server.url}/slow", timeout_s=1)
    assert time.monotonic() - started < 4


def test_a_body_announced_over_the_cap_is_refused_before_reading(server):
    server.routes["/big"] = body(b"x" * (2 * MIB))
    with pytest.raises(FetchRefused, match="over the import limit of 1 MiB"):
        _get(f"{server.url}/big", max_bytes=MIB)


def test_a_body_without_a_length_is_cut_at_the_cap(server):
    server.routes["/big"] = body(b"x" * (3 * MIB), length=False)
    received: list[bytes] = []
    with pytest.raises(FetchRefused, match="over the import limit of 1 MiB"):
        fetch(f"{server.url}/big", received.append, allowed_networks=ALLOWED, timeout_s=10, max_bytes=MIB)
    assert sum(len(c) for c in received) <= MIB


def test_a_body_shorter_than_announced_fails(server):
    def short(out):
        out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly-this")

    server.routes["/short"] = short
    with pytest.raises(FetchError, match="sent 9 of 100 bytes"):
        _get(f"{server.url}/short")


def test_an_error_status_is_reported(server):
    with pytest.raises(FetchError, match="answered 404"):
        _get(f"{server.url}/missing")


@pytest.fixture
def tls_server(tmp_path):
    """An https server on 127.0.0.2 with a self-signed certificate for images.example; records the SNI names."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=images.example"]
        + ["-addext", "subjectAltName=DNS:images.example", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.2", 0))
    port = listener.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret")
            except (OSError, ssl.SSLError):
                pass  # a client that refused the certificate

    threading.Thread(target=serve, daemon=True).start()
    yield port, cert, names
    listener.close()


@pytest.fixture
def images_example(monkeypatch):
    def resolve(host, port, *args, **kwargs):
        assert host == "images.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]

    monkeypatch.setattr(http_fetch.socket, "getaddrinfo", resolve)


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_server, images_example, monkeypatch):
    port, cert, names = tls_server
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):  # self-signed: the system's CAs refuse it
        _get(f"https://images.example:{port}/img")
    trusting = ssl.create_default_context
    monkeypatch.setattr(http_fetch.ssl, "create_default_context", lambda: trusting(cafile=str(cert)))
    assert _get(f"https://images.example:{port}/img") == b"secret"
    assert names == ["images.example", "images.example"]  # SNI carries the name; TCP went to 127.0.0.2


def test_a_resolver_that_never_answers_is_bounded_by_the_deadline(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(http_fetch.socket, "getaddrinfo", hang)
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="resolving slow.example took too long"):
        _get("http://slow.example/disk.raw", timeout_s=1)
    assert time.monotonic() - started < 3


def test_a_dripping_https_body_hits_the_overall_deadline(tmp_path):
    """Over https the deadline shuts the TLS socket (the plain one was detached by the wrapping)."""
    from tests.key_server import Answer, KeyServer, make_ca_and_cert

    tls = make_ca_and_cert(tmp_path)
    server = KeyServer(tls["cert"], tls["key"], "127.0.0.2")
    server.routes["/slow"] = Answer(body=b"x" * 10_000, drip=0.05)
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    started = time.monotonic()
    try:
        with pytest.raises(FetchRefused, match="longer than its limit of 1 s"):
            fetch(
                f"https://127.0.0.2:{server.port}/slow",
                lambda c: None,
                allowed_networks=ALLOWED,
                timeout_s=1,
                max_bytes=MIB,
                context=context,
            )
    finally:
        server.close()
    assert time.monotonic() - started < 3
