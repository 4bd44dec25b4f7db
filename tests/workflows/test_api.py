# ruff: noqa: F811 (the `world` fixture, imported from tests/workflows/world.py, is every test's argument)
"""The workflows' API through DRF's test client: the catalogue and registration, a run started with targets
and variables (POST /api/v1/workflows/{id}/runs/), runs with their events read incrementally (?after=), and
cancel. Bad targets and values answer 400 with a message; nothing answers 500."""

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from machines.models import Machine
from portal.models import AuditEvent
from tests.workflows.world import FACTS, SECRET, add_events, world  # noqa: F401 (`world` is a fixture)
from workflows.models import Workflow, WorkflowRun

pytestmark = pytest.mark.django_db


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def runs_url(workflow) -> str:
    return f"/api/v1/workflows/{workflow.pk}/runs/"


def test_anonymous_requests_answer_401(world):
    c = APIClient()
    assert c.get("/api/v1/workflows/").status_code == 401
    assert c.post(runs_url(world.workflow), {}, format="json").status_code == 401
    assert c.get("/api/v1/workflow-runs/").status_code == 401


def test_the_catalogue_lists_what_the_user_may_run_and_hides_secret_defaults(world):
    names = [w["name"] for w in api(world.members["viewer"]).get("/api/v1/workflows/").json()["results"]]
    assert names == ["write-a-file"]
    staff = [w["name"] for w in api(world.staff).get("/api/v1/workflows/").json()["results"]]
    assert staff == ["their-only", "write-a-file"]
    one = api(world.owner).get(f"/api/v1/workflows/{world.workflow.pk}/").json()
    assert [v["name"] for v in one["variables"]] == ["greeting", "count", "verbose", "level", "api_token"]
    assert "default" not in one["variables"][-1]
    assert api(world.owner).get(f"/api/v1/workflows/{world.elsewhere.pk}/").status_code == 404


def test_staff_register_a_workflow_and_others_are_refused(world):
    body = {
        "name": "facts-again",
        "source": "directory",
        "directory": FACTS,
        "playbook": "playbook.yml",
        "variables": [{"name": "wait_timeout", "type": "integer", "default": 30}],
        "groups": ["all"],
    }
    r = api(world.staff).post("/api/v1/workflows/", body, format="json")
    assert r.status_code == 201, r.json()
    assert Workflow.objects.get(name="facts-again").variables[0]["default"] == 30
    r = api(world.owner).post("/api/v1/workflows/", {**body, "name": "mine"}, format="json")
    assert r.status_code == 403
    bad = api(world.staff).post("/api/v1/workflows/", {**body, "name": "x", "directory": "/nowhere"}, format="json")
    assert bad.status_code == 400 and "directory" in bad.json()
    bad = api(world.staff).post(
        "/api/v1/workflows/", {**body, "name": "y", "variables": [{"name": "ansible_host"}]}, format="json"
    )
    assert bad.status_code == 400 and "ansible_" in str(bad.json())


def test_a_run_starts_on_machines_with_its_variables_and_never_answers_a_secret(world):
    body = {"machines": [world.vm.pk], "variables": {"level": "high", "count": "5", "api_token": SECRET}}
    r = api(world.owner).post(runs_url(world.workflow), body, format="json")
    assert r.status_code == 201, r.json()
    data = r.json()
    assert data["status"] == "queued" and data["machines"] == [world.vm.pk] and data["project"] == "wf-team"
    assert data["variables"] == {"greeting": "hello", "count": 5, "verbose": False, "level": "high"}
    assert SECRET not in r.content.decode()
    run = WorkflowRun.objects.get(pk=data["id"])
    assert SECRET not in run.secrets_encrypted and run.secrets_encrypted
    detail = api(world.owner).get(f"/api/v1/workflow-runs/{run.pk}/")
    assert detail.status_code == 200 and SECRET not in detail.content.decode()
    assert SECRET not in " ".join(AuditEvent.objects.values_list("detail", flat=True))


def test_a_run_on_a_lab_takes_every_machine_of_it(world):
    r = api(world.members["operator"]).post(
        runs_url(world.workflow), {"lab": world.lab.pk, "variables": {"level": "low"}}, format="json"
    )
    assert r.status_code == 201, r.json()
    assert sorted(r.json()["machines"]) == sorted([world.vm.pk, world.vm2.pk]) and r.json()["lab"] == world.lab.pk


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"variables": {"level": "low"}}, "non_field_errors"),
        ({"machines": [999999], "variables": {"level": "low"}}, "machines"),
        ({"machines": ["abc"], "variables": {"level": "low"}}, "machines"),
        ({"machines": [2**40], "variables": {"level": "low"}}, "machines"),
        ({"machines": "1", "variables": {"level": "low"}}, "machines"),
        ({"lab": 999999, "variables": {"level": "low"}}, "lab"),
        ({"lab": "x"}, "lab"),
        ({"variables": []}, "variables"),
    ],
)
def test_bad_targets_answer_400_with_a_message(world, body, field):
    r = api(world.owner).post(runs_url(world.workflow), body, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({}, "level"),  # required
        ({"level": "medium"}, "level"),
        ({"level": "low", "count": "many"}, "count"),
        ({"level": "low", "verbose": "perhaps"}, "verbose"),
        ({"level": "low", "nope": 1}, "nope"),
        ({"level": "low", "greeting": {"a": 1}}, "greeting"),
    ],
)
def test_bad_variables_answer_400_by_name(world, variables, field):
    r = api(world.owner).post(
        runs_url(world.workflow), {"machines": [world.vm.pk], "variables": variables}, format="json"
    )
    assert r.status_code == 400, r.content
    assert field in r.json()


def test_someone_elses_machine_is_no_machine(world):
    r = api(world.owner).post(
        runs_url(world.workflow), {"machines": [world.theirs.pk], "variables": {"level": "low"}}, format="json"
    )
    assert r.status_code == 400 and r.json() == {"machines": [f"No machine {world.theirs.pk}."]}
    r = api(world.stranger).post(
        runs_url(world.workflow), {"lab": world.lab.pk, "variables": {"level": "low"}}, format="json"
    )
    assert r.status_code == 400 and "lab" in r.json()


def test_a_viewer_is_refused_and_a_project_workflow_is_no_workflow_for_others(world):
    r = api(world.members["viewer"]).post(
        runs_url(world.workflow), {"machines": [world.vm.pk], "variables": {"level": "low"}}, format="json"
    )
    assert r.status_code == 409 and "operator" in r.json()["detail"]
    r = api(world.owner).post(runs_url(world.elsewhere), {"machines": [world.vm.pk]}, format="json")
    assert r.status_code == 404


def test_a_stopped_machine_is_refused_with_its_state(world):
    Machine.objects.filter(pk=world.vm.pk).update(status="stopped")
    r = api(world.owner).post(
        runs_url(world.workflow), {"machines": [world.vm.pk], "variables": {"level": "low"}}, format="json"
    )
    assert r.status_code in (400, 409) and "active" in r.content.decode()


def test_runs_list_what_the_user_may_see(world):
    run = world.run()
    own = world.run(actor=world.owner, machines=[world.private])
    ids = lambda user: {r["id"] for r in api(user).get("/api/v1/workflow-runs/").json()["results"]}  # noqa: E731
    assert ids(world.owner) == {run.pk, own.pk}
    assert ids(world.members["viewer"]) == {run.pk}
    assert ids(world.stranger) == set()
    assert ids(world.staff) == {run.pk, own.pk}
    assert api(world.stranger).get(f"/api/v1/workflow-runs/{run.pk}/").status_code == 404


def test_events_are_read_incrementally_after_a_counter(world):
    run = world.run()
    add_events(run)
    c = api(world.members["viewer"])
    everything = c.get(f"/api/v1/workflow-runs/{run.pk}/").json()
    assert [e["counter"] for e in everything["events"]] == [1, 2, 3, 4, 5, 6]
    assert everything["events"][4] | {"created": None} == {
        "counter": 5,
        "created": None,
        "event": "runner_on_ok",
        "host": "web1",
        "task": "write the file",
        "status": "changed",
        "stdout": "",
        "data": {"msg": "file written"},
    }
    later = c.get(f"/api/v1/workflow-runs/{run.pk}/?after=4").json()
    assert [e["counter"] for e in later["events"]] == [5, 6]
    assert c.get(f"/api/v1/workflow-runs/{run.pk}/?after=6").json()["events"] == []
    for bad in ("x", "-5", "1e3", str(2**40)):
        r = c.get(f"/api/v1/workflow-runs/{run.pk}/?after={bad}")
        assert r.status_code == 400 and "after" in r.json(), bad


def test_cancel_by_an_operator_and_not_by_a_viewer(world):
    run = world.run()
    r = api(world.members["viewer"]).post(f"/api/v1/workflow-runs/{run.pk}/cancel/")
    assert r.status_code == 403
    r = api(world.members["operator"]).post(f"/api/v1/workflow-runs/{run.pk}/cancel/")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = api(world.members["operator"]).post(f"/api/v1/workflow-runs/{run.pk}/cancel/")
    assert r.status_code == 409 and "nothing to cancel" in r.json()["detail"]
    assert api(world.stranger).post(f"/api/v1/workflow-runs/{run.pk}/cancel/").status_code == 404


def test_cancelling_a_running_run_asks_the_worker_to_stop_it(world):
    run = world.run()
    WorkflowRun.objects.filter(pk=run.pk).update(status="running", started=timezone.now())
    r = api(world.owner).post(f"/api/v1/workflow-runs/{run.pk}/cancel/")
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True


def test_a_workflow_is_changed_disabled_and_re_enabled_by_its_writers_through_patch(world):
    url = f"/api/v1/workflows/{world.workflow.pk}/"
    assert api(world.members["operator"]).patch(url, {"description": "x"}, format="json").status_code == 403
    assert api(world.stranger).patch(url, {"description": "x"}, format="json").status_code == 403
    r = api(world.staff).patch(url, {"description": "now described", "enabled": False}, format="json")
    assert r.status_code == 200, r.json()
    world.workflow.refresh_from_db()
    assert (world.workflow.description, world.workflow.enabled) == ("now described", False)
    assert world.workflow.name == "write-a-file" and world.workflow.variables  # the rest kept
    assert api(world.owner).get(url).status_code == 404  # disabled: offered to nobody but staff
    bad = api(world.staff).patch(url, {"directory": "/nowhere"}, format="json")
    assert bad.status_code == 400 and "directory" in bad.json()
    bad = api(world.staff).patch(url, {"variables": [{"name": "ansible_host"}]}, format="json")
    assert bad.status_code == 400 and "ansible_" in str(bad.json())
    assert api(world.staff).patch(url, {"enabled": True}, format="json").json()["enabled"] is True
    assert AuditEvent.objects.filter(action="workflow.update", outcome="success").count() == 2
    assert AuditEvent.objects.filter(action="workflow.update", outcome="refused").count() == 2


def test_a_project_admin_reaches_and_removes_a_workflow_of_their_project_that_never_ran(world):
    body = {"name": "team-git", "project": "wf-team", "source": "git", "git_url": "https://git.example/x.git"}
    r = api(world.members["admin"]).post("/api/v1/workflows/", body, format="json")
    assert r.status_code == 201, r.json()
    url = f"/api/v1/workflows/{r.json()['id']}/"
    assert api(world.members["admin"]).patch(url, {"enabled": False}, format="json").status_code == 200
    assert api(world.members["admin"]).patch(url, {"enabled": True}, format="json").status_code == 200  # still theirs
    assert api(world.members["viewer"]).delete(url).status_code == 403
    assert api(world.members["admin"]).delete(url).status_code == 204
    assert not Workflow.objects.filter(name="team-git").exists()
    assert AuditEvent.objects.filter(action="workflow.delete", outcome="success", detail="name=team-git").exists()


def test_a_workflow_that_ran_is_kept_with_its_runs_and_the_answer_says_to_disable_it(world):
    world.run(machines=[world.vm])
    r = api(world.staff).delete(f"/api/v1/workflows/{world.workflow.pk}/")
    assert r.status_code == 409 and "1 run, kept with it: disable it instead" in r.json()["detail"]
    assert Workflow.objects.filter(pk=world.workflow.pk).exists()
