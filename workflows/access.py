"""Who sees which workflow and which run, and who may act on them (the pages and the API ask here).

A workflow is offered to everyone (no project) or to its project's members; staff see all of them, disabled
ones too. A run is seen by its creator, staff and its project's members (viewer and up), and never by someone
who may not see every machine it ran against: its output is those machines' output. Cancelling a run takes
the operator level on every target (staff: always), as starting one does.
"""

from __future__ import annotations

from django.db.models import Q, QuerySet

from labs.services import lab_level
from machines import access
from machines.access import project_choices
from machines.models import Machine, Membership, Project
from workflows.models import Workflow, WorkflowRun

ENDED = {WorkflowRun.Status.SUCCESSFUL, WorkflowRun.Status.FAILED, WorkflowRun.Status.CANCELLED}
ENDED |= {WorkflowRun.Status.ERROR}


def _active(user) -> bool:
    return bool(user.is_authenticated and user.is_active)


def workflows_for(user) -> QuerySet[Workflow]:
    """Workflows the user may run: enabled ones for everyone and their projects'; staff: all, disabled too."""
    qs = Workflow.objects.select_related("project")
    if not _active(user):
        return qs.none()
    if user.is_staff:
        return qs
    mine = Membership.objects.filter(user=user).values("project_id")
    return qs.filter(Q(project__isnull=True) | Q(project_id__in=mine), enabled=True)


def writable_projects(user) -> QuerySet[Project]:
    """Projects whose workflows the user may register and change: those they administer (staff: all)."""
    return project_choices(user)


def may_write(user, project: Project | None) -> bool:
    """Staff write any workflow; a project's admins write their project's (a workflow for everyone: staff)."""
    if not _active(user):
        return False
    if user.is_staff:
        return True
    return project is not None and writable_projects(user).filter(pk=project.pk).exists()


def may_register(user) -> bool:
    return _active(user) and (user.is_staff or writable_projects(user).exists())


def _hidden_machines(user) -> QuerySet[Machine]:
    """Machines the user may not see (the complement of machines_for), as a subquery."""
    mine = Membership.objects.filter(user=user).values("project_id")
    return Machine.objects.exclude(owner=user).exclude(project_id__in=mine)


def runs_for(user) -> QuerySet[WorkflowRun]:
    """Runs the user may see: their own and their projects' (viewer and up), none that touched a machine they
    may not see; staff: all."""
    qs = WorkflowRun.objects.select_related("workflow", "created_by", "project", "lab")
    if not _active(user):
        return qs.none()
    if user.is_staff:
        return qs
    mine = Membership.objects.filter(user=user).values("project_id")
    qs = qs.filter(Q(created_by=user) | Q(project_id__in=mine))
    return qs.exclude(machines__in=_hidden_machines(user)).distinct()


def may_operate(user, run: WorkflowRun) -> bool:
    """Whether the user may operate every target of the run (what cancelling it takes)."""
    if not _active(user):
        return False
    if user.is_staff:
        return True
    roles = access.project_roles(user)
    if not all(access.can(user, m, access.OPERATE, roles) for m in run.machines.all()):
        return False
    return run.lab is None or access.allows(lab_level(user, run.lab), access.OPERATE)


def is_running(run: WorkflowRun) -> bool:
    return run.status not in ENDED
