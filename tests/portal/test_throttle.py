"""Repeated failed log-ins lock out a user name from an address, a user name, or an address: on the login page,
the admin's login and the API token header; in the audit trail; and a success clears the pair's count."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEvent, FailedLogin
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery"
LOCKED = "Too many failed attempts; try again in 15 minutes."


@pytest.fixture(autouse=True)
def limits(settings):
    settings.PORTAL_LOGIN_LOCKOUT_MINUTES = 15
    settings.PORTAL_LOGIN_MAX_FAILURES = 5
    settings.PORTAL_LOGIN_MAX_FAILURES_PER_USER = 8
    settings.PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS = 12


@pytest.fixture
def alice(db):
    return UserFactory(username="alice", password=PASSWORD)


def log_in(username: str, password: str, address: str = "10.0.0.7", path: str = "/login/"):
    client = Client(REMOTE_ADDR=address)
    response = client.post(path, {"username": username, "password": password})
    return response, "_auth_user_id" in client.session


def fail(times: int, username: str = "alice", address: str = "10.0.0.7") -> None:
    for _ in range(times):
        r, logged_in = log_in(username, "wrong-guess", address)
        assert r.status_code == 200 and not logged_in


def test_five_failures_lock_the_user_from_that_address_even_with_the_right_password(alice):
    fail(4)
    assert "Please enter a correct username and password." in log_in("alice", "wrong-guess")[0].content.decode()
    r, logged_in = log_in("alice", PASSWORD)
    assert r.status_code == 200 and not logged_in
    assert LOCKED in r.content.decode()
    lockout = AuditEvent.objects.get(action="login.lockout")
    assert (lockout.username, lockout.address, lockout.outcome) == ("alice", "10.0.0.7", "refused")
    assert lockout.detail == "5 failed log-ins for alice from 10.0.0.7 in 15 minutes: locked for 15 minutes"
    refusals = AuditEvent.objects.filter(action="login", outcome="refused").order_by("pk")
    assert [e.detail for e in refusals][-2:] == [
        "wrong user name or password",
        "locked out: 5 failed log-ins for alice from 10.0.0.7 in 15 minutes",
    ]
    assert FailedLogin.objects.count() == 5  # the locked attempt was not checked, so not counted


def test_the_same_user_from_another_address_still_logs_in(alice):
    fail(5)
    assert log_in("alice", PASSWORD, address="10.0.0.8")[1]


def test_user_names_count_whatever_their_case(alice):
    fail(3, "Alice")
    fail(2, " alice")
    assert LOCKED in log_in("alice", PASSWORD)[0].content.decode()


def test_a_success_clears_the_failures_of_the_user_from_that_address(alice):
    fail(4)
    assert log_in("alice", PASSWORD)[1]
    fail(4)
    assert log_in("alice", PASSWORD)[1]


def test_the_lock_ends_when_the_oldest_failure_leaves_the_window(alice):
    fail(5)
    FailedLogin.objects.update(created=timezone.now() - timedelta(minutes=10, seconds=30))
    assert "try again in 5 minutes." in log_in("alice", PASSWORD)[0].content.decode()
    FailedLogin.objects.update(created=timezone.now() - timedelta(minutes=15, seconds=1))
    assert log_in("alice", PASSWORD)[1]


def test_one_user_name_guessed_from_many_addresses_is_locked_everywhere(alice):
    for i in range(8):
        fail(1, address=f"10.0.1.{i}")
    r, logged_in = log_in("alice", PASSWORD, address="10.0.2.1")
    assert not logged_in and LOCKED in r.content.decode()
    assert "8 failed log-ins for alice in 15 minutes" in AuditEvent.objects.get(action="login.lockout").detail


def test_one_address_guessing_many_user_names_is_locked_for_all(alice):
    for i in range(12):
        fail(1, username=f"user{i}")
    r, logged_in = log_in("alice", PASSWORD)
    assert not logged_in and LOCKED in r.content.decode()
    assert log_in("alice", PASSWORD, address="10.0.0.9")[1]


def test_the_admin_login_is_throttled_too(alice):
    alice.is_staff = True
    alice.save()
    fail(5)
    r, logged_in = log_in("alice", PASSWORD, path="/admin/login/")
    assert r.status_code == 200 and not logged_in and LOCKED in r.content.decode()


def token_client(key: str, address: str = "10.0.0.7") -> APIClient:
    client = APIClient(REMOTE_ADDR=address)
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def test_unknown_api_tokens_lock_the_address_with_429(alice):
    _, raw = ApiToken.issue(user=alice, name="laptop")
    for i in range(12):
        assert token_client(f"{i:043d}").get("/api/v1/machines/").status_code == 401
    r = token_client(raw).get("/api/v1/machines/")  # a good token from that address too: nothing more is learnt
    assert r.status_code == 429
    # The lock's 15 minutes count from the locking failure: what passed since (seconds, on a loaded machine) is off.
    assert r.json()["detail"] == LOCKED and 840 <= int(r["Retry-After"]) <= 900
    assert token_client(raw, address="10.0.0.8").get("/api/v1/machines/").status_code == 200
    last = AuditEvent.objects.filter(action="login.token").first()
    assert last is not None and last.detail == "locked out: 12 failed log-ins from 10.0.0.7 in 15 minutes"
    assert AuditEvent.objects.filter(action="login.lockout", address="10.0.0.7").count() == 1
    # the address is locked for the login page as well
    assert LOCKED in log_in("alice", PASSWORD)[0].content.decode()


def test_an_expired_token_counts_towards_no_lock(alice):
    token, raw = ApiToken.issue(user=alice, expires_at=timezone.now() - timedelta(days=1))
    for _ in range(15):
        assert token_client(raw).get("/api/v1/machines/").status_code == 401
    assert not FailedLogin.objects.exists()


def test_the_test_clients_login_and_force_login_are_not_throttled(alice, client):
    # client.login() authenticates without a request, so the throttle has no address to count: the suite's
    # log-ins work as before, and so does a session made by force_login after failures.
    fail(5)
    assert client.login(username="alice", password=PASSWORD)
    client.force_login(alice)
    assert client.get("/").status_code == 200
