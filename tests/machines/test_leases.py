"""Leases (machines/leases.py, machines/services/leases.py) with frozen time: `now` is passed to the periodic
check, the FakeDriver takes the power calls and deletes through the services, mail goes to Django's locmem
outbox. A new machine's lease from its project, the limits of an extension, the warning once, the shut-down
at the end, the power-off of a guest that ignores it, the delete later, protection winning, a lab's lease."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client
from django.utils import timezone

from hypervisors.drivers.base import PowerState
from labs import services as lab_services
from labs.models import Lab
from machines import leases, services
from machines.models import Machine, Membership, Project, Role
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import UserFactory
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(owner):  # noqa: F811
    p = Project.objects.create(name="leased", lease_default_days=7, lease_max_days=30)
    Membership.objects.create(project=p, user=owner, role=Role.ADMIN)
    return p


@pytest.fixture
def machine(django_capture_on_commit_callbacks, host, owner, hv, image, project):  # noqa: F811
    owner.email = "owner@example.org"
    owner.save()
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, project=project))
    assert m.status == Status.ACTIVE and m.power_state == PowerState.RUNNING
    return m


def run(capture, now):
    with capture(execute=True):
        done = services.leases_enforce(now)
    return done


def test_a_new_machine_gets_its_projects_default_lease(machine):
    assert machine.expires_at is not None
    assert abs(machine.expires_at - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)


def test_a_create_may_choose_a_lease_up_to_the_maximum_or_none_without_one(
    django_capture_on_commit_callbacks,
    host,
    owner,  # noqa: F811
    hv,  # noqa: F811
    image,  # noqa: F811
    project,
    staff,
):
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, project=project, lease_days=2))
    assert abs(m.expires_at - (timezone.now() + timedelta(days=2))) < timedelta(minutes=1)
    with pytest.raises(ValidationError, match="at most 30 days"):
        services.machine_create(**base_kwargs(owner, hv, image, name="long", project=project, lease_days=31))
    with pytest.raises(ValidationError, match="only staff may remove a lease"):
        services.machine_create(**base_kwargs(owner, hv, image, name="none", project=project, lease_days=0))
    with pytest.raises(ValidationError, match="0 \\(none\\) to 3650"):
        services.machine_create(**base_kwargs(owner, hv, image, name="neg", project=project, lease_days=-1))
    mine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, name="mine"))
    assert mine.expires_at is None  # no project: no default lease
    forever = create(
        django_capture_on_commit_callbacks,
        **base_kwargs(staff, hv, image, name="staffs", project=project, lease_days=0, nics=None),
    )
    assert forever.expires_at is None


def test_the_owner_extends_up_to_the_project_maximum_and_staff_beyond(machine, owner, staff):  # noqa: F811
    now = timezone.now()
    services.machine_extend_lease(machine=machine, actor=owner, until=now + timedelta(days=30))
    with pytest.raises(leases.LeaseRefused, match="at most 30 days"):
        services.machine_extend_lease(machine=machine, actor=owner, until=now + timedelta(days=31))
    with pytest.raises(leases.LeaseRefused, match="in the future"):
        services.machine_extend_lease(machine=machine, actor=owner, until=now - timedelta(minutes=1))
    with pytest.raises(leases.LeaseRefused, match="only staff"):
        services.machine_extend_lease(machine=machine, actor=owner, until=None)
    services.machine_extend_lease(machine=machine, actor=staff, until=now + timedelta(days=400))
    machine.refresh_from_db()
    assert machine.expires_at > now + timedelta(days=399)
    services.machine_extend_lease(machine=machine, actor=staff, until=None)
    machine.refresh_from_db()
    assert machine.expires_at is None
    refused = AuditEvent.objects.filter(action="machine.lease", outcome="refused").count()
    assert refused == 3


def test_an_operator_may_not_extend_and_a_stranger_gets_a_404(machine, project):
    operator = UserFactory(username="op")
    Membership.objects.create(project=project, user=operator, role=Role.OPERATOR)
    with pytest.raises(PermissionDenied):
        services.machine_extend_lease(machine=machine, actor=operator, until=timezone.now() + timedelta(days=1))


def test_warned_once_then_shut_down_at_the_end_then_powered_off_then_deleted(
    django_capture_on_commit_callbacks, settings, host, machine
):
    end = machine.expires_at
    assert run(django_capture_on_commit_callbacks, end - timedelta(hours=25))["warned"] == 0
    assert run(django_capture_on_commit_callbacks, end - timedelta(hours=23))["warned"] == 1
    assert run(django_capture_on_commit_callbacks, end - timedelta(hours=22))["warned"] == 0  # once
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["owner@example.org"]
    assert "web1" in mail.outbox[0].subject and "shut down" in mail.outbox[0].body
    done = run(django_capture_on_commit_callbacks, end + timedelta(seconds=1))
    assert done["shut_down"] == 1
    machine.refresh_from_db()
    assert machine.expired_off is not None and machine.status == Status.ACTIVE
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=2))["shut_down"] == 0  # once
    # As if the guest ignored the ACPI shut-down: still running, so the power-off follows.
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING)
    host.domains[str(machine.uuid)]["state"] = PowerState.RUNNING
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=3))["powered_off"] == 0  # not yet
    late = end + timedelta(seconds=settings.PORTAL_LEASE_POWEROFF_AFTER + 2)
    assert run(django_capture_on_commit_callbacks, late)["powered_off"] == 1
    machine.refresh_from_db()
    assert machine.power_state == PowerState.OFF and host.domains[str(machine.uuid)]["state"] == PowerState.OFF
    assert run(django_capture_on_commit_callbacks, end + timedelta(hours=71))["deleted"] == 0
    assert run(django_capture_on_commit_callbacks, end + timedelta(hours=73))["deleted"] == 1
    assert not Machine.objects.filter(pk=machine.pk).exists() and not host.domains
    actions = set(AuditEvent.objects.filter(username="portal (lease)").values_list("action", flat=True))
    assert {"machine.lease_warn", "machine.power", "machine.delete"} <= actions


def test_protection_wins_the_machine_is_only_warned(django_capture_on_commit_callbacks, host, machine):
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=True)
    end = machine.expires_at
    assert run(django_capture_on_commit_callbacks, end - timedelta(hours=1))["warned"] == 1
    assert "neither shut down nor deleted" in mail.outbox[0].body
    for later in (timedelta(seconds=1), timedelta(hours=1), timedelta(days=30)):
        done = run(django_capture_on_commit_callbacks, end + later)
        assert done == {"warned": 0, "shut_down": 0, "powered_off": 0, "deleted": 0}
    machine.refresh_from_db()
    assert machine.power_state == PowerState.RUNNING and machine.expired_off is None


def test_an_extension_after_the_shut_down_keeps_the_machine(django_capture_on_commit_callbacks, host, machine, owner):  # noqa: F811
    end = machine.expires_at
    run(django_capture_on_commit_callbacks, end + timedelta(seconds=1))
    services.machine_extend_lease(machine=machine, actor=owner, until=timezone.now() + timedelta(days=10))
    done = run(django_capture_on_commit_callbacks, end + timedelta(hours=80))
    assert done["deleted"] == 0 and Machine.objects.filter(pk=machine.pk).exists()


def test_a_busy_machine_is_shut_down_at_a_later_check(django_capture_on_commit_callbacks, host, machine):
    Machine.objects.filter(pk=machine.pk).update(operation="reboot")
    end = machine.expires_at
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=1))["shut_down"] == 0
    machine.refresh_from_db()
    assert machine.expired_off is None  # not marked: the step is whole or not at all
    Machine.objects.filter(pk=machine.pk).update(operation="")
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=61))["shut_down"] == 1


def test_a_machine_in_error_is_deleted_and_one_provisioning_waits(django_capture_on_commit_callbacks, host, machine):
    end = machine.expires_at
    Machine.objects.filter(pk=machine.pk).update(status=Status.PROVISIONING)
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=1))["shut_down"] == 0
    Machine.objects.filter(pk=machine.pk).update(status=Status.ERROR)
    assert run(django_capture_on_commit_callbacks, end + timedelta(seconds=2))["shut_down"] == 1  # marked only
    assert host.domains[str(machine.uuid)]["state"] == PowerState.RUNNING  # no power call on a failed machine
    assert run(django_capture_on_commit_callbacks, end + timedelta(hours=73))["deleted"] == 1
    assert not Machine.objects.filter(pk=machine.pk).exists()


def test_a_failing_mail_server_still_warns_on_the_page(django_capture_on_commit_callbacks, settings, machine):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 2  # nothing listens
    run(django_capture_on_commit_callbacks, machine.expires_at - timedelta(hours=1))
    event = machine.events.filter(step="lease").latest("pk")
    assert "the e-mail failed" in event.message


def test_the_dashboard_lists_machines_expiring_soon(client, machine, owner, settings):  # noqa: F811
    client.force_login(owner)
    assert b"Expiring soon" not in client.get("/").content
    Machine.objects.filter(pk=machine.pk).update(expires_at=timezone.now() + timedelta(hours=2))
    page = client.get("/").content.decode()
    assert "Expiring soon" in page and "web1" in page


def test_a_labs_lease_applies_to_its_machines(machine, owner, project, staff):  # noqa: F811
    lab = Lab.objects.create(name="lab1", owner=owner, project=project)
    lab_services.lab_add_machine(lab=lab, machine=machine)
    until = timezone.now() + timedelta(days=20)
    lab_services.lab_set_lease(lab=lab, actor=owner, until=until)
    machine.refresh_from_db()
    lab.refresh_from_db()
    assert lab.expires_at == until and machine.expires_at == until
    with pytest.raises(leases.LeaseRefused, match="at most 30 days"):
        lab_services.lab_set_lease(lab=lab, actor=owner, until=timezone.now() + timedelta(days=40))
    with pytest.raises(PermissionDenied):
        lab_services.lab_set_lease(lab=lab, actor=UserFactory(username="nobody"), until=until)
    client = Client()
    client.force_login(owner)
    url = f"/api/v1/labs/{lab.pk}/lease/"
    r = client.post(url, {"until": (timezone.now() + timedelta(days=45)).isoformat()}, content_type="application/json")
    assert r.status_code == 400 and "at most 30 days" in r.json()["until"][0]
    r = client.post(url, {"until": (timezone.now() + timedelta(days=5)).isoformat()}, content_type="application/json")
    assert r.status_code == 200 and r.json()["expires_at"]
    machine.refresh_from_db()
    assert abs(machine.expires_at - (timezone.now() + timedelta(days=5))) < timedelta(minutes=1)
    assert client.post(url, {"until": "soon"}, content_type="application/json").status_code == 400
