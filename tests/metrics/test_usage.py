"""Usage reports (metrics/usage.py, usage_views.py, usage_api.py): a month's sums from the hourly usage rows, the
month's boundaries in the portal's time zone, who sees what (staff all, a project admin their projects only,
anyone else 403), bad months answered with a message, the CSV neutralising formulas, constant queries."""

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from machines.models import Membership, Role
from metrics import usage
from metrics.models import UsageHour
from tests.factories import MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


def _hour(machine, at, *, vcpus=2, memory_gib=1.0, disk_gib=10, project="same"):
    return UsageHour.objects.create(
        at=at, machine=machine, machine_uuid=machine.uuid, machine_name=machine.name, owner=machine.owner,
        project=machine.project if project == "same" else project, vcpu_hours=vcpus, memory_gib_hours=memory_gib,
        disk_gib_days=disk_gib / 24,
    )  # fmt: skip


def _aware(*args):
    return timezone.make_aware(datetime(*args))


@pytest.fixture
def world():
    team, other_team = ProjectFactory(name="team"), ProjectFactory(name="other-team")
    padmin, alice, bob = UserFactory(username="padmin"), UserFactory(username="alice"), UserFactory(username="bob")
    Membership.objects.create(project=team, user=padmin, role=Role.ADMIN)
    Membership.objects.create(project=other_team, user=padmin, role=Role.VIEWER)  # not theirs to report on
    a = MachineFactory(name="a1", owner=alice, project=team)
    b = MachineFactory(name="b1", owner=bob, project=other_team)
    c = MachineFactory(name="c1", owner=bob, project=None)
    # Around the boundary of November and December 2026: the last hour of November, the first of December.
    _hour(a, _aware(2026, 11, 30, 23))
    for h in range(3):
        _hour(a, _aware(2026, 12, 1, h))
    _hour(b, _aware(2026, 12, 1, 0), vcpus=4, memory_gib=8.0)
    _hour(c, _aware(2026, 12, 31, 23), vcpus=1, memory_gib=0.5, disk_gib=24)
    _hour(c, _aware(2027, 1, 1, 0), vcpus=100)  # January: not December's
    return {"padmin": padmin, "alice": alice, "bob": bob, "team": team, "a": a, "c": c}


def _staff():
    return UserFactory(username="boss", is_staff=True)


def test_sums_by_project_within_the_month_boundaries(world):
    rows = usage.report(_staff(), usage.month_of("2026-12"), "project")
    by_name = {r["name"]: r for r in rows}
    assert by_name["team"]["vcpu_hours"] == 6  # three December hours, not November's
    assert by_name["team"]["memory_gib_hours"] == 3
    assert by_name["team"]["disk_gib_days"] == pytest.approx(30 / 24, abs=0.001)
    assert by_name["team"]["machines"] == 1
    assert by_name["other-team"]["vcpu_hours"] == 4
    assert by_name[usage.NO_PROJECT]["vcpu_hours"] == 1  # the last hour of December, not January's
    assert by_name[usage.NO_PROJECT]["disk_gib_days"] == 1
    assert [r["name"] for r in rows] == ["other-team", "team", usage.NO_PROJECT]
    november = usage.report(_staff(), usage.month_of("2026-11"), "project")
    assert [(r["name"], r["vcpu_hours"]) for r in november] == [("team", 2)]


def test_sums_by_user_and_rows_of_deleted_machines_and_users_stay(world):
    world["c"].delete()  # its usage rows stay (machine set null), still its owner's
    rows = {r["name"]: r for r in usage.report(_staff(), usage.month_of("2026-12"), "user")}
    assert rows["alice"]["vcpu_hours"] == 6
    assert rows["bob"]["vcpu_hours"] == 5  # b1's 4 and the deleted c1's 1
    assert rows["bob"]["machines"] == 2
    UsageHour.objects.filter(owner=world["alice"]).update(owner=None)  # as after the user's deletion
    rows = {r["name"]: r for r in usage.report(_staff(), usage.month_of("2026-12"), "user")}
    assert rows[usage.NO_USER]["vcpu_hours"] == 6


def test_the_month_is_the_portals_time_zone(world, settings):
    settings.TIME_ZONE = "Europe/Berlin"  # December begins at 23:00 UTC on 30 November
    with timezone.override("Europe/Berlin"):
        month = usage.month_of("2026-12")
        rows = {r["name"]: r for r in usage.report(_staff(), month, "project")}
    assert month.start == datetime(2026, 11, 30, 23, tzinfo=UTC)
    assert rows["team"]["vcpu_hours"] == 8  # 23:00 UTC on 30 November is December in Berlin


def test_a_project_admin_sees_only_their_projects(world):
    rows = usage.report(world["padmin"], usage.month_of("2026-12"), "project")
    assert [r["name"] for r in rows] == ["team"]
    by_user = usage.report(world["padmin"], usage.month_of("2026-12"), "user")
    assert [(r["name"], r["vcpu_hours"]) for r in by_user] == [("alice", 6)]  # bob's machines are elsewhere


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_others_are_refused(client, world, who):
    client.force_login(world[who])
    assert client.get("/usage/").status_code == 403
    assert client.get("/usage/usage.csv").status_code == 403
    api = APIClient()
    api.force_login(world[who])
    assert api.get("/api/v1/usage/").status_code == 403


def test_the_page_shows_both_tables(client, world):
    client.force_login(_staff())
    r = client.get("/usage/", {"month": "2026-12"})
    assert r.status_code == 200
    page = r.content.decode()
    assert 'id="usage-by-project"' in page and 'id="usage-by-user"' in page
    assert "other-team" in page and "alice" in page
    assert "?month=2026-12&amp;by=user" in page


def test_the_page_default_is_this_month(client, world):
    client.force_login(world["padmin"])
    r = client.get("/usage/")
    assert r.status_code == 200
    assert timezone.localtime().strftime("%B %Y") in r.content.decode()


@pytest.mark.parametrize("month", ["2026-13", "26-1", "2026-00", "x" * 500, "0001-01", "9999-12", "2026-1é"])
def test_a_bad_month_is_a_message_not_a_500(client, world, month):
    client.force_login(_staff())
    r = client.get("/usage/", {"month": month})
    assert r.status_code == 200
    assert 'id="usage-month-error"' in r.content.decode()
    assert client.get("/usage/usage.csv", {"month": month}).status_code == 400
    api = APIClient()
    api.force_login(_staff())
    r = api.get("/api/v1/usage/", {"month": month})
    assert r.status_code == 400 and "month" in r.json()
    assert api.get("/api/v1/usage/", {"by": "machine"}).status_code == 400


def test_the_csv_neutralises_formulas(client, world):
    evil = UserFactory(username="=HYPERLINK(1)")
    project = ProjectFactory(name="@SUM(A1)")
    m = MachineFactory(name="evil", owner=evil, project=project)
    _hour(m, _aware(2026, 12, 5, 0))
    client.force_login(_staff())
    r = client.get("/usage/usage.csv", {"month": "2026-12", "by": "user"})
    assert r.status_code == 200
    assert r["Content-Disposition"] == 'attachment; filename="usage-2026-12-by-user.csv"'
    rows = list(csv.reader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert rows[0] == list(usage.CSV_COLUMNS)
    assert ["2026-12", "user", "'=HYPERLINK(1)", "1", "2.0", "1.0", "0.417"] in rows
    by_project = client.get("/usage/usage.csv", {"month": "2026-12"})
    assert "'@SUM(A1)" in b"".join(by_project.streaming_content).decode()


def test_the_api(world):
    api = APIClient()
    api.force_login(world["padmin"])
    r = api.get("/api/v1/usage/", {"month": "2026-12", "by": "project"})
    assert r.status_code == 200
    body = r.json()
    assert body["month"] == "2026-12" and body["by"] == "project"
    assert body["rows"] == [
        {"id": world["team"].pk, "name": "team", "machines": 1, "vcpu_hours": 6.0, "memory_gib_hours": 3.0,
         "disk_gib_days": 1.25}
    ]  # fmt: skip
    assert body["total"]["vcpu_hours"] == 6.0
    assert APIClient().get("/api/v1/usage/").status_code == 401


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as q:
        r = client.get(url)
        assert r.status_code == 200
        if hasattr(r, "streaming_content"):
            b"".join(r.streaming_content)
    return len(q)


@pytest.mark.parametrize(
    "url", ["/usage/?month=2026-12", "/usage/usage.csv?month=2026-12&by=user", "/api/v1/usage/?month=2026-12"]
)
def test_queries_do_not_grow_with_rows(client, world, url):
    client.force_login(world["padmin"])
    few = _queries(client, url)
    for i in range(15):
        m = MachineFactory(name=f"m{i}", owner=UserFactory(), project=world["team"])
        for h in range(3):
            _hour(m, _aware(2026, 12, 2, h) + timedelta(days=i))
    assert _queries(client, url) == few


def test_the_dashboard_links_the_report_for_those_who_may_see_it(client, world):
    for who, shown in ((world["padmin"], True), (world["alice"], False), (_staff(), True)):
        client.force_login(who)
        assert ('id="dashboard-usage-link"' in client.get("/").content.decode()) is shown, who.username
