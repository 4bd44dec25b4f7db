# ruff: noqa: F811 (the `world` fixture, imported from tests/workflows/world.py, is every test's argument)
"""The workflows' admin: a workflow is edited there with its schema checked as the pages check it; a run is a
read-only record with its events inline, and its secrets (encrypted or not) are on no admin page."""

import pytest
from django.urls import reverse

from tests.workflows.world import SECRET, add_events, world  # noqa: F401 (`world` is a fixture)
from workflows.models import Workflow

pytestmark = pytest.mark.django_db


def test_staff_edit_a_workflow_and_a_bad_schema_is_refused_on_the_field(world):
    c = world.client(world.staff)
    url = reverse("admin:workflows_workflow_change", args=[world.workflow.pk])
    assert c.get(url).status_code == 200
    data = {
        "name": "write-a-file",
        "description": "",
        "project": "",
        "source": "directory",
        "directory": world.workflow.directory,
        "git_url": "",
        "git_ref": "",
        "playbook": "playbook.yml",
        "variables": '[{"name": "x", "type": "float"}]',
        "groups": '["all"]',
        "enabled": "on",
    }
    r = c.post(url, data)
    assert r.status_code == 200 and "the type is one of" in r.content.decode()
    r = c.post(url, {**data, "variables": '[{"name": "x"}]'})
    assert r.status_code == 302
    assert Workflow.objects.get(pk=world.workflow.pk).variables[0] == {
        "name": "x", "type": "string", "default": None, "required": False, "secret": False, "choices": [], "help": "",
    }  # fmt: skip
    r = c.post(url, {**data, "variables": "[]", "groups": '"all"'})
    assert r.status_code == 200 and "A list of group names" in r.content.decode()


def test_a_run_is_read_only_with_its_events_and_no_secret(world):
    run = world.run()
    add_events(run)
    c = world.client(world.staff)
    r = c.get(reverse("admin:workflows_workflowrun_change", args=[run.pk]))
    assert r.status_code == 200
    text = r.content.decode()
    assert "write the file" in text and "runner_on_failed" in text
    assert SECRET not in text and run.secrets_encrypted not in text and "secrets_encrypted" not in text
    assert 'name="status"' not in text  # nothing to edit
    assert c.get(reverse("admin:workflows_workflowrun_changelist")).status_code == 200
    assert c.get(reverse("admin:workflows_workflowrun_add")).status_code == 403
    assert c.post(reverse("admin:workflows_workflowrun_delete", args=[run.pk])).status_code == 403
    # Not for users who are not staff.
    assert world.client(world.owner).get(reverse("admin:workflows_workflowrun_changelist")).status_code == 302


def test_every_field_of_a_run_is_either_shown_or_hidden_and_the_secrets_are_hidden():
    """A field added to WorkflowRun is shown nowhere (admin, API) until it is put in SHOWN_FIELDS or, holding
    something secret, in HIDDEN_FIELDS: the admin and the API take their lists from there."""
    from workflows.admin import WorkflowRunAdmin
    from workflows.api import WorkflowRunSerializer
    from workflows.models import WorkflowRun

    fields = {f.name for f in WorkflowRun._meta.get_fields() if f.concrete or f.many_to_many} - {"id"}
    shown, hidden = set(WorkflowRun.SHOWN_FIELDS), set(WorkflowRun.HIDDEN_FIELDS)
    assert not shown & hidden
    assert shown | hidden == fields
    assert "secrets_encrypted" in hidden
    assert set(WorkflowRunAdmin.fields) == shown
    assert set(WorkflowRunSerializer.Meta.fields) - {"id", "workflow_name"} <= shown
