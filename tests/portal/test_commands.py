import io

import pytest
from django.contrib.auth import get_user_model, password_validation
from django.core.management import CommandError, call_command

from hypervisors.models import Hypervisor
from portal.models import ApiToken, hash_token

pytestmark = pytest.mark.django_db


def run(*args, **kwargs) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, **kwargs)
    return out.getvalue()


def test_create_api_token_prints_only_the_token(staff):
    out = run("create_api_token", staff.username)
    raw = out.strip()
    assert out == raw + "\n" and len(raw) >= 40
    assert ApiToken.objects.get(key_hash=hash_token(raw)).user == staff


def test_create_api_token_for_a_missing_user_fails():
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        run("create_api_token", "nobody")


def test_bootstrap_registers_local_and_prints_a_generated_password_once(monkeypatch, settings):
    monkeypatch.delenv("PORTAL_ADMIN_USER", raising=False)
    monkeypatch.delenv("PORTAL_ADMIN_PASSWORD", raising=False)
    settings.PORTAL_LOCAL_HYPERVISOR_URI = "qemu+tcp://127.0.0.1:1/system"  # not contacted inline here
    out = run("bootstrap")
    local = Hypervisor.objects.get(name="local")
    assert local.uri == "qemu+tcp://127.0.0.1:1/system"
    password = out.split("with password: ")[1].split()[0]
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(password)
    again = run("bootstrap")
    assert again == "" and Hypervisor.objects.count() == 1


def test_bootstrap_takes_the_admin_from_the_environment(monkeypatch):
    monkeypatch.setenv("PORTAL_ADMIN_USER", "ops")
    monkeypatch.setenv("PORTAL_ADMIN_PASSWORD", "a-long-password")
    out = run("bootstrap")
    assert "a-long-password" not in out
    assert get_user_model().objects.get(username="ops").check_password("a-long-password")


@pytest.mark.parametrize(
    "password, reason",
    [
        ("short", "at least 8 characters"),
        ("password123", "too common"),
        ("4815162342", "entirely numeric"),
        ("operations", "too similar to the username"),
    ],
)
def test_bootstrap_refuses_a_password_the_validators_refuse_and_creates_no_admin(monkeypatch, password, reason):
    monkeypatch.setenv("PORTAL_ADMIN_USER", "operations")
    monkeypatch.setenv("PORTAL_ADMIN_PASSWORD", password)
    with pytest.raises(CommandError, match=f"PORTAL_ADMIN_PASSWORD is refused: .*{reason}"):
        run("bootstrap")
    assert not get_user_model().objects.filter(username="operations").exists()


def test_bootstrap_sets_no_refused_password_on_an_existing_admin(monkeypatch, staff):
    monkeypatch.setenv("PORTAL_ADMIN_USER", staff.username)
    monkeypatch.setenv("PORTAL_ADMIN_PASSWORD", "12345678")
    with pytest.raises(CommandError, match="entirely numeric"):
        run("bootstrap")
    staff.refresh_from_db()
    assert not staff.check_password("12345678")


def test_the_generated_admin_password_passes_every_validator(monkeypatch, settings):
    monkeypatch.delenv("PORTAL_ADMIN_USER", raising=False)
    monkeypatch.delenv("PORTAL_ADMIN_PASSWORD", raising=False)
    settings.PORTAL_LOCAL_HYPERVISOR_URI = "qemu+tcp://127.0.0.1:1/system"
    password = run("bootstrap").split("with password: ")[1].split()[0]
    admin = get_user_model().objects.get(username="admin")
    password_validation.validate_password(password, admin)  # raises if any refuses it
    names = {type(v).__name__ for v in password_validation.get_default_password_validators()}
    assert names == {
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    }
