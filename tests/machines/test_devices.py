"""Disks, NICs and CD-ROM drives after create (machines.services.devices) on the fake hypervisor: hot-plug where
the bus allows, quota and the pool's room, volumes named per disk and never reused, the NIC policy of a create,
the seed rewritten, drives for every deployment type, snapshots and roles refused, the API, the page."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client
from rest_framework.test import APIClient

from hypervisors.drivers.base import HypervisorFatalError, PowerState
from hypervisors.models import ImageStatus
from machines import capacity, services
from machines.models import Machine, MachineSnapshot, Membership, Project, Quota
from machines.services import MachineError
from portal.models import AuditEvent
from tests.factories import ImageFactory, UserFactory, tenant_nic
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture
def made(django_capture_on_commit_callbacks, host, owner, hv, image):  # noqa: F811
    def make(**kw):
        return create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, **kw))

    return make


@pytest.fixture
def run(django_capture_on_commit_callbacks):
    """Call a device service as the request does, then its worker run; the machine as it is afterwards."""

    def call(fn, machine, actor=None, **kw) -> Machine:
        with django_capture_on_commit_callbacks(execute=True):
            fn(machine=machine, actor=actor or machine.owner, **kw)
        return Machine.objects.get(pk=machine.pk)

    return call


def spec_of(host, machine):
    return host.domains[str(machine.uuid)]["spec"]


def off(host, machine) -> Machine:
    host.domains[str(machine.uuid)]["state"] = PowerState.OFF
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.OFF)
    return Machine.objects.get(pk=machine.pk)


def test_a_blank_disk_is_hot_plugged_counted_and_detached_with_its_volume(made, host, run):
    machine = made()
    assert machine.power_state == PowerState.RUNNING
    before = capacity.usage(machine.owner)["disk_gib"]
    machine = run(services.machine_attach_disk, machine, size_gib=3)
    name = f"m-{machine.uuid}-disk1.qcow2"
    assert machine.extra_disks == [{"size_gib": 3, "n": 1}] and machine.operation == ""
    assert host.pools["default"][name]["capacity"] == 3 << 30
    assert [d.path for d in spec_of(host, machine).disks if d.path.endswith(name)] == [f"/fake/default/{name}"]
    assert "attached as vdb (the running guest has it now)" in machine.events.last().message
    assert capacity.usage(machine.owner)["disk_gib"] == before + 3
    assert AuditEvent.objects.filter(action="machine.devices", outcome="success").count() == 1
    machine = run(services.machine_detach_disk, machine, disk=1)
    assert machine.extra_disks == [] and name not in host.pools["default"]
    assert name not in host.get_driver("fake:///").domain_xml(str(machine.uuid))
    assert f"its volume {name} deleted" in machine.events.last().message
    assert capacity.usage(machine.owner)["disk_gib"] == before


def test_a_disk_over_an_image_is_an_overlay_of_its_copy(made, host, run, image):  # noqa: F811
    machine = run(services.machine_attach_disk, made(), size_gib=1, image=image)
    vol = host.pools["default"][f"m-{machine.uuid}-disk1.qcow2"]
    assert vol["backing"].startswith("/fake/default/portal-image-")
    assert machine.extra_disks == [{"size_gib": 1, "n": 1, "image": image.pk}]
    with pytest.raises(ValidationError, match="needs at least 3 GiB"):
        big = ImageFactory(name="big", status=ImageStatus.READY, virtual_size_bytes=3 << 30)
        services.machine_attach_disk(machine=machine, actor=machine.owner, size_gib=1, image=big)


def test_kept_volumes_stay_and_their_numbers_are_not_reused(made, host, run):
    machine = made()
    for size in (1, 2):
        machine = run(services.machine_attach_disk, machine, size_gib=size)
    machine = run(services.machine_detach_disk, machine, disk=1, keep_volume=True)  # the first: disk 2 stays disk2
    assert machine.extra_disks == [{"size_gib": 2, "n": 2}]
    assert machine.extra_disk_volume(0) == f"m-{machine.uuid}-disk2.qcow2"
    kept = f"m-{machine.uuid}-disk1.qcow2"
    assert kept in host.pools["default"] and "kept in pool default" in machine.events.last().message
    machine = run(services.machine_attach_disk, machine, size_gib=4)  # numbered 3, not 1: the kept one is not it
    assert [e["n"] for e in machine.extra_disks] == [2, 3]
    assert host.pools["default"][kept]["capacity"] == 1 << 30
    assert set(machine.volumes) >= {f"m-{machine.uuid}-disk2.qcow2", f"m-{machine.uuid}-disk3.qcow2"}
    assert kept not in machine.volumes


def test_the_disks_of_a_create_keep_their_volumes_when_one_before_them_goes(made, host, run):
    machine = made(extra_disks=[1, 2])
    assert machine.volumes[1:3] == [f"m-{machine.uuid}-disk1.qcow2", f"m-{machine.uuid}-disk2.qcow2"]
    machine = run(services.machine_detach_disk, machine, disk=1)
    assert [(e["size_gib"], e["n"]) for e in machine.extra_disks] == [(2, 2)]
    assert machine.extra_disk_volume(0) == f"m-{machine.uuid}-disk2.qcow2" in host.pools["default"]
    assert f"m-{machine.uuid}-disk1.qcow2" not in host.pools["default"]


def test_quota_and_the_pools_room_are_checked_and_refusals_audited(made, run, hv, owner):  # noqa: F811
    machine = made()
    Quota.objects.update_or_create(user=owner, defaults={"disk_gib": 3})
    with pytest.raises(ValidationError, match="GiB of disk"):
        run(services.machine_attach_disk, machine, size_gib=3)
    Quota.objects.filter(user=owner).update(disk_gib=None)
    hv.pools = [{**hv.pools[0], "available_bytes": 2 << 30}]
    hv.save()
    with pytest.raises(ValidationError, match="2 GiB free in pool default"):
        run(services.machine_attach_disk, machine, size_gib=3)
    for bad in (0, "2", True, 20000):
        with pytest.raises(ValidationError, match="whole number of GiB"):
            services.machine_attach_disk(machine=machine, actor=owner, size_gib=bad)
    machine.refresh_from_db()
    assert machine.extra_disks == [] and machine.operation == ""
    assert AuditEvent.objects.filter(action="machine.devices", outcome="refused").count() == 2


def test_a_sata_disk_waits_for_the_machine_to_be_off(made, host, run):
    machine = made(disk_bus="sata")
    with pytest.raises(MachineError, match="cannot be hot-plugged.*Shut it down first"):
        run(services.machine_attach_disk, machine, size_gib=1)
    machine = run(services.machine_attach_disk, off(host, machine), size_gib=1)
    assert machine.extra_disks == [{"size_gib": 1, "n": 1}]
    assert "attached as sdb" in machine.events.last().message


def test_a_failed_attach_takes_the_disk_off_again(made, host, run):
    machine = made()
    host.fail["attach_disk"] = HypervisorFatalError("No more available PCI slots")
    machine = run(services.machine_attach_disk, machine, size_gib=1)
    assert machine.extra_disks == [] and machine.operation == ""
    assert f"m-{machine.uuid}-disk1.qcow2" not in host.pools["default"]
    last = machine.events.last()
    assert last.level == "error" and "No more available PCI slots" in last.message


def test_snapshots_roles_limits_and_adoption_refuse(made, run, owner):  # noqa: F811
    machine = made()
    snap = MachineSnapshot.objects.create(machine=machine, name="s", status=MachineSnapshot.Status.READY)
    with pytest.raises(MachineError, match="has snapshots"):
        services.machine_attach_disk(machine=machine, actor=owner, size_gib=1)
    with pytest.raises(MachineError, match="has snapshots"):
        services.machine_detach_nic(machine=machine, actor=owner, nic=1)
    snap.delete()
    project = Project.objects.create(name="team")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    operator = UserFactory(username="op")
    Membership.objects.create(project=project, user=operator, role="operator")
    with pytest.raises(PermissionDenied):
        services.machine_attach_disk(machine=Machine.objects.get(pk=machine.pk), actor=operator, size_gib=1)
    for _ in range(4):
        machine = run(services.machine_attach_disk, machine, size_gib=1)
    with pytest.raises(MachineError, match="4 extra disks, the most"):
        services.machine_attach_disk(machine=machine, actor=owner, size_gib=1)
    with pytest.raises(ValidationError, match="no extra disk 5; it has 4"):
        services.machine_detach_disk(machine=machine, actor=owner, disk=5)
    Machine.objects.filter(pk=machine.pk).update(adopted=True)
    with pytest.raises(MachineError, match="adopted"):
        services.machine_detach_disk(machine=Machine.objects.get(pk=machine.pk), actor=owner, disk=1)


def test_a_nic_follows_the_create_policy_and_rewrites_the_seed(made, host, run, owner):  # noqa: F811
    machine = made()
    with pytest.raises(ValidationError, match="(?i)user-mode"):
        services.machine_attach_nic(machine=machine, actor=owner, nic=services.NicInput(type="user"))
    with pytest.raises(ValidationError, match="already used by another machine"):
        taken = machine.nics.get().mac
        services.machine_attach_nic(machine=machine, actor=owner, nic=tenant_nic(mac=taken))
    machine = run(services.machine_attach_nic, machine, nic=tenant_nic(mac="52:54:00:aa:bb:02", model="e1000"))
    assert [n.mac for n in machine.nics.all()][1] == "52:54:00:aa:bb:02"
    assert [(n.mac, n.model) for n in spec_of(host, machine).nics][1] == ("52:54:00:aa:bb:02", "e1000")
    seed = host.pools["default"][machine.seed_volume]["data"]
    assert b"52:54:00:aa:bb:02" in seed  # the seed's network-config matches it by MAC
    assert "the seed's network-config lists it" in machine.events.last().message
    staff = UserFactory(username="boss", is_staff=True)
    machine = run(services.machine_attach_nic, machine, actor=staff, nic=services.NicInput(type="user"))
    assert machine.nics.count() == 3
    machine = run(services.machine_detach_nic, machine, nic=2)
    assert [n.mac for n in spec_of(host, machine).nics if n.mac == "52:54:00:aa:bb:02"] == []
    assert machine.nics.filter(mac="52:54:00:aa:bb:02").count() == 0
    assert b"52:54:00:aa:bb:02" not in host.pools["default"][machine.seed_volume]["data"]


def an_iso(settings, name: str):
    path = settings.PORTAL_IMAGE_DIR / f"{name}.iso"
    path.write_bytes(b"\0" * 2048)
    return ImageFactory(
        name=name,
        kind="iso",
        format="iso",
        status=ImageStatus.READY,
        file_name=path.name,
        sha256=name[0] * 64,
        file_size_bytes=2048,
        virtual_size_bytes=2048,
    )


def test_cd_rom_drives_for_an_image_machine(made, host, run, owner, settings):  # noqa: F811
    iso = an_iso(settings, "tools")
    machine = made()
    with pytest.raises(MachineError, match="cannot be hot-plugged"):
        run(services.machine_add_cdrom, machine)
    machine = run(services.machine_add_cdrom, off(host, machine), image=iso)
    cdroms = [d for d in spec_of(host, machine).disks if d.device == "cdrom"]
    assert len(cdroms) == 2 and cdroms[1].path.startswith("/fake/default/portal-image-")  # after the seed
    assert "CD-ROM drive 1 added as hdb with tools" in machine.events.last().message
    machine = run(services.machine_change_media, machine, slot=0, image=None)  # the media rule of ISO machines
    assert [d.path for d in spec_of(host, machine).disks if d.device == "cdrom"][1] == ""
    assert machine.cdroms.get().image is None
    with pytest.raises(ValidationError, match="no CD-ROM drive in slot 3"):
        services.machine_remove_cdrom(machine=machine, actor=owner, slot=3)
    machine = run(services.machine_remove_cdrom, machine, slot=0)
    assert machine.cdroms.count() == 0 and len([d for d in spec_of(host, machine).disks if d.device == "cdrom"]) == 1


def test_an_iso_machine_keeps_its_installer_drive(
    django_capture_on_commit_callbacks,
    host,
    run,
    owner,  # noqa: F811
    hv,  # noqa: F811
    settings,
    image,  # noqa: F811 - its fixture sets the image directory
):
    iso = an_iso(settings, "inst")
    kw = {**base_kwargs(owner, hv, iso), "deploy_type": "iso", "ssh_authorized_keys": ""}
    machine = off(host, create(django_capture_on_commit_callbacks, **kw))
    machine = run(services.machine_add_cdrom, machine)
    assert list(machine.cdroms.values_list("slot", flat=True)) == [0, 1]
    with pytest.raises(ValidationError, match="Remove the last drive first"):
        services.machine_remove_cdrom(machine=machine, actor=owner, slot=0)
    machine = run(services.machine_remove_cdrom, machine, slot=1)
    with pytest.raises(ValidationError, match="keeps its installer"):
        services.machine_remove_cdrom(machine=machine, actor=owner, slot=0)


def test_the_api(made, host, owner):  # noqa: F811
    machine = made()
    client = APIClient()
    client.force_login(owner)
    url = f"/api/v1/machines/{machine.pk}"
    r = client.post(f"{url}/disks/", {"size_gib": 2}, format="json")
    assert r.status_code == 202 and r.json()["operation"] == "devices"
    assert r.json()["extra_disks"] == [{"size_gib": 2, "n": 1}]
    Machine.objects.filter(pk=machine.pk).update(operation="")
    assert client.post(f"{url}/disks/", {"size_gib": 0}, format="json").status_code == 400
    assert client.post(f"{url}/disks/", {"size_gib": 1, "image": 999}, format="json").status_code == 400
    r = client.delete(f"{url}/disks/7/")
    assert r.status_code == 400 and "no extra disk 7" in r.json()["disk"][0]
    assert client.delete(f"{url}/disks/x/").status_code == 404
    assert client.delete(f"{url}/disks/1/?keep_volume=maybe").status_code == 400
    assert (
        client.post(f"{url}/nics/", {"type": "network", "source": "x", "mac": "zz"}, format="json").status_code == 400
    )
    r = client.post(f"{url}/nics/", {"type": "user"}, format="json")
    assert r.status_code == 400 and "user-mode" in str(r.json()).lower()
    assert client.post(f"{url}/cdroms/", {}, format="json").status_code == 400  # image: an ISO or null
    r = client.post(f"{url}/cdroms/", {"image": None}, format="json")
    assert r.status_code == 409 and "Shut it down first" in r.json()["detail"]
    assert client.delete(f"{url}/cdroms/4/").status_code == 400
    assert client.delete(f"{url}/nics/1/").status_code == 202


def test_the_page(made, host, owner):  # noqa: F811
    machine = made()
    client = Client()
    client.force_login(owner)
    page = client.get(f"/machines/{machine.pk}/")
    assert b'id="btn-devices"' in page.content and b"0 extra disks" in page.content
    r = client.get(f"/machines/{machine.pk}/devices/")
    assert r.status_code == 200 and b'id="btn-disk-attach"' in r.content and b'id="btn-nic-detach-1"' in r.content
    for data in ({"op": "attach-disk", "size_gib": "x"}, {"op": "nope"}, {"op": "detach-disk", "disk": "3"}):
        r = client.post(f"/machines/{machine.pk}/devices/", data, follow=True)
        assert r.status_code == 200 and b"alert-danger" in r.content, data
    r = client.post(
        f"/machines/{machine.pk}/devices/", {"op": "attach-disk", "size_gib": "2", "image": ""}, follow=True
    )
    assert r.status_code == 200 and Machine.objects.get(pk=machine.pk).extra_disks == [{"size_gib": 2, "n": 1}]


def test_the_admin_shows_the_devices(made, host, run, settings):
    iso = an_iso(settings, "shown")
    machine = run(services.machine_add_cdrom, off(host, made()), image=iso)
    machine = run(services.machine_attach_disk, machine, size_gib=2)
    staff = UserFactory(username="boss", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    page = client.get(f"/admin/machines/machine/{machine.pk}/change/").content.decode()
    assert "CD-ROM drives" in page and "0: shown" in page and "&quot;size_gib&quot;: 2" in page
