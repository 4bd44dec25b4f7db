"""Adopting domains the portal did not make (machines/services/adoption.py): the sync records their shape and
whether they can be adopted; the request checks that record, the rows and the quotas; the worker reads the domain
again, fills the rows, marks the domain and protects its console; then it is managed like any other, and its
delete keeps its disks unless asked. On the in-memory host, and on libvirt's test:/// driver for the parsing
and the refusals."""

import uuid as uuidlib

import pytest
from django.core.exceptions import PermissionDenied
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from hypervisors import services as hv_services
from hypervisors.drivers.base import PowerState
from hypervisors.drivers.domxml import foreign_domain, portal_domain
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine, MachineNic, Quota
from machines.services import AdoptionRefused
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

GIB = 1 << 30


def domain_xml(
    *, name="legacy-web", uuid=None, disks=(("file", "/fake/default/legacy.qcow2", "qcow2"),), nics=None, extra=""
):
    """A domain as someone defined it by hand: `disks` of (type, source, format)."""
    uuid = uuid or str(uuidlib.uuid4())
    nics = ("52:54:00:10:20:30",) if nics is None else nics
    first_boot = "<boot order='1'/>"
    disk_xml = "".join(
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>"
        + (f"<source file='{src}'/>" if kind == "file" else f"<source dev='{src}'/>" if kind == "block" else "")
        + f"<target dev='vd{'abcdef'[i]}' bus='virtio'/>{first_boot if i == 0 else ''}</disk>"
        for i, (kind, src, fmt) in enumerate(disks)
    )
    nic_xml = "".join(
        f"<interface type='network'><mac address='{mac}'/><source network='isolated'/><model type='virtio'/></interface>"
        for mac in nics
    )
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='KiB'>262144</memory>"
        "<vcpu>2</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>"
        f"<devices>{disk_xml}{nic_xml}<graphics type='vnc' port='-1' autoport='yes'/>{extra}</devices></domain>"
    )


@pytest.fixture
def staff(db):
    return UserFactory(username="staffer", is_staff=True)


@pytest.fixture
def lab(host, monkeypatch):
    """An online hypervisor on the fake host, synced by the real sync through the fake driver."""
    monkeypatch.setattr("hypervisors.services.get_driver", host.get_driver)
    host.pools["default"]["legacy.qcow2"] = {"format": "qcow2", "capacity": 3 * GIB, "backing": "", "data": b""}
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    return hv


def sync(hv) -> Hypervisor:
    assert hv_services.hypervisor_sync(hv.pk) == "online"
    return Hypervisor.objects.get(pk=hv.pk)


def recorded(hv, uuid) -> dict:
    return next(d for d in Hypervisor.objects.get(pk=hv.pk).unmanaged_domains if d["uuid"] == uuid)


def adopt(capture, hv, uuid, **kw) -> Machine:
    with capture(execute=True):
        machine = services.machine_adopt(
            hypervisor=hv, domain_uuid=uuid, owner=kw.pop("owner"), actor=kw.pop("actor"), **kw
        )
    return Machine.objects.get(pk=machine.pk)


# --- what the sync records --------------------------------------------------------------------------------


def test_the_sync_records_each_foreign_domains_shape_and_whether_it_can_be_adopted(host, lab):
    good = host.add_foreign(domain_xml(), state=PowerState.RUNNING)
    bad = host.add_foreign(
        domain_xml(name="odd", disks=(("file", "/srv/loose.img", "raw"), ("block", "/dev/sdz", "raw")), nics=())
    )
    sync(lab)
    entry = recorded(lab, good)
    assert entry["state"] == "running" and entry["vcpus"] == 2 and entry["memory_mib"] == 256
    assert entry["disks"][0] | {} == {
        "target": "vda",
        "device": "disk",
        "type": "file",
        "path": "/fake/default/legacy.qcow2",
        "pool": "default",
        "volume": "legacy.qcow2",
        "format": "qcow2",
        "capacity_bytes": 3 * GIB,
    }
    assert entry["nics"] == [{"type": "network", "source": "isolated", "mac": "52:54:00:10:20:30", "model": "virtio"}]
    assert entry["adoptable"] and entry["problems"] == []
    odd = recorded(lab, bad)
    assert not odd["adoptable"]
    assert odd["problems"] == [
        "Disk vda (/srv/loose.img) is outside any storage pool of this hypervisor.",
        "Disk vdb is a block disk (/dev/sdz): the portal handles only files that are volumes of a storage pool.",
    ]


def test_the_shape_parser_reads_firmware_boot_and_graphics():
    xml = (
        "<domain type='kvm'><name>u</name><uuid>0b8c1c86-0000-4000-8000-000000000001</uuid>"
        "<memory unit='GiB'>2</memory><vcpu placement='static'>4</vcpu>"
        "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><firmware>"
        "<feature enabled='yes' name='secure-boot'/></firmware><boot dev='network'/><boot dev='hd'/></os>"
        "<devices><disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>"
        "<interface type='bridge'><mac address='52:54:00:AA:BB:CC'/><source bridge='br0'/>"
        "<vlan><tag id='42'/></vlan><model type='e1000e'/><boot order='2'/></interface>"
        "<graphics type='spice'/><hostdev mode='subsystem' type='pci'/></devices></domain>"
    )
    shape = foreign_domain(xml)
    assert (shape["vcpus"], shape["memory_mib"], shape["machine_type"]) == (4, 2048, "q35")
    assert (shape["firmware"], shape["secure_boot"], shape["boot"]) == ("uefi", True, ["network", "hd"])
    assert shape["disks"][0]["device"] == "cdrom" and shape["disks"][0]["path"] == ""
    assert shape["nics"] == [
        {
            "type": "bridge",
            "source": "br0",
            "mode": "bridge",
            "mac": "52:54:00:aa:bb:cc",
            "model": "e1000e",
            "vlan": 42,
            "boot_order": 2,
        }
    ]
    problems = hv_services.adoption_problems({**shape, "persistent": True})
    assert problems == [
        "Its graphical console is spice: the portal's consoles are VNC.",
        "It has 1 host device(s) passed through, which the portal cannot take over.",
    ]


def test_the_test_driver_gives_the_shape_with_volumes_and_takes_the_mark(test_hv_state):
    """libvirt's own parsing of a hand-made domain (test:///default): the disk in a pool is found as its volume,
    the other is not; the mark makes it the portal's by its UUID (its own name kept), once."""
    d = LibvirtDriver("test:///default")
    vol = d.create_volume(pool="default-pool", name="hand.qcow2", fmt="qcow2", capacity_bytes=GIB)
    uuid = str(uuidlib.uuid4())
    xml = domain_xml(
        name="hand", uuid=uuid, disks=(("file", vol.path, "qcow2"), ("file", "/nowhere/x.img", "raw"))
    ).replace("type='qemu'", "type='test'", 1)
    d.conn.defineXML(xml)
    try:
        shape = d.domain_shape(uuid)
        assert shape is not None and shape["persistent"]
        assert [(x["pool"], x["volume"], x["capacity_bytes"]) for x in shape["disks"]] == [
            ("default-pool", "hand.qcow2", GIB),
            ("", "", 0),
        ]
        assert hv_services.adoption_problems(shape) == [
            "Disk vdb (/nowhere/x.img) is outside any storage pool of this hypervisor."
        ]
        assert [x.shape["name"] for x in d.host_info().domains if x.shape] == ["hand", "test"]
        mark = {"id": "7", "adopted": uuid}
        assert d.domain_mark(uuid, mark) is True and d.domain_mark(uuid, mark) is False
        assert portal_domain(d.domain_xml(uuid)) == ("hand", mark)
        assert next(x for x in d.list_domains() if x.uuid == uuid).managed
    finally:
        d.undefine(uuid)
        d.delete_volume(pool="default-pool", name="hand.qcow2")


# --- the adoption -------------------------------------------------------------------------------------------


def test_an_adopted_domain_becomes_an_active_machine_with_its_hardware_nics_mark_and_console_password(
    host, lab, staff, django_capture_on_commit_callbacks
):
    uuid = host.add_foreign(domain_xml(), state=PowerState.RUNNING)
    host.domains[uuid]["vnc_protected"] = host.domains[uuid]["vnc_config_protected"] = False
    host.domains[uuid]["autostart"] = True
    sync(lab)
    owner = UserFactory(username="olga")
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=owner, actor=staff)
    assert (machine.status, machine.adopted, str(machine.uuid), machine.name) == ("active", True, uuid, "legacy-web")
    assert (machine.vcpus, machine.memory_mib, machine.disk_gib, machine.pool) == (2, 256, 3, "default")
    assert (machine.machine_type, machine.firmware, machine.power_state) == ("pc-i440fx-7.2", "bios", "running")
    assert machine.autostart  # as the domain has it
    assert machine.domain_name == "legacy-web"
    assert [(n.mac, n.type, n.source) for n in machine.nics.all()] == [("52:54:00:10:20:30", "network", "isolated")]
    xml = host.get_driver("x").domain_xml(uuid)
    assert portal_domain(xml) == (
        "legacy-web",
        {"id": str(machine.pk), "owner": str(owner.pk), "deploy-type": "network", "adopted": uuid},
    )
    assert host.domains[uuid]["vnc_config_protected"]  # the next cold start asks a password
    events = " | ".join(machine.events.values_list("message", flat=True))
    assert "disk vda (virtio): default/legacy.qcow2, qcow2, 3 GiB, boot order 1" in events
    assert "NIC 52:54:00:10:20:30 network isolated (virtio)" in events and "VNC password" in events
    assert AuditEvent.objects.filter(action="machine.adopt", outcome="success").count() == 1
    assert AuditEvent.objects.filter(action="machine.adopt_run", outcome="success").count() == 1
    # the next sync lists it as the portal's, and the sweeper never calls it left behind
    assert uuid not in {d["uuid"] for d in sync(lab).unmanaged_domains}
    for _ in range(2):
        assert services.hypervisor_sweep_run(lab.pk) == []


def test_it_is_managed_like_any_other_power_and_bmc(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff, name="web1", bmc=True)
    assert machine.name == "web1" and machine.domain_name == "legacy-web" and machine.has_bmc
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=machine, action="start", actor=staff)
    assert host.domains[uuid]["state"] == PowerState.RUNNING and host.domains[uuid]["vnc_protected"]
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=staff)
    assert host.domains[uuid]["state"] == PowerState.OFF
    machine.refresh_from_db()
    assert "grow_disk" not in services_allowed(staff, machine) and "migrate" not in services_allowed(staff, machine)


def services_allowed(user, machine):
    from machines.policy import allowed_actions

    return allowed_actions(user, machine)


def test_delete_keeps_an_adopted_machines_disks_unless_asked(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_delete(machine=machine, actor=staff)
    assert not Machine.objects.filter(pk=machine.pk).exists() and uuid not in host.domains
    assert "legacy.qcow2" in host.pools["default"]  # kept
    # a second one, deleted with its disks
    uuid = host.add_foreign(domain_xml(name="again"))
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_delete(machine=machine, actor=staff, keep_disks=False)
    assert "legacy.qcow2" not in host.pools["default"]


def test_keeping_disks_is_for_adopted_machines_only(host, staff):
    machine = MachineFactory(owner=staff, status="active")
    with pytest.raises(services.MachineError, match="only an adopted machine's disks can be kept"):
        services.machine_delete(machine=machine, actor=staff, keep_disks=True)


# --- refusals ----------------------------------------------------------------------------------------------


def test_refusals_say_why_and_make_nothing(host, lab, staff, django_capture_on_commit_callbacks):
    good = host.add_foreign(domain_xml())
    loose = host.add_foreign(domain_xml(name="loose", disks=(("file", "/srv/loose.img", "raw"),), nics=()))
    bad_name = host.add_foreign(domain_xml(name="Win_10", disks=(), nics=()))
    sync(lab)
    owner = UserFactory(username="olga")

    def refused(uuid, match, **kw):
        with pytest.raises(AdoptionRefused, match=match):
            services.machine_adopt(hypervisor=lab, domain_uuid=uuid, owner=kw.pop("owner", owner), actor=staff, **kw)

    refused(loose, r"cannot manage loose: Disk vda \(/srv/loose.img\) is outside any storage pool")
    refused(str(uuidlib.uuid4()), "No domain .* among those the last check of lab found")
    refused(bad_name, "not a valid host name: give the machine one")
    refused(good, "not a valid host name", name="no_way")
    MachineFactory(owner=owner, name="legacy-web")
    refused(good, "olga has a machine named legacy-web already")
    refused(good, "olga is not an admin of project p1", name="other", project=ProjectFactory(name="p1"))
    Quota.objects.create(user=owner, vcpus=1)
    refused(good, "exceed your quota", name="other")
    Hypervisor.objects.filter(pk=lab.pk).update(maintenance=True)
    refused(good, "lab is in maintenance")
    Hypervisor.objects.filter(pk=lab.pk).update(maintenance=False)
    taken = MachineFactory(owner=staff, name="taken")
    MachineNic.objects.create(machine=taken, index=0, type="network", source="x", mac="52:54:00:10:20:30")
    refused(good, "MAC address 52:54:00:10:20:30 is another machine's", owner=staff)
    with pytest.raises(PermissionDenied, match="Only staff"):
        services.machine_adopt(hypervisor=lab, domain_uuid=good, owner=owner, actor=owner)
    assert Machine.objects.filter(adopted=True).count() == 0
    assert AuditEvent.objects.filter(action="machine.adopt", outcome="refused").count() == 10


def test_a_uuid_already_a_machines_is_refused(host, lab, staff):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    MachineFactory(owner=staff, name="first", uuid=uuid)
    with pytest.raises(AdoptionRefused, match="is machine first's already"):
        services.machine_adopt(hypervisor=lab, domain_uuid=uuid, owner=staff, actor=staff)


def test_a_domain_changed_since_the_sync_ends_the_adoption_and_stays_untouched(
    host, lab, staff, django_capture_on_commit_callbacks
):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    host.domains[uuid]["xml"] = domain_xml(uuid=uuid, disks=(("file", "/srv/moved.img", "raw"),))
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_adopt(hypervisor=lab, domain_uuid=uuid, owner=staff, actor=staff)
    assert not Machine.objects.filter(uuid=uuid).exists()
    assert portal_domain(host.get_driver("x").domain_xml(uuid)) is None  # not marked
    failed = AuditEvent.objects.get(action="machine.adopt_run", outcome="failed")
    assert "outside any storage pool" in failed.detail


def test_a_resumed_provisioning_of_an_adopted_machine_adopts_it_and_makes_no_disk(
    host, lab, staff, django_capture_on_commit_callbacks
):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    with django_capture_on_commit_callbacks(execute=False):  # the worker died before it ran
        machine = services.machine_adopt(hypervisor=lab, domain_uuid=uuid, owner=staff, actor=staff)
    services.machine_provision_run(machine.pk)  # what the recovery queues for a machine left provisioning
    machine.refresh_from_db()
    assert machine.status == "active" and set(host.pools["default"]) == {"legacy.qcow2"}


# --- entry points ------------------------------------------------------------------------------------------


def test_the_api_adopts_for_staff_only(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    owner = UserFactory(username="olga")
    api = APIClient()
    api.force_authenticate(owner)
    url = f"/api/v1/hypervisors/{lab.pk}/adopt/"
    assert api.post(url, {"domain_uuid": uuid, "owner": owner.pk}, format="json").status_code in (403, 404)
    api.force_authenticate(staff)
    r = api.post(url, {"domain_uuid": "nope", "owner": owner.pk}, format="json")
    assert r.status_code == 400 and "domain_uuid" in r.json()
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(url, {"domain_uuid": uuid, "owner": owner.pk, "name": "web2"}, format="json")
    assert r.status_code == 202, r.content
    machine = Machine.objects.get(pk=r.json()["id"])
    assert machine.adopted and machine.name == "web2" and machine.status == "active"
    r = api.post(url, {"domain_uuid": uuid, "owner": owner.pk}, format="json")
    assert r.status_code == 409 and "web2's already" in r.json()["detail"]
    assert api.delete(f"/api/v1/machines/{machine.pk}/?keep_disks=maybe").status_code == 400
    with django_capture_on_commit_callbacks(execute=True):
        r = api.delete(f"/api/v1/machines/{machine.pk}/?keep_disks=false")
    assert r.status_code == 202 and uuid not in host.domains and "legacy.qcow2" not in host.pools["default"]


def test_the_hypervisor_page_lists_domains_with_an_adopt_form(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    host.add_foreign(domain_xml(name="loose", disks=(("file", "/srv/loose.img", "raw"),), nics=()))
    sync(lab)
    client = Client()
    client.force_login(staff)
    page = client.get(reverse("hypervisors:detail", args=[lab.pk])).content.decode()
    assert "legacy-web" in page and "outside any storage pool" in page and "Adopt" in page
    url = reverse("machines:adopt", args=[lab.pk])
    r = client.post(url, {"domain_uuid": uuid, "owner": staff.pk, "name": "Bad Name"})
    assert r.status_code == 200 and "not a valid host name" in r.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(url, {"domain_uuid": uuid, "owner": staff.pk, "name": "", "bmc": "on"})
    machine = Machine.objects.get(uuid=uuid)
    assert r.status_code == 302 and r["Location"] == machine.get_absolute_url() and machine.has_bmc
    plain = Client()
    plain.force_login(UserFactory(username="plain"))
    assert plain.post(url, {"domain_uuid": uuid, "owner": staff.pk}).status_code in (403, 404)


def test_the_admin_action_adopts_the_ticked_domains(host, lab, staff, django_capture_on_commit_callbacks):
    staff.is_superuser = True
    staff.save()
    uuid = host.add_foreign(domain_xml())
    host.add_foreign(domain_xml(name="loose", disks=(("file", "/srv/loose.img", "raw"),), nics=()))
    sync(lab)
    client = Client()
    client.force_login(staff)
    url = reverse("admin:hypervisors_hypervisor_changelist")
    picked = {"action": "adopt_domains", "_selected_action": [lab.pk]}
    page = client.post(url, picked).content.decode()
    assert "lab: legacy-web (2 vCPUs, 256 MiB)" in page and "loose cannot be adopted" in page
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(url, {**picked, "apply": "1", "domains": [uuid], "owner": staff.pk}, follow=True)
    assert "Adopting legacy-web as legacy-web" in r.content.decode()
    assert Machine.objects.get(uuid=uuid).status == "active"


def test_the_reconcile_reports_a_running_console_without_password_until_a_cold_start(
    host, lab, staff, django_capture_on_commit_callbacks
):
    uuid = host.add_foreign(domain_xml(), state=PowerState.RUNNING)
    host.domains[uuid]["vnc_protected"] = host.domains[uuid]["vnc_config_protected"] = False
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    services.hypervisor_reconcile_run(lab.pk)
    assert Machine.objects.get(pk=machine.pk).last_observed.console_unprotected  # the live server has none yet
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=staff)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="start", actor=staff)
    services.hypervisor_reconcile_run(lab.pk)
    assert not Machine.objects.get(pk=machine.pk).last_observed.console_unprotected


def test_an_adopted_domain_whose_row_vanished_is_swept_as_the_portals_and_its_disks_are_never_listed(
    host, lab, staff, settings, django_capture_on_commit_callbacks
):
    settings.PORTAL_ORPHAN_GRACE = 0
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    sync(lab)  # now one of the portal's: not among the others the sweeper skips
    Machine.objects.filter(pk=machine.pk).delete()  # behind the portal's back
    services.hypervisor_sweep_run(lab.pk)
    found = services.hypervisor_sweep_run(lab.pk)
    assert found is not None
    assert [(o["kind"], o["name"], o["uuid"]) for o in found] == [("domain", "legacy-web", uuid)]


def test_the_page_says_whose_a_domain_being_adopted_is(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    with django_capture_on_commit_callbacks(execute=False):  # the worker has not taken it over yet
        services.machine_adopt(hypervisor=lab, domain_uuid=uuid, owner=staff, actor=staff, name="web9")
    client = Client()
    client.force_login(staff)
    page = client.get(reverse("hypervisors:detail", args=[lab.pk])).content.decode()
    assert "being adopted as web9" in page and f"?domain={uuid}" not in page


def test_the_delete_page_offers_keeping_an_adopted_machines_disks(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    client = Client()
    client.force_login(staff)
    url = reverse("machines:delete", args=[machine.pk])
    page = client.get(url).content.decode()
    assert 'name="keep_disks" value="1"' in page and "checked" in page
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(url, {})  # the box cleared: the disks go too
    assert r.status_code == 302 and uuid not in host.domains and "legacy.qcow2" not in host.pools["default"]
    plain = MachineFactory(owner=staff, status="active")
    assert 'name="keep_disks"' not in client.get(reverse("machines:delete", args=[plain.pk])).content.decode()


def test_its_disks_are_never_grown_or_moved_by_the_portal(host, lab, staff, django_capture_on_commit_callbacks):
    uuid = host.add_foreign(domain_xml())
    sync(lab)
    machine = adopt(django_capture_on_commit_callbacks, lab, uuid, owner=staff, actor=staff)
    HypervisorFactory(name="other", uri="qemu:///other")
    with pytest.raises(services.MachineError, match="does not grow"):
        services.machine_grow_disk(machine=machine, disk_gib=10, actor=staff)
    with pytest.raises(services.MachineError, match="does not move"):
        services.machine_migrate(machine=machine, actor=staff)
    report = services.hypervisor_evacuate(hypervisor=lab, actor=staff)
    assert report == [
        "legacy-web: stays (legacy-web was adopted: its disks are the domain's own volumes, which the portal does not move.)"
    ]
    assert Machine.objects.get(pk=machine.pk).hypervisor_id == lab.pk
