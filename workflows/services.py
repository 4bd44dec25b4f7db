"""What changes workflows and their runs: registering a playbook, starting, cancelling and executing a run, and
ending the runs a dead worker left running.

A run's targets are checked here (the actor operates every one, all in the workflow's project when it has one,
in at most one project, active), its values by the workflow's schema (workflows/variables.py), and the limits per
project and per hypervisor under those rows' locks. Its secrets are stored only encrypted (machines/crypto.py),
and the audit records its targets and public values, never a secret. The worker's side is
workflow_run_execute(), which hands the run to workflows/runner.py (the only module that drives ansible-runner).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from hypervisors.models import Hypervisor
from labs.models import Lab
from labs.services import lab_level, labs_for
from machines import access, attempts, crypto
from machines.models import Machine, Project
from machines.states import Status
from portal import audit
from portal.refusals import Refusal
from workflows import runner, tasks
from workflows.models import Workflow, WorkflowRun
from workflows.variables import validate_schema

log = logging.getLogger(__name__)

ACTIVE = (WorkflowRun.Status.QUEUED, WorkflowRun.Status.RUNNING)
MAX_TARGETS = 200
_GROUP = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@+-]{0,199}$")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[A-Za-z0-9._/~-][^\s]*$")


class WorkflowRefused(Refusal):
    """A workflow or run request the portal will not carry out; the message is for the user."""


# --- The catalogue. ---


def _clean_playbook(playbook: str) -> str:
    path = PurePosixPath(playbook or "")
    if not playbook or path.is_absolute() or ".." in path.parts or "\x00" in playbook or playbook.startswith("-"):
        raise ValidationError(
            {"playbook": "The playbook is a path inside the workflow's directory (no .., not absolute)."}
        )
    if path.suffix not in (".yml", ".yaml"):
        raise ValidationError({"playbook": "The playbook is a .yml or .yaml file."})
    return str(path)


def playbook_inside(root: Path, playbook: str) -> Path:
    """The playbook's resolved path, which must be a file inside `root` (resolved too: a symlink out is refused)."""
    base = root.resolve()
    target = (base / playbook).resolve()
    if not target.is_relative_to(base):
        raise ValidationError({"playbook": f"{playbook} leads out of the workflow's directory."})
    if not target.is_file():
        raise ValidationError({"playbook": f"{playbook} is not a file in {root}."})
    return target


def _clean_git(url: str, ref: str) -> tuple[str, str]:
    url, ref = (url or "").strip(), (ref or "").strip()
    if not url or url.startswith("-") or any(c.isspace() or c == "\x00" for c in url) or len(url) > 500:
        raise ValidationError({"git_url": "A git URL: https://…, ssh://…, user@host:path or file:///…"})
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("https", "ssh", "file") and not (scheme == "" and _SCP_LIKE.match(url)):
        raise ValidationError({"git_url": "Only https://, ssh:// (or user@host:path) and file:// git URLs."})
    if scheme in ("https", "ssh") and not urlsplit(url).hostname:
        raise ValidationError({"git_url": "The git URL names no host."})
    if ref and (not _REF.match(ref) or ".." in ref or ref.endswith((".lock", "/"))):
        raise ValidationError(
            {"git_ref": "A branch, tag or commit: letters, digits and . _ / @ + - (not starting with -)."}
        )
    return url, ref


def _clean_definition(
    *,
    name: str,
    description: str,
    project: Project | None,
    source: str,
    directory: str,
    git_url: str,
    git_ref: str,
    playbook: str,
    variables: Iterable[Mapping[str, Any]],
    groups: Iterable[str],
    exclude_pk: int | None = None,
) -> dict[str, Any]:
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError({"name": "A name of 1 to 100 characters."})
    same = Workflow.objects.filter(project=project, name=name)
    if exclude_pk is not None:
        same = same.exclude(pk=exclude_pk)
    if same.exists():
        where = f"project {project.name}" if project is not None else "everyone"
        raise ValidationError({"name": f"A workflow named {name} is already offered to {where}."})
    playbook = _clean_playbook(playbook)
    fields: dict[str, Any] = {"directory": "", "git_url": "", "git_ref": ""}
    if source == Workflow.Source.DIRECTORY:
        root = Path(directory or "")
        if not directory or not root.is_absolute() or ".." in root.parts:
            raise ValidationError({"directory": "The directory is an absolute path on the portal host (no ..)."})
        if not root.is_dir():
            raise ValidationError({"directory": f"{directory} is not a directory on the portal host."})
        playbook_inside(root, playbook)
        fields["directory"] = str(root)
    elif source == Workflow.Source.GIT:
        fields["git_url"], fields["git_ref"] = _clean_git(git_url, git_ref)
    else:
        raise ValidationError({"source": "The source is directory or git."})
    schema = validate_schema(list(variables or ()))
    group_list = [str(g).strip() for g in (groups or ()) if str(g).strip()]
    bad = [g for g in group_list if not _GROUP.match(g)]
    if bad or len(group_list) > 50:
        raise ValidationError(
            {"groups": "Groups are Ansible group names (letters, digits, _), at most 50: " + ", ".join(bad)}
        )
    return {
        "name": name,
        "description": (description or "").strip(),
        "project": project,
        "source": source,
        "playbook": playbook,
        "variables": schema,
        "groups": list(dict.fromkeys(group_list)),
        **fields,
    }


def may_write(actor, project: Project | None) -> bool:
    """Staff write any workflow; a project's admins write their project's (a workflow for everyone: staff)."""
    if not (actor.is_authenticated and actor.is_active):
        return False
    if actor.is_staff:
        return True
    return project is not None and access.project_choices(actor).filter(pk=project.pk).exists()


def may_operate(actor, run: WorkflowRun) -> bool:
    """Whether the actor operates every machine of the run (and its lab): what starting and cancelling take."""
    if not (actor.is_authenticated and actor.is_active):
        return False
    if actor.is_staff:
        return True
    roles = access.project_roles(actor)
    if not all(access.can(actor, m, access.OPERATE, roles) for m in run.machines.all()):
        return False
    return run.lab is None or access.allows(lab_level(actor, run.lab), access.OPERATE)


def _check_writer(actor, project: Project | None, source: str) -> None:
    if not may_write(actor, project):
        raise WorkflowRefused("Only staff register workflows for everyone; a project's admins for their project.")
    # A directory names any path the worker can read on the portal host: staff only. (Any playbook runs Ansible on
    # the worker, whose lookups and local tasks act there: registering one is a trusted act either way.)
    if source == Workflow.Source.DIRECTORY and not actor.is_staff:
        raise WorkflowRefused("Only staff register workflows from a directory on the portal host; use a git URL.")


def workflow_register(
    *,
    actor,
    name: str,
    description: str = "",
    project: Project | None = None,
    source: str = "directory",
    directory: str = "",
    git_url: str = "",
    git_ref: str = "",
    playbook: str = "playbook.yml",
    variables: Iterable[Mapping[str, Any]] = (),
    groups: Iterable[str] = (),
) -> Workflow:
    """Register a playbook (staff for everyone, a project's admins for their project; a directory: staff)."""
    try:
        _check_writer(actor, project, source)
        with transaction.atomic():
            fields = _clean_definition(
                name=name, description=description, project=project, source=source, directory=directory,
                git_url=git_url, git_ref=git_ref, playbook=playbook, variables=variables, groups=groups,
            )  # fmt: skip
            workflow = Workflow.objects.create(created_by=actor, **fields)
    except (Refusal, ValidationError) as e:
        audit.record("workflow.register", outcome="refused", detail=_why(e), user=actor)
        raise
    audit.record("workflow.register", workflow, detail=_definition_detail(workflow), user=actor)
    return workflow


def workflow_update(
    *,
    workflow: Workflow,
    actor,
    name: str,
    description: str = "",
    project: Project | None = None,
    source: str = "directory",
    directory: str = "",
    git_url: str = "",
    git_ref: str = "",
    playbook: str = "playbook.yml",
    variables: Iterable[Mapping[str, Any]] = (),
    groups: Iterable[str] = (),
    enabled: bool = True,
) -> Workflow:
    """Change a workflow (who may write it, before and after the change). Runs already made keep their values."""
    try:
        _check_writer(actor, workflow.project, workflow.source)
        _check_writer(actor, project, source)
        with transaction.atomic():
            fields = _clean_definition(
                name=name, description=description, project=project, source=source, directory=directory,
                git_url=git_url, git_ref=git_ref, playbook=playbook, variables=variables, groups=groups,
                exclude_pk=workflow.pk,
            )  # fmt: skip
            for key, value in fields.items():
                setattr(workflow, key, value)
            workflow.enabled = bool(enabled)
            workflow.save()
    except (Refusal, ValidationError) as e:
        audit.record("workflow.update", workflow, outcome="refused", detail=_why(e), user=actor)
        raise
    audit.record("workflow.update", workflow, detail=_definition_detail(workflow), user=actor)
    return workflow


def workflow_delete(*, workflow: Workflow, actor) -> None:
    """Remove a workflow that never ran (who may write it); one with runs is kept for their record: disable it."""
    try:
        _check_writer(actor, workflow.project, workflow.source)
        with transaction.atomic():
            runs = WorkflowRun.objects.filter(workflow=workflow).count()
            if runs:
                raise WorkflowRefused(
                    f"Workflow {workflow.name} has {runs} run{'s' if runs != 1 else ''}, kept with it: disable it instead."
                )
            name = workflow.name
            workflow.delete()
    except (Refusal, ValidationError) as e:
        audit.record("workflow.delete", workflow, outcome="refused", detail=_why(e), user=actor)
        raise
    audit.record("workflow.delete", detail=f"name={name}", user=actor)


def _definition_detail(workflow: Workflow) -> str:
    where = (
        workflow.directory if workflow.source == Workflow.Source.DIRECTORY else f"{workflow.git_url}@{workflow.git_ref}"
    )
    names = ",".join(v["name"] for v in workflow.variables)
    return f"name={workflow.name} source={workflow.source} at={where} playbook={workflow.playbook} variables={names}"


def _why(e: Exception) -> str:
    return "; ".join(getattr(e, "messages", None) or [str(e)])


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def workflow_examples_register() -> list[str]:
    """Register (or bring up to date) the workflows shipped in workflows/examples/ for everyone: what was done,
    a line each. Idempotent: a second call changes nothing."""
    import yaml

    done = []
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if (p / "workflow.yml").is_file()):
        meta = yaml.safe_load((folder / "workflow.yml").read_text()) or {}
        with transaction.atomic():
            existing = Workflow.objects.filter(project=None, name=meta["name"]).first()
            fields = _clean_definition(
                name=meta["name"], description=meta.get("description", ""), project=None, source="directory",
                directory=str(folder), git_url="", git_ref="", playbook=meta.get("playbook", "playbook.yml"),
                variables=meta.get("variables") or [], groups=meta.get("groups") or [],
                exclude_pk=existing.pk if existing else None,
            )  # fmt: skip
            if existing is None:
                workflow = Workflow.objects.create(**fields)
                done.append(f"{workflow.name}: registered")
            else:
                changed = [k for k, v in fields.items() if getattr(existing, k) != v]
                if not changed:
                    done.append(f"{existing.name}: unchanged")
                    continue
                for key in changed:
                    setattr(existing, key, fields[key])
                existing.save()
                workflow = existing
                done.append(f"{workflow.name}: updated ({', '.join(changed)})")
        audit.record("workflow.register", workflow, detail=_definition_detail(workflow) + " (shipped example)")
    return done


# --- Runs. ---


def _targets(actor, workflow: Workflow, machines: Iterable[Machine], lab: Lab | None) -> list[Machine]:
    wanted = {m.pk for m in machines}
    if lab is not None:
        if not labs_for(actor).filter(pk=lab.pk).exists():
            raise WorkflowRefused("There is no such lab.")
        if not access.allows(lab_level(actor, lab), access.OPERATE):
            raise WorkflowRefused(f"Your role on lab {lab.name} does not allow running workflows on it.")
        wanted |= set(lab.members.exclude(machine__status=Status.DELETING).values_list("machine_id", flat=True))
    if not wanted:
        raise WorkflowRefused("Name at least one machine or a lab with machines to run the workflow on.")
    if len(wanted) > MAX_TARGETS:
        raise WorkflowRefused(f"A run has at most {MAX_TARGETS} machines.")
    visible = {m.pk: m for m in access.machines_for(actor).filter(pk__in=wanted)}
    if len(visible) != len(wanted):
        raise WorkflowRefused("There is no such machine.")  # never which one: what is not visible does not exist
    roles = access.project_roles(actor)
    targets = sorted(visible.values(), key=lambda m: (m.name, m.pk))
    for m in targets:
        if not access.can(actor, m, access.OPERATE, roles):
            raise WorkflowRefused(f"Your role on {m.name} does not allow running workflows on it (operator needed).")
        if m.status != Status.ACTIVE:
            raise WorkflowRefused(f"{m.name} is {m.get_status_display().lower()}; a workflow runs on active machines.")
    if workflow.project_id is not None:
        outside = [m.name for m in targets if m.project_id != workflow.project_id]
        if outside:
            raise WorkflowRefused(
                f"Workflow {workflow.name} belongs to project {workflow.project}; not in it: {', '.join(outside)}."
            )
    if len({m.project_id for m in targets}) > 1:
        raise WorkflowRefused("A run's machines are all in one project (or all in none): it uses one project's key.")
    return targets


def _check_limits(project_id: int | None, targets: list[Machine]) -> None:
    """Under the rows' locks (the caller's transaction): the project's and each hypervisor's active runs."""
    if project_id is not None:
        Project.objects.select_for_update().filter(pk=project_id).first()
        running = WorkflowRun.objects.filter(project_id=project_id, status__in=ACTIVE).count()
        if running >= settings.PORTAL_WORKFLOW_RUNS_PER_PROJECT:
            raise WorkflowRefused(
                f"The project already has {running} workflow runs queued or running (at most"
                f" {settings.PORTAL_WORKFLOW_RUNS_PER_PROJECT}); try again when one ends."
            )
    hv_ids = sorted({m.hypervisor_id for m in targets})
    list(Hypervisor.objects.select_for_update().filter(pk__in=hv_ids).order_by("pk").values_list("pk", flat=True))
    for hv_id in hv_ids:
        running = (
            WorkflowRun.objects.filter(status__in=ACTIVE, machines__hypervisor_id=hv_id).values("pk").distinct().count()
        )
        if running >= settings.PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR:
            name = next(m.hypervisor.name for m in targets if m.hypervisor_id == hv_id)
            raise WorkflowRefused(
                f"Hypervisor {name} already has {running} workflow runs queued or running (at most"
                f" {settings.PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR}); try again when one ends."
            )


def _run_detail(run: WorkflowRun, targets: Iterable[Machine], secret_names: Iterable[str]) -> str:
    names = ",".join(m.name for m in targets)
    public = json.dumps(run.variables, sort_keys=True, default=str)
    hidden = ",".join(sorted(secret_names)) or "-"
    return f"workflow={run.workflow.name} machines={names} lab={run.lab or '-'} variables={public} secrets={hidden}"


def workflow_run_start(
    *, workflow: Workflow, actor, machines: Iterable[Machine] = (), lab: Lab | None = None, variables: Mapping[str, Any]
) -> WorkflowRun:
    """Queue a run of `workflow` on the machines (and the lab's machines): the actor operates every one, the
    values pass the workflow's schema, the limits hold. The task is queued once the transaction commits."""
    from workflows.variables import clean_variables

    try:
        if not workflow.enabled:
            raise WorkflowRefused(f"Workflow {workflow.name} is disabled.")
        if workflow.project_id is not None and not actor.is_staff:
            from machines.models import Membership

            if not Membership.objects.filter(project_id=workflow.project_id, user=actor).exists():
                raise WorkflowRefused("There is no such workflow.")
        public, secret = clean_variables(workflow.variables, variables)
        with transaction.atomic():
            targets = _targets(actor, workflow, list(machines), lab)
            project_id = workflow.project_id if workflow.project_id is not None else targets[0].project_id
            _check_limits(project_id, targets)
            run = WorkflowRun.objects.create(
                workflow=workflow,
                created_by=actor,
                project_id=project_id,
                lab=lab,
                variables=public,
                secrets_encrypted=crypto.encrypt(json.dumps(secret)) if secret else "",
            )
            run.machines.set(targets)
            transaction.on_commit(lambda: tasks.workflow_run_task(run.pk))
    except (Refusal, ValidationError) as e:
        audit.record("workflow.run", workflow, outcome="refused", detail=_why(e), user=actor)
        raise
    audit.record("workflow.run", run, detail=_run_detail(run, targets, secret), user=actor)
    return run


def workflow_run_cancel(*, run: WorkflowRun, actor) -> WorkflowRun:
    """Cancel a queued run at once; ask a running one to stop (the worker stops ansible-playbook and its
    processes within seconds). The actor operates every target (or is staff), as starting it took."""
    try:
        if not may_operate(actor, run):
            raise WorkflowRefused("Your role on this run's machines does not allow cancelling it.")
        if WorkflowRun.objects.filter(pk=run.pk, status=WorkflowRun.Status.QUEUED).update(
            status=WorkflowRun.Status.CANCELLED, cancel_requested=True, finished=timezone.now(),
            status_message=f"cancelled by {actor.get_username()} before it started",
        ):  # fmt: skip
            pass
        elif not WorkflowRun.objects.filter(pk=run.pk, status=WorkflowRun.Status.RUNNING).update(cancel_requested=True):
            run.refresh_from_db()
            raise WorkflowRefused(f"The run is {run.get_status_display().lower()}; there is nothing to cancel.")
    except Refusal as e:
        audit.record("workflow.cancel", run, outcome="refused", detail=_why(e), user=actor)
        raise
    run.refresh_from_db()
    audit.record("workflow.cancel", run, detail=f"status={run.status}", user=actor)
    return run


def _finish(run: WorkflowRun, status: str, message: str, **fields: Any) -> None:
    WorkflowRun.objects.filter(pk=run.pk).update(
        status=status, status_message=message, finished=timezone.now(), **fields
    )
    run.refresh_from_db()
    hosts = " ".join(
        f"{h}:ok={s.get('ok', 0)},changed={s.get('changed', 0)},failed={s.get('failures', 0)},"
        f"unreachable={s.get('unreachable', 0)}"
        for h, s in sorted((run.summary or {}).items())
    )
    outcome = "success" if status == WorkflowRun.Status.SUCCESSFUL else "failed"
    audit.record(
        "workflow.run_end",
        run,
        outcome=outcome,
        detail=f"status={status} rc={run.rc} {hosts} {message}".strip(),
        user=run.created_by,
    )


def workflow_run_execute(
    run_id: int, *, hostvars: Mapping[str, Any] | None = None, ssh_key: str | None = None
) -> WorkflowRun | None:
    """Run a queued run in this worker thread, to its end (what the task calls). Stale or duplicate deliveries
    and cancelled runs do nothing. `hostvars` (tests: merged into every host's variables, e.g. a local
    connection) and `ssh_key` (tests: the key instead of the project's) are for the test suite only."""
    attempt = attempts.new_id()
    claimed = WorkflowRun.objects.filter(pk=run_id, status=WorkflowRun.Status.QUEUED, cancel_requested=False).update(
        status=WorkflowRun.Status.RUNNING, started=timezone.now(), attempt_id=attempt, status_message="starting"
    )
    if not claimed:
        return None
    run = WorkflowRun.objects.select_related("workflow", "project", "created_by", "lab").get(pk=run_id)
    try:
        secrets = json.loads(crypto.decrypt(run.secrets_encrypted)) if run.secrets_encrypted else {}
        result = runner.execute(run, secrets=secrets, hostvars=hostvars, ssh_key=ssh_key)
    except runner.RunError as e:
        _finish(run, WorkflowRun.Status.ERROR, str(e))
        return run
    except Exception as e:
        log.exception("workflow run %s", run_id)
        _finish(run, WorkflowRun.Status.ERROR, f"the worker failed: {type(e).__name__}: {e}")
        return run
    _finish(run, result.status, result.message, rc=result.rc, summary=result.summary, stdout=result.stdout)
    return run


def workflow_runs_recover() -> list[str]:
    """As a worker starts: runs left running by a worker process that is gone end as error (their processes
    stopped, their private directories removed). Runs of live workers, or of workers on other hosts, are theirs."""
    done = []
    for run in WorkflowRun.objects.filter(status=WorkflowRun.Status.RUNNING).exclude(attempt_id=""):
        owner = attempts.owner_of(run.attempt_id)
        if owner is None or owner.alive():
            continue
        ended = WorkflowRun.objects.filter(pk=run.pk, attempt_id=run.attempt_id, status=WorkflowRun.Status.RUNNING)
        if not ended.update(attempt_id=""):
            continue
        runner.clean_after_dead(run.pk)
        _finish(run, WorkflowRun.Status.ERROR, f"the worker running it stopped (pid {owner.pid}); run it again")
        done.append(f"workflow run {run.pk}: error (its worker stopped)")
    for line in done:
        log.warning("recovered %s", line)
    return done


LOST_GRACE = 300  # seconds past PORTAL_WORKFLOW_TIMEOUT after which a run still running is taken for lost


def workflow_runs_expire() -> list[str]:
    """Runs still running PORTAL_WORKFLOW_TIMEOUT + 5 minutes after they started: their worker would have stopped
    them at the deadline, so it is gone (on another host, whose own start has not come yet): they end as error."""
    cutoff = timezone.now() - datetime.timedelta(seconds=settings.PORTAL_WORKFLOW_TIMEOUT + LOST_GRACE)
    done = []
    for run in WorkflowRun.objects.filter(status=WorkflowRun.Status.RUNNING, started__lt=cutoff):
        if not WorkflowRun.objects.filter(pk=run.pk, status=WorkflowRun.Status.RUNNING).update(attempt_id=""):
            continue
        _finish(run, WorkflowRun.Status.ERROR, "its worker stopped answering (still running long past its deadline)")
        done.append(f"workflow run {run.pk}: error (lost)")
    for line in done:
        log.warning("expired %s", line)
    return done


def run_dirs_left() -> list[Path]:
    """Private directories of runs no longer running (for the tests and the operator: none should be left)."""
    base = Path(settings.PORTAL_WORKFLOW_RUN_DIR)
    if not base.is_dir():
        return []
    running = set(WorkflowRun.objects.filter(status=WorkflowRun.Status.RUNNING).values_list("pk", flat=True))
    return [p for p in base.iterdir() if p.name.removeprefix("run-").isdigit() and int(p.name[4:]) not in running]
