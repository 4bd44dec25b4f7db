import pytest
from django.test import Client
from rest_framework.test import APIClient

from hypervisors import services as hv_services
from portal.models import ApiToken, AuditEvent
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_logins_and_failed_logins_are_recorded(user):
    client = Client(REMOTE_ADDR="192.0.2.7")
    client.post("/login/", {"username": "alice", "password": "nope"})
    client.post("/login/", {"username": "alice", "password": "correct-horse-battery"})
    client.post("/logout/")
    events = AuditEvent.objects.filter(action__in=("login", "logout")).order_by("pk")
    events = list(events.values_list("action", "outcome", "username", "address"))
    assert events == [
        ("login", "refused", "alice", "192.0.2.7"),
        ("login", "success", "alice", "192.0.2.7"),
        ("logout", "success", "alice", "192.0.2.7"),
    ]


def test_api_changes_are_recorded_with_the_token_user(staff, django_capture_on_commit_callbacks):
    _, raw = ApiToken.issue(user=staff)
    api = APIClient(REMOTE_ADDR="198.51.100.9")
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    api.post("/api/v1/hypervisors/", {"name": "lab", "uri": "qemu+tcp://127.0.0.1:1/system"}, format="json")
    created = AuditEvent.objects.get(action="hypervisor.create")
    assert (created.username, created.address, created.outcome, created.object_repr) == (
        staff.username,
        "198.51.100.9",
        "success",
        "lab",
    )
    assert "uri=qemu+tcp://127.0.0.1:1/system" in created.detail


def test_refused_deletes_are_recorded(staff):
    hv = HypervisorFactory(name="lab")

    MachineFactory(name="m", owner=staff, hypervisor=hv, deploy_type="network")
    with pytest.raises(hv_services.HypervisorInUse):
        hv_services.hypervisor_delete(hypervisor=hv)
    event = AuditEvent.objects.get(action="hypervisor.delete")
    assert event.outcome == "refused" and "still has 1 machine" in event.detail


def test_staff_read_and_filter_the_trail(staff_client, user_client, staff):
    AuditEvent.objects.create(username="alice", action="machine.power", outcome="success")
    AuditEvent.objects.create(username="bob", action="login", outcome="refused")
    r = staff_client.get("/audit/?outcome=refused")
    assert r.status_code == 200 and b"bob" in r.content and b"machine.power" not in r.content.split(b"<tbody>")[1]
    assert user_client.get("/audit/").status_code == 403
    _, raw = ApiToken.issue(user=staff)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert [e["username"] for e in api.get("/api/v1/audit/?action=machine").json()["results"]] == ["alice"]


def test_the_trail_cannot_be_read_by_users_through_the_api(user):
    _, raw = ApiToken.issue(user=user)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert api.get("/api/v1/audit/").status_code == 403


def test_no_secret_lands_in_the_trail(staff_client, staff):
    UserFactory(username="x")
    staff_client.post("/login/", {"username": "x", "password": "hunter2-secret"})
    assert not AuditEvent.objects.filter(detail__contains="hunter2").exists()


def test_every_audited_call_is_a_public_service_naming_its_object_by_keyword():
    """The class of the misplaced decorator (it sat on a private helper called positionally, so every
    finished operation wrote an anonymous "machine.media" row and media changes wrote none)."""
    import inspect

    from hypervisors import images, networks  # noqa: F401 - import every module with audited services
    from machines import (
        consoles,  # noqa: F401
        services,  # noqa: F401
    )
    from portal.audit import AUDITED

    actions = [action for action, _kwarg, _fn in AUDITED]
    assert len(actions) == len(set(actions)), sorted(a for a in actions if actions.count(a) > 1)  # one service each
    for action, obj_kwarg, fn in AUDITED:
        assert not fn.__name__.startswith("_"), f"{action} is on a private helper: {fn.__name__}"
        if obj_kwarg:
            param = inspect.signature(fn).parameters.get(obj_kwarg)
            assert param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY, (action, fn.__name__)


def test_a_media_change_records_machine_media_and_other_operations_do_not(django_capture_on_commit_callbacks):
    from machines import services
    from machines.models import Machine
    from machines.services import common

    hv = HypervisorFactory(name="lab", console_address="127.0.0.1")
    owner = UserFactory(username="media")
    iso = ImageFactory(name="installer", kind="iso", format="raw", status="ready")
    machine = MachineFactory(name="m", owner=owner, hypervisor=hv, deploy_type="iso", status="active", image=iso)
    machine.cdroms.create(slot=0)
    with django_capture_on_commit_callbacks(execute=False):
        services.machine_change_media(machine=machine, slot=0, image=None, actor=machine.owner)
    media = AuditEvent.objects.get(action="machine.media")
    assert (media.object_repr, media.outcome, "slot=0" in media.detail) == ("m", "success", True)
    common._release_operation(machine)  # what every finished operation does
    with django_capture_on_commit_callbacks(execute=False):
        services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=machine.owner)
    assert AuditEvent.objects.filter(action="machine.media").count() == 1
    power = AuditEvent.objects.get(action="machine.power")  # recorded again (its decorator had wandered too)
    assert (power.object_repr, "action=poweroff" in power.detail) == ("m", True)


def test_every_service_refusal_is_recorded_as_refused_and_a_breakdown_as_failed():
    from hypervisors.drivers.base import HypervisorError
    from hypervisors.images import ImageInUse
    from hypervisors.services import HypervisorInUse
    from machines.capacity import QuotaExceeded
    from machines.consoles import ConsoleDenied
    from machines.services import MachineError
    from portal import audit

    for error in (MachineError, HypervisorInUse, ImageInUse, ConsoleDenied, QuotaExceeded):
        assert audit._is_refusal(error("no")), error
    for error in (HypervisorError, RuntimeError, OSError):
        assert not audit._is_refusal(error("broke")), error


def test_a_service_refuses_a_role_itself_and_records_who_was_refused(django_capture_on_commit_callbacks):
    """No view in between: the service is told the actor and decides by machines.policy; the refusal is
    recorded against that actor, and the machine is untouched."""
    from django.core.exceptions import PermissionDenied

    from machines import services
    from machines.models import Machine, Membership, Project, Role

    owner, viewer = UserFactory(username="owner"), UserFactory(username="peeker")
    project = Project.objects.create(name="lab")
    Membership.objects.create(project=project, user=viewer, role=Role.VIEWER)
    machine = MachineFactory(name="m", owner=owner, project=project, status="active")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        for call in (
            lambda: services.machine_delete(machine=machine, actor=viewer),
            lambda: services.machine_power(machine=machine, action="poweroff", actor=viewer),
            lambda: services.machine_set_autostart(machine=machine, enabled=not machine.autostart, actor=viewer),
        ):
            with pytest.raises(PermissionDenied):
                call()
    assert queued == []
    refused = AuditEvent.objects.filter(outcome="refused").order_by("pk")
    assert [(e.action, e.username) for e in refused] == [
        ("machine.delete", "peeker"),
        ("machine.power", "peeker"),
        ("machine.autostart", "peeker"),
    ]
    fresh = Machine.objects.get(pk=machine.pk)
    assert (fresh.status, fresh.operation, fresh.autostart) == ("active", "", machine.autostart)
