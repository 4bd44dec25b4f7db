import pytest

from machines.models import Machine, MachineObserved
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, UserFactory
from tests.fakes import FakeDriver

pytestmark = pytest.mark.django_db


@pytest.fixture
def machine(db):
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    return MachineFactory(
        name="web1",
        owner=UserFactory(username="o"),
        hypervisor=hv,
        deploy_type="network",
        status=Status.ACTIVE,
        disk_gib=5,
    )


def act(staff_client, action, machine):
    return staff_client.post(
        "/admin/machines/machine/", {"action": action, "_selected_action": [machine.pk]}, follow=True
    )


def test_power_action_queues_the_operation(staff_client, machine):
    r = act(staff_client, "power_shutdown", machine)
    assert b"Shut down: queued for 1 machine" in r.content
    assert Machine.objects.get(pk=machine.pk).operation == "shutdown"


def test_grow_disk_action(staff_client, machine, host, django_capture_on_commit_callbacks):
    host.pools["default"][machine.disk_volume] = {"format": "qcow2", "capacity": 5 << 30, "backing": "", "data": b""}
    with django_capture_on_commit_callbacks(execute=True):
        act(staff_client, "grow_disk", machine)
    assert Machine.objects.get(pk=machine.pk).disk_gib == 15
    assert host.pools["default"][machine.disk_volume]["capacity"] == 15 << 30


def test_protected_machines_are_not_deleted_by_the_action(staff_client, machine):
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=True)
    r = act(staff_client, "delete_machines", machine)
    assert b"protected" in r.content
    assert Machine.objects.get(pk=machine.pk).status == Status.ACTIVE


def test_the_admin_lists_machines_with_events(staff_client, machine):
    machine.log("create", "hello <b>world</b>")
    MachineObserved.objects.create(machine=machine, guest_addresses={"52:54:00:12:34:56": ["192.0.2.77/24"]})
    r = staff_client.get(f"/admin/machines/machine/{machine.pk}/change/")
    assert r.status_code == 200 and b"hello &lt;b&gt;world&lt;/b&gt;" in r.content
    assert b"192.0.2.77/24" in r.content  # the addresses the guest was last seen with


def test_sync_action_refreshes_power_state(staff_client, machine, host, django_capture_on_commit_callbacks):
    from hypervisors.drivers.base import PowerState

    host.domains[str(machine.uuid)] = {"spec": None, "state": PowerState.RUNNING, "autostart": True}
    with django_capture_on_commit_callbacks(execute=True):
        act(staff_client, "sync", machine)
    assert Machine.objects.get(pk=machine.pk).power_state == "running"


def test_the_two_editable_fields_go_through_the_services(
    staff_client, machine, host, django_capture_on_commit_callbacks
):
    from hypervisors.drivers.base import DomainSpec
    from portal.models import AuditEvent

    FakeDriver("qemu:///system", host).define_domain(
        DomainSpec(uuid=str(machine.uuid), name=machine.domain_name, domain_type="qemu", vcpus=1, memory_mib=64)
    )
    page = staff_client.get(f"/admin/machines/machine/{machine.pk}/change/")
    assert page.status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_client.post(
            f"/admin/machines/machine/{machine.pk}/change/",
            {
                # Also editable here, unchanged (what changing them does: tests/machines/test_changes.py).
                **{k: getattr(machine, k) for k in ("name", "vcpus", "memory_mib")},
                "tags": "[]",
                "deletion_protection": "on",
                "autostart": "",
                "nics-TOTAL_FORMS": "0",
                "nics-INITIAL_FORMS": "0",
                "events-TOTAL_FORMS": "0",
                "events-INITIAL_FORMS": "0",
                "snapshots-TOTAL_FORMS": "0",
                "snapshots-INITIAL_FORMS": "0",
            },
        )
    assert r.status_code == 302, r.content.decode()[:3000]
    machine.refresh_from_db()
    assert machine.deletion_protection and not machine.autostart
    assert host.domains[str(machine.uuid)]["autostart"] is False  # reached libvirt, through the worker's task
    actions = set(AuditEvent.objects.values_list("action", "outcome"))
    assert {("machine.protection", "success"), ("machine.autostart", "success")} <= actions
    steps = list(machine.events.values_list("step", flat=True))
    assert "protection" in steps and steps.count("autostart") == 2  # requested, then set on the hypervisor
