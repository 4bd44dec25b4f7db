"""API tokens may expire and may be read-only: chosen at creation, held by the token authentication itself."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEvent, hash_token

pytestmark = pytest.mark.django_db


def api(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


def created_key(response) -> str:
    return response.content.decode().split('user-select-all">')[1].split("<")[0]


def test_the_account_page_creates_a_read_only_token_that_expires(user_client, user):
    before = timezone.now()
    r = user_client.post("/account/tokens/", {"name": "monitoring", "expires": "7", "read_only": "on"})
    assert r.status_code == 200
    token = ApiToken.objects.get(user=user)
    assert token.read_only and token.expires_at is not None
    assert timedelta(days=7) <= token.expires_at - before < timedelta(days=7, minutes=1)
    page = user_client.get("/account/").content.decode()
    assert "read-only" in page and f"expires {timezone.localtime(token.expires_at):%Y-%m-%d}" in page
    created = AuditEvent.objects.get(action="api_token.create")
    assert created.detail.startswith("read-only, expires ")
    assert api(created_key(r)).get("/api/v1/machines/").status_code == 200


def test_by_default_a_token_never_expires_and_may_write(user_client, user):
    user_client.post("/account/tokens/", {"name": "laptop", "expires": ""})
    token = ApiToken.objects.get(user=user)
    assert token.expires_at is None and not token.read_only


def test_an_unknown_expiry_is_a_form_error(user_client, user):
    r = user_client.post("/account/tokens/", {"name": "laptop", "expires": "3650"})
    assert r.status_code == 200 and "Select a valid choice" in r.content.decode()
    assert not ApiToken.objects.exists()


def test_an_expired_token_is_refused_and_recorded(user):
    token, raw = ApiToken.issue(user=user, name="old", expires_at=timezone.now() + timedelta(minutes=5))
    assert api(raw).get("/api/v1/machines/").status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    r = api(raw).get("/api/v1/machines/")
    assert r.status_code == 401 and r.json()["detail"] == "Token expired."
    refusal = AuditEvent.objects.get(action="login.token")
    assert (refusal.outcome, refusal.detail, refusal.username) == ("refused", "token expired", "alice")


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_a_read_only_token_may_not_write_anywhere(user, staff, method):
    _, raw = ApiToken.issue(user=staff, name="ro", read_only=True)
    for path in ("/api/v1/machines/", "/api/v1/hypervisors/", "/api/v1/audit/1/"):
        r = getattr(api(raw), method)(path, {}, format="json")
        assert r.status_code == 403, path
        assert r.json()["detail"] == (
            f"This token is read-only: it may use GET, HEAD and OPTIONS, not {method.upper()}."
        )
    refused = AuditEvent.objects.filter(action="login.token", outcome="refused")
    assert refused.count() == 3
    assert all(
        d.startswith(f"read-only token: {method.upper()} /api/v1/") for d in refused.values_list("detail", flat=True)
    )


def test_a_read_only_token_reads(staff):
    _, raw = ApiToken.issue(user=staff, name="ro", read_only=True)
    client = api(raw)
    assert client.get("/api/v1/machines/").status_code == 200
    assert client.head("/api/v1/hypervisors/").status_code == 200
    assert client.options("/api/v1/machines/").status_code == 200
    assert client.get("/api/v1/audit/").status_code == 200


def test_a_read_write_token_still_writes(staff):
    _, raw = ApiToken.issue(user=staff, name="rw")
    r = api(raw).post("/api/v1/hypervisors/", {"name": "h1", "uri": "test:///default"}, format="json")
    assert r.status_code == 201


def test_create_api_token_takes_an_expiry_and_the_read_only_scope(staff):
    out = io.StringIO()
    call_command("create_api_token", staff.username, "--expires-days", "30", "--read-only", stdout=out)
    token = ApiToken.objects.get(key_hash=hash_token(out.getvalue().strip()))
    assert token.read_only and token.expires_at is not None
    assert timedelta(days=29) < token.expires_at - timezone.now() <= timedelta(days=30)
