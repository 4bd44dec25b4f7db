import pytest
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEvent, SshKey

pytestmark = pytest.mark.django_db

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD me@laptop"


def test_a_token_is_shown_once_and_works(user_client, user):
    r = user_client.post("/account/tokens/", {"name": "laptop"})
    assert r.status_code == 200 and r["Cache-Control"] == "no-store"
    raw = r.content.decode().split('user-select-all">')[1].split("<")[0]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert api.get("/api/v1/machines/").status_code == 200
    assert raw not in user_client.get("/account/").content.decode()
    token = ApiToken.objects.get(user=user)
    user_client.post(f"/account/tokens/{token.pk}/revoke/")
    assert api.get("/api/v1/machines/").status_code == 401
    actions = AuditEvent.objects.filter(action__startswith="api_token").order_by("pk").values_list("action", flat=True)
    assert list(actions) == ["api_token.create", "api_token.revoke"]


def test_another_users_token_cannot_be_revoked(user_client, staff):
    token, _ = ApiToken.issue(user=staff)
    assert user_client.post(f"/account/tokens/{token.pk}/revoke/").status_code == 404
    assert ApiToken.objects.filter(pk=token.pk).exists()


def test_ssh_keys_are_validated_kept_and_offered_on_create(user_client, user):
    r = user_client.post("/account/keys/", {"name": "bad", "public_key": "ssh-rsa nonsense"})
    assert r.status_code == 200 and not SshKey.objects.exists()
    user_client.post("/account/keys/", {"name": "laptop", "public_key": KEY})
    assert SshKey.objects.get(user=user).public_key == KEY
    assert KEY in user_client.get("/machines/new/").content.decode()
    r = user_client.post("/account/keys/", {"name": "laptop", "public_key": KEY})
    assert "already have a key with that name" in r.content.decode()


def test_password_change(user_client, user):
    r = user_client.post(
        "/account/password/",
        {
            "old_password": "correct-horse-battery",
            "new_password1": "an-even-longer-one-42",
            "new_password2": "an-even-longer-one-42",
        },
    )
    assert r.status_code == 302
    user.refresh_from_db()
    assert user.check_password("an-even-longer-one-42")


def test_self_registration_is_off_by_default(client):
    assert client.get("/signup/").status_code == 404


def test_self_registration_when_on(client, settings):
    settings.PORTAL_SELF_REGISTRATION = True
    r = client.post(
        "/signup/", {"username": "newcomer", "password1": "a-long-pass-phrase-1", "password2": "a-long-pass-phrase-1"}
    )
    assert r.status_code == 302
    assert AuditEvent.objects.filter(action="user.signup", username="newcomer").exists()
    r = client.post("/signup/", {"username": "x", "password1": "short", "password2": "short"})
    assert r.status_code == 302  # already logged in: sent on
