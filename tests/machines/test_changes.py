"""Changing a machine after create (machines.services.changes) on the fake hypervisor: live within the maxima,
pending beyond them until a cold start, quota and room, rename, labels, protection and autostart, roles."""

from dataclasses import replace

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from hypervisors.drivers.base import DomainSize, PowerState
from machines import services
from machines.models import Machine, Membership, Project, Quota, Role
from machines.services import MachineError, observation
from portal.models import AuditEvent
from tests.factories import UserFactory
from tests.fakes import FakeDriver
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


# --- PATCH /api/v1/machines/{id}/ and ?tag= ----------------------------------------------------------------


@pytest.fixture
def api(owner):  # noqa: F811
    from django.test import Client

    client = Client()
    client.force_login(owner)
    return client


def patch(client, machine, body, capture):
    with capture(execute=True):
        return client.patch(f"/api/v1/machines/{machine.pk}/", body, content_type="application/json")


def test_patch_changes_and_answers_the_machine(made, api, django_capture_on_commit_callbacks):
    machine = made(vcpus=1, max_vcpus=2)
    r = patch(api, machine, {"vcpus": 2, "tags": ["web"], "description": "front"}, django_capture_on_commit_callbacks)
    assert r.status_code == 200, r.content
    assert (r.json()["tags"], r.json()["description"], r.json()["max_vcpus"]) == (["web"], "front", 2)
    machine.refresh_from_db()
    assert (machine.vcpus, machine.pending) == (2, {})


@pytest.mark.parametrize(
    "body, field",
    [
        ({"disk_gib": 5}, "disk_gib"),
        ({"status": "active"}, "status"),
        ({"vcpus": "many"}, "vcpus"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"memory_mib": 1 << 40}, "memory_mib"),
        ({"name": "Not A Host"}, "name"),
        ({"tags": "web"}, "tags"),
        ({"tags": ["a b"]}, "tags"),
        ({"autostart": "perhaps"}, "autostart"),
    ],
)
def test_patch_refuses_bad_input_with_400(made, api, body, field, django_capture_on_commit_callbacks):
    machine = made()
    r = patch(api, machine, body, django_capture_on_commit_callbacks)
    assert r.status_code == 400 and field in r.json(), r.content


def test_patch_answers_409_when_busy_or_running_for_a_rename_and_404_for_others(
    made, api, django_capture_on_commit_callbacks
):
    machine = made()
    r = patch(api, machine, {"name": "db1"}, django_capture_on_commit_callbacks)
    assert r.status_code == 409 and "shut off" in r.json()["detail"]
    Machine.objects.filter(pk=machine.pk).update(operation="reboot")
    assert patch(api, machine, {"vcpus": 2}, django_capture_on_commit_callbacks).status_code == 409
    other = UserFactory(username="mallory")
    api.force_login(other)
    assert patch(api, machine, {"tags": ["x"]}, django_capture_on_commit_callbacks).status_code == 404
    for body in ([1, 2], "text"):
        api.force_login(machine.owner)
        r = patch(api, machine, body, django_capture_on_commit_callbacks)
        assert r.status_code == 400


def test_patch_by_an_operator_labels_but_does_not_resize(made, api, django_capture_on_commit_callbacks):
    project = Project.objects.create(name="team")
    machine = made()
    Machine.objects.filter(pk=machine.pk).update(project=project)
    operator = UserFactory(username="op")
    Membership.objects.create(project=project, user=operator, role=Role.OPERATOR)
    api.force_login(operator)
    assert patch(api, machine, {"tags": ["ops"]}, django_capture_on_commit_callbacks).status_code == 200
    assert patch(api, machine, {"memory_mib": 512}, django_capture_on_commit_callbacks).status_code == 403


def test_the_list_filters_by_tag(made, api, django_capture_on_commit_callbacks):
    web, db = made(tags=["web", "prod"]), made(name="db1", tags=["db"])
    made(name="web10", tags=["web1"])  # a tag that starts like another is another tag
    ids = [m["id"] for m in api.get("/api/v1/machines/?tag=web").json()["results"]]
    assert ids == [web.pk]
    assert [m["id"] for m in api.get("/api/v1/machines/?tag=db").json()["results"]] == [db.pk]
    assert api.get("/api/v1/machines/?tag=%22%20or").json()["results"] == []
    page = api.get("/machines/?tag=prod")
    assert page.status_code == 200 and b"db1" not in page.content and b"web1" in page.content


# --- the Edit page ---------------------------------------------------------------------------------------


def test_the_edit_page_shows_the_machine_and_saves_only_what_changed(made, api, django_capture_on_commit_callbacks):
    machine = made(vcpus=1, max_vcpus=2)
    page = api.get(f"/machines/{machine.pk}/edit/")
    assert page.status_code == 200 and b'name="tags"' in page.content and b"Up to 2 while it runs" in page.content
    assert b'id="btn-edit"' in api.get(f"/machines/{machine.pk}/").content
    form = {"name": machine.name, "vcpus": 2, "memory_mib": machine.memory_mib, "tags": "web, prod", "autostart": "on"}
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/machines/{machine.pk}/edit/", form)
    assert r.status_code == 302
    machine.refresh_from_db()
    assert (machine.vcpus, machine.tags, machine.autostart) == (2, ["web", "prod"], True)
    detail = api.get(f"/machines/{machine.pk}/").content
    assert b"?tag=web" in detail


def test_the_edit_page_shows_refusals_and_pending_changes(made, api, django_capture_on_commit_callbacks):
    machine = made()
    base = {"name": machine.name, "vcpus": 1, "memory_mib": machine.memory_mib, "autostart": "on"}
    for bad, text in (({"tags": "a b!"}, b"Not a tag"), ({"name": "db1"}, b"only while it is shut off")):
        r = api.post(f"/machines/{machine.pk}/edit/", {**base, **bad})
        assert r.status_code == 200 and text in r.content
    with django_capture_on_commit_callbacks(execute=True):
        api.post(f"/machines/{machine.pk}/edit/", {**base, "memory_mib": 512})
    assert b"Applies at next cold start: 512 MiB memory" in api.get(f"/machines/{machine.pk}/").content
    assert b"Applies at next cold start" in api.get(f"/machines/{machine.pk}/edit/").content


def test_the_edit_page_is_for_those_who_see_the_machine(made, client):
    machine = made()
    assert client.get(f"/machines/{machine.pk}/edit/").status_code == 302  # to the login
    client.force_login(UserFactory(username="mallory"))
    assert client.get(f"/machines/{machine.pk}/edit/").status_code == 404
    assert client.put(f"/machines/{machine.pk}/edit/").status_code in (404, 405)


def test_the_create_form_takes_maxima_description_and_tags(user_client):
    page = user_client.get("/machines/new/").content
    assert b'name="max_vcpus"' in page and b'name="max_memory_mib"' in page and b'name="tags"' in page


def test_the_admin_changes_through_the_service(made, host, client, django_capture_on_commit_callbacks):
    staff = UserFactory(username="root", is_staff=True, is_superuser=True)
    client.force_login(staff)
    machine = made(vcpus=1, max_vcpus=2)
    assert client.get(f"/admin/machines/machine/{machine.pk}/change/").status_code == 200
    form = {
        "name": machine.name,
        "vcpus": 2,
        "memory_mib": machine.memory_mib,
        "description": "from the admin",
        "tags": '["admin"]',
        "max_vcpus": 4,
        "max_memory_mib": "",
        "autostart": "on",
        **{
            f"{inline}-{n}": "0" for inline in ("nics", "events", "snapshots") for n in ("TOTAL_FORMS", "INITIAL_FORMS")
        },
    }
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/admin/machines/machine/{machine.pk}/change/", form)
    assert r.status_code == 302, r.content.decode()[:2000]
    machine.refresh_from_db()
    assert (machine.vcpus, machine.description, machine.tags) == (2, "from the admin", ["admin"])
    assert host.get_driver("fake:///").domain_size(str(machine.uuid)).live_vcpus == 2
    assert (machine.max_vcpus, machine.pending) == (4, {"max_vcpus": 4})  # running: at its next cold start
    assert AuditEvent.objects.filter(action="machine.change", user=staff).exists()
    r = client.post(f"/admin/machines/machine/{machine.pk}/change/", {**form, "vcpus": 99}, follow=True)
    assert r.status_code == 200  # refused by the form or the service: said on the page, never a 500
    machine.refresh_from_db()
    assert machine.vcpus == 2


def test_a_network_boot_machine_started_through_its_bmc_boots_what_was_pending(
    django_capture_on_commit_callbacks,
    host,
    owner,  # noqa: F811
    hv,  # noqa: F811
):
    kw = base_kwargs(owner, hv, None, deploy_type="network", ssh_authorized_keys="", power_on=True)
    machine = create(django_capture_on_commit_callbacks, **kw)
    assert machine.has_bmc and machine.power_state == PowerState.RUNNING
    machine = change(django_capture_on_commit_callbacks, machine, memory_mib=512)
    assert machine.pending == {"memory_mib": 512}
    for action in ("poweroff", "start"):
        with django_capture_on_commit_callbacks(execute=True):
            services.machine_power(machine=Machine.objects.get(pk=machine.pk), action=action, actor=owner)
    machine.refresh_from_db()
    assert machine.power_state == PowerState.RUNNING and machine.pending == {}
    assert host.get_driver("fake:///").domain_size(str(machine.uuid)).live_memory_mib == 512


def test_a_rebuild_boots_what_was_pending(made, host, django_capture_on_commit_callbacks):
    """The rebuild defines the domain again and starts it cold: the pending change runs, and the page stops
    saying it waits."""
    machine = made(vcpus=1, memory_mib=256)
    machine = change(django_capture_on_commit_callbacks, machine, memory_mib=512)
    assert machine.pending == {"memory_mib": 512}
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_rebuild(machine=machine, actor=machine.owner, snapshot=False)
    machine.refresh_from_db()
    assert machine.status == "active" and machine.power_state == PowerState.RUNNING, machine.status_message
    assert machine.pending == {}
    assert host.get_driver("fake:///").domain_size(str(machine.uuid)).live_memory_mib == 512
    assert machine.events.filter(message__startswith="applied at this cold start: memory_mib 512").exists()


def test_a_start_from_outside_the_portal_clears_what_it_runs(
    made, host, monkeypatch, django_capture_on_commit_callbacks
):
    """virsh, a BMC or the host's autostart starts the domain: the reconcile sees a run it had not seen, reads the
    size of that domain only (not of machines with nothing pending, nor again for a run it saw) and clears what
    runs, with an event."""
    other = made(name="other", vcpus=1)  # nothing pending: its size is never read
    machine = made(vcpus=2, memory_mib=256)
    machine = change(django_capture_on_commit_callbacks, machine, vcpus=1, memory_mib=512)
    assert machine.pending == {"vcpus": 1, "memory_mib": 512}
    read = []
    real = FakeDriver.domain_size
    monkeypatch.setattr(FakeDriver, "domain_size", lambda self, uuid: read.append(uuid) or real(self, uuid))
    uuid = str(machine.uuid)
    monkeypatch.setattr(observation, "PENDING_CHECKS_PER_RUN", 2)
    services.hypervisor_reconcile_run(machine.hypervisor_id)  # first sight of the run the change was made in
    assert Machine.objects.get(pk=machine.pk).pending == {"vcpus": 1, "memory_mib": 512} and read == [uuid]
    for _ in range(2):  # read once more in that run (a balloon takes its time), then no more
        services.hypervisor_reconcile_run(machine.hypervisor_id)
    assert read == [uuid, uuid] and Machine.objects.get(pk=machine.pk).pending == {"vcpus": 1, "memory_mib": 512}
    driver = host.get_driver("fake:///")
    driver.power_off(uuid)
    driver.start(uuid)  # outside the portal: a new run, booted from the config
    services.hypervisor_reconcile_run(machine.hypervisor_id)
    machine.refresh_from_db()
    assert machine.pending == {} and read == [uuid, uuid, uuid] and str(other.uuid) not in read
    event = machine.events.last()
    assert event.step == "change" and event.message == (
        "running since a start outside the portal: vcpus 1, memory_mib 512"
    )


def test_what_a_run_does_not_show_stays_pending():
    """pending_left: vCPUs by the live count, memory by the live balloon and maximum equal to the config's."""
    from machines.services.changes import pending_left

    size = DomainSize(
        True, 1, 2, 512, 512, live_vcpus=1, live_max_vcpus=2, live_memory_mib=256, live_max_memory_mib=256
    )
    assert pending_left({"vcpus": 1, "memory_mib": 512}, size) == {"memory_mib": 512}
    assert pending_left({"memory_mib": 512}, replace(size, live_memory_mib=512, live_max_memory_mib=512)) == {}
    smaller = DomainSize(
        True, 1, 1, 192, 256, live_vcpus=1, live_max_vcpus=1, live_memory_mib=192, live_max_memory_mib=256
    )
    assert pending_left({"memory_mib": 192}, smaller) == {}  # the balloon a cold start set
    assert pending_left({"memory_mib": 192}, replace(smaller, live_memory_mib=256)) == {"memory_mib": 192}
    assert pending_left({"vcpus": 1}, replace(size, running=False)) == {"vcpus": 1}


# --- the maxima after create -----------------------------------------------------------------------------


def test_the_maxima_change_at_once_while_off_and_at_the_next_cold_start_while_running(
    made, host, django_capture_on_commit_callbacks
):
    machine = made(vcpus=1, memory_mib=256)
    uuid, driver = str(machine.uuid), host.get_driver("fake:///")
    host.domains[uuid]["state"] = PowerState.OFF
    Machine.objects.filter(pk=machine.pk).update(power_state="off")
    machine = change(django_capture_on_commit_callbacks, machine, max_vcpus=4, max_memory_mib=1024)
    size = driver.domain_size(uuid)
    assert (size.vcpus, size.max_vcpus, size.memory_mib, size.max_memory_mib) == (1, 4, 256, 1024)
    assert (machine.max_vcpus, machine.max_memory_mib, machine.pending, machine.operation) == (4, 1024, {}, "")
    record = AuditEvent.objects.filter(action="machine.change").get()
    assert "max_vcpus None -> 4" in record.detail and "max_memory_mib None -> 1024" in record.detail
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=machine, action="start", actor=machine.owner)
    # Running: a lower maximum is in the config at once and in the guest at its next cold start.
    machine = change(django_capture_on_commit_callbacks, Machine.objects.get(pk=machine.pk), max_vcpus=2)
    assert machine.pending == {"max_vcpus": 2} and machine.max_vcpus == 2
    size = driver.domain_size(uuid)
    assert (size.max_vcpus, size.live_max_vcpus) == (2, 4)
    driver.power_off(uuid)
    driver.start(uuid)  # outside the portal: the reconcile sees it
    services.hypervisor_reconcile_run(machine.hypervisor_id)
    machine.refresh_from_db()
    assert machine.pending == {} and driver.domain_size(uuid).live_max_vcpus == 2
    # None: no more than the value.
    machine = change(django_capture_on_commit_callbacks, machine, max_vcpus=None)
    assert machine.max_vcpus is None and machine.pending == {"max_vcpus": 1}


def test_maxima_are_checked_and_not_charged(made, owner, hv, django_capture_on_commit_callbacks):  # noqa: F811
    machine = made(vcpus=2, memory_mib=256)
    Quota.objects.update_or_create(user=owner, defaults={"vcpus": 2, "memory_mib": 256})
    # At their quota, the maxima still grow: they are not charged (quota counts the values).
    machine = change(django_capture_on_commit_callbacks, machine, max_vcpus=8, max_memory_mib=2048)
    assert (machine.max_vcpus, machine.max_memory_mib) == (8, 2048)
    for fields, key, text in (
        ({"max_vcpus": 1}, "max_vcpus", "At least the 2 vCPUs"),
        ({"max_memory_mib": 200}, "max_memory_mib", "At least the 256 MiB"),
        ({"vcpus": 1, "max_vcpus": 0}, "max_vcpus", "A whole number from 1 to 64"),
        ({"max_memory_mib": "lots"}, "max_memory_mib", "A whole number"),
        ({"max_vcpus": True}, "max_vcpus", "A whole number"),
        ({"max_vcpus": 64}, "max_vcpus", f"Hypervisor {hv.name} gives at most"),
        ({"max_memory_mib": hv.memory_mib + 1}, "max_memory_mib", f"has {hv.memory_mib} MiB"),
    ):
        with pytest.raises(ValidationError) as e:
            change(django_capture_on_commit_callbacks, machine, **fields)
        assert text in " ".join(e.value.message_dict[key]), (fields, e.value.message_dict)
    Machine.objects.filter(pk=machine.pk).update(cpu_topology={"sockets": 1, "cores": 2, "threads": 1})
    with pytest.raises(ValidationError, match="CPU topology"):
        change(django_capture_on_commit_callbacks, Machine.objects.get(pk=machine.pk), max_vcpus=4)
    machine.refresh_from_db()
    assert (machine.max_vcpus, machine.max_memory_mib, machine.operation) == (8, 2048, "")
    assert AuditEvent.objects.filter(action="machine.change", outcome="refused").count() == 8


def test_patch_and_the_edit_page_change_the_maxima(made, api, django_capture_on_commit_callbacks):
    machine = made(vcpus=1, memory_mib=256)
    r = patch(api, machine, {"max_vcpus": 2, "max_memory_mib": 512}, django_capture_on_commit_callbacks)
    assert r.status_code == 200 and (r.json()["max_vcpus"], r.json()["max_memory_mib"]) == (2, 512), r.content
    machine.refresh_from_db()  # after the worker's run
    assert machine.pending == {"max_vcpus": 2, "max_memory_mib": 512}  # it runs: at its next cold start
    assert b"at most 2 vCPUs without a restart" in api.get(f"/machines/{machine.pk}/").content
    for body in ({"max_vcpus": 0}, {"max_vcpus": "x"}, {"max_memory_mib": 1 << 40}, {"max_vcpus": 1, "vcpus": 2}):
        r = patch(api, machine, body, django_capture_on_commit_callbacks)
        assert r.status_code == 400 and ("max_vcpus" in r.json() or "max_memory_mib" in r.json()), r.content
    assert patch(api, machine, {"max_vcpus": None}, django_capture_on_commit_callbacks).json()["max_vcpus"] is None
    page = api.get(f"/machines/{machine.pk}/edit/")
    assert b'name="max_vcpus"' in page.content and b'name="max_memory_mib"' in page.content
    form = {"name": machine.name, "vcpus": 1, "memory_mib": 256, "max_vcpus": 3, "max_memory_mib": 512}
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/machines/{machine.pk}/edit/", {**form, "max_vcpus": 0})
    assert r.status_code == 200 and b"max_vcpus" in r.content  # the form again, with the error
    with django_capture_on_commit_callbacks(execute=True):
        assert api.post(f"/machines/{machine.pk}/edit/", form).status_code == 302
    machine.refresh_from_db()
    assert (machine.max_vcpus, machine.max_memory_mib) == (3, 512)
