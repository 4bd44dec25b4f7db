"""Changing a machine after create (machines.services.changes) on the fake hypervisor: live within the maxima,
pending beyond them until a cold start, quota and room, rename, labels, protection and autostart, roles."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from hypervisors.drivers.base import PowerState
from machines import services
from machines.models import Machine, Membership, Project, Quota, Role
from machines.services import MachineError
from portal.models import AuditEvent
from tests.factories import UserFactory
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture
def made(django_capture_on_commit_callbacks, host, owner, hv, image):  # noqa: F811
    def make(**kw):
        return create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, **kw))

    return make


def change(capture, machine, actor=None, **fields) -> Machine:
    with capture(execute=True):
        changed = services.machine_change(machine=machine, actor=actor or machine.owner, **fields)
    changed.refresh_from_db()  # after the worker's run
    return changed


def test_a_machine_made_with_maxima_is_defined_to_grow_and_grows_live(made, host, django_capture_on_commit_callbacks):
    machine = made(vcpus=1, max_vcpus=2, memory_mib=256, max_memory_mib=512)
    spec = host.domains[str(machine.uuid)]["spec"]
    assert (spec.vcpus, spec.max_vcpus, spec.memory_mib, spec.max_memory_mib) == (1, 2, 256, 512)
    machine = change(django_capture_on_commit_callbacks, machine, vcpus=2, memory_mib=384)
    size = host.get_driver("fake:///").domain_size(str(machine.uuid))
    assert (size.live_vcpus, size.live_memory_mib) == (2, 384) and (size.vcpus, size.memory_mib) == (2, 384)
    assert (machine.vcpus, machine.memory_mib, machine.pending, machine.operation) == (2, 384, {}, "")
    assert "the running machine has them now" in machine.events.last().message
    record = AuditEvent.objects.filter(action="machine.change").get()
    assert record.outcome == "success" and "vcpus 1 -> 2" in record.detail and "memory_mib 256 -> 384" in record.detail


def test_beyond_the_maximum_it_waits_for_the_next_cold_start(made, host, django_capture_on_commit_callbacks):
    machine = made(vcpus=1, memory_mib=256)
    machine = change(django_capture_on_commit_callbacks, machine, memory_mib=512)
    assert machine.pending == {"memory_mib": 512} and machine.memory_mib == 512
    size = host.get_driver("fake:///").domain_size(str(machine.uuid))
    assert (size.memory_mib, size.live_memory_mib) == (512, 256)  # in the config now, in the guest later
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=machine, action="reboot", actor=machine.owner)  # warm: still pending
    machine.refresh_from_db()
    assert machine.pending == {"memory_mib": 512}
    host.domains[str(machine.uuid)]["state"] = PowerState.OFF
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=machine, action="start", actor=machine.owner)
    machine.refresh_from_db()
    assert machine.pending == {}
    assert host.get_driver("fake:///").domain_size(str(machine.uuid)).live_memory_mib == 512
    assert machine.events.filter(message__startswith="applied at this cold start: memory_mib 512").exists()


def test_a_smaller_value_of_a_running_machine_waits_too(made, host, django_capture_on_commit_callbacks):
    machine = made(vcpus=2, memory_mib=256)
    machine = change(django_capture_on_commit_callbacks, machine, vcpus=1)
    assert machine.pending == {"vcpus": 1} and machine.vcpus == 1


def test_quota_and_the_hypervisors_room_are_checked(made, owner, hv, django_capture_on_commit_callbacks):  # noqa: F811
    machine = made(vcpus=1)
    Quota.objects.update_or_create(user=owner, defaults={"vcpus": 2})
    with pytest.raises(ValidationError, match="vCPUs of 2 allowed"):
        change(django_capture_on_commit_callbacks, machine, vcpus=3)
    Quota.objects.filter(user=owner).update(vcpus=None, memory_mib=1 << 20)
    with pytest.raises(ValidationError, match="MiB memory free"):
        change(django_capture_on_commit_callbacks, machine, memory_mib=hv.memory_mib + 1)
    machine.refresh_from_db()
    assert (machine.vcpus, machine.operation) == (1, "")
    assert AuditEvent.objects.filter(action="machine.change", outcome="refused").count() == 2


def test_rename_is_refused_while_running_and_renames_the_domain_when_off(
    made, host, django_capture_on_commit_callbacks
):
    machine = made()
    with pytest.raises(MachineError, match="only while it is shut off"):
        change(django_capture_on_commit_callbacks, machine, name="db1")
    host.domains[str(machine.uuid)]["state"] = PowerState.OFF
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.OFF)
    machine.refresh_from_db()
    machine = change(django_capture_on_commit_callbacks, machine, name="db1")
    assert machine.name == "db1" and machine.domain_name == f"db1-{machine.uuid.hex[:8]}"
    assert host.domains[str(machine.uuid)]["spec"].name == machine.domain_name


def test_an_adopted_machine_is_renamed_in_the_portal_only(made, host, django_capture_on_commit_callbacks):
    machine = made()
    Machine.objects.filter(pk=machine.pk).update(adopted=True, own_domain_name="legacy-vm")
    machine.refresh_from_db()
    machine = change(django_capture_on_commit_callbacks, machine, name="renamed")  # running: fine
    assert (machine.name, machine.domain_name) == ("renamed", "legacy-vm")
    assert "rename_domain" not in host.calls


def test_names_are_hostnames_and_unique_per_owner(made, django_capture_on_commit_callbacks):
    first, second = made(), made(name="web2")
    Machine.objects.filter(pk=second.pk).update(power_state=PowerState.OFF)
    second.refresh_from_db()
    with pytest.raises(ValidationError, match="already have a machine called web1"):
        change(django_capture_on_commit_callbacks, second, name=first.name)
    with pytest.raises(ValidationError, match="RFC 1123"):
        change(django_capture_on_commit_callbacks, second, name="-bad_")


def test_description_tags_protection_and_autostart(made, host, django_capture_on_commit_callbacks):
    machine = made()
    machine = change(
        django_capture_on_commit_callbacks,
        machine,
        description=" web front ",
        tags=["Web", "prod", "web"],
        deletion_protection=True,
        autostart=False,
    )
    assert (machine.description, machine.tags) == ("web front", ["web", "prod"])
    assert machine.deletion_protection is True and machine.autostart is False
    assert host.domains[str(machine.uuid)]["autostart"] is False
    for bad in (["no spaces"], ["x" * 33], "a,b;c", [1]):
        with pytest.raises(ValidationError, match="tag"):
            change(django_capture_on_commit_callbacks, machine, tags=bad)
    with pytest.raises(ValidationError, match="cannot be changed here"):
        change(django_capture_on_commit_callbacks, machine, disk_gib=5)


def test_maxima_at_create_are_at_least_the_values(made):
    with pytest.raises(ValidationError, match="From the 2 vCPUs"):
        made(vcpus=2, max_vcpus=1)
    with pytest.raises(ValidationError, match="From the 256 MiB"):
        made(max_memory_mib=128)


def test_roles_operators_label_and_admins_change_the_rest(made, django_capture_on_commit_callbacks):
    project = Project.objects.create(name="team")
    machine = made()
    Machine.objects.filter(pk=machine.pk).update(project=project)
    machine.refresh_from_db()
    operator, viewer = UserFactory(username="op"), UserFactory(username="viewer")
    Membership.objects.create(project=project, user=operator, role=Role.OPERATOR)
    Membership.objects.create(project=project, user=viewer, role=Role.VIEWER)
    machine = change(django_capture_on_commit_callbacks, machine, actor=operator, tags=["ops"])
    assert machine.tags == ["ops"]
    for fields in ({"vcpus": 2}, {"name": "x1"}, {"deletion_protection": True}, {"autostart": False}):
        with pytest.raises(PermissionDenied):
            change(django_capture_on_commit_callbacks, machine, actor=operator, **fields)
    with pytest.raises(PermissionDenied):
        change(django_capture_on_commit_callbacks, machine, actor=viewer, description="x")


def test_one_operation_at_a_time(made, django_capture_on_commit_callbacks):
    machine = made()
    Machine.objects.filter(pk=machine.pk).update(operation="shutdown")
    machine.refresh_from_db()
    with pytest.raises(MachineError, match="busy"):
        change(django_capture_on_commit_callbacks, machine, vcpus=2)
