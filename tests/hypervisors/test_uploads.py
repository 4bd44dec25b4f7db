"""Only the image upload endpoints, for staff, spool large files to disk; every other request keeps Django's
small in-memory limits, also before any view runs (CsrfViewMiddleware reads the body of any POST with a
CSRF cookie)."""

from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from hypervisors.models import Image
from portal.models import ApiToken

pytestmark = pytest.mark.django_db

FORGED = "A" * 32  # a well-formed CSRF secret that the server never issued
BIG = 5 << 20  # over FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB)


@pytest.fixture
def spooled(monkeypatch):
    """Every temporary upload file Django creates (TemporaryFileUploadHandler), by name."""
    made: list[str] = []
    original = TemporaryUploadedFile.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self.temporary_file_path())

    monkeypatch.setattr(TemporaryUploadedFile, "__init__", record)
    return made


def _qcow2_like(size: int) -> SimpleUploadedFile:
    return SimpleUploadedFile("disk.qcow2", b"\0" * size, content_type="application/octet-stream")


def _uploads_dir() -> list[Path]:
    return list(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir())


def test_an_anonymous_post_with_a_forged_csrf_cookie_writes_nothing(spooled):
    before = _uploads_dir()
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = FORGED
    r = client.post("/login/", {"csrfmiddlewaretoken": FORGED, "file": _qcow2_like(BIG)})
    assert spooled == [] and _uploads_dir() == before
    assert r.status_code in (200, 403)  # the view saw no file (or the token came after it); never a spooled body


def test_the_token_first_then_a_file_still_leaves_no_file(spooled):
    """The CSRF token before the file: the check passes, the file stops at the memory cap, nothing on disk."""
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = FORGED
    body = {"csrfmiddlewaretoken": FORGED, "username": "x", "password": "y", "zz": _qcow2_like(BIG)}
    client.post("/login/", body)
    assert spooled == []


def test_a_small_file_elsewhere_stays_in_memory(spooled, staff_client):
    r = staff_client.post("/hypervisors/add/", {"name": "x", "file": _qcow2_like(1000)})
    assert r.status_code == 200 and spooled == []


def test_staff_posting_a_large_file_to_another_view_spools_nothing(spooled, staff_client):
    staff_client.post("/hypervisors/add/", {"name": "x", "file": _qcow2_like(BIG)})
    assert spooled == []


def test_a_plain_user_at_the_upload_view_spools_nothing(spooled, user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    token = client.get("/hypervisors/images/").cookies["csrftoken"].value
    body = {"csrfmiddlewaretoken": token, "name": "x", "source": "upload", "file": _qcow2_like(BIG)}
    r = client.post("/hypervisors/images/add/", body)
    assert r.status_code == 403 and spooled == []


def test_staff_upload_through_the_page_spools_to_disk_with_csrf_checked(spooled, staff, settings):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    page = client.get("/hypervisors/images/add/")
    token = page.cookies["csrftoken"].value
    form = {"name": "big", "kind": "disk", "format": "raw", "source": "upload", "arch": "x86_64", "os_name": "x"}
    refused = client.post("/hypervisors/images/add/", {**form, "file": _qcow2_like(BIG)})
    assert refused.status_code == 403 and not Image.objects.exists()  # no token: CSRF still applies
    r = client.post("/hypervisors/images/add/", {**form, "csrfmiddlewaretoken": token, "file": _qcow2_like(BIG)})
    assert r.status_code == 302, r.content[-500:]
    assert len(spooled) == 2  # each POST streamed its file to a temporary file, not memory
    image = Image.objects.get(name="big")
    assert image.total_bytes == BIG


def test_the_api_spools_for_staff_tokens_only(spooled, staff, user):
    body = {"name": "api-big", "kind": "disk", "format": "raw"}
    plain = APIClient()
    plain.credentials(HTTP_AUTHORIZATION=f"Token {ApiToken.issue(user=user)[1]}")
    r = plain.post("/api/v1/images/", {**body, "file": _qcow2_like(BIG)}, format="multipart")
    assert r.status_code == 403 and spooled == []
    anonymous = APIClient().post("/api/v1/images/", {**body, "file": _qcow2_like(BIG)}, format="multipart")
    assert anonymous.status_code == 401 and spooled == []
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {ApiToken.issue(user=staff)[1]}")
    r = api.post("/api/v1/images/", {**body, "file": _qcow2_like(BIG)}, format="multipart")
    assert r.status_code == 201, r.content
    assert len(spooled) == 1 and Image.objects.get(name="api-big").total_bytes == BIG


def test_the_api_spools_for_a_staff_session_with_csrf(spooled, staff):
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(staff)
    token = Client().get("/login/").cookies["csrftoken"].value
    api.cookies["csrftoken"] = token
    body = {"name": "session-big", "kind": "disk", "format": "raw", "file": _qcow2_like(BIG)}
    r = api.post("/api/v1/images/", body, format="multipart", HTTP_X_CSRFTOKEN=token)
    assert r.status_code == 201, r.content
    assert len(spooled) == 1
