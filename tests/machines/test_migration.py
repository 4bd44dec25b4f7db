"""Cold migration (machines/services/migration.py, machines/moves.py) between two in-memory hypervisors: what is
refused before anything moves, and the worker's step: disks copied byte for byte, the domain defined off on the
target, the source removed only after the switch, and a failure that leaves the source as it was."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from hypervisors.drivers.base import HypervisorFatalError
from hypervisors.models import Hypervisor
from machines import moves, services
from machines.models import Machine, Membership
from machines.states import PowerState
from tests.factories import HypervisorFactory, ProjectFactory, UserFactory, tenant_network_entry, tenant_nic
from tests.fakes import FakeHost

pytestmark = pytest.mark.django_db

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}


def hypervisor(name: str, uri: str, **kw):
    return HypervisorFactory(name=name, uri=uri, arch="x86_64", networks=[tenant_network_entry()], pools=[POOL], **kw)


@pytest.fixture
def hosts(host, monkeypatch):
    """`lab` is the fake every module reaches (host); `lab2` is a second, separate one the move reaches too."""
    other = FakeHost()
    lab = hypervisor("lab", "qemu:///system")
    lab2 = hypervisor("lab2", "qemu+tcp://lab2/system", console_address="10.0.0.2")  # a remote host's address

    def get_driver(uri, driver="libvirt"):
        return (other if uri == lab2.uri else host).get_driver(uri)

    monkeypatch.setattr("machines.services.migration.get_driver", get_driver)
    return {"lab": lab, "lab2": lab2, "source": host, "target": other}


@pytest.fixture
def staff(db):
    return UserFactory(username="boss", is_staff=True)


def network_machine(capture, hosts, name="metal", owner=None) -> Machine:
    with capture(execute=True):
        machine = services.machine_create(
            owner=owner or UserFactory(username=f"o-{name}"),
            hypervisor=hosts["lab"],
            name=name,
            deploy_type="network",
            extra_disks=[{"size_gib": 2}],
            nics=[tenant_nic()],
        )
    machine.refresh_from_db()
    # What an installed system would have written: bytes to find again on the target.
    disks = hosts["source"].pools["default"]
    disks[machine.disk_volume]["data"] = b"installed system " * 100
    disks[machine.extra_disk_volume(0)]["data"] = b"data disk"
    return machine


def migrate(capture, machine, actor, **kw):
    with capture(execute=True):
        return services.machine_migrate(machine=Machine.objects.get(pk=machine.pk), actor=actor, **kw)


def test_a_stopped_machine_moves_with_its_disks_and_leaves_nothing_behind(
    django_capture_on_commit_callbacks, hosts, staff, settings
):
    settings.PORTAL_BMC_PORT_RANGE = "17330-17339"
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    uuid, source, target = str(machine.uuid), hosts["source"], hosts["target"]
    volumes = {n: source.pools["default"][n]["data"] for n in (machine.disk_volume, machine.extra_disk_volume(0))}

    assert migrate(django_capture_on_commit_callbacks, machine, staff) == hosts["lab2"]

    moved = Machine.objects.get(pk=machine.pk)
    assert moved.hypervisor == hosts["lab2"] and moved.power_state == PowerState.OFF and not moved.operation
    assert target.domains[uuid]["state"] == PowerState.OFF  # defined there, left off
    assert {n: target.pools["default"][n]["data"] for n in volumes} == volumes  # byte for byte
    assert uuid not in source.domains and not set(volumes) & set(source.pools["default"])
    assert not [n for n in target.pools["default"] if "probe" in n]  # the shared-storage probe went
    # The BMC keeps its port and credentials; the BMC server follows the machine's hypervisor URI.
    assert (moved.bmc_port, moved.bmc_username) == (machine.bmc_port, machine.bmc_username)
    steps = list(moved.events.filter(step="migrate").values_list("message", flat=True))
    assert steps[0] == "move to lab2 requested (cold)"
    assert any(m.startswith("copied to lab2: ") and machine.disk_volume in m for m in steps)
    assert any(m.startswith("now on lab2 (") for m in steps) and any(m.startswith("removed from lab: ") for m in steps)


def test_a_failed_copy_leaves_the_source_whole_and_the_target_clean(django_capture_on_commit_callbacks, hosts, staff):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    uuid, source, target = str(machine.uuid), hosts["source"], hosts["target"]
    before = {n: dict(v) for n, v in source.pools["default"].items()}
    target.fail["upload_volume"] = HypervisorFatalError("the target's pool is full")

    migrate(django_capture_on_commit_callbacks, machine, staff)

    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and not stayed.operation
    assert uuid in source.domains and source.pools["default"] == before
    assert uuid not in target.domains and target.pools["default"] == {}
    failed = stayed.events.filter(step="migrate", level="error").get().message
    assert failed.startswith("move to lab2 failed: ") and "the target's pool is full" in failed
    assert "lab keeps it" in failed


def test_a_machine_started_behind_the_portals_back_during_the_copy_is_not_switched(
    django_capture_on_commit_callbacks, hosts, staff, monkeypatch
):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    uuid, source, target = str(machine.uuid), hosts["source"], hosts["target"]
    copy = moves.copy_disks

    def copy_then_started(*args):
        done = copy(*args)
        source.domains[uuid]["state"] = PowerState.RUNNING  # its BMC, or virsh, started it meanwhile
        return done

    monkeypatch.setattr(moves, "copy_disks", copy_then_started)
    migrate(django_capture_on_commit_callbacks, machine, staff)
    assert Machine.objects.get(pk=machine.pk).hypervisor == hosts["lab"]
    assert uuid in source.domains and uuid not in target.domains and target.pools["default"] == {}


def test_the_same_libvirtd_under_another_name_is_never_copied_onto(django_capture_on_commit_callbacks, hosts, staff):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    uuid, source, target = str(machine.uuid), hosts["source"], hosts["target"]
    target.domains[uuid] = dict(source.domains[uuid])  # lab2 answers with lab's own domains
    before = {n: dict(v) for n, v in source.pools["default"].items()}
    migrate(django_capture_on_commit_callbacks, machine, staff)
    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and source.pools["default"] == before
    assert "already has a domain with this machine's UUID" in stayed.events.get(step="migrate", level="error").message


def test_a_pool_shared_by_both_hosts_is_refused_before_any_copy(
    django_capture_on_commit_callbacks, host, hosts, staff, monkeypatch
):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    shared = FakeHost(pools=host.pools)  # another libvirtd on the same directory (NFS, say)
    lab2 = hosts["lab2"]
    monkeypatch.setattr(
        "machines.services.migration.get_driver",
        lambda uri, driver="libvirt": (shared if uri == lab2.uri else host).get_driver(uri),
    )
    before = {n: dict(v) for n, v in host.pools["default"].items()}
    migrate(django_capture_on_commit_callbacks, machine, staff)
    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and host.pools["default"] == before
    assert "is the same storage" in stayed.events.get(step="migrate", level="error").message
    assert str(machine.uuid) not in shared.domains


# --- refused before anything moves -----------------------------------------------------------------------


def test_what_is_refused_at_the_request(django_capture_on_commit_callbacks, hosts, staff):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    with pytest.raises(services.MachineError, match="metal is not running: a live move is for a running machine"):
        services.machine_migrate(machine=machine, actor=staff, live=True)
    with pytest.raises(ValidationError, match="metal is already on lab"):
        services.machine_migrate(machine=machine, actor=staff, hypervisor=hosts["lab"])
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING)
    with pytest.raises(services.MachineError, match="metal is running; shut it down first"):
        services.machine_migrate(machine=Machine.objects.get(pk=machine.pk), actor=staff)
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.OFF, operation="reboot")
    with pytest.raises(services.MachineError, match="busy with another operation"):
        services.machine_migrate(machine=Machine.objects.get(pk=machine.pk), actor=staff)
    Machine.objects.filter(pk=machine.pk).update(operation="", hostdevs=[{"type": "pci", "address": "0000:01:00.0"}])
    with pytest.raises(services.MachineError, match="passes devices of lab through"):
        services.machine_migrate(machine=Machine.objects.get(pk=machine.pk), actor=staff)
    assert not Machine.objects.get(pk=machine.pk).events.filter(step="migrate").exists()


def test_the_target_is_checked_as_a_create_there_would_be(django_capture_on_commit_callbacks, hosts, staff):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    lab2 = hosts["lab2"]
    lab2.networks = []
    lab2.save()
    with pytest.raises(ValidationError, match="No hypervisor has room.*lab2: no network portal-tenants"):
        services.machine_migrate(machine=machine, actor=staff)  # placement: nowhere else has its network
    with pytest.raises(ValidationError, match="lab2 cannot take metal: NIC 1: network 'portal-tenants' does not"):
        services.machine_migrate(machine=machine, actor=staff, hypervisor=lab2)
    lab2.networks, lab2.memory_mib = [tenant_network_entry()], 512
    lab2.save()
    with pytest.raises(ValidationError, match="Hypervisor lab2 has no room for this machine"):
        services.machine_migrate(machine=machine, actor=staff, hypervisor=lab2)
    lab2.memory_mib, lab2.status = 16384, "down"
    lab2.save()
    with pytest.raises(ValidationError, match="Hypervisor lab2 is down"):
        services.machine_migrate(machine=machine, actor=staff, hypervisor=lab2)


def test_owners_move_their_machines_only_where_staff_allow_it(django_capture_on_commit_callbacks, hosts, settings):
    owner = UserFactory(username="owner")
    project = ProjectFactory(name="team")
    operator = UserFactory(username="op")
    Membership.objects.create(project=project, user=operator, role="operator")
    machine = network_machine(django_capture_on_commit_callbacks, hosts, owner=owner)
    Machine.objects.filter(pk=machine.pk).update(project=project)
    machine = Machine.objects.get(pk=machine.pk)
    with pytest.raises(PermissionDenied, match="Only staff"):
        services.machine_migrate(machine=machine, actor=owner)
    settings.PORTAL_MIGRATION_FOR = "owners"
    with pytest.raises(PermissionDenied):
        services.machine_migrate(machine=machine, actor=operator)  # below the machine's admin role
    assert migrate(django_capture_on_commit_callbacks, machine, owner) == hosts["lab2"]
    assert Machine.objects.get(pk=machine.pk).hypervisor == hosts["lab2"]


# --- restart moves, held room, maintenance -----------------------------------------------------------------


def running(machine: Machine, host: FakeHost) -> Machine:
    host.domains[str(machine.uuid)]["state"] = PowerState.RUNNING
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING)
    return Machine.objects.get(pk=machine.pk)


def test_a_running_machine_moves_only_when_asked_to_restart_and_runs_there(
    django_capture_on_commit_callbacks, hosts, staff
):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    with pytest.raises(services.MachineError, match="ask for a restart"):
        services.machine_migrate(machine=machine, actor=staff)
    migrate(django_capture_on_commit_callbacks, machine, staff, restart=True)
    moved = Machine.objects.get(pk=machine.pk)
    assert moved.hypervisor == hosts["lab2"] and moved.power_state == PowerState.RUNNING and moved.moving_to is None
    assert hosts["target"].domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    assert str(machine.uuid) not in hosts["source"].domains
    steps = list(moved.events.filter(step="migrate").values_list("message", flat=True))
    assert steps[0] == "move to lab2 requested (cold, restarted there)" and steps[-1] == "started again on lab2"
    assert any(m.startswith("shutting down for the move") for m in steps)


def test_a_failed_restart_move_starts_the_machine_again_where_it_was(django_capture_on_commit_callbacks, hosts, staff):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    hosts["target"].fail["upload_volume"] = HypervisorFatalError("no space")
    migrate(django_capture_on_commit_callbacks, machine, staff, restart=True)
    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and stayed.power_state == PowerState.RUNNING
    assert hosts["source"].domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    assert stayed.events.filter(step="migrate", message="started again on lab").exists()


def test_a_moves_room_is_held_on_the_target_until_it_ends(django_capture_on_commit_callbacks, hosts, staff):
    a = network_machine(django_capture_on_commit_callbacks, hosts, "a")
    b = network_machine(django_capture_on_commit_callbacks, hosts, "b")
    lab2 = hosts["lab2"]
    lab2.memory_mib = a.memory_mib + a.memory_mib // 2  # room for one of them
    lab2.save()
    services.machine_migrate(machine=a, actor=staff, hypervisor=lab2)  # queued, not yet run (no commit here)
    assert Machine.objects.get(pk=a.pk).moving_to == lab2
    with pytest.raises(ValidationError, match="Hypervisor lab2 has no room"):
        services.machine_migrate(machine=b, actor=staff, hypervisor=lab2)


def test_a_drained_hypervisor_takes_no_new_machine_and_no_move(django_capture_on_commit_callbacks, hosts, staff):
    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    lab2 = hosts["lab2"]
    with pytest.raises(PermissionDenied, match="Only staff"):
        services.hypervisor_set_maintenance(hypervisor=lab2, enabled=True, actor=machine.owner)
    services.hypervisor_set_maintenance(hypervisor=lab2, enabled=True, actor=staff)
    with pytest.raises(ValidationError, match="Hypervisor lab2 is in maintenance"):
        services.machine_migrate(machine=machine, actor=staff, hypervisor=lab2)
    with pytest.raises(ValidationError, match=r"No hypervisor has room for this machine \(lab2: in maintenance\)"):
        services.machine_migrate(machine=machine, actor=staff)
    with pytest.raises(ValidationError, match="Hypervisor lab2 is in maintenance"):
        services.machine_create(owner=staff, hypervisor=lab2, name="new", deploy_type="network", nics=[tenant_nic()])
    services.hypervisor_set_maintenance(hypervisor=lab2, enabled=False, actor=staff)
    assert migrate(django_capture_on_commit_callbacks, machine, staff) == lab2


def test_evacuate_drains_and_moves_what_may_move(django_capture_on_commit_callbacks, hosts, staff):
    capture = django_capture_on_commit_callbacks
    stopped = network_machine(capture, hosts, "stopped")
    live = running(network_machine(capture, hosts, "live"), hosts["source"])
    Machine.objects.filter(pk=live.pk).update(firmware="uefi")  # runs, but may not move live
    Machine.objects.filter(pk=network_machine(capture, hosts, "broken").pk).update(status="error")
    lab = hosts["lab"]
    with pytest.raises(PermissionDenied):
        services.hypervisor_evacuate(hypervisor=lab, actor=stopped.owner)
    with capture(execute=True):
        report = services.hypervisor_evacuate(hypervisor=lab, actor=staff)
    assert report[0] == "stopped: to lab2" and report[2] == "broken: stays (error)"
    assert report[1].startswith("live: stays (live is running; shut it down first, or ask for a restart")
    assert not Machine.objects.get(pk=live.pk).events.filter(step="migrate").exists()
    assert Machine.objects.get(pk=stopped.pk).hypervisor == hosts["lab2"]
    assert Machine.objects.get(pk=live.pk).hypervisor == lab
    lab.refresh_from_db()
    assert lab.maintenance
    with capture(execute=True):  # again, running ones too
        report = services.hypervisor_evacuate(hypervisor=lab, actor=staff, restart=True)
    assert report == ["live: to lab2", "broken: stays (error)"]
    moved = Machine.objects.get(pk=live.pk)
    assert moved.hypervisor == hosts["lab2"] and moved.power_state == PowerState.RUNNING


def test_maintenance_and_evacuation_through_the_api_and_the_pages(django_capture_on_commit_callbacks, hosts, staff):
    from django.test import Client
    from rest_framework.test import APIClient

    machine = network_machine(django_capture_on_commit_callbacks, hosts)
    lab = hosts["lab"]
    api = APIClient()
    api.force_login(staff)
    r = api.post(f"/api/v1/hypervisors/{lab.pk}/maintenance/", {"maintenance": True}, format="json")
    assert r.status_code == 200 and r.json()["maintenance"] is True
    assert (
        api.post(f"/api/v1/hypervisors/{lab.pk}/maintenance/", {"maintenance": "x"}, format="json").status_code == 400
    )
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/api/v1/hypervisors/{lab.pk}/evacuate/", {}, format="json")
    assert r.status_code == 202 and r.json()["machines"] == ["metal: to lab2"], r.content
    assert Machine.objects.get(pk=machine.pk).hypervisor == hosts["lab2"]

    page = Client()
    page.force_login(staff)
    body = page.get(f"/hypervisors/{lab.pk}/").content.decode()
    assert 'id="hv-maintenance"' in body and "Return to service" in body and "in maintenance" in body
    r = page.post(f"/machines/hypervisors/{lab.pk}/maintenance/", {"maintenance": "0"}, follow=True)
    assert "lab is back in service." in r.content.decode()
    lab.refresh_from_db()
    assert not lab.maintenance
    r = page.post(f"/machines/hypervisors/{hosts['lab2'].pk}/evacuate/", follow=True)
    assert "Evacuating lab2: metal: to lab" in r.content.decode()


# --- live moves ----------------------------------------------------------------------------------------------


def test_a_running_machine_moves_live_and_keeps_running(django_capture_on_commit_callbacks, hosts, staff):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    uuid, source, target = str(machine.uuid), hosts["source"], hosts["target"]
    written = source.pools["default"][machine.disk_volume]["data"]
    migrate(django_capture_on_commit_callbacks, machine, staff, live=True)
    moved = Machine.objects.get(pk=machine.pk)
    steps = list(moved.events.filter(step="migrate").values_list("message", flat=True))
    assert moved.hypervisor == hosts["lab2"] and moved.power_state == PowerState.RUNNING, steps
    assert target.domains[uuid]["state"] == PowerState.RUNNING and uuid not in source.domains
    assert target.pools["default"][machine.disk_volume]["data"] == written  # the disk's own data went along
    assert not {machine.disk_volume, machine.extra_disk_volume(0)} & set(source.pools["default"])
    assert steps[0] == "move to lab2 requested (live)" and not [m for m in steps if "shutting down" in m]
    assert any(m.startswith("now running on lab2: live in ") for m in steps)
    assert moved.moving_to is None and not moved.operation and not moved.attempt_id


def test_a_failed_live_move_leaves_it_running_where_it_was(django_capture_on_commit_callbacks, hosts, staff):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    hosts["source"].fail["migrate_live"] = HypervisorFatalError("migration job: unexpectedly failed")
    migrate(django_capture_on_commit_callbacks, machine, staff, live=True)
    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and hosts["source"].domains[str(machine.uuid)]["state"] == "running"
    assert hosts["target"].pools["default"] == {} and str(machine.uuid) not in hosts["target"].domains
    failed = stayed.events.get(step="migrate", level="error").message
    assert failed.startswith("live move to lab2 failed: migration job: unexpectedly failed; it runs on lab")


def test_a_move_cancelled_before_it_began_does_nothing(django_capture_on_commit_callbacks, hosts, staff):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    services.machine_migrate(machine=machine, actor=staff, live=True)  # queued: nothing commits in the test
    services.machine_migrate_cancel(machine=Machine.objects.get(pk=machine.pk), actor=staff)
    with pytest.raises(services.MachineError, match="is not being moved"):
        services.machine_migrate_cancel(machine=Machine.objects.get(pk=machine.pk), actor=staff)
    services.machine_migrate_run(machine.pk, hosts["lab2"].pk, False, True)
    stayed = Machine.objects.get(pk=machine.pk)
    assert stayed.hypervisor == hosts["lab"] and not stayed.operation and str(machine.uuid) in hosts["source"].domains
    assert stayed.events.filter(message="move to lab2 cancelled before it began").exists()


def test_a_live_move_needs_the_targets_address_on_the_hypervisors_network(
    django_capture_on_commit_callbacks, hosts, staff
):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    Hypervisor.objects.filter(pk=hosts["lab2"].pk).update(console_address="127.0.0.1")
    with pytest.raises(services.MachineError, match="lab2's console address 127.0.0.1 is a loopback address"):
        services.machine_migrate(machine=machine, actor=staff, live=True)
    assert migrate(django_capture_on_commit_callbacks, machine, staff, restart=True) == hosts["lab2"]  # cold: fine


def test_a_uefi_machine_moves_only_cold(django_capture_on_commit_callbacks, hosts, staff):
    machine = running(network_machine(django_capture_on_commit_callbacks, hosts), hosts["source"])
    Machine.objects.filter(pk=machine.pk).update(firmware="uefi")
    with pytest.raises(services.MachineError, match="boots UEFI"):
        services.machine_migrate(machine=Machine.objects.get(pk=machine.pk), actor=staff, live=True)


def test_evacuate_moves_running_machines_live(django_capture_on_commit_callbacks, hosts, staff):
    capture = django_capture_on_commit_callbacks
    machine = running(network_machine(capture, hosts, "runner"), hosts["source"])
    with capture(execute=True):
        assert services.hypervisor_evacuate(hypervisor=hosts["lab"], actor=staff) == ["runner: to lab2 (live)"]
    moved = Machine.objects.get(pk=machine.pk)
    assert moved.hypervisor == hosts["lab2"] and moved.power_state == PowerState.RUNNING
    assert hosts["target"].domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    assert not moved.events.filter(message__startswith="shutting down").exists()  # it never stopped
