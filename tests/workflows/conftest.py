from pathlib import Path

import pytest

from machines.models import Membership, Role
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory


@pytest.fixture
def run_dir(settings, tmp_path):
    settings.PORTAL_WORKFLOW_RUN_DIR = tmp_path / "runs"
    return settings.PORTAL_WORKFLOW_RUN_DIR


class PlaybookDir(str):
    """A directory's path holding a playbook.yml; called with a text (and a name), writes that playbook there
    and gives the path again."""

    def __call__(self, text: str, name: str = "playbook.yml") -> str:
        (Path(self) / name).write_text(text)
        return str(self)


@pytest.fixture
def playbook_dir(tmp_path):
    root = tmp_path / "playbooks"
    root.mkdir()
    directory = PlaybookDir(root)
    directory("- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
    return directory


@pytest.fixture
def team(db):
    """A project with an admin, an operator and a viewer, and two active machines of the operator's in it, on
    one hypervisor."""
    project = ProjectFactory(name="web-team")
    admin, operator, viewer = UserFactory(username="pat"), UserFactory(username="oscar"), UserFactory(username="vic")
    for user, role in ((admin, Role.ADMIN), (operator, Role.OPERATOR), (viewer, Role.VIEWER)):
        Membership.objects.create(project=project, user=user, role=role)
    hv = HypervisorFactory(name="kvm-a")
    web1 = MachineFactory(name="web1", owner=operator, project=project, hypervisor=hv, status=Status.ACTIVE)
    web2 = MachineFactory(name="web2", owner=operator, project=project, hypervisor=hv, status=Status.ACTIVE)
    return {
        "project": project,
        "admin": admin,
        "operator": operator,
        "viewer": viewer,
        "hv": hv,
        "machines": [web1, web2],
    }
