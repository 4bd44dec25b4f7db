"""The sweeper (machines/services/sweeper.py) on the in-memory host: what the portal made that no machine row owns
is found after a row goes behind the portal's back, never for a machine in a move or within the grace period,
never someone else's or an image copy; staff see it on the hypervisor page and remove it, and the removal looks
again at run time."""

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from hypervisors.drivers.base import DomainSpec, HypervisorUnavailable, PowerState
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, MachineFactory, UserFactory, tenant_network_entry, tenant_nic
from tests.fakes import FakeHost

pytestmark = pytest.mark.django_db

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}


@pytest.fixture
def lab(host):
    return HypervisorFactory(
        name="lab", uri="qemu:///system", arch="x86_64", networks=[tenant_network_entry()], pools=[POOL]
    )


@pytest.fixture
def boss(db):
    return UserFactory(username="boss", is_staff=True)


def made(capture, lab, name="metal") -> Machine:
    """A network-boot machine made for real on the fake host: a domain, a disk and an extra disk."""
    with capture(execute=True):
        machine = services.machine_create(
            owner=UserFactory(username=f"o-{name}"),
            hypervisor=lab,
            name=name,
            deploy_type="network",
            extra_disks=[{"size_gib": 2}],
            nics=[tenant_nic()],
        )
    return Machine.objects.get(pk=machine.pk)


def sweep(lab, *, times=2) -> list[dict]:
    for _ in range(times):
        found = services.hypervisor_sweep_run(lab.pk)
    assert found is not None
    return found


def by_key(found: list[dict]) -> dict[str, dict]:
    return {o["key"]: o for o in found}


def test_a_row_removed_behind_the_portals_back_leaves_its_domain_and_volumes_reported(
    django_capture_on_commit_callbacks, host, lab, settings
):
    settings.PORTAL_ORPHAN_GRACE = 0
    machine = made(django_capture_on_commit_callbacks, lab)
    uuid = str(machine.uuid)
    host.pools["default"][machine.serial_volume] = {"format": "raw", "capacity": 5, "backing": "", "data": b"login"}
    assert sweep(lab) == []  # owned: nothing to report
    Machine.objects.filter(pk=machine.pk).delete()  # as a delete whose worker died between its steps would

    found = by_key(sweep(lab))

    assert set(found) == {
        f"domain:{uuid}",
        f"volume:default/{machine.disk_volume}",
        f"volume:default/{machine.extra_disk_volume(0)}",
        f"volume:default/{machine.serial_volume}",
    }
    domain = found[f"domain:{uuid}"]
    assert (domain["kind"], domain["name"], domain["uuid"], domain["pool"]) == ("domain", machine.domain_name, uuid, "")
    log = found[f"volume:default/{machine.serial_volume}"]
    assert (log["kind"], log["uuid"], log["size_bytes"], log["sweeps"], log["reported"]) == ("volume", uuid, 5, 2, True)
    assert Hypervisor.objects.get(pk=lab.pk).orphans_swept is not None


def test_nothing_is_reported_within_the_grace_period_or_before_a_second_sweep(
    django_capture_on_commit_callbacks, host, lab, settings
):
    settings.PORTAL_ORPHAN_GRACE = 600
    machine = made(django_capture_on_commit_callbacks, lab)
    Machine.objects.filter(pk=machine.pk).delete()

    first = sweep(lab, times=1)
    assert first and not any(o["reported"] for o in first)  # seen once: a create could still be in flight
    assert not any(o["reported"] for o in sweep(lab, times=1))  # seen twice, but first seen moments ago
    lab.refresh_from_db()
    assert lab.orphans_reported == [] and lab.orphans_pending == len(first)

    # Ten minutes later (first seen then), the next sweep reports them, keeping when they were first seen.
    earlier = (timezone.now() - timedelta(seconds=601)).isoformat()
    Hypervisor.objects.filter(pk=lab.pk).update(orphans=[{**o, "first_seen": earlier} for o in lab.orphans])
    again = sweep(lab, times=1)
    assert all(o["reported"] and o["first_seen"] == earlier and o["sweeps"] == 3 for o in again)

    # Once an item is gone from the host, it is gone from the report.
    host.domains.clear()
    host.pools["default"].clear()
    assert sweep(lab, times=1) == []


def test_a_machine_in_a_move_is_not_an_orphan_on_either_side(
    django_capture_on_commit_callbacks, host, lab, settings, monkeypatch
):
    settings.PORTAL_ORPHAN_GRACE = 0
    other = FakeHost()
    lab2 = HypervisorFactory(name="lab2", uri="qemu+tcp://lab2/system", arch="x86_64", pools=[POOL])
    machine = made(django_capture_on_commit_callbacks, lab)
    # Mid-move: the target already has its disks and its domain, the source still has them all.
    Machine.objects.filter(pk=machine.pk).update(moving_to=lab2)
    for name in machine.volumes[:2]:
        other.pools["default"][name] = dict(host.pools["default"][name])
    other.domains[str(machine.uuid)] = dict(host.domains[str(machine.uuid)])

    def get_driver(uri, driver="libvirt"):
        return (other if uri == lab2.uri else host).get_driver(uri)

    monkeypatch.setattr("machines.services.sweeper.get_driver", get_driver)
    assert sweep(lab) == [] and sweep(lab2) == []
    # After the switch (the row names the target) the source's copy still has an owner until its cleanup.
    Machine.objects.filter(pk=machine.pk).update(hypervisor=lab2)
    assert sweep(lab) == [] and sweep(lab2) == []


def test_other_domains_other_volumes_and_image_copies_are_never_reported(host, lab, settings):
    settings.PORTAL_ORPHAN_GRACE = 0
    pool = host.pools["default"]
    for name in ("portal-image-0123456789abcdef.qcow2", "debian.qcow2", "m-not-a-uuid-disk.qcow2"):
        pool[name] = {"format": "qcow2", "capacity": 1, "backing": "", "data": b""}
    driver = host.get_driver(lab.uri)
    # A domain with the portal's metadata under a name the portal does not give (`<host name>-<uuid8>`).
    driver.define_domain(
        DomainSpec(
            uuid="1c9d2d97-7045-4e4c-8e6a-1d4d2c6e3021",
            name="hand-made",
            domain_type="qemu",
            vcpus=1,
            memory_mib=64,
            metadata={"id": 1},
        )
    )
    # One the last sync found without the portal's metadata (the fake's XML always has it): not even looked at.
    uuid = "0b8c1c86-6f34-4d3b-9d59-0c3c1b5d2f10"
    driver.define_domain(DomainSpec(uuid=uuid, name="web-0b8c1c86", domain_type="qemu", vcpus=1, memory_mib=64))
    Hypervisor.objects.filter(pk=lab.pk).update(unmanaged_domains=[{"uuid": uuid, "name": "web-0b8c1c86"}])
    lab.refresh_from_db()
    host.calls.clear()

    assert sweep(lab) == []
    assert host.calls.count("domains_observed") == 2 and host.calls.count("volume_names") == 2


def test_an_unreachable_host_keeps_what_was_recorded(django_capture_on_commit_callbacks, host, lab, settings):
    settings.PORTAL_ORPHAN_GRACE = 0
    machine = made(django_capture_on_commit_callbacks, lab)
    Machine.objects.filter(pk=machine.pk).delete()
    before = sweep(lab)
    host.fail["domains_observed"] = HypervisorUnavailable("no route to host")

    assert services.hypervisor_sweep_run(lab.pk) is None
    assert Hypervisor.objects.get(pk=lab.pk).orphans == before


def test_a_pool_gone_since_the_last_sync_does_not_hide_the_others(
    django_capture_on_commit_callbacks, host, lab, settings
):
    settings.PORTAL_ORPHAN_GRACE = 0
    machine = made(django_capture_on_commit_callbacks, lab)
    Machine.objects.filter(pk=machine.pk).delete()
    Hypervisor.objects.filter(pk=lab.pk).update(pools=[{**POOL, "name": "a-stopped-pool"}, POOL])

    found = by_key(sweep(lab))

    assert f"volume:default/{machine.disk_volume}" in found and f"domain:{machine.uuid}" in found


def test_the_periodic_sweep_visits_every_enabled_online_hypervisor(django_capture_on_commit_callbacks, host, lab):
    down = HypervisorFactory(name="down", status="down")
    off = HypervisorFactory(name="off", enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        ids = services.hypervisors_sweep()
    assert lab.pk in ids and down.pk not in ids and off.pk not in ids
    assert Hypervisor.objects.get(pk=lab.pk).orphans_swept is not None  # the queued sweep ran (immediate Huey)


def orphaned(capture, host, lab, settings) -> Machine:
    settings.PORTAL_ORPHAN_GRACE = 0
    machine = made(capture, lab)
    Machine.objects.filter(pk=machine.pk).delete()
    sweep(lab)
    return machine


def test_staff_see_them_on_the_page_and_others_do_not(django_capture_on_commit_callbacks, host, lab, settings, boss):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    page = Client()
    page.force_login(boss)
    r = page.get(reverse("hypervisors:detail", args=[lab.pk]))
    html = r.content.decode()
    assert 'id="hv-orphans"' in html and "Remove all" in html
    assert machine.domain_name in html and machine.disk_volume in html and str(machine.uuid) in html
    assert html.count('class="orphan"') == 3  # the domain and two disks (no seed or log on a network machine)

    page.force_login(UserFactory(username="plain"))
    html = page.get(reverse("hypervisors:detail", args=[lab.pk])).content.decode()
    assert 'id="hv-orphans"' not in html and machine.disk_volume not in html


def test_remove_all_from_the_page_removes_them_and_audits_each(
    django_capture_on_commit_callbacks, host, lab, settings, boss
):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    page = Client()
    page.force_login(boss)
    with django_capture_on_commit_callbacks(execute=True):
        r = page.post(reverse("machines:hypervisor-orphans-remove", args=[lab.pk]), {"all": "1"}, follow=True)

    assert "Removing 3 items" in r.content.decode()
    assert str(machine.uuid) not in host.domains
    assert not [n for n in host.pools["default"] if str(machine.uuid) in n]
    assert Hypervisor.objects.get(pk=lab.pk).orphans == []
    removed = AuditEvent.objects.filter(action="hypervisor.orphan_remove", outcome="success", user_id=boss.pk)
    assert removed.count() == 3 and all(e.detail.endswith(": removed") for e in removed)
    assert AuditEvent.objects.filter(action="hypervisor.orphans_remove", outcome="success").count() == 1


def test_remove_one_leaves_the_others(django_capture_on_commit_callbacks, host, lab, settings, boss):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    key = f"volume:default/{machine.extra_disk_volume(0)}"
    with django_capture_on_commit_callbacks(execute=True):
        assert services.hypervisor_orphans_remove(hypervisor=lab, actor=boss, keys=[key]) == [key]
    assert machine.extra_disk_volume(0) not in host.pools["default"]
    assert machine.disk_volume in host.pools["default"] and str(machine.uuid) in host.domains
    assert key not in by_key(Hypervisor.objects.get(pk=lab.pk).orphans)


def test_the_removal_looks_again_and_leaves_what_a_row_owns_or_what_is_no_longer_the_portals(
    django_capture_on_commit_callbacks, host, lab, settings, boss
):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    uuid = str(machine.uuid)
    keys = [o["key"] for o in Hypervisor.objects.get(pk=lab.pk).orphans]
    # Between the sweep and the worker: a row with that UUID appears (say, restored from a backup).
    owner = MachineFactory(uuid=machine.uuid, hypervisor=lab, name="restored")

    outcomes = services.hypervisor_orphans_remove_run(lab.pk, keys, boss.pk)

    assert set(outcomes.values()) == {"left: a machine owns it"}
    assert uuid in host.domains and machine.disk_volume in host.pools["default"]
    assert AuditEvent.objects.filter(action="hypervisor.orphan_remove", outcome="refused").count() == 3

    # The row goes again, and the domain is replaced by someone else's under the same UUID (not named by the
    # portal; a domain without the portal's metadata is refused the same way: test_domxml).
    owner.delete()
    sweep(lab)
    host.domains[uuid]["spec"] = DomainSpec(uuid=uuid, name="intruder", domain_type="qemu", vcpus=1, memory_mib=64)
    outcomes = services.hypervisor_orphans_remove_run(lab.pk, [f"domain:{uuid}"], boss.pk)
    assert outcomes == {f"domain:{uuid}": "left: the domain no longer carries the portal's marks"}
    assert host.domains[uuid]["state"] == PowerState.OFF  # untouched


def test_only_staff_may_remove_and_only_what_is_reported(django_capture_on_commit_callbacks, host, lab, settings, boss):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        services.hypervisor_orphans_remove(hypervisor=lab, actor=UserFactory(username="plain"), keys=None)
    with pytest.raises(services.MachineError, match="Not reported"):
        services.hypervisor_orphans_remove(hypervisor=lab, actor=boss, keys=["volume:default/m-elsewhere.qcow2"])
    Hypervisor.objects.filter(pk=lab.pk).update(orphans=[])
    with pytest.raises(services.MachineError, match="Nothing left"):
        services.hypervisor_orphans_remove(hypervisor=lab, actor=boss)
    assert str(machine.uuid) in host.domains


def test_the_api_shows_them_to_staff_and_removes_them(django_capture_on_commit_callbacks, host, lab, settings, boss):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    api = APIClient()
    api.force_authenticate(UserFactory(username="plain"))
    assert api.get(f"/api/v1/hypervisors/{lab.pk}/").json()["orphans"] == []
    api.force_authenticate(boss)
    keys = [o["key"] for o in api.get(f"/api/v1/hypervisors/{lab.pk}/").json()["orphans"]]
    assert f"domain:{machine.uuid}" in keys

    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/api/v1/hypervisors/{lab.pk}/orphans/remove/", {"keys": keys[:1]}, format="json")
    assert r.status_code == 202 and r.json() == {"queued": keys[:1]}
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/api/v1/hypervisors/{lab.pk}/orphans/remove/", {}, format="json")
    assert r.status_code == 202 and sorted(r.json()["queued"]) == sorted(keys[1:])
    assert str(machine.uuid) not in host.domains and not [n for n in host.pools["default"] if str(machine.uuid) in n]
    r = api.post(f"/api/v1/hypervisors/{lab.pk}/orphans/remove/", {}, format="json")
    assert r.status_code == 409


def test_the_admin_shows_what_the_sweep_saw(django_capture_on_commit_callbacks, host, lab, settings, boss):
    machine = orphaned(django_capture_on_commit_callbacks, host, lab, settings)
    boss.is_superuser = True
    boss.save()
    page = Client()
    page.force_login(boss)
    r = page.get(reverse("admin:hypervisors_hypervisor_change", args=[lab.pk]))
    assert r.status_code == 200
    assert "Left behind by the portal" in r.content.decode() and machine.disk_volume in r.content.decode()
