"""Real ansible-runner runs through workflow_run_execute (what the worker's task calls), against this machine
itself: the run's inventory is built from its machines as usual, and the test merges `ansible_connection: local`
into every host (the runner's test-only `hostvars`). A successful shipped workflow (changed, then ok on the second
run), facts, a failing task, an unreachable host over real ssh with a key, a cancelled run (no process left), a git
workflow checked out at a ref, and secrets masked everywhere they could show."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import connection

from machines.models import MachineObserved
from portal.models import AuditEvent
from workflows import services
from workflows.models import Workflow, WorkflowEvent, WorkflowRun

LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def _start(team, workflow, variables=None, machines=None):
    return services.workflow_run_start(
        workflow=workflow, actor=team["operator"], machines=machines or team["machines"][:1], variables=variables or {}
    )


def _execute(run, **kw):
    services.workflow_run_execute(run.pk, hostvars=kw.pop("hostvars", LOCAL), **kw)
    run.refresh_from_db()
    return run


def _events(run, **filters):
    return list(WorkflowEvent.objects.filter(run=run, **filters).order_by("counter"))


def _example(staff, name):
    services.workflow_examples_register()
    return Workflow.objects.get(name=name, project=None)


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


@pytest.mark.django_db
def test_file_and_command_writes_then_reads_back_and_a_second_run_changes_nothing(team, staff, run_dir, tmp_path):
    wf = _example(staff, "file-and-command")
    target = tmp_path / "hello.txt"
    values = {"path": str(target), "content": "from the portal", "command": "cat " + str(target)}
    first = _execute(_start(team, wf, values))
    assert first.status == "successful", first.stdout
    assert first.rc == 0 and target.read_text() == "from the portal\n"
    write = _events(first, task="Write the file", event="runner_on_ok")
    assert [(e.host, e.status) for e in write] == [("web1", "changed")]
    shown = _events(first, task="Show the file", event="runner_on_ok")[0]
    assert "holds: from the portal" in shown.stdout
    output = _events(first, task="Show its output", event="runner_on_ok")[0]
    assert output.data["ran.stdout_lines"] == ["from the portal"]
    assert first.summary == {
        "web1": {"ok": 5, "changed": 1, "failures": 0, "unreachable": 0, "skipped": 0, "rescued": 0, "ignored": 0}
    }
    assert "TASK [Write the file]" in first.stdout and "PLAY RECAP" in first.stdout and "\r" not in first.stdout
    assert "host keys accepted on first connection for web1" in first.status_message
    counters = [e.counter for e in _events(first)]
    assert counters == sorted(counters) and len(counters) == len(set(counters)) > 10
    second = _execute(_start(team, wf, values))
    assert second.status == "successful"
    assert [e.status for e in _events(second, task="Write the file", event="runner_on_ok")] == ["ok"]
    assert second.summary["web1"]["changed"] == 0
    assert not run_dir.exists() or not any(run_dir.iterdir())  # each private directory removed
    ends = AuditEvent.objects.filter(action="workflow.run_end", outcome="success")
    assert ends.count() == 2 and "web1:ok=5,changed=1" in ends.order_by("pk").first().detail


@pytest.mark.django_db
def test_facts_waits_gathers_and_prints_the_hostname(team, staff, run_dir):
    run = _execute(_start(team, _example(staff, "facts"), {"wait_timeout": 30}))
    assert run.status == "successful", run.stdout
    printed = _events(run, task="Print the hostname", event="runner_on_ok")[0]
    assert f"hostname={socket.gethostname()}" in printed.data["msg"]
    gathered = _events(run, task="Gather facts", event="runner_on_ok")[0]
    assert gathered.status == "ok" and gathered.data["ansible_facts"]["ansible_hostname"] == socket.gethostname()
    if gathered.data.get("_trimmed"):  # over 16000 characters (this host's interfaces and mounts): the key facts
        assert {"ansible_distribution", "ansible_all_ipv4_addresses"} <= set(gathered.data["ansible_facts"])


@pytest.mark.django_db
def test_the_private_directory_is_0700_with_the_targets_only_and_values_never_templated(
    team, staff, playbook_dir, run_dir
):
    directory = playbook_dir(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.stat: {path: '{{ playbook_dir }}/..'}\n      register: pdd\n"
        "    - ansible.builtin.debug: {msg: \"mode={{ pdd.stat.mode }} hosts={{ groups['all'] | sort | join(',') }}\"}\n"
        "    - ansible.builtin.debug: {msg: 'typed={{ typed }}'}\n"
    )
    wf = services.workflow_register(actor=staff, name="inspect", directory=directory, variables=[{"name": "typed"}])
    run = _execute(_start(team, wf, {"typed": "{{ lookup('pipe', 'id') }}"}, machines=team["machines"]))
    assert run.status == "successful", run.stdout
    msgs = [e.data.get("msg", "") for e in _events(run, event="runner_on_ok", host="web1")]
    assert "mode=0700 hosts=web1,web2" in msgs
    assert "typed={{ lookup('pipe', 'id') }}" in msgs  # the text as typed: never run on the portal host
    assert "uid=" not in run.stdout


@pytest.mark.django_db
def test_a_failing_task_fails_the_run_with_its_output_kept(team, staff, playbook_dir, run_dir):
    directory = playbook_dir(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Say something\n      ansible.builtin.command: echo before the failure\n"
        "    - name: Fail\n      ansible.builtin.command: sh -c 'echo it broke >&2; exit 3'\n"
        "    - name: Never reached\n      ansible.builtin.debug: {msg: unreachable}\n"
    )
    wf = services.workflow_register(actor=staff, name="fails", directory=directory)
    run = _execute(_start(team, wf))
    assert run.status == "failed" and run.rc not in (0, None)  # ansible-core 2.19: 5 here
    assert "failed on web1" in run.status_message, run.stdout
    failed = _events(run, event="runner_on_failed")
    assert [(e.task, e.host, e.status) for e in failed] == [("Fail", "web1", "failed")]
    assert failed[0].data["rc"] == 3 and failed[0].data["stderr"] == "it broke"
    assert "fatal: [web1]" in run.stdout and "it broke" in run.stdout
    assert not _events(run, task="Never reached", event="runner_on_ok")
    assert run.summary["web1"]["failures"] == 1


@pytest.mark.django_db
def test_an_unreachable_host_fails_the_run_with_an_unreachable_event(team, staff, playbook_dir, run_dir):
    """Over real ssh, with a key in env/ssh_key (ansible-runner's ssh-agent), to a port nothing listens on; the
    guest's recorded host keys make the check strict."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    host_key = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    MachineObserved.objects.create(machine=team["machines"][0], ssh_host_keys=host_key.decode() + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    wf = services.workflow_register(actor=staff, name="unreachable", directory=playbook_dir)
    hostvars = {"ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "nobody", "ansible_ssh_retries": 0}
    run = _execute(_start(team, wf), hostvars=hostvars, ssh_key=pem.decode())
    assert run.status == "failed", run.stdout
    assert [(e.host, e.status) for e in _events(run, event="runner_on_unreachable")] == [("web1", "unreachable")]
    assert run.summary["web1"]["unreachable"] == 1
    assert "UNREACHABLE!" in run.stdout and "Connection refused" in run.stdout
    assert "host keys checked for web1" in run.status_message and "SSH with the project's key" in run.status_message
    assert "PRIVATE KEY" not in run.stdout
    time.sleep(0.5)
    assert _leftovers(str(run_dir)) == []  # ansible-runner's ssh-agent (holding the key) is stopped too


@pytest.mark.django_db
def test_secrets_are_masked_in_the_output_and_the_events(team, staff, playbook_dir, run_dir):
    secret = 'pa$$ "quoted" s3cr3t'
    directory = playbook_dir(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.debug: {msg: 'the token is {{ token }}'}\n"
        "    - name: Echo it\n      ansible.builtin.command: {argv: [echo, '{{ token }}']}\n      register: echoed\n"
        "    - ansible.builtin.debug: {var: echoed}\n"
        "    - name: 'Named {{ token }}'\n      ansible.builtin.debug: {msg: done}\n"
    )
    wf = services.workflow_register(
        actor=staff,
        name="secretive",
        directory=directory,
        variables=[{"name": "token", "secret": True, "required": True}],
    )
    run = _execute(_start(team, wf, {"token": secret}))
    assert run.status == "successful", run.stdout
    assert "the token is ********" in run.stdout
    stored = json.dumps(list(WorkflowEvent.objects.filter(run=run).values()), default=str)
    stored += json.dumps(list(WorkflowRun.objects.filter(pk=run.pk).values()), default=str)
    stored += json.dumps(list(AuditEvent.objects.values()), default=str)
    for form in (secret, json.dumps(secret)[1:-1], "s3cr3t"):
        assert form not in stored and form not in run.stdout
    echoed = _events(run, task="Echo it", event="runner_on_ok")[0]
    assert echoed.data["stdout"] == "********" and echoed.data["cmd"] == ["echo", "********"]
    assert "********" in stored


@pytest.mark.django_db
def test_a_git_workflow_is_checked_out_at_its_ref(team, staff, tmp_path, run_dir):
    repo = tmp_path / "repo"
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    repo.mkdir()
    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (repo / "site.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: {msg: version one}\n"
    )
    git("add", ".")
    git("commit", "-qm", "one")
    git("tag", "v1")
    (repo / "site.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: {msg: version two}\n"
    )
    git("commit", "-qam", "two")
    wf = services.workflow_register(
        actor=staff, name="from-git", source="git", git_url=f"file://{repo}", git_ref="v1", playbook="site.yml"
    )
    run = _execute(_start(team, wf))
    assert run.status == "successful", (run.status_message, run.stdout)
    assert "version one" in run.stdout and f"checked out file://{repo} at" in run.status_message
    wf.git_ref = "main"
    wf.save()
    assert "version two" in _execute(_start(team, wf)).stdout
    wf.git_ref = "no-such-branch"
    wf.save()
    missing = _execute(_start(team, wf))
    assert missing.status == "error" and "no branch, tag or commit no-such-branch" in missing.status_message


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_run_stops_within_seconds_and_leaves_no_process(team, staff, playbook_dir, run_dir, monkeypatch):
    monkeypatch.setattr("workflows.tasks.workflow_run_task", lambda run_id: None)  # committed here: this test runs it
    marker = f"{60 + os.getpid() % 1000 / 1000:.3f}"  # `sleep 60.xyz`: this test's own, to look for afterwards
    directory = playbook_dir(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Before\n      ansible.builtin.debug: {msg: starting}\n"
        f"    - name: Sleep\n      ansible.builtin.command: sleep {marker}\n"
        "    - name: After\n      ansible.builtin.debug: {msg: never}\n"
    )
    wf = services.workflow_register(actor=staff, name="sleeper", directory=directory)
    run = _start(team, wf)

    def work():
        try:
            services.workflow_run_execute(run.pk, hostvars=LOCAL)
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not _leftovers(f"sleep {marker}"):
            now = WorkflowRun.objects.filter(pk=run.pk).values("status", "status_message", "stdout").get()
            assert time.monotonic() < deadline and now["status"] in ("queued", "running"), now
            time.sleep(0.2)
        assert WorkflowRun.objects.get(pk=run.pk).status == "running"
        asked = time.monotonic()
        services.workflow_run_cancel(run=run, actor=team["operator"])
        worker.join(timeout=30)
        took = time.monotonic() - asked
    finally:
        worker.join(timeout=60)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.rc == 254 and took < 10, took
    assert run.status_message.startswith("cancelled")
    assert _events(run, task="Before", event="runner_on_ok") and not _events(run, task="After")
    assert "TASK [Sleep]" in run.stdout
    time.sleep(0.5)
    assert _leftovers(f"sleep {marker}") == [] and _leftovers(str(run_dir)) == []
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.django_db
def test_a_run_past_its_deadline_is_stopped_and_fails(team, staff, playbook_dir, run_dir, settings):
    settings.PORTAL_WORKFLOW_TIMEOUT = 2
    marker = f"{70 + os.getpid() % 1000 / 1000:.3f}"
    directory = playbook_dir(
        f"- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.command: sleep {marker}\n"
    )
    wf = services.workflow_register(actor=staff, name="slow", directory=directory)
    started = time.monotonic()
    run = _execute(_start(team, wf))
    assert run.status == "failed" and "stopped after 2 s (PORTAL_WORKFLOW_TIMEOUT)" in run.status_message
    assert time.monotonic() - started < 15
    time.sleep(0.5)
    assert _leftovers(f"sleep {marker}") == []


@pytest.mark.django_db
def test_a_git_checkout_that_hangs_is_given_up_after_its_deadline(team, staff, run_dir, settings):
    settings.PORTAL_WORKFLOW_GIT_TIMEOUT = 2
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts, never answers: the TLS handshake waits forever
    try:
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/ops.git"
        wf = services.workflow_register(actor=staff, name="hangs", source="git", git_url=url)
        started = time.monotonic()
        run = _execute(_start(team, wf))
    finally:
        silent.close()
    assert run.status == "error" and run.status_message == "git clone took longer than 2 s"
    assert time.monotonic() - started < 10
    assert _leftovers(url) == [] and not WorkflowEvent.objects.filter(run=run).exists()


@pytest.mark.django_db
def test_the_private_directory_holds_the_projects_key_the_host_keys_and_the_values(team, staff, playbook_dir, tmp_path):
    """What the runner writes before ansible-runner starts (read here before the run would remove it)."""
    from machines.projectkeys import project_keypair
    from workflows import runner

    web1, web2 = team["machines"]
    host_key = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    MachineObserved.objects.create(machine=web1, ssh_host_keys=host_key + "\n")
    wf = services.workflow_register(
        actor=staff, name="inspect", directory=playbook_dir,
        variables=[{"name": "note"}, {"name": "count", "type": "integer"}, {"name": "token", "secret": True}],
    )  # fmt: skip
    run = _start(team, wf, {"note": "{{ x }}", "count": "3", "token": "t0ken"}, machines=[web1, web2])
    pdd = tmp_path / "pdd"
    note = runner._prepare(run, pdd, {"token": "t0ken"}, {"ansible_host": "192.0.2.7"}, None)
    assert (pdd.stat().st_mode & 0o777) == 0o700
    assert "host keys checked for web1; host keys accepted on first connection for web2 (none recorded)" in note
    assert (pdd / "env" / "ssh_key").read_text().strip() == project_keypair(team["project"])[1].strip()
    assert (pdd / "env" / "ssh_key").stat().st_mode & 0o777 == 0o600
    assert (pdd / "known_hosts").read_text() == f"192.0.2.7 {host_key}\n"
    inventory = json.loads((pdd / "inventory" / "hosts.json").read_text())
    hosts = inventory["all"]["hosts"]
    assert sorted(hosts) == ["web1", "web2"]
    assert "StrictHostKeyChecking=yes" in hosts["web1"]["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=accept-new" in hosts["web2"]["ansible_ssh_common_args"]
    assert f"UserKnownHostsFile={pdd}/known_hosts" in hosts["web2"]["ansible_ssh_common_args"]
    assert inventory["all"]["children"]["project_web_team"]["hosts"] == {"web1": {}, "web2": {}}
    assert (pdd / "env" / "extravars").read_text().splitlines() == [
        '"note": !unsafe "{{ x }}"', '"count": 3', '"token": !unsafe "t0ken"'
    ]  # fmt: skip


@pytest.mark.django_db
def test_packages_with_what_is_installed_already_changes_nothing(team, staff, run_dir):
    """The shipped `packages` workflow, with packages this host has (so nothing is installed), through apt on
    the system's Python (python3-apt), as root without sudo."""
    wf = _example(staff, "packages")
    hostvars = {**LOCAL, "ansible_python_interpreter": "/usr/bin/python3"}
    run = _execute(_start(team, wf, {"packages": "coreutils, bash", "become": "false"}), hostvars=hostvars)
    assert run.status == "successful", run.stdout
    installed = _events(run, task="Install packages", event="runner_on_ok")
    assert [(e.host, e.status) for e in installed] == [("web1", "ok")]


@pytest.mark.django_db
def test_a_run_right_after_a_first_boot_reads_the_host_keys_from_the_console_first(
    team, staff, playbook_dir, tmp_path, monkeypatch
):
    """No keys recorded yet for an image machine: the runner asks machine_host_keys, which reads the serial log
    now, so the first run after a boot checks the guest's keys instead of accepting whatever answers."""
    from machines import services as machine_services
    from workflows import runner

    web1, web2 = team["machines"]
    host_key = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    asked = []

    def from_console(*, machine):
        asked.append(machine.name)
        return host_key if machine.pk == web2.pk else ""

    monkeypatch.setattr(machine_services, "machine_host_keys", from_console)
    wf = services.workflow_register(actor=staff, name="first-boot", directory=playbook_dir)
    run = _start(team, wf, {}, machines=[web1, web2])
    pdd = tmp_path / "pdd"
    runner._prepare(run, pdd, {}, {"ansible_host": "192.0.2.8"}, None)
    assert sorted(asked) == ["web1", "web2"]
    hosts = json.loads((pdd / "inventory" / "hosts.json").read_text())["all"]["hosts"]
    assert "StrictHostKeyChecking=yes" in hosts["web2"]["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=accept-new" in hosts["web1"]["ansible_ssh_common_args"]
    assert (pdd / "known_hosts").read_text() == f"192.0.2.8 {host_key}\n"
