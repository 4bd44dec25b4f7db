# ruff: noqa: F811 (the `world` fixture, imported from tests/workflows/world.py, is every test's argument)
"""The workflow pages through the Django test client: the catalogue, a workflow, its registration, the run
form (from a machine, a lab, a selection), a run's page with its output coming in by ?after=, and cancel.
Runs are started through the service; their progress is written as WorkflowEvent rows, as the engine writes
them."""

import re

import pytest
from django.urls import reverse
from django.utils import timezone

from machines.models import Machine
from tests.workflows.world import FACTS, SECRET, add_events, world  # noqa: F401 (`world` is a fixture)
from workflows.models import Workflow, WorkflowEvent, WorkflowRun

pytestmark = pytest.mark.django_db


def test_anonymous_users_are_sent_to_log_in(client, world):
    for url in (
        reverse("workflows:list"),
        reverse("workflows:detail", args=[world.workflow.pk]),
        reverse("workflows:runs"),
    ):
        r = client.get(url)
        assert r.status_code == 302 and "/login/" in r["Location"]


def test_the_catalogue_offers_workflows_for_everyone_and_the_users_projects(world):
    r = world.client(world.members["viewer"]).get(reverse("workflows:list"))
    assert r.status_code == 200
    assert b"write-a-file" in r.content and b"their-only" not in r.content
    assert b"Register a workflow" not in r.content  # a viewer registers nothing
    assert b"Register a workflow" in world.client(world.members["admin"]).get(reverse("workflows:list")).content
    staff = world.client(world.staff).get(reverse("workflows:list"))
    assert b"their-only" in staff.content
    # Another project's workflow does not exist for this user.
    url = reverse("workflows:detail", args=[world.elsewhere.pk])
    assert world.client(world.members["viewer"]).get(url).status_code == 404


def test_a_disabled_workflow_is_left_out_of_the_catalogue_but_staff_see_it(world):
    Workflow.objects.filter(pk=world.workflow.pk).update(enabled=False)
    assert b"write-a-file" not in world.client(world.owner).get(reverse("workflows:list")).content
    assert b"disabled" in world.client(world.staff).get(reverse("workflows:list")).content


def test_the_workflow_page_lists_its_variables_and_runs_without_secret_values(world):
    run = world.run()
    r = world.client(world.owner).get(reverse("workflows:detail", args=[world.workflow.pk]))
    assert r.status_code == 200
    text = r.content.decode()
    assert "greeting" in text and "api_token" in text and ">secret<" in text
    assert f"#{run.pk}" in text
    assert SECRET not in text


def test_staff_register_a_workflow_with_variables_typed_as_yaml(world):
    c = world.client(world.staff)
    assert c.get(reverse("workflows:create")).status_code == 200
    data = {
        "name": "install-packages",
        "source": "directory",
        "directory": FACTS,
        "playbook": "playbook.yml",
        "variables": "- name: packages\n  default: curl\n- name: level\n  type: choice\n  choices: [a, b]\n",
        "groups": "web, db",
        "enabled": "on",
    }
    r = c.post(reverse("workflows:create"), data)
    assert r.status_code == 302, r.content.decode()[:2000]
    workflow = Workflow.objects.get(name="install-packages")
    assert [v["name"] for v in workflow.variables] == ["packages", "level"]
    assert workflow.groups == ["web", "db"] and workflow.project is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: [unclosed", "Not valid YAML or JSON"),
        ('[{"name": "x", "type": "float"}]', "the type is one of"),
        ("name: not-a-list", "a list"),
        ("- name: ansible_user", "ansible_"),
        ("- name: pw\n  secret: true\n  default: hunter2", "a secret has no default"),
    ],
)
def test_a_bad_variables_schema_is_a_message_on_the_form(world, text, message):
    data = {"name": "bad", "source": "directory", "directory": FACTS, "playbook": "playbook.yml", "variables": text}
    r = world.client(world.staff).post(reverse("workflows:create"), data)
    assert r.status_code == 200
    assert message in r.content.decode()
    assert not Workflow.objects.filter(name="bad").exists()


def test_project_admins_register_for_their_project_only_and_others_may_not(world):
    admin = world.client(world.members["admin"])
    data = {
        "name": "team-wf",
        "source": "git",
        "git_url": "https://git.example.org/team/wf.git",
        "git_ref": "main",
        "playbook": "site.yml",
        "variables": "[]",
    }
    r = admin.post(reverse("workflows:create"), {**data, "project": world.other_project.pk})
    assert r.status_code == 200 and not Workflow.objects.filter(name="team-wf").exists()
    r = admin.post(reverse("workflows:create"), {**data, "project": ""})  # for everyone: staff only
    assert r.status_code == 200 and not Workflow.objects.filter(name="team-wf").exists()
    r = admin.post(reverse("workflows:create"), {**data, "project": world.project.pk})
    assert r.status_code == 302
    assert Workflow.objects.get(name="team-wf").project == world.project
    assert world.client(world.members["operator"]).get(reverse("workflows:create")).status_code == 403
    # The global workflow is staff's to change; the team's is its admins'.
    assert admin.get(reverse("workflows:edit", args=[world.workflow.pk])).status_code == 403
    team = Workflow.objects.get(name="team-wf")
    assert admin.get(reverse("workflows:edit", args=[team.pk])).status_code == 200


def test_staff_edit_a_workflow_and_its_schema_shows_as_yaml(world):
    c = world.client(world.staff)
    url = reverse("workflows:edit", args=[world.workflow.pk])
    r = c.get(url)
    assert r.status_code == 200 and "name: greeting" in r.content.decode()
    data = {
        "name": "write-a-file",
        "description": "changed",
        "source": "directory",
        "directory": FACTS,
        "playbook": "playbook.yml",
        "variables": "- name: greeting\n",
        "groups": "",
    }
    assert c.post(url, data).status_code == 302
    world.workflow.refresh_from_db()
    assert world.workflow.directory == FACTS and world.workflow.description == "changed"
    assert [v["name"] for v in world.workflow.variables] == ["greeting"]
    assert world.workflow.enabled is False  # the box was not ticked


def test_the_run_form_has_a_field_per_variable_and_the_targets_it_was_started_from(world):
    url = reverse("workflows:run", args=[world.workflow.pk]) + f"?machine={world.vm.pk}&lab={world.lab.pk}"
    r = world.client(world.owner).get(url)
    assert r.status_code == 200
    text = r.content.decode()
    assert re.search(rf'<option value="{world.vm.pk}" selected>web1</option>', text)
    assert re.search(rf'<option value="{world.lab.pk}" selected>wflab</option>', text)
    assert 'name="var_greeting"' in text and 'value="hello"' in text
    assert re.search(r'type="number" name="var_count"[^>]*value="2"', text)
    assert 'type="checkbox" name="var_verbose"' in text
    assert '<option value="high">high</option>' in text
    assert re.search(r'<input type="password" name="var_api_token"', text)
    # A stranger sees neither the owner's machine nor the lab among the choices.
    text = world.client(world.stranger).get(url).content.decode()
    assert "web1" not in text and "wflab" not in text


def test_starting_a_run_from_the_form_keeps_secrets_out_of_the_run_and_the_pages(world):
    c = world.client(world.owner)
    url = reverse("workflows:run", args=[world.workflow.pk])
    data = {
        "machines": [world.vm.pk],
        "var_greeting": "hi",
        "var_count": "3",
        "var_level": "high",
        "var_api_token": SECRET,
    }
    r = c.post(url, data)
    assert r.status_code == 302
    run = WorkflowRun.objects.get()
    assert r["Location"] == reverse("workflows:run-detail", args=[run.pk])
    assert run.variables["greeting"] == "hi" and run.variables["count"] == 3 and run.variables["level"] == "high"
    assert "api_token" not in run.variables and SECRET not in str(run.variables)
    assert list(run.machines.all()) == [world.vm]
    page = c.get(r["Location"]).content.decode()
    assert "api_token" in page and SECRET not in page


def test_a_failed_submit_never_renders_the_secret_back(world):
    url = reverse("workflows:run", args=[world.workflow.pk])
    data = {"machines": [world.vm.pk], "var_count": "many", "var_level": "low", "var_api_token": SECRET}
    r = world.client(world.owner).post(url, data)
    assert r.status_code == 200
    text = r.content.decode()
    assert "Enter a whole number" in text
    assert SECRET not in text
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "Pick machines or a lab"),
        ({"machines": ["999999"]}, "Select a valid choice"),
        ({"machines": ["abc"]}, "is not a valid value"),
        ({"lab": "999999"}, "Select a valid choice"),
        ({"machines": ["1"], "var_level": "medium"}, "Select a valid choice"),
    ],
)
def test_bad_targets_and_values_are_messages_not_errors(world, data, message):
    r = world.client(world.owner).post(reverse("workflows:run", args=[world.workflow.pk]), {"var_level": "low", **data})
    assert r.status_code == 200
    assert message in r.content.decode()
    assert not WorkflowRun.objects.exists()


def test_someone_elses_machine_cannot_be_a_target(world):
    data = {"machines": [world.theirs.pk], "var_level": "low"}
    r = world.client(world.owner).post(reverse("workflows:run", args=[world.workflow.pk]), data)
    assert r.status_code == 200 and "Select a valid choice" in r.content.decode()
    assert not WorkflowRun.objects.exists()


def test_a_viewer_may_not_start_a_run_on_the_projects_machine(world):
    data = {"machines": [world.vm.pk], "var_level": "low"}
    r = world.client(world.members["viewer"]).post(reverse("workflows:run", args=[world.workflow.pk]), data)
    assert r.status_code == 200
    assert "does not allow" in r.content.decode()
    assert not WorkflowRun.objects.exists()


def test_the_entry_points_lead_to_the_run_form_with_their_targets(world):
    c = world.client(world.owner)
    machine_page = c.get(reverse("machines:detail", args=[world.vm.pk])).content.decode()
    assert f"{reverse('workflows:start')}?machine={world.vm.pk}" in machine_page
    lab_page = c.get(reverse("labs:detail", args=[world.lab.pk])).content.decode()
    assert f"{reverse('workflows:start')}?lab={world.lab.pk}" in lab_page
    listing = c.get(reverse("machines:list")).content.decode()
    assert f'formaction="{reverse("workflows:start")}"' in listing and "Run workflow" in listing
    # The list posts its selection; it comes back as a plain GET with the machines.
    r = c.post(reverse("workflows:start"), {"ids": [world.vm.pk, world.vm2.pk], "action": ""})
    assert r.status_code == 302 and r["Location"].endswith(f"?machine={world.vm.pk}&machine={world.vm2.pk}")
    page = c.get(r["Location"]).content.decode()
    assert "web1" in page and "web2" in page
    assert (
        f"{reverse('workflows:run', args=[world.workflow.pk])}?machine={world.vm.pk}&amp;machine={world.vm2.pk}" in page
    )
    assert "their-only" not in page
    # Nothing selected: back to the list with a message; made-up ids are simply not there.
    assert c.post(reverse("workflows:start"), {"action": ""})["Location"] == reverse("machines:list")
    page = c.get(reverse("workflows:start") + f"?machine={world.theirs.pk}&machine=x&lab=99999999999").content.decode()
    assert "strangers" not in page


def test_the_run_page_streams_events_after_the_last_counter(world):
    run = world.run()
    c = world.client(world.owner)
    url = reverse("workflows:run-detail", args=[run.pk])
    page = c.get(url).content.decode()
    assert 'id="run-poller"' in page and f'hx-get="{url}?after=-1"' in page and "Queued" in page
    add_events(run)
    WorkflowRun.objects.filter(pk=run.pk).update(status="running", started=timezone.now())
    partial = c.get(url + "?after=-1", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial
    assert 'hx-swap-oob="beforeend:#run-events"' in partial
    assert "PLAY [Write a file]" in partial and "TASK [write the file]" in partial
    assert "run-badge-changed" in partial and "run-badge-failed" in partial and "no such file" in partial
    assert f'hx-get="{url}?after=6"' in partial and "Running" in partial
    # Only what came after: nothing new, then one more event.
    partial = c.get(url + "?after=6", headers={"HX-Request": "true"}).content.decode()
    assert "run-event" not in partial and "?after=6" in partial
    WorkflowEvent.objects.create(run=run, counter=7, event="runner_on_unreachable", host="web2", status="unreachable")
    partial = c.get(url + "?after=6", headers={"HX-Request": "true"}).content.decode()
    assert partial.count('class="run-event ') == 1 and "run-badge-unreachable" in partial and "after=7" in partial


def test_the_run_page_stops_polling_and_shows_the_summary_and_log_when_it_ends(world):
    run = world.run()
    add_events(run)
    summary = {"web1": {"ok": 2, "changed": 1, "failures": 1, "dark": 0, "skipped": 0}}
    WorkflowRun.objects.filter(pk=run.pk).update(
        status="failed", finished=timezone.now(), rc=2, summary=summary, stdout="PLAY RECAP\nweb1 : ok=2 ********"
    )
    c = world.client(world.owner)
    url = reverse("workflows:run-detail", args=[run.pk])
    partial = c.get(url + "?after=6", headers={"HX-Request": "true"}).content.decode()
    assert 'id="run-poller"' in partial and "hx-get" not in partial.split('id="run-poller"')[1].split(">")[0]
    assert 'id="run-summary"' in partial and "Failed" in partial and "PLAY RECAP" in partial
    page = c.get(url).content.decode()
    assert page.count('class="run-event ') == 6 and 'id="run-log"' in page and "exit code 2" in page
    assert 'id="run-cancel"' not in page


def test_who_sees_a_run(world):
    run = world.run()
    url = reverse("workflows:run-detail", args=[run.pk])
    for user in (world.owner, world.staff, world.members["viewer"], world.members["operator"]):
        assert world.client(user).get(url).status_code == 200, user
    assert world.client(world.stranger).get(url).status_code == 404
    # A run that touched a machine a member may no longer see is not theirs to read (its output is that
    # machine's): here the machine moved to another project after the run.
    hidden = world.run(machines=[world.vm, world.vm2])
    Machine.objects.filter(pk=world.vm2.pk).update(project=world.other_project)
    assert (
        world.client(world.members["operator"]).get(reverse("workflows:run-detail", args=[hidden.pk])).status_code
        == 404
    )
    assert world.client(world.owner).get(reverse("workflows:run-detail", args=[hidden.pk])).status_code == 200
    runs = world.client(world.members["viewer"]).get(reverse("workflows:runs")).content.decode()
    assert f"#{run.pk}<" in runs and f"#{hidden.pk}<" not in runs
    assert f"#{run.pk}<" not in world.client(world.stranger).get(reverse("workflows:runs")).content.decode()


def test_the_run_list_filters_mine_and_refreshes_as_a_partial(world):
    run = world.run()
    theirs = world.run(actor=world.members["operator"])
    c = world.client(world.members["operator"])
    mine = c.get(reverse("workflows:runs") + "?mine=1").content.decode()
    assert f"#{theirs.pk}<" in mine and f"#{run.pk}<" not in mine
    partial = c.get(reverse("workflows:runs") + f"?project={world.project.pk}", headers={"HX-Request": "true"})
    assert b"<html" not in partial.content and b'id="run-table"' in partial.content
    assert c.get(reverse("workflows:runs") + "?project=x").status_code == 200


def test_operators_cancel_a_run_and_viewers_may_not(world):
    run = world.run()
    url = reverse("workflows:run-detail", args=[run.pk])
    assert 'id="run-cancel"' not in world.client(world.members["viewer"]).get(url).content.decode()
    r = world.client(world.members["viewer"]).post(reverse("workflows:run-cancel", args=[run.pk]))
    assert r.status_code == 403
    operator = world.client(world.members["operator"])
    assert 'id="run-cancel"' in operator.get(url).content.decode()
    assert operator.get(reverse("workflows:run-cancel", args=[run.pk])).status_code == 405
    r = operator.post(reverse("workflows:run-cancel", args=[run.pk]))
    assert r.status_code == 302
    run.refresh_from_db()
    assert run.cancel_requested or run.status == "cancelled"
    assert world.client(world.stranger).post(reverse("workflows:run-cancel", args=[run.pk])).status_code == 404


def test_cancelling_an_ended_run_is_a_message(world):
    run = world.run()
    WorkflowRun.objects.filter(pk=run.pk).update(status="successful", finished=timezone.now())
    r = world.client(world.owner).post(reverse("workflows:run-cancel", args=[run.pk]), follow=True)
    assert r.status_code == 200
    assert b"alert-danger" in r.content


def _queries(client, url) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_the_run_lists_cost_the_same_queries_at_3_runs_as_at_12(world):
    from rest_framework.test import APIClient

    c = world.client(world.members["viewer"])
    api = APIClient()
    api.force_authenticate(world.members["viewer"])
    for _ in range(3):
        world.run(machines=[world.vm, world.vm2])
    few = [_queries(c, reverse("workflows:runs")), _queries(api, "/api/v1/workflow-runs/")]
    few.append(_queries(c, reverse("workflows:detail", args=[world.workflow.pk])))
    WorkflowRun.objects.update(status="successful")  # past the project's limit of queued runs
    for _ in range(9):
        world.run(machines=[world.vm, world.vm2])
        WorkflowRun.objects.update(status="successful")
    many = [_queries(c, reverse("workflows:runs")), _queries(api, "/api/v1/workflow-runs/")]
    many.append(_queries(c, reverse("workflows:detail", args=[world.workflow.pk])))
    assert WorkflowRun.objects.count() == 12
    assert many == few
