import io

import pytest
from django.contrib.auth import get_user_model
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


def test_bootstrap_refuses_a_short_password(monkeypatch):
    monkeypatch.setenv("PORTAL_ADMIN_USER", "ops")
    monkeypatch.setenv("PORTAL_ADMIN_PASSWORD", "short")
    with pytest.raises(CommandError, match="at least 8"):
        run("bootstrap")
