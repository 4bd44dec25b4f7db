"""Who may see and act on which machine.

Owners and staff may do everything to a machine. Members of the machine's
project act by their role: a viewer sees it (events, console view-only), an
operator also powers it, sets its boot device, types on its console and
changes its ISOs, and a project admin also rebuilds, deletes and reveals BMC
credentials. Anything a user may not see answers 404; what they may see but
not do answers 403.
"""

from collections.abc import Mapping

from django.core.exceptions import PermissionDenied
from django.db.models import JSONField, Q, QuerySet, TextField

from hypervisors.models import Hypervisor
from machines.models import Machine, Membership, Role

VIEW, OPERATE, ADMIN = "view", "operate", "admin"
_RANK: dict[str | None, int] = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}
_NEEDED = {VIEW: 1, OPERATE: 2, ADMIN: 3}


def machines_for(user):
    """The machines a user may see: their own and their projects'; staff see all."""
    # What was observed of each comes along for the lists' addresses, not its serial log (up to 256 KiB),
    # which only the machine page reads.
    qs = Machine.objects.select_related("hypervisor", "image", "owner", "project", "observed")
    qs = qs.defer("observed__serial_log")
    if not user.is_authenticated or not user.is_active:
        return qs.none()
    if user.is_staff:
        return qs
    return qs.filter(Q(owner=user) | Q(project__memberships__user=user)).distinct()


def project_roles(user) -> dict[int, str]:
    """The user's role in each of their projects, {project id: role}, in one query: for a list that asks
    level() of every row (pass it as `roles`). Empty for staff and anonymous users, whom level() never asks."""
    if not user.is_authenticated or not user.is_active or user.is_staff:
        return {}
    return dict(Membership.objects.filter(user=user).values_list("project_id", "role"))


# A hypervisor's capabilities and last error, as a sync stores them (every JSON and text column: pools,
# networks, devices, machine types… kilobytes per host). Lists of machines show a hypervisor's name only.
HYPERVISOR_CAPABILITIES = tuple(
    f.name for f in Hypervisor._meta.concrete_fields if isinstance(f, JSONField | TextField)
)


def for_lists(machines: QuerySet[Machine]) -> QuerySet[Machine]:
    """Machines (machines_for()) as the lists read them: without their hypervisors' capabilities. Not for
    rows a service changes: they need their hypervisor whole."""
    return machines.defer(*(f"hypervisor__{name}" for name in HYPERVISOR_CAPABILITIES))


def level(user, machine: Machine, roles: Mapping[int, str] | None = None) -> int:
    """0: none, 1: view, 2: operate, 3: admin. `roles`: project_roles(user), read in this request; without
    it the machine's project membership is looked up (a query)."""
    if not user.is_authenticated or not user.is_active:
        return 0
    if user.is_staff or machine.owner_id == user.pk:
        return 3
    if machine.project_id is None:
        return 0
    if roles is not None:
        return _RANK.get(roles.get(machine.project_id), 0)
    role = Membership.objects.filter(project_id=machine.project_id, user=user).values_list("role", flat=True).first()
    return _RANK.get(role, 0)


def allows(have: int, need: str) -> bool:
    """Whether a level (level()) is enough for what `need` names (VIEW, OPERATE, ADMIN)."""
    return have >= _NEEDED[need]


def can(user, machine: Machine, need: str, roles: Mapping[int, str] | None = None) -> bool:
    return allows(level(user, machine, roles), need)


def require(user, machine: Machine, need: str) -> None:
    """PermissionDenied (403) for a machine the user sees but may not act on this way."""
    if not can(user, machine, need):
        raise PermissionDenied(f"Your role on {machine.name} does not allow this.")


def can_use(user, machine: Machine) -> bool:
    """Consoles: anyone who may see the machine (viewers get view-only sessions)."""
    return can(user, machine, VIEW)


def project_choices(user):
    """Projects in which the user may create machines (project admins; staff: all)."""
    from machines.models import Project

    if user.is_staff:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user, memberships__role=Role.ADMIN)
