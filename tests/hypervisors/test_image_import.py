"""Imports from a URL, through the service and the task (run inline): refused destinations, the deadline and the
size cap end the import in error with a clear message and leave no file, partial or whole."""

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError

from hypervisors import images
from hypervisors.models import Image, ImageStatus
from tests.fake_http import FakeHttpServer, body, drip_body, redirect

pytestmark = pytest.mark.django_db
MIB = 1 << 20


@pytest.fixture
def server(settings):
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = ["127.0.0.2/32"]
    s = FakeHttpServer("127.0.0.2")
    yield s
    s.close()


def _import(url: str, django_capture_on_commit_callbacks) -> Image:
    with django_capture_on_commit_callbacks(execute=True):
        image = images.image_create_from_url(name="imp", kind="disk", fmt="raw", source_url=url)
    return Image.objects.get(pk=image.pk)


def _files() -> list[str]:
    return sorted(p.name for p in images.image_dir().iterdir())


def test_the_default_allow_list_is_empty_and_refuses_loopback_at_once(django_capture_on_commit_callbacks):
    # The unit test process runs with the shipped default; only the stack's processes get 127.0.0.1/32
    # (tests/conftest.py _stack_env) for the local file server.
    assert settings.PORTAL_IMPORT_ALLOWED_NETWORKS == []
    for url in ("http://127.0.0.1/disk.raw", "http://[::1]/disk.raw", "http://169.254.169.254/latest/"):
        with pytest.raises(ValidationError, match="Refused: .* is a (loopback|link-local) address"):
            images.image_create_from_url(name="imp", kind="disk", fmt="raw", source_url=url)
    assert not Image.objects.exists()


def test_a_name_resolving_to_loopback_is_refused_by_the_worker(django_capture_on_commit_callbacks):
    before = _files()
    image = _import("http://localhost:9/disk.raw", django_capture_on_commit_callbacks)
    assert image.status == ImageStatus.ERROR
    assert "localhost resolves to" in image.status_message and "loopback address" in image.status_message
    assert _files() == before


def test_an_allowed_server_is_imported(server, django_capture_on_commit_callbacks):
    server.routes["/disk.raw"] = body(b"\0" * 65536)
    image = _import(f"{server.url}/disk.raw", django_capture_on_commit_callbacks)
    assert image.status == ImageStatus.READY, image.status_message
    assert image.file_size_bytes == 65536 and image.total_bytes == 65536
    assert (images.image_dir() / image.file_name).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://127.0.0.1:8000/", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254 is a link-local address"),
        ("http://[::1]:8000/", "::1 is a loopback address"),
    ],
)
def test_a_redirect_to_a_refused_address_fails_the_import(server, django_capture_on_commit_callbacks, target, message):
    server.routes["/disk.raw"] = redirect("/next")
    server.routes["/next"] = redirect(target)
    before = _files()
    image = _import(f"{server.url}/disk.raw", django_capture_on_commit_callbacks)
    assert image.status == ImageStatus.ERROR and message in image.status_message, image.status_message
    assert image.status_message.startswith("Import failed: ")
    assert _files() == before


def test_a_dripping_server_hits_the_import_deadline(server, settings, django_capture_on_commit_callbacks):
    settings.PORTAL_IMPORT_TIMEOUT = 1
    server.routes["/disk.raw"] = drip_body(100_000, every=0.01)
    before = _files()
    image = _import(f"{server.url}/disk.raw", django_capture_on_commit_callbacks)
    assert image.status == ImageStatus.ERROR and "longer than its limit of 1 s" in image.status_message
    assert _files() == before


def test_a_body_over_the_cap_is_cut(server, settings, django_capture_on_commit_callbacks):
    settings.PORTAL_IMPORT_MAX_BYTES = MIB
    server.routes["/disk.raw"] = body(b"\0" * (3 * MIB), length=False)
    before = _files()
    image = _import(f"{server.url}/disk.raw", django_capture_on_commit_callbacks)
    assert image.status == ImageStatus.ERROR and "over the import limit of 1 MiB" in image.status_message
    assert _files() == before
