"""URL imports through the real worker, whose environment allows only the stack's file server (127.0.0.1/32,
tests/conftest.py): a test image still comes in, and everything else that is not public stays refused,
redirects included, leaving no file."""

from pathlib import Path

import pytest

from hypervisors import images
from hypervisors.models import Image, ImageStatus
from tests.conftest import wait_for
from tests.fake_http import FakeHttpServer, body, redirect
from tests.images import test_images

pytestmark = pytest.mark.integration


@pytest.fixture
def redirector(file_server):
    """A server on 127.0.0.1 (allowed) whose paths redirect elsewhere."""
    s = FakeHttpServer("127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def elsewhere():
    """A server on 127.0.0.2: loopback, not on the stack's allow-list, so never reached."""
    s = FakeHttpServer("127.0.0.2")
    s.routes["/disk.raw"] = body(b"\0" * 4096)
    yield s
    s.close()


def _imported(url: str) -> Image:
    image = images.image_create_from_url(name="imported", kind="disk", fmt="qcow2", source_url=url)
    return wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 60)


def _files() -> set[str]:
    return {p.name for p in images.image_dir().iterdir()}


def test_the_file_server_is_allowed_and_the_file_is_private(worker, file_server):
    image = _imported(f"{file_server}/{Path(test_images()['tiny_disk']).name}")
    assert image.status == ImageStatus.READY, image.status_message
    assert (images.image_dir() / image.file_name).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://127.0.0.2:{port}/disk.raw", "127.0.0.2 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[::1]:{port}/disk.raw", "::1 is a loopback address"),
    ],
)
def test_the_worker_refuses_a_redirect_off_the_allow_list(worker, redirector, elsewhere, target, message):
    redirector.routes["/disk.qcow2"] = redirect(target.format(port=elsewhere.port))
    before = _files()
    image = _imported(f"{redirector.url}/disk.qcow2")
    assert image.status == ImageStatus.ERROR and message in image.status_message, image.status_message
    assert elsewhere.requests == [] and [p for p, _ in redirector.requests] == ["/disk.qcow2"]
    assert _files() == before


def test_the_test_iso_is_imported_and_opened_under_the_limits(tiny_iso):
    """The worker opens an ISO with pycdlib in a child under prlimit (hypervisors/drivers/iso_probe.py)."""
    assert tiny_iso.status == ImageStatus.READY and tiny_iso.virtual_size_bytes == tiny_iso.file_size_bytes > 0
