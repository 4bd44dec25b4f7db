"""Snapshot services (machines/services/snapshots.py) with the in-memory FakeDriver behind get_driver, and one run
through libvirt's test:/// driver: the method per firmware, the tree, the worker's runs, the refusals (name taken,
machine busy, role too low, someone else's machine), the quota, the rebuild's kept disk, and the volumes a delete
and the sweeper know as the machine's."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from hypervisors.drivers.base import PowerState
from machines import capacity, services
from machines.models import Machine, MachineSnapshot, Membership, Project, Quota
from machines.services import sweeper
from machines.services.common import MachineError
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, UserFactory
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture
def machine(django_capture_on_commit_callbacks, host, owner, hv, image):  # noqa: F811
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    assert m.status == Status.ACTIVE and m.power_state == PowerState.RUNNING
    return m


def take(capture, machine, name, **kw) -> MachineSnapshot:
    with capture(execute=True):
        snap = services.snapshot_create(machine=machine, name=name, actor=kw.pop("actor", machine.owner), **kw)
    snap.refresh_from_db()
    return snap


def test_a_bios_machine_takes_internal_snapshots_in_a_tree_and_reverts_to_one_running(
    django_capture_on_commit_callbacks, host, machine
):
    cap = django_capture_on_commit_callbacks
    assert services.snapshot_method(machine) == "internal" and "internal" in services.method_text(machine)
    first = take(cap, machine, "first", description="clean", memory=True)
    assert (first.status, first.kind, first.memory, first.parent, first.created_by) == (
        "ready",
        "internal",
        True,
        None,
        machine.owner,
    )
    second = take(cap, machine, "second", memory=True)
    assert second.parent == first
    assert [(s.name, depth) for s, depth in services.snapshot_tree(machine)] == [("first", 0), ("second", 1)]
    host.domains[str(machine.uuid)]["state"] = PowerState.OFF
    with cap(execute=True):
        services.snapshot_revert(machine=machine, snapshot=first, actor=machine.owner)
    machine.refresh_from_db()
    assert machine.power_state == PowerState.RUNNING and machine.operation == ""
    assert host.domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    steps = [e.message for e in machine.events.filter(step="snapshot")]
    assert "reverted to snapshot first; the machine is running" in steps
    with cap(execute=True):
        services.snapshot_delete(machine=machine, snapshot=first, actor=machine.owner)
    second.refresh_from_db()
    assert second.parent is None and list(machine.snapshots.values_list("name", flat=True)) == ["second"]
    assert [s["name"] for s in host.domains[str(machine.uuid)]["snapshots"]] == ["second"]
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"machine.snapshot", "machine.snapshot_revert", "machine.snapshot_delete"} <= actions


def test_a_uefi_machine_takes_external_overlays_named_as_its_volumes_and_a_delete_leaves_none(
    django_capture_on_commit_callbacks, host, machine
):
    cap = django_capture_on_commit_callbacks
    Machine.objects.filter(pk=machine.pk).update(firmware="uefi")
    machine.refresh_from_db()
    assert services.snapshot_method(machine) == "external"
    with pytest.raises(ValidationError, match="disk-only"):
        services.snapshot_create(machine=machine, name="mem", memory=True, actor=machine.owner)
    snap = take(cap, machine, "ext")
    assert (snap.status, snap.kind, snap.memory) == ("ready", "external", False)
    overlay = f"m-{machine.uuid}-disk-snap{snap.pk}.qcow2"
    assert snap.volumes == [overlay] and overlay in host.pools["default"]
    assert sweeper.VOLUME_NAME.match(overlay)["uuid"] == str(machine.uuid)  # the sweeper knows it as the machine's
    with cap(execute=True):
        services.snapshot_delete(machine=machine, snapshot=snap, actor=machine.owner)
    assert overlay not in host.pools["default"] and not machine.snapshots.exists()


def test_a_running_bios_machine_without_memory_is_refused_with_the_reason(machine):
    with pytest.raises(ValidationError, match="holds its memory"):
        services.snapshot_create(machine=machine, name="nomem", actor=machine.owner)
    assert not machine.snapshots.exists()


def test_refusals_name_taken_bad_name_busy_machine_and_not_active(django_capture_on_commit_callbacks, machine):
    take(django_capture_on_commit_callbacks, machine, "one", memory=True)
    with pytest.raises(ValidationError, match="already"):
        services.snapshot_create(machine=machine, name="one", memory=True, actor=machine.owner)
    with pytest.raises(ValidationError, match="host name"):
        services.snapshot_create(machine=machine, name="Not A Name!", memory=True, actor=machine.owner)
    Machine.objects.filter(pk=machine.pk).update(operation="reboot")
    with pytest.raises(MachineError, match="busy"):
        services.snapshot_create(machine=machine, name="two", memory=True, actor=machine.owner)
    snap = machine.snapshots.get()
    with pytest.raises(MachineError, match="busy"):
        services.snapshot_revert(machine=machine, snapshot=snap, actor=machine.owner)
    Machine.objects.filter(pk=machine.pk).update(operation="", status=Status.ERROR)
    machine.refresh_from_db()
    with pytest.raises(MachineError, match="active"):
        services.snapshot_create(machine=machine, name="three", memory=True, actor=machine.owner)
    assert list(machine.snapshots.values_list("name", flat=True)) == ["one"]
    refused = AuditEvent.objects.filter(action="machine.snapshot", outcome="refused").count()
    assert refused == 4


def test_roles_operator_takes_admin_reverts_and_deletes_viewer_and_strangers_may_not(
    django_capture_on_commit_callbacks, machine
):
    project = Project.objects.create(name="team")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    machine.refresh_from_db()
    people = {}
    for role in ("viewer", "operator", "admin"):
        people[role] = UserFactory(username=role)
        Membership.objects.create(project=project, user=people[role], role=role)
    stranger = UserFactory(username="stranger")
    with pytest.raises(PermissionDenied):
        services.snapshot_create(machine=machine, name="v", memory=True, actor=people["viewer"])
    with pytest.raises(PermissionDenied):  # the pages and the API answer 404 for it (test_snapshot_api)
        services.snapshot_create(machine=machine, name="s", memory=True, actor=stranger)
    snap = take(django_capture_on_commit_callbacks, machine, "op", memory=True, actor=people["operator"])
    assert snap.status == "ready" and snap.created_by == people["operator"]
    for refused in (services.snapshot_revert, services.snapshot_delete):
        with pytest.raises(PermissionDenied):
            refused(machine=machine, snapshot=snap, actor=people["operator"])
    with django_capture_on_commit_callbacks(execute=True):
        services.snapshot_revert(machine=machine, snapshot=snap, actor=people["admin"])
    with django_capture_on_commit_callbacks(execute=True):
        services.snapshot_delete(machine=machine, snapshot=snap, actor=people["admin"])
    assert not machine.snapshots.exists()


def test_snapshot_space_counts_in_the_disk_quota_and_a_full_quota_refuses_a_new_one(
    django_capture_on_commit_callbacks, machine
):
    before = capacity.usage(machine.owner)["disk_gib"]
    snap = take(django_capture_on_commit_callbacks, machine, "big", memory=True)
    MachineSnapshot.objects.filter(pk=snap.pk).update(size_bytes=(3 << 30) + 1)
    assert capacity.usage(machine.owner)["disk_gib"] == before + 4
    by_owner = capacity.usage_by(Machine.objects.all(), "owner")
    assert by_owner[machine.owner.pk]["disk_gib"] == before + 4
    Quota.objects.update_or_create(user=machine.owner, defaults={"disk_gib": before + 4})
    with pytest.raises(ValidationError, match="quota"):
        services.snapshot_create(machine=machine, name="more", memory=True, actor=machine.owner)


def test_a_failed_snapshot_is_recorded_and_can_be_deleted(django_capture_on_commit_callbacks, host, machine):
    from hypervisors.drivers.base import HypervisorFatalError

    host.fail["snapshot_create"] = HypervisorFatalError("internal snapshots of a VM with pflash are not supported")
    snap = take(django_capture_on_commit_callbacks, machine, "broken", memory=True)
    assert snap.status == "error" and "pflash" in snap.status_message
    machine.refresh_from_db()
    assert machine.operation == ""
    with django_capture_on_commit_callbacks(execute=True):
        services.snapshot_delete(machine=machine, snapshot=snap, actor=machine.owner)
    assert not machine.snapshots.exists()


def test_a_rebuild_keeps_the_old_disk_as_a_snapshot_unless_asked_not_to(
    django_capture_on_commit_callbacks, host, machine
):
    cap = django_capture_on_commit_callbacks
    pool = host.pools["default"]
    pool[machine.disk_volume]["data"] = b"the old disk"
    take(cap, machine, "inside", memory=True)
    with cap(execute=True):
        services.machine_rebuild(machine=machine, actor=machine.owner)
    machine.refresh_from_db()
    assert machine.status == Status.ACTIVE
    kept = machine.snapshots.get()  # the internal one went with the replaced disk
    assert kept.automatic and kept.kept_disk and kept.status == "ready" and kept.name.startswith("before-rebuild-")
    assert pool[kept.volume(0)]["data"] == b"the old disk" and pool[machine.disk_volume]["data"] == b""
    # Reverting to it brings the old disk back (a copy: the snapshot stays), the machine off.
    with cap(execute=True):
        services.snapshot_revert(machine=machine, snapshot=kept, actor=machine.owner)
    machine.refresh_from_db()
    assert pool[machine.disk_volume]["data"] == b"the old disk" and machine.power_state == PowerState.OFF
    assert kept.volume(0) in pool
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.RUNNING)
    with cap(execute=True):
        services.machine_rebuild(machine=machine, actor=machine.owner, snapshot=False)
    assert list(machine.snapshots.all()) == [kept]  # no new one; the earlier kept disk stays
    with cap(execute=True):
        services.machine_delete(machine=machine, actor=machine.owner)
    assert not any(name.startswith(f"m-{machine.uuid}") for name in pool)  # the kept disk went with the machine


def test_the_tree_and_refresh_run_on_libvirts_test_driver(test_hv_state, monkeypatch, db):
    """The services' runs through LibvirtDriver("test:///default"): an internal snapshot of the running domain
    `test` with its memory, reverted to and deleted, with libvirt's own parent recorded."""
    from hypervisors.drivers.libvirt_driver import LibvirtDriver
    from tests.factories import MachineFactory

    driver = LibvirtDriver("test:///default")
    dom = driver.conn.lookupByName("test")
    test_hv = HypervisorFactory(name="t", uri="test:///default")
    tester = UserFactory(username="tester")
    m = MachineFactory(name="test", owner=tester, hypervisor=test_hv, status=Status.ACTIVE, power_state="running")
    Machine.objects.filter(pk=m.pk).update(uuid=dom.UUIDString())
    m.refresh_from_db()
    from django.db import transaction

    for name in ("a", "b"):
        with transaction.atomic():
            snap = services.snapshot_create(machine=m, name=name, memory=True, actor=tester)
        services.snapshot_create_run(snap.pk)
    a, b = m.snapshots.get(name="a"), m.snapshots.get(name="b")
    assert (a.status, b.status, b.parent) == ("ready", "ready", a)
    with transaction.atomic():
        services.snapshot_revert(machine=m, snapshot=a, actor=tester)
    services.snapshot_revert_run(a.pk)
    m.refresh_from_db()
    assert m.power_state == "running" and [s.name for s in driver.snapshot_list(str(m.uuid)) if s.current] == ["a"]
    with transaction.atomic():
        services.snapshot_delete(machine=m, snapshot=a, actor=tester)
    services.snapshot_delete_run(a.pk)
    b.refresh_from_db()
    assert b.parent is None and [s.name for s in driver.snapshot_list(str(m.uuid))] == ["b"]


# --- the API, the page and the admin ----------------------------------------------------------------------


def api_client(user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_login(user)
    return client


def test_the_api_takes_lists_reverts_and_deletes_and_says_why_not(django_capture_on_commit_callbacks, machine):
    client = api_client(machine.owner)
    base = f"/api/v1/machines/{machine.pk}/snapshots/"
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(base, {"name": "api1", "description": "from the API", "memory": True}, format="json")
    assert r.status_code == 202, r.content
    assert (r.json()["name"], r.json()["kind"], r.json()["status"]) == ("api1", "internal", "creating")
    sid = r.json()["id"]
    listed = client.get(base).json()
    assert [(s["name"], s["status"], s["memory"], s["parent"]) for s in listed] == [("api1", "ready", True, None)]
    r = client.post(base, {"name": "api1", "memory": True}, format="json")
    assert r.status_code == 400 and "already" in r.json()["name"][0]
    r = client.post(base, {"name": "nomem"}, format="json")
    assert r.status_code == 400 and "memory" in r.json()
    r = client.post(base, {"name": "Bad Name"}, format="json")
    assert r.status_code == 400
    assert client.post(f"{base}999999999999999999999/revert/").status_code == 404
    assert client.delete(f"{base}abc/").status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"{base}{sid}/revert/")
    assert r.status_code == 202 and r.json()["status"] == "reverting"
    Machine.objects.filter(pk=machine.pk).update(operation="reboot")
    assert client.delete(f"{base}{sid}/").status_code == 409  # busy
    Machine.objects.filter(pk=machine.pk).update(operation="")
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"{base}{sid}/").status_code == 202
    assert client.get(base).json() == []


def test_the_api_hides_another_users_machine_and_refuses_a_viewer(machine):
    stranger = UserFactory(username="other")
    base = f"/api/v1/machines/{machine.pk}/snapshots/"
    assert api_client(stranger).get(base).status_code == 404
    assert api_client(stranger).post(base, {"name": "x", "memory": True}, format="json").status_code == 404
    project = Project.objects.create(name="p")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    viewer = UserFactory(username="viewer1")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    assert api_client(viewer).get(base).status_code == 200
    assert api_client(viewer).post(base, {"name": "x", "memory": True}, format="json").status_code == 403


def test_the_api_rebuild_field_and_the_page_checkbox_choose_the_automatic_snapshot(
    django_capture_on_commit_callbacks, machine
):
    client = api_client(machine.owner)
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/api/v1/machines/{machine.pk}/rebuild/", {"snapshot": False}, format="json")
    assert r.status_code == 202 and not machine.snapshots.exists()
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/api/v1/machines/{machine.pk}/rebuild/", {}, format="json")
    assert r.status_code == 202 and machine.snapshots.get().kept_disk
    from django.test import Client

    page = Client()
    page.force_login(machine.owner)
    with django_capture_on_commit_callbacks(execute=True):
        page.post(f"/machines/{machine.pk}/rebuild/", {"snapshot": "1"})
    assert machine.snapshots.filter(automatic=True).count() == 2


def test_the_page_shows_the_method_the_tree_and_the_forms(django_capture_on_commit_callbacks, machine):
    from django.test import Client

    cap = django_capture_on_commit_callbacks
    first = take(cap, machine, "first", memory=True)
    take(cap, machine, "second", description="after the upgrade", memory=True)
    page = Client()
    page.force_login(machine.owner)
    body = page.get(f"/machines/{machine.pk}/").content.decode()
    assert 'id="snapshot-method"' in body and "internal qcow2 snapshots" in body
    assert 'data-snapshot="first" data-depth="0"' in body and 'data-snapshot="second" data-depth="1"' in body
    assert "after the upgrade" in body and "after first" in body and 'id="snapshot-form"' in body
    assert f"/machines/{machine.pk}/snapshots/{first.pk}/revert/" in body and "data-confirm=" in body
    with cap(execute=True):
        r = page.post(f"/machines/{machine.pk}/snapshots/", {"name": "third", "memory": "on"})
    assert r.status_code == 302 and machine.snapshots.get(name="third").status == "ready"
    r = page.post(f"/machines/{machine.pk}/snapshots/", {"name": "Bad!"}, follow=True)
    assert "name:" in r.content.decode() and not machine.snapshots.filter(name="Bad!").exists()
    with cap(execute=True):
        page.post(f"/machines/{machine.pk}/snapshots/{first.pk}/delete/")
    assert not machine.snapshots.filter(name="first").exists()
    other = UserFactory(username="nosy")
    page.force_login(other)
    assert page.post(f"/machines/{machine.pk}/snapshots/{first.pk}/revert/").status_code == 404


def test_the_admin_shows_snapshots_read_only_on_the_machine(django_capture_on_commit_callbacks, machine, admin_client):
    take(django_capture_on_commit_callbacks, machine, "adm", memory=True)
    body = admin_client.get(f"/admin/machines/machine/{machine.pk}/change/").content.decode()
    assert "adm" in body and "Snapshots" in body
    assert 'name="snapshots-0-name"' not in body  # read-only: no input for it


def test_a_machine_with_snapshots_is_not_moved_and_one_with_overlays_not_grown(
    django_capture_on_commit_callbacks, machine
):
    Machine.objects.filter(pk=machine.pk).update(firmware="uefi")
    machine.refresh_from_db()
    host_off = {"power_state": PowerState.OFF}
    take(django_capture_on_commit_callbacks, machine, "ext")
    Machine.objects.filter(pk=machine.pk).update(**host_off)
    machine.refresh_from_db()
    staff = UserFactory(username="boss", is_staff=True)
    here = machine.hypervisor
    HypervisorFactory(
        name="lab2",
        uri="qemu+tcp://lab2/system",
        arch="x86_64",
        networks=here.networks,
        pools=here.pools,
        firmwares=here.firmwares,
    )
    with pytest.raises(MachineError, match="delete them before moving"):
        services.machine_migrate(machine=machine, actor=staff)
    with pytest.raises(MachineError, match="delete them before growing"):
        services.machine_grow_disk(machine=machine, disk_gib=machine.disk_gib + 1, actor=machine.owner)


def test_deleting_a_machine_removes_its_snapshots_overlays_too(django_capture_on_commit_callbacks, host, machine):
    Machine.objects.filter(pk=machine.pk).update(firmware="uefi")
    machine.refresh_from_db()
    snap = take(django_capture_on_commit_callbacks, machine, "ext")
    assert snap.volume(0) in host.pools["default"]
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_delete(machine=machine, actor=machine.owner)
    assert not any(name.startswith(f"m-{machine.uuid}") for name in host.pools["default"])
    assert not MachineSnapshot.objects.filter(pk=snap.pk).exists()


def test_a_snapshot_a_dead_worker_left_creating_can_be_deleted_once_the_machine_is_free(
    django_capture_on_commit_callbacks, machine
):
    with django_capture_on_commit_callbacks(execute=False):  # queued, never run: the worker died
        snap = services.snapshot_create(machine=machine, name="limbo", memory=True, actor=machine.owner)
    machine.refresh_from_db()
    with pytest.raises(MachineError, match="being taken"):
        services.snapshot_delete(machine=machine, snapshot=snap, actor=machine.owner)
    Machine.objects.filter(pk=machine.pk).update(operation="", operation_started=None)  # the reconcile's clean-up
    machine.refresh_from_db()
    with pytest.raises(MachineError, match="being taken"):
        services.snapshot_revert(machine=machine, snapshot=snap, actor=machine.owner)
    with django_capture_on_commit_callbacks(execute=True):
        services.snapshot_delete(machine=machine, snapshot=snap, actor=machine.owner)
    assert not machine.snapshots.exists()
