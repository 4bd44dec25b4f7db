"""A new password or a deactivated account ends what the old credentials opened: consoles and API tokens."""

from datetime import timedelta

import pytest
from django.utils import timezone

from machines import consoles
from machines.models import ConsoleSession, ConsoleToken
from portal.models import ApiToken
from tests.factories import HypervisorFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def held(db):
    user = UserFactory(username="holder", password="old-password-123")
    machine = MachineFactory(name="m", owner=user, hypervisor=HypervisorFactory(name="h"), deploy_type="network")
    unused = ConsoleToken.objects.create(
        key_hash="x" * 64, machine=machine, user=user, expires_at=timezone.now() + timedelta(minutes=1)
    )
    session = ConsoleSession.objects.create(machine=machine, user=user, token=unused, client="127.0.0.1", proxy_pid=1)
    ApiToken.issue(user=user, name="laptop")
    return user, session


def test_a_password_change_revokes_consoles_and_api_tokens(held, client):
    user, session = held
    client.force_login(user)
    r = client.post(
        "/account/password/",
        {
            "old_password": "old-password-123",
            "new_password1": "n3w-Passw0rd-long",
            "new_password2": "n3w-Passw0rd-long",
        },
    )
    assert r.status_code in (200, 302)
    user.refresh_from_db()
    assert user.check_password("n3w-Passw0rd-long")
    assert not ConsoleToken.objects.filter(user=user).exists() and not ApiToken.objects.filter(user=user).exists()
    session.refresh_from_db()
    assert session.revoked and consoles.console_session_mode(session.pk)[0] == "end"


def test_deactivating_a_user_revokes_them_too(held):
    user, session = held
    user.is_active = False
    user.save()
    session.refresh_from_db()
    assert session.revoked and not ApiToken.objects.filter(user=user).exists()


def test_other_saves_revoke_nothing(held):
    user, session = held
    user.first_name = "Holder"
    user.save()
    session.refresh_from_db()
    assert not session.revoked and ApiToken.objects.filter(user=user).count() == 1


def test_a_log_in_costs_no_extra_query(held, django_assert_num_queries):
    user, _ = held
    user.first_name = "x"
    with django_assert_num_queries(1):  # the UPDATE alone: no look at the old password
        user.save(update_fields=["last_login"])
