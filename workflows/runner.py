"""A workflow run carried out with ansible-runner: the only module that imports ansible_runner.

Each run gets a private data directory (mode 0700) under PORTAL_WORKFLOW_RUN_DIR, removed when the run ends
whatever happens:
- project/: the playbook's directory copied, or the git repository checked out at its ref (git, with a deadline);
- inventory/hosts.json: the run's targets only, as labs.inventory.build_inventory gives them to the run's creator
  (the same data as the inventory endpoint), each host's SSH checked against a known_hosts file of its own;
- env/ssh_key: the project's private key (ansible-runner hands it to an ssh-agent and removes the file);
- env/extravars: the public and secret values, every text marked !unsafe so Ansible never templates what a
  user typed (a `{{ lookup('pipe', …) }}` would otherwise run on the portal host);
- known_hosts: the host keys the guests printed at first boot (StrictHostKeyChecking=yes for those hosts;
  accept-new for the others, which the run's message says).

Every event is stored as it comes (WorkflowEvent), with each secret value replaced by ******** in its output
and data, and so is the whole output at the end. A cancel (or the deadline) stops ansible-playbook and every
process under it: Ansible's workers leave its process group (they call setsid), so the tree is found by parent
links, stopped, then killed, before ansible-runner kills the group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ansible_runner
from django.conf import settings
from django.db import IntegrityError, transaction

from labs.inventory import build_inventory
from machines import access, attempts, hostkeys
from machines import services as machine_services
from machines.models import MachineObserved
from workflows.models import Workflow, WorkflowEvent, WorkflowRun

log = logging.getLogger(__name__)

MASK = "********"
EVENT_STDOUT_MAX = 8000  # characters of one event's output kept
EVENT_DATA_MAX = 16000  # characters of one event's result (as JSON) kept whole; beyond, its main keys trimmed
STDOUT_MAX = 4 * 1024 * 1024  # characters of a run's whole output kept (head and tail)
POLL_SECONDS = 1  # how often ansible-runner asks whether to stop (its pexpect timeout)
IDENT = "run"  # ansible-runner's artifact directory name inside the private data directory
PID_FILE = "ansible.pid"

_STATUS = {
    "runner_on_failed": "failed",
    "runner_item_on_failed": "failed",
    "runner_on_async_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
    "runner_item_on_skipped": "skipped",
}
_OK = {"runner_on_ok", "runner_item_on_ok", "runner_on_async_ok"}
_KEY_FACTS = (
    "hostname", "fqdn", "nodename", "machine_id", "distribution", "distribution_version", "distribution_release",
    "os_family", "architecture", "kernel", "python_version", "default_ipv4", "default_ipv6", "all_ipv4_addresses",
    "all_ipv6_addresses", "memtotal_mb", "processor_vcpus", "virtualization_type", "virtualization_role",
)  # fmt: skip


class RunError(Exception):
    """The run could not be carried out (its checkout, its targets, its key); the message is for the run's page."""


@dataclass
class Result:
    status: str
    rc: int | None
    summary: dict[str, dict[str, int]]
    stdout: str
    message: str


def run_dir(run_id: int) -> Path:
    return Path(settings.PORTAL_WORKFLOW_RUN_DIR) / f"run-{run_id}"


# --- Masking. ---


class Masker:
    """Replaces every secret value (as typed, and as JSON or Python would escape it) by ********."""

    def __init__(self, secrets: Iterable[object]) -> None:
        forms: set[str] = set()
        for value in secrets:
            text = str(value)
            if not text:
                continue
            forms |= {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1]}
            forms |= {text.replace("\n", "\r\n")}
        self.forms = sorted((f for f in forms if f), key=len, reverse=True)

    def text(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, MASK)
        return text

    def data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value


def _plain(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… ({len(text) - limit} characters left out) …\n{text[-half:]}"


def _trim_result(res: object) -> dict[str, Any]:
    if not isinstance(res, Mapping):
        return {}
    res = {k: v for k, v in res.items() if not str(k).startswith("_ansible") or k == "_ansible_no_log"}
    if len(json.dumps(res, default=str)) <= EVENT_DATA_MAX:
        return json.loads(json.dumps(res, default=str))
    kept: dict[str, Any] = {"_trimmed": True}
    for key in ("msg", "rc", "changed", "failed", "unreachable", "skipped", "stdout", "stderr", "cmd"):
        if key in res:
            value = res[key]
            kept[key] = _trim(value, 2000) if isinstance(value, str) else json.loads(json.dumps(value, default=str))
    facts = res.get("ansible_facts")
    if isinstance(facts, Mapping):  # gathered facts run to tens of kilobytes: the ones that say which machine
        wanted = {f"{prefix}{name}" for name in _KEY_FACTS for prefix in ("", "ansible_")}
        kept["ansible_facts"] = json.loads(json.dumps({k: v for k, v in facts.items() if k in wanted}, default=str))
    return kept


# --- Processes. ---


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        out[int(entry)] = int(fields[1])
    return out


def _tree(root: int) -> list[int]:
    """`root` (if alive) and every process under it, by parent links."""
    parents = _parents()
    if root not in parents:
        return []
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _top(pid: int) -> int:
    """The ancestor of `pid` that this process started (ansible-runner's child: ssh-agent's shell, or
    ansible-playbook itself), so the tree killed holds the agent too."""
    parents = _parents()
    me = os.getpid()
    for _ in range(8):
        ppid = parents.get(pid)
        if ppid is None or ppid == me or ppid <= 1:
            return pid
        pid = ppid
    return pid


def kill_tree(root: int) -> list[int]:
    """Stop `root` and everything under it (SIGSTOP until no new process appears, so nothing forks away),
    then SIGKILL them all. The pids killed."""
    seen: list[int] = []
    for _ in range(10):
        pids = [p for p in _tree(root) if p not in seen]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        seen += pids
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return seen


def _stop_control_masters(pdd: Path) -> None:
    """ssh's ControlPersist masters outlive ansible-playbook by a minute: ask each to exit."""
    cp = pdd / "cp"
    if not cp.is_dir():
        return
    for sock in cp.iterdir():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "portal-run"],
                capture_output=True,
                timeout=5,
                check=False,
            )


def clean_after_dead(run_id: int) -> None:
    """What a dead worker left of a run: ansible-playbook and its processes (if still running, by the pid and
    start time it recorded) and the private directory."""
    pdd = run_dir(run_id)
    with contextlib.suppress(OSError, ValueError):
        pid_text, started = (pdd / PID_FILE).read_text().split()
        pid = int(pid_text)
        if attempts._start_time(pid) == started:
            kill_tree(pid)
    _stop_control_masters(pdd)
    shutil.rmtree(pdd, ignore_errors=True)


# --- The private data directory. ---


def _git(args: list[str], *, cwd: Path | None, env: dict[str, str], timeout: float) -> None:
    proc = subprocess.Popen(
        ["git", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RunError(f"git {args[0]} took longer than {settings.PORTAL_WORKFLOW_GIT_TIMEOUT} s") from None
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip().splitlines()
        raise RunError(f"git {args[0]} failed: {' '.join(text[-3:])[:500]}")


def checkout(url: str, ref: str, dest: Path, pdd: Path) -> str:
    """Clone `url` into `dest` and check out `ref` (a branch, tag or commit; empty: the default branch), within
    PORTAL_WORKFLOW_GIT_TIMEOUT. The commit checked out."""
    deadline = time.monotonic() + settings.PORTAL_WORKFLOW_GIT_TIMEOUT
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(pdd),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "https:ssh:file",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_SSH_COMMAND": f"ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={pdd}/git_known_hosts",
    }

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    _git(["clone", "--quiet", "--no-checkout", "--", url, str(dest)], cwd=pdd, env=env, timeout=left())
    candidates = [ref, f"origin/{ref}", f"refs/tags/{ref}"] if ref else ["HEAD"]
    for candidate in candidates:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
            cwd=dest, env=env, capture_output=True, timeout=left(), check=False,
        )  # fmt: skip
        if found.returncode == 0:
            commit = found.stdout.decode().strip()
            _git(["checkout", "--quiet", "--detach", commit], cwd=dest, env=env, timeout=left())
            return commit
    raise RunError(f"git: no branch, tag or commit {ref} in {url}")


def _project(workflow: Workflow, pdd: Path) -> str:
    """project/ filled; a line for the run's message."""
    from workflows.services import playbook_inside

    dest = pdd / "project"
    if workflow.source == Workflow.Source.GIT:
        commit = checkout(workflow.git_url, workflow.git_ref, dest, pdd)
        note = f"checked out {workflow.git_url} at {commit[:12]}"
    else:
        source = Path(workflow.directory)
        if not source.is_dir():
            raise RunError(f"the workflow's directory {source} is gone")
        shutil.copytree(source, dest, symlinks=True)
        note = f"playbook from {source}"
    try:
        playbook_inside(dest, workflow.playbook)
    except Exception as e:
        raise RunError("; ".join(getattr(e, "messages", [str(e)]))) from None
    return note


def _yaml_value(value: Any) -> str:
    """One extra var as YAML: text !unsafe (never templated), numbers and booleans as JSON."""
    if isinstance(value, str):
        return "!unsafe " + json.dumps(value, ensure_ascii=False)
    return json.dumps(value)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _inventory(run: WorkflowRun, pdd: Path, overrides: Mapping[str, Any] | None) -> tuple[dict, str]:
    """The run's inventory (its targets only, as the creator sees them now) and a line about host keys."""
    user = run.created_by
    targets = list(run.machines.all())
    roles = access.project_roles(user)
    lost = [m.name for m in targets if not access.can(user, m, access.OPERATE, roles)]
    if lost:
        raise RunError(f"{user.get_username()} may no longer operate: {', '.join(sorted(lost))}")
    wanted = {m.pk for m in targets}
    full = build_inventory(user)
    hostvars = {h: v for h, v in full["_meta"]["hostvars"].items() if v.get("portal_id") in wanted}
    missing = wanted - {v["portal_id"] for v in hostvars.values()}
    if missing:
        names = sorted(m.name for m in targets if m.pk in missing)
        raise RunError(f"no longer in the inventory (being deleted?): {', '.join(names)}")
    keys = dict(MachineObserved.objects.filter(machine_id__in=wanted).values_list("machine_id", "ssh_host_keys"))
    for m in targets:  # a run right after a first boot: the keys may be on the console, not yet read
        if m.deploy_type == "image" and not (keys.get(m.pk) or "").strip():
            try:
                keys[m.pk] = machine_services.machine_host_keys(machine=m)
            except Exception:  # an unreachable hypervisor: the run goes on, accept-new, as without keys
                log.warning("could not read the host keys of %s from its console", m.name, exc_info=True)
    known, checked, accepted = [], [], []
    for host, hv in sorted(hostvars.items()):
        hv.update(overrides or {})
        address = str(hv.get("ansible_host") or host)
        port = int(hv.get("ansible_port") or 22)
        name = address if port == 22 else f"[{address}]:{port}"
        host_keys = (keys.get(hv["portal_id"]) or "").strip()
        if host_keys:
            known.append(hostkeys.known_hosts(host_keys, name))
            checked.append(host)
        else:
            accepted.append(host)
        strict = "yes" if host_keys else "accept-new"
        hv["ansible_ssh_common_args"] = (
            f"-o UserKnownHostsFile={pdd}/known_hosts -o GlobalKnownHostsFile=/dev/null"
            f" -o StrictHostKeyChecking={strict}"
        )
    _write(pdd / "known_hosts", "".join(known))
    # The YAML inventory plugin's shape (it reads .json too): every host with its variables under `all`, each
    # group the machines are in as a child of `all` listing its hosts.
    children: dict[str, Any] = {}
    for group, body in full.items():
        if group in ("_meta", "all"):
            continue
        hosts = [h for h in body.get("hosts", []) if h in hostvars]
        if hosts:
            children[group] = {"hosts": {h: {} for h in hosts}}
    inventory: dict[str, Any] = {"all": {"hosts": hostvars, "children": children}}
    said = []
    if checked:
        said.append(f"host keys checked for {', '.join(checked)}")
    if accepted:
        said.append(f"host keys accepted on first connection for {', '.join(accepted)} (none recorded)")
    return inventory, "; ".join(said)


def _project_key(run: WorkflowRun) -> str:
    if run.project is None:
        return ""
    from machines.projectkeys import project_keypair

    try:
        return project_keypair(run.project)[1]
    except ValueError as e:
        raise RunError(f"the project's SSH key: {e}") from None


def _prepare(
    run: WorkflowRun,
    pdd: Path,
    secrets: Mapping[str, Any],
    hostvars: Mapping[str, Any] | None,
    ssh_key: str | None,
) -> str:
    pdd.mkdir(parents=True, mode=0o700)
    os.chmod(pdd, 0o700)
    for sub in ("env", "inventory", "cp", "tmp", "home"):
        (pdd / sub).mkdir(mode=0o700)
    notes = [_project(run.workflow, pdd)]
    inventory, keys_note = _inventory(run, pdd, hostvars)
    if keys_note:
        notes.append(keys_note)
    _write(pdd / "inventory" / "hosts.json", json.dumps(inventory, indent=1, default=str))
    values = {**run.variables, **secrets}
    lines = "".join(f"{json.dumps(k)}: {_yaml_value(v)}\n" for k, v in values.items())
    _write(pdd / "env" / "extravars", lines or "{}\n")
    key = ssh_key if ssh_key is not None else _project_key(run)
    if key:
        _write(pdd / "env" / "ssh_key", key if key.endswith("\n") else key + "\n")
        notes.append("SSH with the project's key")
    return "; ".join(notes)


def _envvars(pdd: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # ansible-playbook, next to the worker's Python
    return {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(pdd / "home"),
        "ANSIBLE_HOME": str(pdd / "home"),
        "ANSIBLE_LOCAL_TEMP": str(pdd / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(pdd / "cp"),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
    }


# --- The run. ---


class _Run:
    """ansible-runner's callbacks for one run: events stored as they come, the stop check."""

    def __init__(self, run: WorkflowRun, pdd: Path, masker: Masker) -> None:
        self.run, self.pdd, self.masker = run, pdd, masker
        self.started = time.monotonic()
        self.pid: int | None = None
        self.stats: dict[str, Any] = {}
        self.stopped = ""  # "cancelled" or "timeout" once asked to stop
        self.store_errors = 0
        self.agents: list[tuple[int, str]] = []

    def stop_agents(self) -> None:
        for pid, started in self.agents:
            if attempts._start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def event(self, event: dict[str, Any]) -> bool:
        try:
            self._event(event)
        except Exception:  # never into ansible-runner's read loop: the run goes on, the run's message says so
            self.store_errors += 1
            log.exception("workflow run %s: storing event %s", self.run.pk, event.get("counter"))
        return False  # ansible-runner keeps no copy in the private directory (unmasked)

    def _event(self, event: dict[str, Any]) -> None:
        pid = event.get("pid")
        if self.pid is None and isinstance(pid, int):
            self.pid = _top(pid)
            _write(self.pdd / PID_FILE, f"{self.pid} {attempts._start_time(self.pid)}\n")
            # ansible-runner's ssh-agent (it holds the project's key) forks off before ansible-playbook starts and
            # would outlive the run by up to 10 s: noted now, stopped at the end.
            self.agents = [(p, attempts._start_time(p)) for p in _tree(self.pid) if _command(p) == "ssh-agent"]
        name = str(event.get("event", ""))
        data = event.get("event_data") or {}
        res_value = data.get("res")
        res: Mapping[str, Any] = res_value if isinstance(res_value, Mapping) else {}
        if name == "playbook_on_stats":
            self.stats = {
                k: data.get(k) or {} for k in ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")
            }
            stored: dict[str, Any] = self.masker.data(self.stats)
        else:
            stored = self.masker.data(_trim_result(res))
        status = _STATUS.get(name, "")
        if name in _OK:
            status = "changed" if res.get("changed") else "ok"
        counter = event.get("counter")
        if not isinstance(counter, int):
            return
        try:
            with transaction.atomic():
                WorkflowEvent.objects.create(
                    run=self.run,
                    counter=counter,
                    event=name[:50],
                    host=str(data.get("host") or "")[:255],
                    task=self.masker.text(str(data.get("task") or ""))[:500],
                    status=status,
                    stdout=self.masker.text(_trim(_plain(str(event.get("stdout") or "")), EVENT_STDOUT_MAX)),
                    data=stored,
                )
        except IntegrityError:
            pass  # the same counter twice: kept once

    def cancel(self) -> bool:
        if self.stopped:
            return True
        if time.monotonic() - self.started > settings.PORTAL_WORKFLOW_TIMEOUT:
            self.stopped = "timeout"
        elif WorkflowRun.objects.filter(pk=self.run.pk, cancel_requested=True).exists():
            self.stopped = "cancelled"
        if not self.stopped:
            return False
        if self.pid is not None:
            kill_tree(self.pid)  # before ansible-runner kills the group: Ansible's workers left it (setsid)
        return True

    def status(self, data: dict[str, Any], runner_config: object = None) -> None:
        if data.get("status") == "running":
            WorkflowRun.objects.filter(pk=self.run.pk).update(status_message=self.run.status_message)


def _summary(stats: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    names = {"ok": "ok", "changed": "changed", "failures": "failures", "dark": "unreachable", "skipped": "skipped"}
    names |= {"rescued": "rescued", "ignored": "ignored"}
    hosts = sorted({h for per_host in stats.values() for h in per_host})
    return {h: {label: int((stats.get(key) or {}).get(h, 0)) for key, label in names.items()} for h in hosts}


def execute(
    run: WorkflowRun,
    *,
    secrets: Mapping[str, Any],
    hostvars: Mapping[str, Any] | None = None,
    ssh_key: str | None = None,
) -> Result:
    """Carry out the run in this thread, to its end. RunError when it cannot start. `hostvars` are merged into
    every host's variables and `ssh_key` replaces the project's key: both for the test suite only."""
    pdd = run_dir(run.pk)
    masker = Masker(secrets.values())
    callbacks: _Run | None = None
    if pdd.exists():  # a previous attempt's, whose worker died
        shutil.rmtree(pdd, ignore_errors=True)
    try:
        try:
            note = _prepare(run, pdd, secrets, hostvars, ssh_key)
        except OSError as e:
            raise RunError(f"preparing the run's directory: {e}") from None
        run.status_message = masker.text(note)
        WorkflowRun.objects.filter(pk=run.pk).update(status_message=run.status_message)
        callbacks = _Run(run, pdd, masker)
        result = ansible_runner.run(
            private_data_dir=str(pdd),
            playbook=run.workflow.playbook,
            ident=IDENT,
            event_handler=callbacks.event,
            cancel_callback=callbacks.cancel,
            status_handler=callbacks.status,
            envvars=_envvars(pdd),
            settings={"pexpect_timeout": POLL_SECONDS, "suppress_ansible_output": True},
            quiet=True,
        )
        if callbacks.pid is not None and callbacks.stopped:
            kill_tree(callbacks.pid)  # anything that slipped between the stop and ansible-runner's kill
        try:
            stdout = (pdd / "artifacts" / IDENT / "stdout").read_text(errors="replace")
        except OSError:
            stdout = ""
        stdout = masker.text(_trim(_plain(stdout), STDOUT_MAX))
        summary = _summary(callbacks.stats)
        message = run.status_message
        if callbacks.store_errors:
            message += f"; {callbacks.store_errors} events could not be stored"
        if callbacks.stopped == "cancelled":
            status, message = WorkflowRun.Status.CANCELLED, f"cancelled; {message}"
        elif callbacks.stopped == "timeout":
            status = WorkflowRun.Status.FAILED
            message = f"stopped after {settings.PORTAL_WORKFLOW_TIMEOUT} s (PORTAL_WORKFLOW_TIMEOUT); {message}"
        elif result.status == "successful":
            status = WorkflowRun.Status.SUCCESSFUL
        elif result.status == "failed":
            status = WorkflowRun.Status.FAILED
            failed = sorted(h for h, s in summary.items() if s["failures"] or s["unreachable"])
            if failed:
                message = f"failed on {', '.join(failed)}; {message}"
            elif not summary:
                message = f"ansible-playbook ended with rc {result.rc} before any task; {message}"
        else:
            status = WorkflowRun.Status.ERROR
            message = f"ansible-runner ended {result.status}; {message}"
        return Result(status=status, rc=result.rc, summary=summary, stdout=stdout, message=masker.text(message))
    finally:
        if callbacks is not None:
            callbacks.stop_agents()
        _stop_control_masters(pdd)
        shutil.rmtree(pdd, ignore_errors=True)
