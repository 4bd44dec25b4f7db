"""Large request bodies against the portal as served (gunicorn, tests/conftest.py `web_server`), over raw
sockets: an anonymous POST with a forged CSRF cookie writes nothing to the data directory and the server's
memory stays bounded; a staff upload through the API still spools its file to disk."""

import os
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
from django.conf import settings

from hypervisors.images import image_dir
from hypervisors.models import Image
from portal.models import ApiToken
from tests.factories import UserFactory

pytestmark = pytest.mark.integration

BOUNDARY = "portalboundary"
BODY_BYTES = 256 << 20  # announced; far more than any small limit
CHUNK = 1 << 20


def _server_pids(url: str) -> list[int]:
    """The gunicorn master and worker serving `url` (found by their command line)."""
    port = urllib.parse.urlsplit(url).port
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gunicorn" in cmdline and f"127.0.0.1:{port}".encode() in cmdline:
                pids.append(int(entry.name))
    assert pids, "the web server's processes were not found"
    return pids


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _multipart_head(fields: dict[str, str], file_field: str) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{file_field}"; filename="disk.raw"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return "".join(parts).encode()


def _send_request(url: str, path: str, headers: dict[str, str], head: bytes, body_bytes: int) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(head) + body_bytes}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + head)
    return sock


def test_an_anonymous_post_with_a_forged_csrf_cookie_spools_nothing_and_stays_small(web_server):
    data_dir = Path(settings.DATA_DIR)
    before = _files_under(data_dir)
    pids = _server_pids(web_server)
    peak_before = max(_peak_rss_kib(p) for p in pids)
    forged = "A" * 32
    head = _multipart_head({"csrfmiddlewaretoken": forged}, "file")
    sock = _send_request(
        web_server,
        "/login/",
        {"Cookie": f"csrftoken={forged}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        head,
        BODY_BYTES,
    )
    sent = 0
    chunk = b"\0" * CHUNK
    new_files: set[Path] = set()
    try:
        while sent < BODY_BYTES:
            sock.sendall(chunk)
            sent += CHUNK
            new_files |= _files_under(data_dir) - before
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading at the cap and closed: what it should do
    finally:
        sock.close()
    time.sleep(0.5)
    new_files |= _files_under(data_dir) - before
    # Files the server may write on its own (the database's WAL) are not uploads: nothing under uploads/ or images/.
    assert not [p for p in new_files if p.parent.name in ("uploads", "images")], new_files
    assert sent < BODY_BYTES, "the server read the whole 256 MiB body instead of stopping at the cap"
    growth_mib = (max(_peak_rss_kib(p) for p in pids) - peak_before) / 1024
    assert growth_mib < 32, f"the web server's peak memory grew by {growth_mib:.0f} MiB"


@pytest.mark.django_db(transaction=True)
def test_a_staff_token_upload_through_the_served_api_is_spooled_to_disk(web_server):
    staff = UserFactory(username="served-upload-staff", is_staff=True)
    _, raw = ApiToken.issue(user=staff)
    size = 8 << 20  # over the 2.5 MiB in-memory limit of every other request
    head = _multipart_head({"name": "served-big", "kind": "disk", "format": "raw"}, "file")
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    sock = _send_request(
        web_server,
        "/api/v1/images/",
        {"Authorization": f"Token {raw}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        head,
        size + len(tail),
    )
    with sock:
        for _ in range(size // CHUNK):
            sock.sendall(b"\0" * CHUNK)
        sock.sendall(tail)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:500]
    image = Image.objects.get(name="served-big")
    stored = image_dir() / image.file_name
    assert image.total_bytes == size and stored.stat().st_size == size
    assert stored.stat().st_mode & 0o077 == 0, oct(stored.stat().st_mode)  # readable by the portal's user only
    os.unlink(stored)
