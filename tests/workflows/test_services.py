"""workflows.services without running Ansible: who registers what (staff, a project's admins; directories for
staff; no path out of the directory; git URLs), who starts and cancels runs on which machines, the limits per
project and per hypervisor, secrets stored only encrypted and never audited, the examples' registration, and
runs a dead worker left running."""

import json
import os
import subprocess

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from labs.services import lab_add_machine, lab_get_or_create
from machines import attempts, crypto
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory
from workflows import runner, services
from workflows.models import Workflow, WorkflowRun
from workflows.services import WorkflowRefused

pytestmark = pytest.mark.django_db

SECRET_SCHEMA = [
    {"name": "greeting", "type": "string", "default": "hello"},
    {"name": "token", "type": "string", "secret": True, "required": True},
]


@pytest.fixture
def workflow(staff, playbook_dir):
    return services.workflow_register(
        actor=staff, name="ping", directory=playbook_dir("- hosts: all\n  tasks: []\n"), variables=SECRET_SCHEMA
    )


# --- Registering. ---


def test_staff_register_directory_workflows_for_everyone(staff, playbook_dir):
    wf = services.workflow_register(
        actor=staff, name="ping", description="pings", directory=playbook_dir, groups=["all", "web"],
        variables=[{"name": "n", "type": "integer", "default": 1}],
    )  # fmt: skip
    assert (wf.project, wf.source, wf.playbook, wf.groups, wf.created_by) == (
        None,
        "directory",
        "playbook.yml",
        ["all", "web"],
        staff,
    )
    assert wf.variables[0]["default"] == 1
    record = AuditEvent.objects.get(action="workflow.register")
    assert record.outcome == "success" and "source=directory" in record.detail
    with pytest.raises(ValidationError) as e:
        services.workflow_register(actor=staff, name="ping", directory=playbook_dir)
    assert "already offered to everyone" in str(e.value)


def test_project_admins_register_their_projects_git_workflows_only(team, playbook_dir):
    admin, project = team["admin"], team["project"]
    wf = services.workflow_register(
        actor=admin, name="deploy", project=project, source="git", git_url="https://git.example.org/ops.git",
        git_ref="v1.2",
    )  # fmt: skip
    assert wf.project == project and wf.git_ref == "v1.2"
    with pytest.raises(WorkflowRefused, match="Only staff register workflows from a directory"):
        services.workflow_register(actor=admin, name="local", project=project, directory=playbook_dir)
    with pytest.raises(WorkflowRefused, match="Only staff register workflows for everyone"):
        services.workflow_register(actor=admin, name="global", source="git", git_url="https://git.example.org/x.git")
    for user in (team["operator"], team["viewer"], UserFactory()):
        with pytest.raises(WorkflowRefused):
            services.workflow_register(
                actor=user, name="nope", project=project, source="git", git_url="https://git.example.org/x.git"
            )
    assert AuditEvent.objects.filter(action="workflow.register", outcome="refused").count() == 5


def test_a_playbook_stays_inside_its_directory(staff, playbook_dir, tmp_path):
    directory = playbook_dir
    (tmp_path / "outside.yml").write_text("- hosts: all\n")
    os.symlink(tmp_path / "outside.yml", tmp_path / "playbooks" / "link.yml")
    for playbook, message in (
        ("../outside.yml", "no .., not absolute"),
        ("/etc/passwd.yml", "no .., not absolute"),
        ("link.yml", "leads out of the workflow's directory"),
        ("missing.yml", "is not a file"),
        ("playbook.txt", ".yml or .yaml"),
    ):
        with pytest.raises(ValidationError) as e:
            services.workflow_register(actor=staff, name="x", directory=directory, playbook=playbook)
        assert message in str(e.value), playbook
    for directory_value, message in (("relative/dir", "absolute path"), ("/nonexistent-wf-dir", "is not a directory")):
        with pytest.raises(ValidationError) as e:
            services.workflow_register(actor=staff, name="x", directory=directory_value)
        assert message in str(e.value)


@pytest.mark.parametrize(
    ("url", "ref", "ok"),
    [
        ("https://git.example.org/ops.git", "main", True),
        ("ssh://git@git.example.org/ops.git", "", True),
        ("git@git.example.org:ops/playbooks.git", "release/2.1", True),
        ("file:///srv/git/ops.git", "0123abcd", True),
        ("http://git.example.org/ops.git", "", False),
        ("ftp://git.example.org/ops.git", "", False),
        ("ext::sh -c touch% /tmp/pwned", "", False),
        ("-uhttps://x", "", False),
        ("https:///nohost.git", "", False),
        ("https://git.example.org/ops.git", "--upload-pack=evil", False),
        ("https://git.example.org/ops.git", "a..b", False),
    ],
)
def test_git_urls_are_https_ssh_or_file_and_refs_plain(staff, url, ref, ok):
    call = lambda: services.workflow_register(actor=staff, name="g", source="git", git_url=url, git_ref=ref)  # noqa: E731
    if ok:
        assert call().git_url == url
    else:
        with pytest.raises(ValidationError):
            call()


def test_update_keeps_the_rules_and_the_examples_register_once(staff, playbook_dir):
    wf = services.workflow_register(actor=staff, name="ping", directory=playbook_dir)
    wf = services.workflow_update(workflow=wf, actor=staff, name="ping2", directory=playbook_dir, enabled=False)
    assert (wf.name, wf.enabled) == ("ping2", False)
    call_command("workflow_examples", stdout=open(os.devnull, "w"))
    names = set(Workflow.objects.filter(project=None).values_list("name", flat=True))
    assert {"facts", "packages", "file-and-command"} <= names
    first = {w.name: w.updated for w in Workflow.objects.all()}
    assert services.workflow_examples_register() == [
        "facts: unchanged", "file-and-command: unchanged", "packages: unchanged"
    ]  # fmt: skip
    assert {w.name: w.updated for w in Workflow.objects.all()} == first
    packages = Workflow.objects.get(name="packages")
    assert [v["name"] for v in packages.variables] == ["packages", "state", "become"]


# --- Starting runs. ---


def test_an_operator_starts_a_run_with_secrets_kept_encrypted_and_out_of_the_audit(
    team, workflow, django_capture_on_commit_callbacks, monkeypatch
):
    queued = []
    monkeypatch.setattr("workflows.tasks.workflow_run_task", lambda run_id: queued.append(run_id))
    with django_capture_on_commit_callbacks(execute=True):
        run = services.workflow_run_start(
            workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "hunter2-s3cr3t"}
        )
    assert queued == [run.pk]
    run.refresh_from_db()
    assert run.status == "queued" and run.project == team["project"] and run.created_by == team["operator"]
    assert run.variables == {"greeting": "hello"}
    assert "hunter2" not in run.secrets_encrypted and json.loads(crypto.decrypt(run.secrets_encrypted)) == {
        "token": "hunter2-s3cr3t"
    }
    assert sorted(m.name for m in run.machines.all()) == ["web1", "web2"]
    record = AuditEvent.objects.get(action="workflow.run", outcome="success")
    assert (
        "machines=web1,web2" in record.detail
        and '"greeting": "hello"' in record.detail
        and "secrets=token" in record.detail
    )
    assert not AuditEvent.objects.filter(detail__contains="hunter2").exists()
    row = WorkflowRun.objects.filter(pk=run.pk).values().get()
    assert "hunter2" not in json.dumps(row, default=str)


def test_a_lab_gives_its_machines(team, workflow):
    lab = lab_get_or_create(name="lab1", owner=team["operator"], project=team["project"])
    for m in team["machines"]:
        lab_add_machine(lab=lab, machine=m, group="provisioned_vms")
    run = services.workflow_run_start(workflow=workflow, actor=team["operator"], lab=lab, variables={"token": "x"})
    assert run.lab == lab and run.machines.count() == 2


def test_who_may_start_a_run_and_on_what(team, workflow):
    web1 = team["machines"][0]
    with pytest.raises(WorkflowRefused, match="operator needed"):
        services.workflow_run_start(workflow=workflow, actor=team["viewer"], machines=[web1], variables={"token": "x"})
    with pytest.raises(WorkflowRefused, match="no such machine"):
        services.workflow_run_start(workflow=workflow, actor=UserFactory(), machines=[web1], variables={"token": "x"})
    with pytest.raises(WorkflowRefused, match="at least one machine"):
        services.workflow_run_start(workflow=workflow, actor=team["operator"], variables={"token": "x"})
    with pytest.raises(ValidationError) as e:
        services.workflow_run_start(workflow=workflow, actor=team["operator"], machines=[web1], variables={"colour": 1})
    assert set(e.value.message_dict) == {"colour", "token"}
    web1.status = Status.DELETING
    web1.save()
    with pytest.raises(WorkflowRefused, match="web1 is deleting"):
        services.workflow_run_start(
            workflow=workflow, actor=team["operator"], machines=[web1], variables={"token": "x"}
        )
    own = MachineFactory(name="mine", owner=team["operator"], status=Status.ACTIVE)  # no project
    with pytest.raises(WorkflowRefused, match="all in one project"):
        services.workflow_run_start(
            workflow=workflow, actor=team["operator"], machines=[own, team["machines"][1]], variables={"token": "x"}
        )
    workflow.enabled = False
    workflow.save()
    with pytest.raises(WorkflowRefused, match="disabled"):
        services.workflow_run_start(workflow=workflow, actor=team["operator"], machines=[own], variables={"token": "x"})
    assert not WorkflowRun.objects.exists()
    assert AuditEvent.objects.filter(action="workflow.run", outcome="refused").count() == 7


def test_a_projects_workflow_runs_only_in_its_project(team, staff, playbook_dir):
    other = ProjectFactory(name="other")
    wf = services.workflow_register(actor=staff, name="theirs", project=other, directory=playbook_dir)
    with pytest.raises(WorkflowRefused, match="no such workflow"):
        services.workflow_run_start(workflow=wf, actor=team["operator"], machines=team["machines"], variables={})
    with pytest.raises(WorkflowRefused, match="belongs to project other; not in it: web1, web2"):
        services.workflow_run_start(workflow=wf, actor=staff, machines=team["machines"], variables={})
    ours = services.workflow_register(actor=staff, name="ours", project=team["project"], directory=playbook_dir)
    run = services.workflow_run_start(workflow=ours, actor=team["operator"], machines=team["machines"], variables={})
    assert run.project == team["project"]


def test_runs_are_limited_per_project_and_per_hypervisor(team, staff, workflow, settings):
    settings.PORTAL_WORKFLOW_RUNS_PER_PROJECT = 2
    settings.PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR = 3
    web1, web2 = team["machines"]
    start = lambda machines, actor=team["operator"]: services.workflow_run_start(  # noqa: E731
        workflow=workflow, actor=actor, machines=machines, variables={"token": "x"}
    )
    first, _ = start([web1]), start([web2])
    with pytest.raises(WorkflowRefused, match="project already has 2 workflow runs"):
        start([web1])
    # Another project's machine on the same hypervisor: the hypervisor's cap (3) holds across projects.
    elsewhere = MachineFactory(name="db1", owner=staff, hypervisor=team["hv"], status=Status.ACTIVE)
    start([elsewhere], actor=staff)
    with pytest.raises(WorkflowRefused, match="Hypervisor kvm-a already has 3 workflow runs"):
        start([MachineFactory(name="db2", owner=staff, hypervisor=team["hv"], status=Status.ACTIVE)], actor=staff)
    start([MachineFactory(name="db3", owner=staff, hypervisor=HypervisorFactory(), status=Status.ACTIVE)], actor=staff)
    # A run that ended frees its place.
    WorkflowRun.objects.filter(pk=first.pk).update(status="successful")
    assert start([web1]).status == "queued"


# --- Cancelling. ---


def test_cancel_a_queued_run_at_once_and_a_running_one_by_request(team, workflow):
    run = services.workflow_run_start(
        workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
    )
    with pytest.raises(WorkflowRefused, match="does not allow cancelling"):
        services.workflow_run_cancel(run=run, actor=team["viewer"])
    run = services.workflow_run_cancel(run=run, actor=team["admin"])
    assert run.status == "cancelled" and "cancelled by pat before it started" in run.status_message
    assert services.workflow_run_execute(run.pk) is None  # the task arrives later: nothing runs
    with pytest.raises(WorkflowRefused, match="The run is cancelled; there is nothing to cancel"):
        services.workflow_run_cancel(run=run, actor=team["operator"])
    running = services.workflow_run_start(
        workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
    )
    WorkflowRun.objects.filter(pk=running.pk).update(status="running")
    running = services.workflow_run_cancel(run=running, actor=team["operator"])
    assert running.status == "running" and running.cancel_requested
    assert AuditEvent.objects.filter(action="workflow.cancel", outcome="success").count() == 2


# --- A worker that died. ---


def test_runs_of_a_dead_worker_end_as_error_with_their_processes_and_directory(team, workflow, run_dir):
    run = services.workflow_run_start(
        workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_attempt = f"{attempts.new_id().split(':')[0]}:{dead.pid}:1:abc"
    WorkflowRun.objects.filter(pk=run.pk).update(status="running", attempt_id=dead_attempt)
    # What it left: its directory and an ansible-playbook that outlived it (a sleep standing in for it).
    pdd = runner.run_dir(run.pk)
    pdd.mkdir(parents=True)
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (pdd / runner.PID_FILE).write_text(f"{orphan.pid} {attempts._start_time(orphan.pid)}\n")
    live = services.workflow_run_start(
        workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
    )
    WorkflowRun.objects.filter(pk=live.pk).update(status="running", attempt_id=attempts.new_id())  # this process: alive
    try:
        assert services.workflow_runs_recover() == [f"workflow run {run.pk}: error (its worker stopped)"]
        assert orphan.wait(timeout=5) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    run.refresh_from_db()
    assert run.status == "error" and f"pid {dead.pid}" in run.status_message and run.finished
    assert not pdd.exists()
    assert WorkflowRun.objects.get(pk=live.pk).status == "running"
    assert services.workflow_runs_recover() == []
    assert AuditEvent.objects.filter(action="workflow.run_end", object_id=str(run.pk), outcome="failed").exists()


@pytest.mark.engines
@pytest.mark.django_db(transaction=True)
def test_starts_at_once_never_pass_the_limit_together(team, workflow, settings, monkeypatch):
    """Six starts in six threads (each its own connection and transaction) with room for two: exactly two runs."""
    import threading

    from django.db import connection

    settings.PORTAL_WORKFLOW_RUNS_PER_PROJECT = 2
    monkeypatch.setattr("workflows.tasks.workflow_run_task", lambda run_id: None)
    barrier, outcomes = threading.Barrier(6), []

    def start():
        try:
            barrier.wait()
            services.workflow_run_start(
                workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
            )
            outcomes.append("started")
        except WorkflowRefused as e:
            outcomes.append(str(e))
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes)[-2:] == ["started", "started"] and outcomes.count("started") == 2, outcomes
    assert all("project already has 2 workflow runs" in o for o in outcomes if o != "started")
    assert WorkflowRun.objects.filter(status="queued").count() == 2


def test_runs_long_past_their_deadline_end_as_lost(team, workflow, settings):
    from django.utils import timezone

    settings.PORTAL_WORKFLOW_TIMEOUT = 60
    old, recent = (
        services.workflow_run_start(
            workflow=workflow, actor=team["operator"], machines=team["machines"], variables={"token": "x"}
        )
        for _ in range(2)
    )
    WorkflowRun.objects.filter(pk=old.pk).update(
        status="running", started=timezone.now() - timezone.timedelta(seconds=400)
    )
    WorkflowRun.objects.filter(pk=recent.pk).update(
        status="running", started=timezone.now() - timezone.timedelta(seconds=300)
    )
    assert services.workflow_runs_expire() == [f"workflow run {old.pk}: error (lost)"]
    assert WorkflowRun.objects.get(pk=old.pk).status == "error"
    assert WorkflowRun.objects.get(pk=recent.pk).status == "running"
