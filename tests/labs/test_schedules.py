"""Scheduled actions (labs/schedules.py) with frozen time: `now` is passed to schedules_run, the FakeDriver takes
the power and snapshot calls through the machine services. The right minute and weekday, never twice, a missed
minute once (and not at all past the catch-up), a lab's machines, retention, who may, and the pages and the API
answering bad input with 400, never 500."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client

from hypervisors.drivers.base import PowerState
from labs import schedules
from labs.models import Lab, LabMachine, ScheduledAction
from machines.models import Machine, MachineSnapshot, Membership, Project, Role
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import UserFactory
from tests.machines.test_services import base_kwargs, create, hv, image, owner  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db
TZ = ZoneInfo("Europe/Berlin")


@pytest.fixture(autouse=True)
def berlin(settings):
    settings.TIME_ZONE = "Europe/Berlin"  # set times are the portal's wall clock, not UTC


@pytest.fixture
def machine(django_capture_on_commit_callbacks, host, owner, hv, image):  # noqa: F811
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    assert m.status == Status.ACTIVE
    return m


def at(*args) -> datetime:
    return datetime(*args, tzinfo=TZ)


def make(machine, owner, created, **kw) -> ScheduledAction:  # noqa: F811
    s = schedules.schedule_create(actor=owner, machine=machine, **{"action": "power_on", "hour": 8, "minute": 30, **kw})
    ScheduledAction.objects.filter(pk=s.pk).update(created=created)
    s.refresh_from_db()
    return s


def run(capture, now) -> int:
    with capture(execute=True):
        return schedules.schedules_run(now)


def stop(machine, host):
    Machine.objects.filter(pk=machine.pk).update(power_state=PowerState.OFF)
    host.domains[str(machine.uuid)]["state"] = PowerState.OFF


def test_power_on_at_the_set_minute_on_the_set_weekday_and_not_twice(
    django_capture_on_commit_callbacks,
    host,
    machine,
    owner,  # noqa: F811
):
    # 2026-12-07 is a Monday (0); the schedule runs on Mondays and Wednesdays at 08:30 Berlin time.
    s = make(machine, owner, at(2026, 12, 6, 12, 0), weekdays=[2, 0])
    assert s.weekdays == [0, 2]
    stop(machine, host)
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 29, 59)) == 0
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 30, 1)) == 1
    assert host.domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 30, 30)) == 0  # a second check that minute
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 31, 0)) == 0
    stop(machine, host)
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 8, 8, 30, 5)) == 0  # Tuesday
    assert host.domains[str(machine.uuid)]["state"] == PowerState.OFF
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 9, 8, 30, 5)) == 1  # Wednesday
    s.refresh_from_db()
    assert "start queued" in s.last_result
    events = machine.events.filter(step="schedule")
    assert events.count() == 2 and "Power on at 08:30" in events.first().message
    audited = AuditEvent.objects.filter(action="machine.power", username__startswith=f"schedule {s.pk} ")
    assert audited.count() == 2
    assert AuditEvent.objects.filter(action="schedule.run", object_id=str(s.pk)).count() == 2


def test_the_time_is_the_portals_time_zone(django_capture_on_commit_callbacks, host, machine, owner):  # noqa: F811
    make(machine, owner, at(2026, 12, 6, 12, 0))
    stop(machine, host)
    utc_0830 = datetime(2026, 12, 7, 8, 30, 10, tzinfo=ZoneInfo("UTC"))  # 09:30 in Berlin: ran at 07:30 UTC
    assert run(django_capture_on_commit_callbacks, datetime(2026, 12, 7, 7, 29, tzinfo=ZoneInfo("UTC"))) == 0
    assert run(django_capture_on_commit_callbacks, datetime(2026, 12, 7, 7, 30, 5, tzinfo=ZoneInfo("UTC"))) == 1
    assert run(django_capture_on_commit_callbacks, utc_0830) == 0


def test_a_missed_minute_runs_once_when_the_worker_is_back_and_not_past_the_catch_up(
    django_capture_on_commit_callbacks,
    settings,
    host,
    machine,
    owner,  # noqa: F811
):
    s = make(machine, owner, at(2026, 12, 6, 12, 0))
    stop(machine, host)
    # The worker was down from 08:20 to 08:50: its first check runs the 08:30 once, the next ones nothing.
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 50, 3)) == 1
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 51, 0)) == 0
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 52, 0)) == 0
    assert host.domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    # Away all day: the next morning's 08:30 is skipped at 20:00 (past PORTAL_SCHEDULE_CATCH_UP_MINUTES), once.
    stop(machine, host)
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 8, 20, 0)) == 0
    s.refresh_from_db()
    assert "skipped" in s.last_result and host.domains[str(machine.uuid)]["state"] == PowerState.OFF
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 9, 8, 30, 2)) == 1


def test_a_schedule_made_after_its_minute_waits_for_the_next_day(
    django_capture_on_commit_callbacks,
    host,
    machine,
    owner,  # noqa: F811
):
    make(machine, owner, at(2026, 12, 7, 8, 30, 40))
    stop(machine, host)
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 31)) == 0
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 8, 8, 30, 1)) == 1


def test_shut_down_on_every_machine_of_a_lab(
    django_capture_on_commit_callbacks,
    host,
    owner,  # noqa: F811
    hv,  # noqa: F811
    image,  # noqa: F811
):
    lab = Lab.objects.create(name="lab1", owner=owner)
    names = ["a1", "a2"]
    for name in names:
        m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, name=name))
        LabMachine.objects.create(lab=lab, machine=m)
    s = schedules.schedule_create(actor=owner, lab=lab, action="power_off", hour=18, minute=0)
    ScheduledAction.objects.filter(pk=s.pk).update(created=at(2026, 12, 1, 0, 0))
    assert run(django_capture_on_commit_callbacks, at(2026, 12, 7, 18, 0, 4)) == 1
    assert all(d["state"] == PowerState.OFF for d in host.domains.values()) and len(host.domains) == 2
    s.refresh_from_db()
    assert "a1: shut-down queued" in s.last_result and "a2: shut-down queued" in s.last_result


def test_snapshots_on_a_schedule_keep_the_retention_count(
    django_capture_on_commit_callbacks,
    host,
    machine,
    owner,  # noqa: F811
):
    make(machine, owner, at(2026, 12, 1, 0, 0), action="snapshot", hour=3, minute=0, retention=2)
    for day in range(2, 6):
        assert run(django_capture_on_commit_callbacks, at(2026, 12, day, 3, 0, 1)) == 1
        run(django_capture_on_commit_callbacks, at(2026, 12, day, 3, 1, 0))  # the next check prunes
    names = list(MachineSnapshot.objects.filter(machine=machine).order_by("created").values_list("name", flat=True))
    assert len(names) == 2 and names[-1].endswith("20261205-0300"), names
    assert all(n.startswith("sched") for n in names)
    assert [s["name"] for s in host.domains[str(machine.uuid)]["snapshots"]] == names


def test_a_creator_who_lost_the_role_runs_nothing(
    django_capture_on_commit_callbacks,
    host,
    owner,  # noqa: F811
    hv,  # noqa: F811
    image,  # noqa: F811
):
    project = Project.objects.create(name="p1")
    Membership.objects.create(project=project, user=owner, role=Role.ADMIN)
    operator = UserFactory(username="op")
    membership = Membership.objects.create(project=project, user=operator, role=Role.OPERATOR)
    m = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, project=project))
    s = make(m, operator, at(2026, 12, 1, 0, 0))
    stop(m, host)
    membership.role = Role.VIEWER
    membership.save()
    run(django_capture_on_commit_callbacks, at(2026, 12, 7, 8, 30, 1))
    s.refresh_from_db()
    assert "may no longer operate it" in s.last_result and host.domains[str(m.uuid)]["state"] == PowerState.OFF


def test_who_may_and_what_is_refused(machine, owner):  # noqa: F811
    viewer = UserFactory(username="viewer")
    with pytest.raises(PermissionDenied):
        schedules.schedule_create(actor=viewer, machine=machine, action="power_on", hour=1, minute=0)
    for bad, field in (
        ({"hour": 24}, "hour"),
        ({"minute": -1}, "minute"),
        ({"weekdays": [7]}, "weekdays"),
        ({"weekdays": "mon"}, "weekdays"),
        ({"action": "explode"}, "action"),
        ({"action": "snapshot", "retention": 0}, "retention"),
    ):
        kw = {"action": "power_on", "hour": 1, "minute": 0, **bad}
        with pytest.raises(ValidationError) as e:
            schedules.schedule_create(actor=owner, machine=machine, **kw)
        assert field in e.value.message_dict


def test_the_api_lists_creates_and_deletes_and_answers_bad_input_with_400(machine, owner):  # noqa: F811
    client = Client()
    client.force_login(owner)
    url = f"/api/v1/machines/{machine.pk}/schedules/"
    r = client.post(
        url, {"action": "power_off", "hour": 19, "minute": 5, "weekdays": [4]}, content_type="application/json"
    )
    assert r.status_code == 201, r.content
    sid = r.json()["id"]
    assert r.json()["weekdays"] == [4] and r.json()["machine"] == machine.pk
    assert [s["id"] for s in client.get(url).json()] == [sid]
    for bad in ({"action": "power_off", "hour": 99}, {"action": "x"}, {"hour": "nine"}, {"weekdays": [1, 9]}, []):
        r = client.post(url, bad, content_type="application/json")
        assert r.status_code == 400, (bad, r.content)
    stranger = Client()
    stranger.force_login(UserFactory(username="stranger"))
    assert stranger.get(url).status_code == 404
    assert stranger.delete(f"{url}{sid}/").status_code == 404
    assert client.delete(f"{url}{sid}/").status_code == 204
    assert not ScheduledAction.objects.exists()


def test_the_lab_api_and_the_pages(machine, owner):  # noqa: F811
    lab = Lab.objects.create(name="lab1", owner=owner)
    LabMachine.objects.create(lab=lab, machine=machine)
    client = Client()
    client.force_login(owner)
    r = client.post(
        f"/api/v1/labs/{lab.pk}/schedules/",
        {"action": "power_on", "hour": 7, "minute": 0},
        content_type="application/json",
    )
    assert r.status_code == 201, r.content
    assert r.json()["lab"] == lab.pk
    assert len(client.get(f"/api/v1/labs/{lab.pk}/schedules/").json()) == 1
    page = client.get(f"/labs/{lab.pk}/").content.decode()
    assert f'hx-get="/labs/{lab.pk}/schedules/"' in page  # the card loads from labs (htmx)
    card = client.get(f"/labs/{lab.pk}/schedules/", headers={"HX-Request": "true"}).content.decode()
    assert "Power on at 07:00 every day" in card and "<html" not in card
    assert f'hx-get="/labs/machines/{machine.pk}/schedules/"' in client.get(f"/machines/{machine.pk}/").content.decode()
    url = f"/labs/machines/{machine.pk}/schedules/"
    r = client.post(url, {"action": "power_off", "hour": "25", "minute": "0"}, headers={"HX-Request": "true"})
    assert r.status_code == 200 and "Ensure this value is less than or equal to 23" in r.content.decode()
    r = client.post(url, {"action": "power_off", "hour": "22", "minute": "15", "weekdays": ["5", "6"]})
    assert r.status_code == 302
    assert "Shut down at 22:15 on Sat, Sun" in client.get(url).content.decode()
    s = ScheduledAction.objects.get(machine=machine)
    assert client.post(f"/labs/schedules/{s.pk}/delete/").status_code == 302
    assert not ScheduledAction.objects.filter(machine=machine).exists()
    assert client.get(url.replace(str(machine.pk), "999999")).status_code == 404
    stranger = Client()
    stranger.force_login(UserFactory(username="stranger"))
    assert stranger.get(url).status_code == 404


def test_the_lease_forms(machine, owner):  # noqa: F811
    client = Client()
    client.force_login(owner)
    assert client.get(f"/machines/{machine.pk}/").status_code == 200
    r = client.post(f"/machines/{machine.pk}/lease/", {"days": "3"})
    assert r.status_code == 302
    machine.refresh_from_db()
    assert machine.expires_at is not None
    assert client.post(f"/machines/{machine.pk}/lease/", {"days": "x"}).status_code == 302  # a message, not a 500
    assert client.post(f"/machines/{machine.pk}/lease/", {"clear": "on"}).status_code == 302
    machine.refresh_from_db()
    assert machine.expires_at is None  # no project: no maximum
    lab = Lab.objects.create(name="lab2", owner=owner)
    LabMachine.objects.create(lab=lab, machine=machine)
    assert client.post(f"/labs/{lab.pk}/lease/", {"days": "2"}).status_code == 302
    machine.refresh_from_db()
    lab.refresh_from_db()
    assert lab.expires_at is not None and machine.expires_at == lab.expires_at
    assert "Lease: ends" in client.get(f"/labs/{lab.pk}/").content.decode()
    r = client.post(f"/api/v1/machines/{machine.pk}/lease/", {"until": None}, content_type="application/json")
    assert r.status_code == 200 and r.json()["expires_at"] is None
    r = client.post(
        f"/api/v1/machines/{machine.pk}/lease/", {"until": "2000-01-01T00:00:00Z"}, content_type="application/json"
    )
    assert r.status_code == 400 and "in the future" in r.json()["until"][0]


def test_the_admin_checks_a_schedule_and_sets_a_lease_through_its_service(machine, staff):
    client = Client()
    client.force_login(staff)
    assert client.get("/admin/labs/scheduledaction/").status_code == 200
    add = "/admin/labs/scheduledaction/add/"
    base = {"machine": machine.pk, "action": "power_on", "hour": "6", "minute": "0", "retention": "3", "enabled": "on"}
    r = client.post(add, {**base, "weekdays": "[9]"})
    assert r.status_code == 200 and "Weekdays are numbers 0" in r.content.decode()
    r = client.post(add, {**base, "weekdays": "[1, 3]"})
    assert r.status_code == 302, r.content.decode()[-2000:]
    s = ScheduledAction.objects.get()
    assert s.created_by == staff and s.weekdays == [1, 3]
    assert AuditEvent.objects.filter(action="schedule.create", object_id=str(s.pk)).exists()
    assert client.get(f"/admin/machines/machine/{machine.pk}/change/").status_code == 200


def test_the_periodic_tasks_check_within_the_minute(settings, db):
    """Huey looks at periodic tasks once a minute at its consumer's own second: the schedules' task asks for a
    check one second into the next minute, the leases' task for one every PORTAL_LEASE_CHECK_INTERVAL s."""
    from unittest import mock

    from labs import tasks as lab_tasks
    from machines import tasks as machine_tasks

    with mock.patch.object(lab_tasks.schedules_check_task, "schedule", autospec=True) as schedule:
        with mock.patch("time.time", return_value=1_800_000_020.5):  # 20.5 s into a minute
            lab_tasks.schedules_run_task.call_local()
    assert [c.kwargs["delay"] for c in schedule.call_args_list] == [40.5]
    settings.PORTAL_LEASE_CHECK_INTERVAL = 20
    with mock.patch.object(machine_tasks.leases_enforce_task, "schedule", autospec=True) as schedule:
        machine_tasks.leases_check_task.call_local()
    assert [c.kwargs["delay"] for c in schedule.call_args_list] == [20, 40]
