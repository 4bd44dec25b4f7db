"""What the API answers where the fuzzer (tests/test_api_fuzz.py) found a 500 or an answer outside its schema."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from portal.models import ApiToken
from tests.factories import ImageFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(db):
    _, raw = ApiToken.issue(user=UserFactory(username="reader"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


def test_a_limit_past_64_bits_is_capped_not_a_500(api):
    ImageFactory.create_batch(3)
    r = api.get("/api/v1/images/", {"limit": "9703798707753448432388276224", "offset": "1"})
    assert r.status_code == 200, r.content
    assert r.json()["count"] == 3 and len(r.json()["results"]) == 2


def test_a_limit_over_the_cap_gets_the_cap(api, monkeypatch):
    monkeypatch.setattr("portal.pagination.Pagination.max_limit", 2)
    ImageFactory.create_batch(3)
    assert len(api.get("/api/v1/images/", {"limit": "500"}).json()["results"]) == 2


@pytest.mark.parametrize("method", ["get", "post", "delete"])
@pytest.mark.parametrize("path", ["/api/v1/machines/0.5/", "/api/v1/machines/1.5/power/", "/api/v1/nothing/"])
def test_an_unrouted_api_path_answers_json_404(api, method, path):
    # POST and DELETE with no CSRF cookie too: the CSRF failure page is HTML.
    r = getattr(APIClient(enforce_csrf_checks=True), method)(path)
    assert (r.status_code, r["Content-Type"], r.json()) == (404, "application/json", {"detail": "Not found."})


def test_the_schema_is_served_without_a_query():
    # Public, and fetched at collection time by the fuzzer while the database is blocked.
    with CaptureQueriesContext(connection) as queries:
        r = APIClient().get("/api/v1/schema/", {"format": "json"})
    assert r.status_code == 200 and len(queries) == 0


def test_the_schema_declares_the_error_answers():
    paths = APIClient().get("/api/v1/schema/", {"format": "json"}).json()["paths"]
    power = paths["/api/v1/machines/{id}/power/"]["post"]["responses"]
    assert {"202", "400", "401", "403", "404", "409"} <= set(power)
    assert set(paths["/api/v1/hypervisors/"]["get"]["responses"]) >= {"200", "400", "401", "403"}
    assert "404" not in paths["/api/v1/hypervisors/"]["get"]["responses"]  # no object in that path


def test_an_export_refused_in_download_format_says_it_is_json(api):
    # ?format=download lets any Accept header reach the exports; a refusal there was labelled "*/*".
    r = api.get("/api/v1/audit/export/csv/", {"format": "download"})
    assert (r.status_code, r["Content-Type"]) == (403, "application/json")


def test_the_json_export_is_one_array_in_the_schema_too():
    paths = APIClient().get("/api/v1/schema/", {"format": "json"}).json()["paths"]
    answer = paths["/api/v1/audit/export/json/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array"


@pytest.mark.parametrize("path", ["/api/v1/machines/", "/api/v1/labs/", "/api/v1/machines/1/power/"])
@pytest.mark.parametrize("body", ["too-many-fields", "form-too-many-fields", "malformed-multipart"])
def test_a_body_django_refuses_before_any_view_answers_json_400_under_the_api(api, settings, path, body):
    """The fuzzer sent a multipart body with thousands of fields to a run's start: Django refused it before the
    view (TooManyFieldsSent) with its HTML 400. Every such refusal under /api/ is the API's JSON 400."""
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    if body == "too-many-fields":
        r = api.post(path, {"machines": list(range(50))}, format="multipart")
    elif body == "form-too-many-fields":
        r = api.generic("POST", path, "&".join(f"f{i}=1" for i in range(50)), "application/x-www-form-urlencoded")
    else:
        r = api.generic("POST", path, b"--x\r\nnot a part", "multipart/form-data; boundary=x")
    # Refused before the view (Django's own limits), or by DRF's parser, or by the view: always the API's JSON.
    assert r.status_code in (400, 404), r.content
    assert r["Content-Type"] == "application/json", r.content
    if body != "malformed-multipart":
        assert r.json() == {"detail": "Bad request: The number of GET/POST parameters exceeded "
                            "settings.DATA_UPLOAD_MAX_NUMBER_FIELDS."}  # fmt: skip


def test_pages_keep_djangos_own_400(settings, client):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    r = client.post("/login/", "&".join(f"f{i}=1" for i in range(50)), content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and r["Content-Type"].startswith("text/html")
