"""A small world for the workflow pages and API tests: a project with a viewer, an operator and an admin, its
owner's two machines in it and in a lab, the owner's own machine, a stranger's machine, and a workflow for
everyone (the shipped file-and-command example's directory) that takes a string, an integer, a boolean, a
choice and a secret. Test modules import the `world` fixture from here."""

import pytest
from django.test import Client

from labs.models import Lab, LabMachine
from machines.models import Membership
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory
from workflows import services
from workflows.models import WorkflowEvent, WorkflowRun
from workflows.services import EXAMPLES_DIR

VARIABLES = [
    {"name": "greeting", "type": "string", "default": "hello", "help": "What to write"},
    {"name": "count", "type": "integer", "default": 2},
    {"name": "verbose", "type": "boolean", "default": False},
    {"name": "level", "type": "choice", "choices": ["low", "high"], "required": True},
    {"name": "api_token", "type": "string", "secret": True},
]
SECRET = "s3cr3t-value-never-shown"
FACTS = str(EXAMPLES_DIR / "facts")


class World:
    def __init__(self):
        self.staff = UserFactory(username="wf-staff", is_staff=True, is_superuser=True)
        self.owner = UserFactory(username="wf-owner")
        self.stranger = UserFactory(username="wf-stranger")
        self.project = ProjectFactory(name="wf-team")
        self.other_project = ProjectFactory(name="wf-elsewhere")
        self.members = {}
        for role in ("viewer", "operator", "admin"):
            self.members[role] = UserFactory(username=f"wf-{role}")
            Membership.objects.create(project=self.project, user=self.members[role], role=role)
        hv = HypervisorFactory(name="wf-hv")
        active = {"hypervisor": hv, "status": Status.ACTIVE, "owner": self.owner}
        self.vm = MachineFactory(name="web1", project=self.project, **active)
        self.vm2 = MachineFactory(name="web2", project=self.project, **active)
        self.private = MachineFactory(name="owners-own", **active)
        self.theirs = MachineFactory(name="strangers", **{**active, "owner": self.stranger})
        self.lab = Lab.objects.create(name="wflab", owner=self.owner, project=self.project)
        LabMachine.objects.create(lab=self.lab, machine=self.vm, group="web")
        LabMachine.objects.create(lab=self.lab, machine=self.vm2, group="web")
        self.workflow = services.workflow_register(
            actor=self.staff,
            name="write-a-file",
            description="Writes a file and reads facts.",
            directory=str(EXAMPLES_DIR / "file-and-command"),
            variables=VARIABLES,
            groups=["all"],
        )
        self.elsewhere = services.workflow_register(
            actor=self.staff, name="their-only", project=self.other_project, directory=FACTS
        )

    def client(self, user) -> Client:
        c = Client()
        c.force_login(user)
        return c

    def run(self, *, actor=None, machines=None, lab=None, **variables) -> WorkflowRun:
        return services.workflow_run_start(
            workflow=self.workflow,
            actor=actor or self.owner,
            machines=[self.vm] if machines is None else machines,
            lab=lab,
            variables={"level": "low", "api_token": SECRET, **variables},
        )


@pytest.fixture
def world(db, settings, tmp_path):
    settings.PORTAL_WORKFLOW_RUN_DIR = tmp_path / "runs"
    return World()


def add_events(run: WorkflowRun, start: int = 1) -> list[WorkflowEvent]:
    """What ansible-runner reports for one play of three tasks on web1 (written as the engine writes them)."""
    rows = [
        ("playbook_on_play_start", "", "", "", {}),
        ("playbook_on_task_start", "", "Gathering Facts", "", {}),
        ("runner_on_ok", "web1", "Gathering Facts", "ok", {}),
        ("playbook_on_task_start", "", "write the file", "", {}),
        ("runner_on_ok", "web1", "write the file", "changed", {"msg": "file written"}),
        ("runner_on_failed", "web1", "read it back", "failed", {"msg": "no such file"}),
    ]
    stdout = {"playbook_on_play_start": "PLAY [Write a file] ****"}
    return [
        WorkflowEvent.objects.create(
            run=run, counter=start + i, event=e, host=h, task=t, status=s, data=d, stdout=stdout.get(e, "")
        )
        for i, (e, h, t, s, d) in enumerate(rows)
    ]
