"""What a user may do to a machine now: one table for the pages, the API and the services.

allowed_actions(user, machine) joins the role a user has on a machine (machines/access.py: view, operate,
admin) with the machine's state rules in RULES. The services (machines/services/) refuse an action in a
wrong state by the same table, the views and the API refuse a role by it, and the pages and the API's
`allowed_actions` field show what it allows, so a button, the field and the refusal cannot disagree.

What only a request carries stays with the service that gets it: which drive and which ISO, which boot
device, how large a disk, the quotas, and the network policy over the NICs that a start or a rebuild checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import PermissionDenied

from machines import access
from machines.models import Machine
from machines.states import DeployType, PowerAction, PowerState, Status

ANY = frozenset(Status.values)
ACTIVE = frozenset({Status.ACTIVE})


def is_iso(machine: Machine) -> bool:
    """Installer-ISO machines have CD-ROM drives to change and to boot from."""
    return machine.deploy_type == DeployType.ISO


def has_drives(machine: Machine) -> bool:
    """CD-ROM drives to change media in: an ISO machine's, or drives added to any machine after create (the list
    prefetched on pages and in the API is used as it is)."""
    return is_iso(machine) or bool(machine.pk and machine.cdroms.all())


def has_bmc(machine: Machine) -> bool:
    return machine.has_bmc


def may_migrate(user) -> bool:
    """Moving machines between hypervisors is staff's unless PORTAL_MIGRATION_FOR lets owners do it."""
    return bool(getattr(user, "is_staff", False)) or settings.PORTAL_MIGRATION_FOR == "owners"


def made_here(machine: Machine) -> bool:
    """The portal made its disks (an adopted machine's are the domain's own: not grown or moved by the portal)."""
    return not machine.adopted


def stopped_here(machine: Machine) -> bool:
    """The portal made its disks and the machine was last seen off: its disks may be read whole (a clone, an image)."""
    return made_here(machine) and machine.power_state == PowerState.OFF


def renamable(machine: Machine) -> bool:
    """libvirt renames only a shut-off domain (as last seen); an adopted machine keeps its domain's own name, so
    renaming it touches no domain."""
    return machine.adopted or machine.power_state == PowerState.OFF


def has_ready_image(machine: Machine) -> bool:
    """A rebuild starts over from the machine's image, so it needs one that is still there."""
    return machine.image is not None and machine.image.is_ready


@dataclass(frozen=True)
class Rule:
    need: str  # the role: access.VIEW, OPERATE or ADMIN
    statuses: frozenset[str] = ANY  # the lifecycle statuses in which the service accepts it
    exclusive: bool = False  # it claims the machine's one operation: refused while another runs
    unprotected: bool = False  # refused while deletion protection is on
    applies: Callable[[Machine], bool] | None = None  # the machine has what it acts on (a drive, a BMC, an image)
    who: Callable[[object], bool] | None = None  # beyond the role: who the portal's settings let do it


RULES: dict[str, Rule] = {
    **{action: Rule(access.OPERATE, ACTIVE, exclusive=True) for action in PowerAction.values},
    "media": Rule(access.OPERATE, ACTIVE, exclusive=True, applies=has_drives),
    "boot_cdrom": Rule(access.OPERATE, ACTIVE, exclusive=True, applies=is_iso),
    "boot_device": Rule(access.OPERATE, ACTIVE, exclusive=True, applies=has_bmc),
    # Changes after create (machines.services.changes): vCPUs, memory and the name change what the machine holds
    # and what it is called (its domain, its BMC, the inventory), as create does: an admin's. Its description and
    # tags change nothing on the hypervisor, and operators organise the machines they run by them.
    "resize": Rule(access.ADMIN, ACTIVE, exclusive=True),
    "rename": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=renamable),
    "label": Rule(access.OPERATE),
    # Disks, NICs and CD-ROM drives after create (machines.services.devices): what the machine holds, as create.
    "devices": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=made_here),
    "rebuild": Rule(
        access.ADMIN,
        frozenset({Status.ACTIVE, Status.ERROR}),
        exclusive=True,
        unprotected=True,
        applies=has_ready_image,
    ),
    "grow_disk": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=made_here),
    # A delete may stop a provision, rebuild or grow (fenced: machines.attempts), never a power action or move.
    "delete": Rule(
        access.ADMIN,
        frozenset({Status.ACTIVE, Status.ERROR, Status.PROVISIONING, Status.REBUILDING, Status.RESIZING}),
        exclusive=True,
        unprotected=True,
    ),
    # Snapshots (machines.services.snapshots): taking one changes nothing in the guest, as a power action does
    # not; a revert throws away what the disks hold since, as a rebuild does (so protection holds it off too), and
    # a delete loses a restore point.
    "snapshot": Rule(access.OPERATE, ACTIVE, exclusive=True, applies=made_here),
    "snapshot_revert": Rule(access.ADMIN, ACTIVE, exclusive=True, unprotected=True, applies=made_here),
    "snapshot_delete": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=made_here),
    # Clones and images from a machine (machines.services.clones): the source is read, not changed, but a clone
    # makes machines (charged to whoever clones) and an image publishes the disk's contents: an admin's, as create.
    # Both read the disk of a machine seen stopped (a running guest's disk changes under the copy).
    "clone": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=stopped_here),
    "save_image": Rule(access.ADMIN, ACTIVE, exclusive=True, applies=stopped_here),
    "protect": Rule(access.ADMIN),
    # A lease's end (machines.leases): set by its owner or a project admin, within the project's maximum.
    "lease": Rule(access.ADMIN),
    # Scheduled actions (labs.schedules) on the machine: the power and snapshot actions they run are an operator's.
    "schedule": Rule(access.OPERATE),
    "migrate": Rule(access.ADMIN, ACTIVE, exclusive=True, unprotected=False, applies=made_here, who=may_migrate),
    "autostart": Rule(access.ADMIN),  # the hypervisor starts it when it boots
    "reveal_bmc": Rule(access.ADMIN, applies=has_bmc),
    "console": Rule(access.VIEW),  # viewers get view-only sessions
    "console_input": Rule(access.OPERATE),  # typing and clicking on the graphical console
    "serial": Rule(access.OPERATE),  # libvirt lends the serial port to one client: not to watchers
}
ACTIONS = frozenset(RULES)

# Why an action is refused (refusal()): the first of these that holds.
ROLE, ELSEWHERE, STATE, BUSY, PROTECTED = "role", "elsewhere", "state", "busy", "protected"
# Refusals that pass by themselves or by one click (the operation ends, protection is turned off): pages
# show those buttons disabled instead of leaving them out.
PASSING = frozenset({BUSY, PROTECTED})

# What the power state last observed makes pointless (the services accept it: the observation may be stale,
# and the worker reports what the hypervisor answers). Pages show these buttons disabled.
_IDLE_WHEN_RUNNING = frozenset({PowerAction.START})
_IDLE_UNLESS_RUNNING = frozenset({PowerAction.SHUTDOWN, PowerAction.REBOOT, "console", "serial"})


def need(action: str) -> str:
    """The role an action needs (KeyError for an action that does not exist)."""
    return RULES[action].need


def statuses_text(action: str) -> str:
    """The statuses an action needs, for a refusal's message: "active", "active or error"."""
    return " or ".join(Status(s).label.lower() for s in Status.values if s in RULES[action].statuses)


def state_refusal(machine: Machine, action: str) -> str:
    """Why the machine's state refuses the action ("" if it does not): ELSEWHERE, STATE, BUSY or PROTECTED."""
    rule = RULES[action]
    if rule.applies is not None and not rule.applies(machine):
        return ELSEWHERE
    if machine.status not in rule.statuses:
        return STATE
    if rule.unprotected and machine.deletion_protection:
        return PROTECTED
    if rule.exclusive and machine.operation:
        return BUSY
    return ""


def refusal(user, machine: Machine, action: str, *, level: int | None = None) -> str:
    """Why `user` may not do `action` to `machine` now ("" if they may): ROLE, then the state's reason."""
    have = access.level(user, machine) if level is None else level
    rule = RULES[action]
    if not access.allows(have, rule.need) or (rule.who is not None and not rule.who(user)):
        return ROLE
    return state_refusal(machine, action)


def refusals(user, machine: Machine, *, roles: Mapping[int, str] | None = None) -> dict[str, str]:
    """Every action with its refusal ("" for those allowed); the user's role is looked up once (in `roles`,
    access.project_roles(user) read once for a whole list, when given)."""
    have = access.level(user, machine, roles)
    return {action: refusal(user, machine, action, level=have) for action in RULES}


def allowed_actions(user, machine: Machine, *, roles: Mapping[int, str] | None = None) -> frozenset[str]:
    """What `user` may do to `machine` now: their role allows it, and so does the machine's state."""
    return frozenset(action for action, why in refusals(user, machine, roles=roles).items() if not why)


def require(user, machine: Machine, action: str) -> None:
    """PermissionDenied (403) when the user's role does not allow the action; the state is the service's to refuse
    (with its own message), by the same table."""
    access.require(user, machine, need(action))
    who = RULES[action].who
    if who is not None and not who(user):
        raise PermissionDenied(f"Only staff may do this to {machine.name} here.")


def idle_actions(machine: Machine) -> frozenset[str]:
    """Actions the power state last observed makes pointless (a start of a running machine)."""
    return _IDLE_WHEN_RUNNING if machine.power_state == PowerState.RUNNING else _IDLE_UNLESS_RUNNING


def page_context(user, machine: Machine) -> dict[str, frozenset[str]]:
    """For templates: `allowed` (what the services accept now), `shown` (also those refused for a passing
    reason, shown disabled) and `idle` (allowed, but pointless in the power state observed: disabled)."""
    why = refusals(user, machine)
    return {
        "allowed": frozenset(a for a, w in why.items() if not w),
        "shown": frozenset(a for a, w in why.items() if not w or w in PASSING),
        "idle": idle_actions(machine),
    }
