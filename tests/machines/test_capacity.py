from unittest import mock

import pytest
from django.core.exceptions import ValidationError

from hypervisors.models import ImageStatus
from machines import capacity
from machines.models import Machine, Quota
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

POOLS = [
    {
        "name": "default",
        "active": True,
        "capacity_bytes": 100 << 30,
        "allocation_bytes": 0,
        "available_bytes": 100 << 30,
    }
]


def hv(name, **kw):
    return HypervisorFactory(
        name=name,
        arch=kw.pop("arch", "x86_64"),
        cpus=kw.pop("cpus", 4),
        memory_mib=kw.pop("memory_mib", 8192),
        pools=kw.pop("pools", POOLS),
        **kw,
    )


def test_quota_defaults_and_overrides(settings):
    settings.PORTAL_QUOTA_MACHINES = 2
    user = UserFactory(username="q")
    assert capacity.quota_of(user).limits()["machines"] == 2
    Quota.objects.filter(user=user).update(machines=5)
    assert capacity.quota_of(user).limits()["machines"] == 5


def test_quota_refuses_with_a_clear_message(settings):
    settings.PORTAL_QUOTA_VCPUS = 4
    user = UserFactory(username="q")
    MachineFactory(name="a", owner=user, hypervisor=hv("h1"), deploy_type="network", vcpus=3)
    with pytest.raises(capacity.QuotaExceeded, match=r"5 vCPUs of 4 allowed \(using 3\)"):
        capacity.check_quota(user, machines=1, vcpus=2)
    capacity.check_quota(user, machines=1, vcpus=1)


def test_staff_have_no_quota(settings):
    settings.PORTAL_QUOTA_MACHINES = 0
    capacity.check_quota(UserFactory(username="s", is_staff=True), machines=1)


def test_usage_report_for_the_pages(settings):
    settings.PORTAL_QUOTA_MACHINES = 4
    user = UserFactory(username="q")
    MachineFactory(name="a", owner=user, hypervisor=hv("h1"), deploy_type="network", memory_mib=512)
    report = {r["key"]: r for r in capacity.usage_report(user)}
    assert report["machines"] == {
        "key": "machines",
        "label": "machines",
        "title": "Machines",
        "used": 1,
        "limit": 4,
        "percent": 25,
    }
    assert report["memory_mib"]["used"] == 512


def test_placement_picks_the_roomiest_and_says_why():
    small, big = hv("small", memory_mib=2048), hv("big", memory_mib=16384)
    fit = capacity.place(vcpus=1, memory_mib=1024, disk_gib=10, pool="default", image=None)
    assert fit.hypervisor == big and "placed on big: 16384 MiB memory" in fit.reason()
    MachineFactory(name="x", owner=UserFactory(username="o"), hypervisor=big, deploy_type="network", memory_mib=15000)
    assert capacity.place(vcpus=1, memory_mib=1024, disk_gib=10, pool="default", image=None).hypervisor == small


def test_placement_goes_where_the_nics_networks_are_and_prefers_the_tenant_network():
    tenant = [{"name": "portal-tenants", "active": True, "forward_mode": "isolated", "bridge": "virbr1"}]
    roomy, with_tenant = hv("roomy", memory_mib=16384), hv("tenanted", memory_mib=4096, networks=tenant)
    args = dict(vcpus=1, memory_mib=1024, disk_gib=10, pool="default", image=None)
    assert capacity.place(**args).hypervisor == roomy  # the most free memory, when nothing else matters
    assert capacity.place(**args, prefer_network="portal-tenants").hypervisor == with_tenant  # default NICs
    assert capacity.place(**args, networks=("portal-tenants",)).hypervisor == with_tenant  # a NIC names it
    with pytest.raises(ValidationError, match="roomy: no network lab; tenanted: no network lab"):
        capacity.place(**args, networks=("lab",))


def test_any_hypervisor_gives_a_plain_users_default_nic_the_tenant_network(settings):
    from machines import services

    tenant = [{"name": "portal-tenants", "active": True, "forward_mode": "isolated", "bridge": "virbr1"}]
    hv("roomy", memory_mib=16384)
    hv("tenanted", memory_mib=4096, networks=tenant)
    machine = services.machine_create(
        owner=UserFactory(username="plain"),
        hypervisor=None,
        name="n1",
        deploy_type="network",
        memory_mib=512,
        disk_gib=1,
    )
    assert machine.hypervisor.name == "tenanted"
    assert [(n.type, n.source) for n in machine.nics.all()] == [("network", "portal-tenants")]


def test_placement_respects_vcpu_overcommit_arch_pool_and_status():
    hv("cpu", cpus=1, cpu_allocation_ratio=2)
    hv("arm", arch="aarch64")
    hv("nopool", pools=[])
    hv("down", status="down")
    image = ImageFactory(name="img", status=ImageStatus.READY, arch="x86_64")
    with pytest.raises(ValidationError) as e:
        capacity.place(vcpus=3, memory_mib=512, disk_gib=10, pool="default", image=image)
    message = e.value.message_dict["hypervisor"][0]
    assert "cpu: 2 vCPUs free, needs 3" in message
    assert "arm: aarch64 host that cannot emulate x86_64" in message
    assert "nopool: no active pool default" in message
    assert "down" not in message  # not a candidate at all
    assert capacity.place(vcpus=2, memory_mib=512, disk_gib=10, pool="default", image=image).hypervisor.name == "cpu"


def test_placement_with_no_online_hypervisor():
    with pytest.raises(ValidationError, match="no hypervisor is online"):
        capacity.place(vcpus=1, memory_mib=512, disk_gib=1, pool="default", image=None)


def test_placement_may_emulate_another_architecture():
    hv("x86", guest_arches=["i686", "x86_64", "aarch64"])
    image = ImageFactory(name="arm", status=ImageStatus.READY, arch="aarch64")
    assert capacity.place(vcpus=1, memory_mib=512, disk_gib=1, pool="default", image=image).hypervisor.name == "x86"


# --- What a machine holds (capacity.held), and every path that allocates checking it -----------------------

TENANT_POOLS = [
    {"name": "default", "active": True, "capacity_bytes": 4 << 40, "allocation_bytes": 0, "available_bytes": 4 << 40}
]


@pytest.fixture
def lab(settings):
    # The network every user may use (issue 11 item 3), so the NIC is not what refuses a plain user here.
    networks = [{"name": settings.PORTAL_TENANT_NETWORK, "active": True}]
    return hv("lab", memory_mib=65536, cpus=16, pools=TENANT_POOLS, networks=networks)


def network_machine(owner, lab, name, *, override=False, **kw):
    from django.conf import settings

    from machines import services

    nic = services.NicInput(type="network", source=settings.PORTAL_TENANT_NETWORK)
    kw = {"memory_mib": 128, "disk_gib": 1, **kw}
    return services.machine_create(
        owner=owner, hypervisor=lab, name=name, deploy_type="network", nics=[nic], override_capacity=override, **kw
    )


def test_the_issue_case_extra_disks_count_for_good(lab):
    """Issue 11: a 500 GiB quota took three machines of 1 GiB with four extra disks of 124 GiB (1,491 GiB)."""
    user = UserFactory(username="plain")
    Quota.objects.create(user=user, disk_gib=500)
    network_machine(user, lab, "big1", extra_disks=[124, 124, 124, 124])
    assert capacity.usage(user)["disk_gib"] == 497
    with pytest.raises(ValidationError, match=r"exceed your quota: 994 GiB of disk of 500 allowed \(using 497\)"):
        network_machine(user, lab, "big2", extra_disks=[124, 124, 124, 124])
    with pytest.raises(ValidationError, match=r"994 GiB of disk of 500 allowed \(using 497\)"):
        network_machine(user, lab, "big3", extra_disks=[124, 124, 124, 124])
    assert list(Machine.objects.filter(owner=user).values_list("name", flat=True)) == ["big1"]
    assert capacity.usage(user)["disk_gib"] == 497


def test_held_counts_the_main_disk_and_every_extra_disk_of_either_shape(lab):
    user = UserFactory(username="plain")
    shapes = [{"size_gib": 10, "image": None, "boot_order": None}, 5]  # 5: a row from before the dict shape
    machine = MachineFactory(
        name="a",
        owner=user,
        hypervisor=lab,
        deploy_type="network",
        disk_gib=3,
        vcpus=2,
        memory_mib=256,
        extra_disks=shapes,
    )
    MachineFactory(name="b", owner=user, hypervisor=lab, deploy_type="network", disk_gib=7)
    assert capacity.held_by(machine) == {"machines": 1, "vcpus": 2, "memory_mib": 256, "disk_gib": 18}
    assert capacity.held_by(machine, disk_gib=10)["disk_gib"] == 25
    assert capacity.usage(user) == {"machines": 2, "vcpus": 3, "memory_mib": 1280, "disk_gib": 25}
    assert capacity.usage_by(Machine.objects.all(), "owner") == {user.pk: capacity.usage(user)}
    assert {r["key"]: r["used"] for r in capacity.usage_report(user)}["disk_gib"] == 25
    # The database's sums and held() of each machine agree, whatever the grouping.
    MachineFactory(name="c", owner=UserFactory(username="other"), hypervisor=lab, extra_disks=[{"size_gib": 2}])
    each = [capacity.held_by(m) for m in Machine.objects.all()]
    assert capacity.usage_of(Machine.objects.all()) == {k: sum(h[k] for h in each) for k in each[0]}
    assert sum(u["disk_gib"] for u in capacity.usage_by(Machine.objects.all(), "owner").values()) == 25 + 10 + 2
    assert capacity.usage_of(Machine.objects.none()) == {"machines": 0, "vcpus": 0, "memory_mib": 0, "disk_gib": 0}


def test_the_dashboard_shows_what_the_machines_hold(client, lab):
    user = UserFactory(username="plain")
    Quota.objects.create(user=user, disk_gib=500)
    network_machine(user, lab, "big1", extra_disks=[124, 124, 124, 124])
    client.force_login(user)
    page = client.get("/").content.decode()
    assert "<span>Disk (GiB)</span><span>497 / 500</span>" in page


def test_the_admin_shows_a_users_and_a_projects_usage(staff_client, lab):
    from machines.models import Membership

    user = UserFactory(username="plain")
    quota = Quota.objects.create(user=user, disk_gib=500)
    project = ProjectFactory(name="lab-team", disk_gib_quota=2000)
    Membership.objects.create(project=project, user=user, role="admin")
    network_machine(user, lab, "big1", extra_disks=[124, 124, 124, 124], project=project)
    shown = "1 machines of 10, 1 vCPUs of 20, 128 MiB of memory of 32768, 497 GiB of disk of 500"
    assert shown in staff_client.get("/admin/machines/quota/").content.decode()
    assert shown in staff_client.get(f"/admin/machines/quota/{quota.pk}/change/").content.decode()
    shown = "1 machines, 1 vCPUs, 128 MiB of memory, 497 GiB of disk of 2000"
    assert shown in staff_client.get("/admin/machines/project/").content.decode()
    assert shown in staff_client.get(f"/admin/machines/project/{project.pk}/change/").content.decode()


def test_a_project_quota_counts_extra_disks_too(lab):
    from machines.models import Membership

    user = UserFactory(username="plain")
    project = ProjectFactory(name="lab-team", disk_gib_quota=600)
    Membership.objects.create(project=project, user=user, role="admin")
    Quota.objects.create(user=user, disk_gib=5000)
    network_machine(user, lab, "p1", extra_disks=[124, 124, 124, 124], project=project)
    with pytest.raises(
        ValidationError, match=r"project lab-team's quota: 994 GiB of disk of 600 allowed \(using 497\)"
    ):
        network_machine(user, lab, "p2", extra_disks=[124, 124, 124, 124], project=project)
    network_machine(user, lab, "mine", extra_disks=[124, 124, 124, 124])  # outside the project: the user's quota


def _active(machine):
    Machine.objects.filter(pk=machine.pk).update(status="active")
    return Machine.objects.get(pk=machine.pk)


def test_growing_a_disk_counts_the_extra_disks(lab):
    from machines import services

    user = UserFactory(username="plain")
    Quota.objects.create(user=user, disk_gib=500)
    machine = _active(network_machine(user, lab, "big1", extra_disks=[124, 124, 124, 124]))  # holds 497
    with pytest.raises(ValidationError, match=r"501 GiB of disk of 500 allowed \(using 497\)"):
        services.machine_grow_disk(machine=machine, disk_gib=5, actor=machine.owner)
    assert Machine.objects.get(pk=machine.pk).disk_gib == 1
    services.machine_grow_disk(machine=machine, disk_gib=4, actor=machine.owner)
    assert capacity.usage(user)["disk_gib"] == 500


def test_growing_a_disk_must_fit_in_the_hypervisors_pool(lab):
    from machines import services

    staff = UserFactory(username="boss", is_staff=True)  # no quota: only the host's room can refuse
    machine = _active(network_machine(staff, lab, "grow1"))
    free = next(p for p in lab.pools if p["name"] == "default")["available_bytes"] >> 30
    with pytest.raises(ValidationError, match=rf"Hypervisor lab has {free} GiB free in pool default; growing by"):
        services.machine_grow_disk(machine=machine, disk_gib=free + 2, actor=machine.owner)
    assert Machine.objects.get(pk=machine.pk).disk_gib == 1
    services.machine_grow_disk(machine=machine, disk_gib=free, actor=machine.owner)


def test_rebuild_allocates_nothing_so_a_full_quota_does_not_stop_it(lab):
    from hypervisors.models import ImageKind
    from machines import services

    user = UserFactory(username="plain")
    Quota.objects.create(user=user, disk_gib=10)
    image = ImageFactory(name="img", kind=ImageKind.DISK, status=ImageStatus.READY, arch="x86_64")
    machine = MachineFactory(
        name="a", owner=user, hypervisor=lab, image=image, disk_gib=6, extra_disks=[4], status="active"
    )
    before = capacity.usage(user)
    # The automatic snapshot of the old disk (the default) holds space: at a full quota it is refused, saying so.
    with pytest.raises(ValidationError, match="without a snapshot"):
        services.machine_rebuild(machine=machine, actor=machine.owner)
    services.machine_rebuild(machine=machine, actor=machine.owner, snapshot=False)
    assert capacity.usage(user) == before and before["disk_gib"] == 10


def test_a_named_hypervisor_is_checked_for_room_like_a_placed_one(lab):
    user = UserFactory(username="plain")
    Quota.objects.create(user=user, memory_mib=1 << 20, disk_gib=1 << 20)
    small = hv("hv1", memory_mib=4096, pools=TENANT_POOLS, networks=lab.networks)
    network_machine(user, small, "first", memory_mib=2048)
    with pytest.raises(ValidationError) as e:
        network_machine(user, small, "second", memory_mib=4096)
    assert e.value.message_dict["hypervisor"] == [
        "Hypervisor hv1 has no room for this machine (2048 MiB memory free, needs 4096)."
    ]
    small.cpus = 1  # 1 CPU x 4 overcommit = 4 vCPUs
    small.save()
    with pytest.raises(ValidationError, match=r"Hypervisor hv1 has no room for this machine \(3 vCPUs free, needs 5\)"):
        network_machine(user, small, "wide", memory_mib=128, vcpus=5)
    with pytest.raises(ValidationError, match=r"\(4096 GiB free in default, needs 4097\)"):
        network_machine(user, small, "deep", memory_mib=128, extra_disks=[4096])
    assert Machine.objects.filter(hypervisor=small).count() == 1


def test_staff_may_override_a_full_hypervisor_and_it_is_recorded(lab):
    from portal.models import AuditEvent

    staff = UserFactory(username="boss", is_staff=True)
    small = hv("hv1", memory_mib=4096, pools=TENANT_POOLS, networks=lab.networks)
    network_machine(staff, small, "first", memory_mib=2048)
    with pytest.raises(ValidationError, match="has no room"):  # staff too, unless they say so
        network_machine(staff, small, "second", memory_mib=4096)
    machine = network_machine(staff, small, "second", memory_mib=4096, override=True)
    note = "created over capacity on hv1 by staff (boss): 2048 MiB memory free, needs 4096"
    assert machine.events.filter(step="placement", level="warning", message=note).exists()
    event = AuditEvent.objects.get(action="machine.capacity_override")
    assert event.detail == note and event.object_id == str(machine.pk) and event.username == "boss"


def test_only_staff_override_and_only_on_a_named_hypervisor(lab):
    user = UserFactory(username="plain")
    with pytest.raises(ValidationError) as e:
        network_machine(user, lab, "sneaky", override=True)
    assert "Only staff" in e.value.message_dict["override_capacity"][0]
    staff = UserFactory(username="boss", is_staff=True)
    with pytest.raises(ValidationError) as e:
        network_machine(staff, None, "anywhere", override=True)
    assert "Name the hypervisor" in e.value.message_dict["override_capacity"][0]
    assert not Machine.objects.exists()


def test_the_api_takes_override_capacity_from_staff_only(client, lab, settings):
    from portal.models import ApiToken

    small = hv("hv1", memory_mib=1024, pools=TENANT_POOLS, networks=lab.networks)
    body = {
        "name": "m1",
        "deploy_type": "network",
        "hypervisor": "hv1",
        "memory_mib": 2048,
        "disk_gib": 1,
        "nics": [{"type": "network", "source": settings.PORTAL_TENANT_NETWORK}],
        "override_capacity": True,
    }
    for name, staff, status, answer in (("plain", False, 400, "Only staff"), ("boss", True, 201, "m1")):
        _, raw = ApiToken.issue(user=UserFactory(username=name, is_staff=staff))
        r = client.post("/api/v1/machines/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {raw}")
        assert r.status_code == status and answer in r.content.decode(), r.content
    body = {**body, "name": "m2", "override_capacity": False}
    r = client.post("/api/v1/machines/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {raw}")
    assert r.status_code == 400 and "Hypervisor hv1 has no room" in r.json()["hypervisor"][0]
    assert Machine.objects.filter(hypervisor=small).count() == 1


def test_the_create_form_offers_the_override_to_staff_only(client, lab):
    from machines.forms import MachineForm

    for name, staff in (("boss", True), ("plain", False)):
        user = UserFactory(username=name, is_staff=staff)
        assert ("override_capacity" in MachineForm(user=user).fields) is staff
        client.force_login(user)
        assert ('name="override_capacity"' in client.get("/machines/new/").content.decode()) is staff


def test_the_create_form_passes_the_staff_override(client, lab):
    staff = UserFactory(username="boss", is_staff=True)
    small = hv("hv1", memory_mib=1024, pools=TENANT_POOLS, networks=lab.networks)
    client.force_login(staff)
    form = {
        "deploy_type": "network",
        "name": "m1",
        "hypervisor": small.pk,
        "pool": "default",
        "vcpus": 1,
        "memory_mib": 2048,
        "disk_gib": 1,
        "nic": f"network:{lab.networks[0]['name']}",
        "nic_model": "virtio",
        "nic_mode": "bridge",
        "firmware": "bios",
        "disk_bus": "virtio",
        "autostart": "on",
    }
    page = client.post("/machines/new/", form).content.decode()
    assert "Hypervisor hv1 has no room for this machine (1024 MiB memory free, needs 2048)." in page
    r = client.post("/machines/new/", {**form, "override_capacity": "on"})
    assert r.status_code == 302, r.content.decode()[:3000]
    assert Machine.objects.get(name="m1").events.filter(message__startswith="created over capacity on hv1").exists()


def test_every_allocating_path_locks_in_one_order(lab):
    """Project, then the user's quota, then the machine (grow, rebuild), then the hypervisor (create, grow):
    one order, so two requests never hold what the other waits for. (SQLite ignores the locks; PostgreSQL takes them.)"""
    from django.db.models.query import QuerySet

    from machines import services
    from machines.models import Membership

    user = UserFactory(username="plain")
    project = ProjectFactory(name="lab-team")
    Membership.objects.create(project=project, user=user, role="admin")
    locked: list[str] = []
    real = QuerySet.select_for_update

    def spy(self, *args, **kwargs):
        locked.append(self.model.__name__)
        return real(self, *args, **kwargs)

    def order(names: list[str]) -> list[str]:  # the first time each row kind is locked
        return [n for i, n in enumerate(names) if n not in names[:i]]

    with mock.patch.object(QuerySet, "select_for_update", spy):
        machine = network_machine(user, lab, "m1", project=project)
        assert order(locked) == ["Project", "Quota", "Hypervisor"]
        locked.clear()
        services.machine_grow_disk(machine=_active(machine), disk_gib=2, actor=machine.owner)
        assert order(locked) == ["Project", "Quota", "Machine", "Hypervisor"]  # the pool's room, last
        locked.clear()
        Machine.objects.filter(pk=machine.pk).update(status="active")
        machine = network_machine(user, None, "m2", project=project)  # placed: every candidate, in id order
        assert order(locked) == ["Project", "Quota", "Hypervisor"]
