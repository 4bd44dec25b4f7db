"""Clones and images from machines (machines/services/clones.py) with the in-memory FakeDriver: linked and full
copies with their own UUID, MACs, instance-id and BMC, "Create N" by a pattern, the refusals (running source, quota
for N, bad pattern, role, someone else's machine 404 in the API), the image saved into the catalogue."""

from __future__ import annotations

import subprocess

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from hypervisors.drivers.base import HypervisorFatalError
from hypervisors.drivers.base import PowerState as DomainState
from hypervisors.models import Image, ImageStatus
from machines import services
from machines.models import Machine, MachineSnapshot, Quota
from machines.services import clones
from machines.services.common import MachineError
from machines.states import PowerState, Status
from portal.models import AuditEvent
from tests.factories import UserFactory
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture
def stopped(django_capture_on_commit_callbacks, host, owner, hv, image, monkeypatch):  # noqa: F811
    monkeypatch.setattr("machines.services.clones.get_driver", host.get_driver)
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    host.domains[str(m.uuid)]["state"] = DomainState.OFF
    Machine.objects.filter(pk=m.pk).update(power_state=PowerState.OFF)
    host.pools["default"][m.disk_volume]["data"] = b"the source's writes"
    m.refresh_from_db()
    return m


def clone(cap, machine, **kw) -> list[Machine]:
    with cap(execute=True):
        made = services.machine_clone(machine=machine, actor=kw.pop("actor", machine.owner), **kw)
    for m in made:
        m.refresh_from_db()
    return made


def test_a_linked_clone_stands_on_the_image_base_with_its_own_identity(
    django_capture_on_commit_callbacks, host, stopped
):
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="copy1")
    assert c.status == Status.ACTIVE and c.cloned_from == stopped and c.hypervisor == stopped.hypervisor
    assert c.uuid != stopped.uuid and c.instance_id != stopped.instance_id
    src_macs = set(stopped.nics.values_list("mac", flat=True))
    assert c.nics.count() == 1 and not src_macs & set(c.nics.values_list("mac", flat=True))
    disk, base = host.pools["default"][c.disk_volume], host.pools["default"][stopped.disk_volume]["backing"]
    assert disk["data"] == b"the source's writes" and disk["backing"] == base and base.endswith(".qcow2")
    assert str(c.uuid) in host.domains and host.domains[str(c.uuid)]["state"] == DomainState.RUNNING
    stopped.refresh_from_db()
    assert stopped.operation == "" and host.domains[str(stopped.uuid)]["state"] == DomainState.OFF
    assert "its own layer over" in c.events.filter(step="disk").first().message
    assert AuditEvent.objects.filter(action="machine.clone", outcome="success").exists()


def test_a_full_copy_and_create_n_by_pattern_checked_as_one(django_capture_on_commit_callbacks, host, stopped):
    made = clone(django_capture_on_commit_callbacks, stopped, count=3, name_pattern="web-{n}", linked=False)
    assert [m.name for m in made] == ["web-1", "web-2", "web-3"]
    assert all(m.status == Status.ACTIVE for m in made)
    assert len({m.instance_id for m in made} | {stopped.instance_id}) == 4
    for m in made:
        assert host.pools["default"][m.disk_volume]["backing"] == ""  # flattened
    macs = [mac for m in made for mac in m.nics.values_list("mac", flat=True)]
    assert len(set(macs)) == 3


def test_refusals_running_quota_pattern_names_and_role(django_capture_on_commit_callbacks, host, stopped):
    Machine.objects.filter(pk=stopped.pk).update(power_state=PowerState.RUNNING)
    stopped.refresh_from_db()
    with pytest.raises(MachineError, match="running: shut it down first"):
        services.machine_clone(machine=stopped, actor=stopped.owner, name="c1")
    Machine.objects.filter(pk=stopped.pk).update(power_state=PowerState.OFF)
    stopped.refresh_from_db()
    Quota.objects.update_or_create(user=stopped.owner, defaults={"machines": 3})
    with pytest.raises(ValidationError, match="quota"):
        services.machine_clone(machine=stopped, actor=stopped.owner, count=3, name_pattern="w-{n}")
    for bad in ("web", "w-{n}-{n}", "W_{n}", "{x}"):
        with pytest.raises(ValidationError, match="pattern|host name"):
            services.machine_clone(machine=stopped, actor=stopped.owner, count=2, name_pattern=bad)
    with pytest.raises(ValidationError, match="already have"):
        services.machine_clone(machine=stopped, actor=stopped.owner, name=stopped.name)
    with pytest.raises(ValidationError, match="1 to 20"):
        services.machine_clone(machine=stopped, actor=stopped.owner, count=21, name_pattern="w-{n}")
    stranger = UserFactory(username="stranger")
    with pytest.raises(PermissionDenied):
        services.machine_clone(machine=stopped, actor=stranger, name="mine")
    assert Machine.objects.count() == 1 and Machine.objects.get().operation == ""
    assert AuditEvent.objects.filter(action="machine.clone", outcome="refused").count() >= 5


def test_a_clone_of_a_source_started_meanwhile_ends_in_error(django_capture_on_commit_callbacks, host, stopped):
    host.domains[str(stopped.uuid)]["state"] = DomainState.RUNNING  # the observation was stale
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="late")
    assert c.status == Status.ERROR and "stopped machine" in c.status_message
    assert c.disk_volume not in host.pools["default"]
    stopped.refresh_from_db()
    assert stopped.operation == ""


def test_a_network_boot_clone_gets_its_own_bmc(django_capture_on_commit_callbacks, host, stopped):
    Machine.objects.filter(pk=stopped.pk).update(deploy_type="network", image=None, bmc_port=6300, bmc_username="x")
    stopped.refresh_from_db()
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="pxe2")
    assert c.bmc_port and c.bmc_port != stopped.bmc_port and c.bmc_username not in ("", "x")
    assert c.bmc_password_encrypted


def test_save_as_image_streams_the_flattened_disk_into_the_catalogue(
    django_capture_on_commit_callbacks, host, stopped, settings, monkeypatch
):
    src = settings.PORTAL_IMAGE_DIR / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "64M"], check=True, capture_output=True)
    host.pools["default"][stopped.disk_volume]["data"] = src.read_bytes()
    with django_capture_on_commit_callbacks(execute=True):
        img = services.image_from_machine(machine=stopped, actor=stopped.owner, name="golden")
    img.refresh_from_db()
    assert img.status == ImageStatus.READY and img.owner == stopped.owner and img.default_user == "tiny"
    assert img.virtual_size_bytes == 64 << 20 and (settings.PORTAL_IMAGE_DIR / img.file_name).exists()
    assert clones.export_volume(stopped, img) not in host.pools["default"]
    stopped.refresh_from_db()
    assert stopped.operation == ""
    with pytest.raises(ValidationError, match="exists"):
        services.image_from_machine(machine=stopped, actor=stopped.owner, name="golden")


def test_save_as_image_of_a_disk_that_is_not_an_image_ends_in_error_with_no_file(
    django_capture_on_commit_callbacks, host, stopped, settings
):
    host.pools["default"][stopped.disk_volume]["data"] = b"not a qcow2"
    with django_capture_on_commit_callbacks(execute=True):
        img = services.image_from_machine(machine=stopped, actor=stopped.owner, name="broken")
    img.refresh_from_db()
    assert img.status == ImageStatus.ERROR and "Refused" in img.status_message
    assert not (settings.PORTAL_IMAGE_DIR / img.file_name).exists()
    assert Image.objects.filter(name="broken").exists()


def test_the_api_clones_and_saves_and_never_shows_another_users_machine(
    django_capture_on_commit_callbacks, host, stopped, client
):
    client.force_login(stopped.owner)
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(
            f"/api/v1/machines/{stopped.pk}/clone/",
            {"count": 2, "name_pattern": "api-{n}", "linked": True},
            content_type="application/json",
        )
    assert r.status_code == 202, r.content
    assert [m["name"] for m in r.json()["machines"]] == ["api-1", "api-2"]
    r = client.post(f"/api/v1/machines/{stopped.pk}/clone/", {"count": 2}, content_type="application/json")
    assert r.status_code == 400 and "pattern" in str(r.json())
    r = client.post(f"/api/v1/machines/{stopped.pk}/clone/", {"name": "Bad_Name"}, content_type="application/json")
    assert r.status_code == 400
    stranger = UserFactory(username="stranger")
    client.force_login(stranger)
    for action in ("clone", "save-image"):
        r = client.post(f"/api/v1/machines/{stopped.pk}/{action}/", {"name": "x"}, content_type="application/json")
        assert r.status_code == 404


def test_the_page_clones_and_refuses_with_a_message(django_capture_on_commit_callbacks, host, stopped, client):
    client.force_login(stopped.owner)
    r = client.get(f"/machines/{stopped.pk}/clone/")
    assert r.status_code == 200 and b"Create" in r.content
    r = client.post(f"/machines/{stopped.pk}/clone/", {"count": "2", "name_pattern": "bad"})
    assert r.status_code == 200 and b"{n}" in r.content
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/machines/{stopped.pk}/clone/", {"name": "page1", "count": "1", "linked": "on"})
    assert r.status_code == 302 and Machine.objects.filter(name="page1", status=Status.ACTIVE).exists()
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/machines/{stopped.pk}/save-image/", {"name": "from-page"})
    assert r.status_code == 302 and Image.objects.filter(name="from-page").exists()


def test_a_rebuilds_kept_disk_clones_while_the_source_runs_and_other_snapshots_are_refused(
    django_capture_on_commit_callbacks, host, stopped
):
    kept = MachineSnapshot.objects.create(
        machine=stopped, name="before-rebuild-1", automatic=True, kind="external", status="ready"
    )
    host.pools["default"][kept.volume(0)] = {"format": "qcow2", "capacity": 1 << 30, "backing": "", "data": b"kept"}
    inside = MachineSnapshot.objects.create(machine=stopped, name="inside", status="ready")
    Machine.objects.filter(pk=stopped.pk).update(power_state=PowerState.RUNNING)
    host.domains[str(stopped.uuid)]["state"] = DomainState.RUNNING
    stopped.refresh_from_db()
    with pytest.raises(MachineError, match="running: shut it down first \\(a clone from internal snapshot inside"):
        services.machine_clone(machine=stopped, actor=stopped.owner, name="c1", snapshot=inside)
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="from-kept", snapshot=kept)
    assert c.status == Status.ACTIVE and host.pools["default"][c.disk_volume]["data"] == b"kept"
    assert "snapshot before-rebuild-1" in c.events.get(step="create").message


def test_the_admin_action_clones_each_selected_machine(django_capture_on_commit_callbacks, host, stopped, client):
    staff = UserFactory(username="boss", is_staff=True, is_superuser=True)
    client.force_login(staff)
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post("/admin/machines/machine/", {"action": "clone", "_selected_action": [stopped.pk]}, follow=True)
    assert b"Clone: queued for 1 machine" in r.content
    made = Machine.objects.get(name=f"{stopped.name}-clone")
    assert made.owner == staff and made.cloned_from == stopped and made.status == Status.ACTIVE


def test_a_disk_only_snapshot_clones_as_a_whole_copy_of_the_disk_below_its_overlay_while_the_source_runs(
    django_capture_on_commit_callbacks, host, stopped
):
    """The overlay's backing file is the disk as it was at the snapshot: copied whole (the layers below an
    overlay are written again when a snapshot is deleted, so nothing may stand on them), even if linked was asked."""
    snap = MachineSnapshot.objects.create(machine=stopped, name="disk-only", kind="external", status="ready")
    pool = host.pools["default"]
    pool[snap.volume(0)] = {
        "format": "qcow2",
        "capacity": 1 << 30,
        "backing": f"/fake/default/{stopped.disk_volume}",
        "data": b"written since the snapshot",
    }
    Machine.objects.filter(pk=stopped.pk).update(power_state=PowerState.RUNNING)
    host.domains[str(stopped.uuid)]["state"] = DomainState.RUNNING
    stopped.refresh_from_db()
    with pytest.raises(MachineError, match="has disk-only snapshots"):  # the machine itself: its disks are overlays
        services.machine_clone(machine=stopped, actor=stopped.owner, name="c0")
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="from-snap", snapshot=snap)
    assert c.status == Status.ACTIVE, c.status_message
    disk = pool[c.disk_volume]
    assert disk["data"] == b"the source's writes" and disk["backing"] == ""  # standalone, as at the snapshot
    assert "cloned (full copy) from snapshot disk-only" in c.events.get(step="create").message
    assert "a whole copy" in c.events.filter(step="disk").first().message
    pool[snap.volume(0)]["backing"] = "/elsewhere/disk.qcow2"  # never a file outside the pool
    (bad,) = clone(django_capture_on_commit_callbacks, stopped, name="from-snap2", snapshot=snap)
    assert bad.status == Status.ERROR and "outside the pool" in bad.status_message


def test_the_page_offers_the_snapshots_a_clone_can_start_from_and_clones_from_one(
    django_capture_on_commit_callbacks, host, stopped, client
):
    snap = MachineSnapshot.objects.create(machine=stopped, name="disk-only", kind="external", status="ready")
    MachineSnapshot.objects.create(machine=stopped, name="inside", status="ready")  # internal: offered too
    MachineSnapshot.objects.create(machine=stopped, name="busy", kind="external", status="creating")
    host.pools["default"][snap.volume(0)] = {
        "format": "qcow2",
        "capacity": 1 << 30,
        "backing": f"/fake/default/{stopped.disk_volume}",
        "data": b"after",
    }
    client.force_login(stopped.owner)
    page = client.get(f"/machines/{stopped.pk}/clone/").content.decode()
    assert "snapshot disk-only" in page and "snapshot inside" in page and "snapshot busy" not in page
    r = client.post(f"/machines/{stopped.pk}/clone/", {"name": "x1", "count": "1", "snapshot": "999999"})
    assert r.status_code == 200 and "Select a valid choice" in r.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/machines/{stopped.pk}/clone/", {"name": "from-page-snap", "count": "1", "snapshot": snap.pk})
    assert r.status_code == 302, r.content.decode()[:2000]
    made = Machine.objects.get(name="from-page-snap")
    assert made.status == Status.ACTIVE and "from snapshot disk-only" in made.events.get(step="create").message


def _internal_snapshot(host, machine, name="inside") -> MachineSnapshot:
    """An internal snapshot of the stopped machine holding b"marker A", its disk written b"marker B" since."""
    uuid, pool = str(machine.uuid), host.pools["default"]
    pool[machine.disk_volume]["data"] = b"marker A"
    host.get_driver("fake:///").snapshot_create(uuid, name=name)
    pool[machine.disk_volume]["data"] = b"marker B"
    return MachineSnapshot.objects.create(machine=machine, name=name, status="ready")


def test_an_internal_snapshot_clones_as_a_whole_copy_and_the_source_stays_as_it_was(
    django_capture_on_commit_callbacks, host, stopped
):
    snap = _internal_snapshot(host, stopped)
    uuid, pool = str(stopped.uuid), host.pools["default"]
    before = host.get_driver("fake:///").snapshot_list(uuid)
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="from-inside", snapshot=snap)  # linked asked
    assert c.status == Status.ACTIVE, c.status_message
    assert pool[c.disk_volume]["data"] == b"marker A" and pool[c.disk_volume]["backing"] == ""
    assert pool[stopped.disk_volume]["data"] == b"marker B"  # the source's own state, as before
    assert host.get_driver("fake:///").snapshot_list(uuid) == before  # no temporary snapshot left, same current
    assert host.domains[uuid]["state"] == DomainState.OFF and "snapshot_copy_disks" in host.calls
    assert "cloned (full copy) from snapshot inside" in c.events.get(step="create").message
    assert "a whole copy of the disk as in snapshot inside" in c.events.filter(step="disk").first().message
    stopped.refresh_from_db()
    assert stopped.operation == ""


def test_an_internal_snapshot_clone_refuses_a_running_source_and_a_failed_copy_ends_in_error(
    django_capture_on_commit_callbacks, host, stopped
):
    snap = _internal_snapshot(host, stopped)
    uuid, pool = str(stopped.uuid), host.pools["default"]
    host.domains[uuid]["state"] = DomainState.RUNNING  # started behind the portal's back: the worker sees it
    (late,) = clone(django_capture_on_commit_callbacks, stopped, name="late", snapshot=snap)
    assert late.status == Status.ERROR and "stopped machine" in late.status_message
    assert late.disk_volume not in pool and "snapshot_copy_disks" not in host.calls
    host.domains[uuid]["state"] = DomainState.OFF
    host.fail["snapshot_copy_disks"] = HypervisorFatalError("the copy broke")
    (bad,) = clone(django_capture_on_commit_callbacks, stopped, name="broken", snapshot=snap)
    assert bad.status == Status.ERROR and "the copy broke" in bad.status_message and bad.disk_volume not in pool
    assert pool[stopped.disk_volume]["data"] == b"marker B"
    assert [s.name for s in host.get_driver("fake:///").snapshot_list(uuid)] == ["inside"]
    stopped.refresh_from_db()
    assert stopped.operation == ""


def test_a_temporary_snapshot_left_by_a_crash_is_reverted_to_first(
    django_capture_on_commit_callbacks, host, stopped, monkeypatch
):
    """A worker that died midway left the source at the chosen snapshot with its state in the temporary one: the
    clone's next run goes back to that state first, then copies."""
    snap = _internal_snapshot(host, stopped)
    uuid, pool = str(stopped.uuid), host.pools["default"]
    driver = host.get_driver("fake:///")
    real = driver.snapshot_copy_disks

    def crash_then_run(uuid, name, *, pool, copies, keep):
        driver.snapshot_create(uuid, name=keep)  # the state kept, then the disk turned back to the snapshot
        host.pools["default"][next(iter(copies))]["data"] = b"marker A"
        real(uuid, name, pool=pool, copies=copies, keep=keep)

    monkeypatch.setattr(driver, "snapshot_copy_disks", crash_then_run)
    monkeypatch.setattr("machines.services.clones.get_driver", lambda uri: driver)
    (c,) = clone(django_capture_on_commit_callbacks, stopped, name="after-crash", snapshot=snap)
    assert c.status == Status.ACTIVE and pool[c.disk_volume]["data"] == b"marker A"
    assert pool[stopped.disk_volume]["data"] == b"marker B"
    assert [(s.name, s.current) for s in driver.snapshot_list(uuid)] == [("inside", True)]
