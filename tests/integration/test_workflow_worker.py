"""Workflow runs through real Huey consumers: the session's worker takes a queued run and carries it out with
ansible-runner in its own thread (ansible-playbook found next to its Python), storing events as they come and
removing the private directory; a cancel from this process stops the run in the worker and leaves no process; and
a consumer SIGKILLed mid-run leaves ansible-playbook running, which the next consumer to start on that queue stops,
ending the run as error and removing its directory. The playbooks use `connection: local` (this machine is the
target), so no guest is needed; the real-guest path is tests/integration/test_workflows_real.py."""

import os
import time
from pathlib import Path

import pytest

from machines.models import Machine, Membership, Role
from machines.states import Status
from tests.conftest import wait_for
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory
from tests.integration.test_worker_death import OwnWorker
from workflows import runner, services, tasks
from workflows.models import WorkflowEvent, WorkflowRun

pytestmark = pytest.mark.integration

LOCAL_PLAY = (
    "- hosts: all\n  gather_facts: false\n  connection: local\n"
    "  vars: {ansible_python_interpreter: '{{ ansible_playbook_python }}'}\n  tasks:\n"
)


def _leftovers(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(f"{entry}: {cmdline}")
    return found


def _setup(tmp_path, playbook: str):
    staff = UserFactory(username="wf-staff", is_staff=True)
    operator = UserFactory(username="wf-operator")
    project = ProjectFactory(name="wf-project")
    Membership.objects.create(project=project, user=operator, role=Role.OPERATOR)
    hv = HypervisorFactory(name="wf-hv", uri="test:///default")
    machines = [
        MachineFactory(name=f"wf-{i}", owner=operator, project=project, hypervisor=hv, status=Status.ACTIVE)
        for i in (1, 2)
    ]
    directory = tmp_path / "playbooks"
    directory.mkdir()
    (directory / "playbook.yml").write_text(LOCAL_PLAY + playbook)
    workflow = services.workflow_register(actor=staff, name=f"wf-{tmp_path.name}"[:100], directory=str(directory))
    return operator, machines, workflow


@pytest.mark.engines
def test_the_worker_runs_a_queued_run_and_a_cancel_stops_it(worker, tmp_path):
    operator, machines, workflow = _setup(
        tmp_path, "    - name: Hello\n      ansible.builtin.command: echo hello from {{ inventory_hostname }}\n"
    )
    run = services.workflow_run_start(workflow=workflow, actor=operator, machines=machines, variables={})
    started = time.monotonic()
    done = wait_for(lambda: (r := WorkflowRun.objects.get(pk=run.pk)).status not in ("queued", "running") and r, 90)
    print(f"run {run.pk}: {done.status} in {time.monotonic() - started:.1f} s, {done.events.count()} events")
    assert done.status == "successful", (done.status_message, done.stdout)
    hello = WorkflowEvent.objects.filter(run=run, task="Hello", event="runner_on_ok").order_by("host")
    assert [(e.host, e.status) for e in hello] == [("wf-1", "changed"), ("wf-2", "changed")]
    assert hello[0].data["stdout"] == "hello from wf-1"
    assert done.attempt_id and "SSH with the project's key" in done.status_message
    assert not runner.run_dir(run.pk).exists()

    marker = f"{90 + os.getpid() % 1000 / 1000:.3f}"
    (Path(workflow.directory) / "playbook.yml").write_text(
        LOCAL_PLAY + f"    - name: Sleep\n      ansible.builtin.command: sleep {marker}\n"
    )
    long = services.workflow_run_start(workflow=workflow, actor=operator, machines=machines[:1], variables={})
    wait_for(lambda: _leftovers(f"sleep {marker}"), 90, message="the sleep task never started")
    asked = time.monotonic()
    services.workflow_run_cancel(run=long, actor=operator)
    ended = wait_for(lambda: (r := WorkflowRun.objects.get(pk=long.pk)).status != "running" and r, 30)
    took = time.monotonic() - asked
    print(f"run {long.pk}: {ended.status} {took:.1f} s after the cancel")
    assert ended.status == "cancelled" and took < 10
    time.sleep(0.5)
    assert _leftovers(f"sleep {marker}") == [] and _leftovers(str(runner.run_dir(long.pk))) == []
    assert not runner.run_dir(long.pk).exists()
    Machine.objects.filter(pk__in=[m.pk for m in machines]).delete()  # rows only: nothing of theirs is on a host


def test_a_worker_killed_mid_run_leaves_it_to_the_next_worker_which_ends_it(tmp_path, transactional_db, monkeypatch):
    marker = f"{120 + os.getpid() % 1000 / 1000:.3f}"
    operator, machines, workflow = _setup(
        tmp_path, f"    - name: Sleep\n      ansible.builtin.command: sleep {marker}\n"
    )
    own = OwnWorker(tmp_path)
    task = tasks.workflow_run_task
    monkeypatch.setattr("workflows.tasks.workflow_run_task", lambda run_id: None)  # queued below, on its queue
    run = services.workflow_run_start(workflow=workflow, actor=operator, machines=machines[:1], variables={})
    own.enqueue(task.s(run.pk))
    try:
        proc = own.start()
        wait_for(lambda: _leftovers(f"sleep {marker}"), 90, message="the sleep task never started")
        held = WorkflowRun.objects.get(pk=run.pk)
        assert held.status == "running" and f":{proc.pid}:" in held.attempt_id
        own.kill()
        time.sleep(1)
        assert _leftovers(f"sleep {marker}"), "ansible-playbook went with its worker: nothing left to recover"
        assert WorkflowRun.objects.get(pk=run.pk).status == "running"  # nothing ends it by itself

        restarted = own.start()
        ended = wait_for(lambda: (r := WorkflowRun.objects.get(pk=run.pk)).status != "running" and r, 60)
        print(f"run {run.pk}: {ended.status} after restart (pid {restarted.pid}): {ended.status_message}")
        assert ended.status == "error" and f"the worker running it stopped (pid {proc.pid})" in ended.status_message
        wait_for(lambda: not _leftovers(f"sleep {marker}"), 10, message="the dead worker's ansible-playbook lives on")
        assert not (own.data / "workflow-runs" / f"run-{run.pk}").exists()
    finally:
        own.stop()
