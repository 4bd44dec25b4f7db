"""What changes labs. Views, the API, the admin, the import and tasks call these.

A lab is made from a template in one transaction: its machine requests (labs.specs) are checked, the whole
lab's quota is checked at once, every machine is placed across the hypervisors (spread or pack) under the
hypervisors' row locks, and only then is each machine created through machines.services.machine_create, so a
lab that does not fit makes nothing. Power and delete act on each machine through the machine services with
the actor, so roles, states, protection and the audit apply machine by machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageStatus
from hypervisors.offers import offers_for
from labs import specs
from labs.models import Lab, LabMachine, LabTemplate
from machines import access, leases, policy, services
from machines.access import machines_for, project_choices
from machines.capacity import QuotaExceeded, check_quota, held, room_on
from machines.models import Machine, Membership, Project, hostname_validator
from machines.states import DeployType, PowerAction
from portal.audit import audited
from portal.refusals import Refusal

SPREAD, PACK = "spread", "pack"
PLACEMENTS = {
    SPREAD: "Spread: each machine on the host with the fewest of the lab's",
    PACK: "Pack: fill one host first",
}
_RANK = {"viewer": 1, "operator": 2, "admin": 3}


class LabError(Refusal):
    """The lab cannot be acted on so; the message says why (and names the machines in the way)."""


@transaction.atomic
def lab_get_or_create(*, name: str, owner, project: Project | None = None, source: str = "") -> Lab:
    """The lab of that name in the project (or, without one, of that owner), made if it is not there yet."""
    lookup = {"project": project} if project is not None else {"project": None, "owner": owner}
    lab, _ = Lab.objects.get_or_create(name=name, **lookup, defaults={"owner": owner, "source": source})
    return lab


def lab_add_machine(*, lab: Lab, machine: Machine, group: str = "") -> LabMachine:
    """Put a machine in a lab (a machine is in one lab at most: this moves it there); a lab's lease is its."""
    member, _ = LabMachine.objects.update_or_create(machine=machine, defaults={"lab": lab, "group": group})
    if lab.expires_at is not None:
        Machine.objects.filter(pk=machine.pk).update(expires_at=lab.expires_at, expiry_warned=None, expired_off=None)
    return member


@audited("lab.lease", obj_kwarg="lab")
@transaction.atomic
def lab_set_lease(*, lab: Lab, actor, until, now=None) -> None:
    """Set the lab's lease end (None: none) within its project's maximum (staff: any), and its machines' with it:
    the lab's lease applies to its machines (machines/services/leases.py shuts them down and deletes them)."""
    lab_require(actor, lab, access.ADMIN)
    now = now or timezone.now()
    leases.check(until, project=lab.project, actor=actor, now=now)
    Lab.objects.filter(pk=lab.pk).update(expires_at=until)
    lab.expires_at = until
    members = Machine.objects.filter(lab_membership__lab=lab)
    members.update(expires_at=until, expiry_warned=None, expired_off=None)
    for machine in members:
        machine.log("lease", f"the lease of lab {lab.name} ends {until:%Y-%m-%d %H:%M %Z}" if until else "no lease")


@audited("lab.change", obj_kwarg="lab")
@transaction.atomic
def lab_change(*, lab: Lab, actor, name: str | None = None, description: str | None = None) -> Lab:
    """Rename a lab or change its description (its admins: the owner, the project's admins, staff). Its machines
    keep their names; the inventory's lab group takes the new one. A name already taken in the project (or,
    without one, by the owner) is refused on the field."""
    lab_require(actor, lab, access.ADMIN)
    lab = Lab.objects.select_for_update().get(pk=lab.pk)
    changed = []
    if name is not None and name != lab.name:
        hostname_validator(name)
        taken = Lab.objects.filter(name=name).exclude(pk=lab.pk)
        taken = taken.filter(project=lab.project) if lab.project_id else taken.filter(project=None, owner=lab.owner)
        if taken.exists():
            where = f"in {lab.project.name}" if lab.project else f"of {lab.owner.username}"
            raise ValidationError({"name": f"There is already a lab {name} {where}."})
        changed.append(f"renamed from {lab.name}")
        lab.name = name
    if description is not None and description != lab.description:
        if len(description) > 2000:
            raise ValidationError({"description": "At most 2,000 characters."})
        lab.description = description
        changed.append("description changed")
    if changed:
        lab.save(update_fields=["name", "description"])
        for machine in Machine.objects.filter(lab_membership__lab=lab):
            machine.log("lab", f"lab {lab.name}: {', '.join(changed)}")
    return lab


# --- Who sees what: a lab's owner and staff do everything; its project's members act by their role. ---


def labs_for(user) -> QuerySet[Lab]:
    """The labs a user may see: their own, their projects'; staff see all."""
    qs = Lab.objects.select_related("owner", "project")
    if not user.is_authenticated or not user.is_active:
        return qs.none()
    if user.is_staff:
        return qs
    return qs.filter(Q(owner=user) | Q(project__memberships__user=user)).distinct()


def lab_level(user, lab: Lab) -> int:
    """0: none, 1: view, 2: operate, 3: admin (the levels of machines.access)."""
    if not user.is_authenticated or not user.is_active:
        return 0
    if user.is_staff or lab.owner_id == user.pk:
        return 3
    if lab.project_id is None:
        return 0
    role = Membership.objects.filter(project_id=lab.project_id, user=user).values_list("role", flat=True).first()
    return _RANK.get(role or "", 0)


def lab_require(user, lab: Lab, need: str) -> None:
    """PermissionDenied (403) unless the user's level on the lab allows `need` (access.VIEW, OPERATE, ADMIN)."""
    if not access.allows(lab_level(user, lab), need):
        raise PermissionDenied(f"Your role on lab {lab.name} does not allow this.")


def lab_machines(lab: Lab, user) -> QuerySet[Machine]:
    """The lab's machines that the user may see (never the others)."""
    return machines_for(user).filter(lab_membership__lab=lab).order_by("lab_membership__group", "name")


def templates_for(user) -> QuerySet[LabTemplate]:
    """Templates a user may see and use: staff's for everyone (no project) and their projects'; staff: all."""
    qs = LabTemplate.objects.select_related("owner", "project")
    if not user.is_authenticated or not user.is_active:
        return qs.none()
    if user.is_staff:
        return qs
    return qs.filter(Q(project__isnull=True) | Q(project__memberships__user=user)).distinct()


def template_projects(user) -> QuerySet[Project]:
    """Projects whose templates the user may write: those they administer (staff: all)."""
    return project_choices(user)


def may_write_template(user, project: Project | None) -> bool:
    """Staff write any template; a project's admins write their project's."""
    if not user.is_authenticated or not user.is_active:
        return False
    if user.is_staff:
        return True
    return project is not None and template_projects(user).filter(pk=project.pk).exists()


@audited("lab_template.save")
@transaction.atomic
def lab_template_save(
    *, actor, name: str, spec: str, description: str = "", project: Project | None = None, template=None
) -> LabTemplate:
    """Make a template (template None) or change one; its YAML is checked first (ValidationError on `spec`)."""
    if template is not None and not may_write_template(actor, template.project):
        raise PermissionDenied("Only staff or the project's admins change this template.")
    if not may_write_template(actor, project):
        raise PermissionDenied(
            "Only staff make templates for everyone; a project's admins make templates for their project."
        )
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError({"name": "Give the template a name of up to 100 characters."})
    try:
        specs.parse(spec)
    except specs.SpecError as e:
        raise ValidationError({"spec": str(e)}) from None
    same = LabTemplate.objects.filter(name=name, project=project)
    if template is not None:
        same = same.exclude(pk=template.pk)
    if same.exists():
        where = f"project {project.name}" if project is not None else "the templates for everyone"
        raise ValidationError({"name": f"{where.capitalize()} already has a template {name}."})
    if template is None:
        template = LabTemplate(owner=actor)
    template.name, template.description, template.project, template.spec = name, description, project, spec
    template.save()
    return template


@audited("lab_template.delete", obj_kwarg="template")
def lab_template_delete(*, template: LabTemplate, actor) -> None:
    """Delete a template; the labs made from it stay."""
    if not may_write_template(actor, template.project):
        raise PermissionDenied("Only staff or the project's admins delete this template.")
    template.delete()


# --- Making a lab from a template. ---


@dataclass
class _Host:
    hv: Hypervisor
    placed: int = 0  # machines of this lab put here so far
    memory_mib: int = 0  # what this lab's machines put here hold
    vcpus: int = 0
    disk_gib: dict[str, int] = field(default_factory=dict)  # per pool
    rooms: dict = field(default_factory=dict)  # (pool, arch) -> room_on()


def _candidates() -> list[_Host]:
    hvs = Hypervisor.objects.filter(enabled=True, maintenance=False, status=HypervisorStatus.ONLINE)
    return [_Host(hv) for hv in hvs.order_by("pk").select_for_update()]


def _free(host: _Host, *, pool: str, arch: str, networks: tuple[str, ...]) -> tuple[int, int, int] | str:
    """What host has free for one more machine of this lab: (memory, vCPUs, pool GiB), or why it has none."""
    missing = offers_for(host.hv).missing_networks(networks)
    if missing:
        return f"no network {', '.join(missing)}"
    key = (pool, arch)
    if key not in host.rooms:
        host.rooms[key] = room_on(host.hv, pool=pool, arch=arch)
    room = host.rooms[key]
    if isinstance(room, str):
        return room
    return (
        room.free_memory_mib - host.memory_mib,
        room.free_vcpus - host.vcpus,
        room.free_disk_gib - host.disk_gib.get(pool, 0),
    )


def plan_placement(
    requests: list[specs.MachineRequest], images: Mapping[str, Image], *, placement: str, pool: str = "default"
) -> list[Hypervisor]:
    """A hypervisor for each request, in order, under the candidates' row locks: spread puts each machine where
    the lab has the fewest so far, pack where it has the most that still has room (ties: the most free
    memory). Hosts with the tenant network come first for machines with the default NIC, as for one machine.
    ValidationError when one does not fit anywhere, with each host's reason: then nothing is made."""
    if placement not in PLACEMENTS:
        raise ValidationError({"placement": f"Placement is {' or '.join(PLACEMENTS)}."})
    hosts = _candidates()
    if not hosts:
        raise ValidationError({"placement": "No hypervisor is online to take the lab."})
    chosen = []
    for r in requests:
        image = images.get(r.image_name)
        arch = image.arch if image is not None else ""
        networks = tuple(dict.fromkeys(n.source for n in r.nics or [] if n.type == "network"))
        need = held({"vcpus": r.vcpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib, "extra_disks": []})
        fits, reasons = [], []
        for host in hosts:
            free = _free(host, pool=pool, arch=arch, networks=networks)
            if isinstance(free, str):
                reasons.append(f"{host.hv.name}: {free}")
            elif free[0] < need["memory_mib"] or free[1] < need["vcpus"] or free[2] < need["disk_gib"]:
                reasons.append(
                    f"{host.hv.name}: {max(free[0], 0)} MiB, {max(free[1], 0)} vCPUs and {max(free[2], 0)} GiB "
                    "left after the lab's machines before it"
                )
            else:
                fits.append((host, free))
        if not fits:
            raise ValidationError(
                {"placement": f"Nothing was made: no hypervisor has room for {r.name} ({'; '.join(reasons)})."}
            )
        tenant = settings.PORTAL_TENANT_NETWORK if r.nics is None else None

        def key(item, tenant=tenant):
            host, free = item
            preferred = tenant is not None and tenant in offers_for(host.hv).network_names
            placed = -host.placed if placement == SPREAD else host.placed
            return (preferred, placed, free[0], free[1], host.hv.name)

        host, _ = max(fits, key=key)
        host.placed += 1
        host.memory_mib += need["memory_mib"]
        host.vcpus += need["vcpus"]
        host.disk_gib[pool] = host.disk_gib.get(pool, 0) + need["disk_gib"]
        chosen.append(host.hv)
    return chosen


def _images(requests: list[specs.MachineRequest]) -> dict[str, Image]:
    """The catalogue images the requests name, ready and of the right kind, by name."""
    out: dict[str, Image] = {}
    for r in requests:
        if not r.image_name or r.image_name in out:
            continue
        kind = "iso" if r.deploy_type == DeployType.ISO else "disk"
        image = Image.objects.filter(name=r.image_name, kind=kind).first()
        if image is None:
            raise ValidationError({"template": f"Group {r.group}: the catalogue has no {kind} image {r.image_name}."})
        if image.status != ImageStatus.READY:
            raise ValidationError({"template": f"Group {r.group}: image {r.image_name} is not ready."})
        out[r.image_name] = image
    return out


def _check_names(actor, name: str, project: Project | None, requests: list[specs.MachineRequest]) -> None:
    taken_lab = Lab.objects.filter(
        name=name, **({"project": project} if project else {"project": None, "owner": actor})
    )
    if taken_lab.exists():
        raise ValidationError(
            {"name": f"There is already a lab {name} {'in ' + project.name if project else 'of yours'}."}
        )
    taken = sorted(
        Machine.objects.filter(owner=actor, name__in=[r.name for r in requests]).values_list("name", flat=True)
    )
    if taken:
        raise ValidationError({"name": f"You already have machines named {', '.join(taken[:10])}: choose other names."})


def _summary(requests: list[specs.MachineRequest]) -> str:
    need = {"vcpus": 0, "memory_mib": 0, "disk_gib": 0}
    for r in requests:
        need["vcpus"] += r.vcpus
        need["memory_mib"] += r.memory_mib
        need["disk_gib"] += r.disk_gib
    return f"{len(requests)} machines, {need['vcpus']} vCPUs, {need['memory_mib']} MiB, {need['disk_gib']} GiB"


@audited("lab.create")
@transaction.atomic
def lab_instantiate(
    *,
    template: LabTemplate,
    actor,
    name: str,
    project: Project | None = None,
    counts: Mapping[str, int] | None = None,
    patterns: Mapping[str, str] | None = None,
    offsets: Mapping[str, Mapping[str, int]] | None = None,
    first: int = 0,
    placement: str = SPREAD,
    description: str = "",
    saved_keys: bool = True,
) -> Lab:
    """Make a lab from a template: every machine checked, the whole lab's quota at once, every machine placed
    (spread or pack), then created through machine_create, all in one transaction: a lab that does not fit
    makes nothing. ValidationError (with the field: name, project, template, placement, quota) says why."""
    if not templates_for(actor).filter(pk=template.pk).exists():
        raise PermissionDenied("You may not use this template.")
    if template.project_id is not None and (project is None or project.pk != template.project_id):
        raise ValidationError({"project": f"Template {template.name} makes labs in project {template.project}."})
    if project is not None and not project_choices(actor).filter(pk=project.pk).exists():
        raise ValidationError({"project": f"You are not an admin of project {project.name}."})
    try:
        Lab(name=name, owner=actor).clean_fields(exclude=["owner", "project", "description", "source"])
        spec = specs.parse(template.spec)
        requests = specs.requests(spec, lab=name, counts=counts, patterns=patterns, offsets=offsets, first=first)
    except specs.SpecError as e:
        raise ValidationError({"template": str(e)}) from None
    _check_names(actor, name, project, requests)
    images = _images(requests)
    total = {"machines": len(requests), "vcpus": 0, "memory_mib": 0, "disk_gib": 0}
    for r in requests:
        one = held({"vcpus": r.vcpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib, "extra_disks": []})
        for k in ("vcpus", "memory_mib", "disk_gib"):
            total[k] += one[k]
    try:
        check_quota(actor, **total, project=project)  # the whole lab at once, under the quota rows' locks
    except QuotaExceeded as e:
        raise QuotaExceeded(
            f"Nothing was made: the lab ({_summary(requests)}) together. {' '.join(e.messages)}"
        ) from None
    hosts = plan_placement(requests, images, placement=placement)
    lab = Lab.objects.create(
        name=name,
        owner=actor,
        project=project,
        source=template.name,
        description=description,
        expires_at=leases.default_expiry(project, timezone.now()),  # the project's default lease, its machines'
    )
    keys = "\n".join(k for k in actor.ssh_keys.values_list("public_key", flat=True) if k.strip()) if saved_keys else ""
    for r, hv in zip(requests, hosts, strict=True):
        try:
            machine = services.machine_create(
                owner=actor,
                hypervisor=hv,
                name=r.name,
                deploy_type=r.deploy_type,
                image=images.get(r.image_name),
                vcpus=r.vcpus,
                memory_mib=r.memory_mib,
                disk_gib=r.disk_gib,
                nics=r.nics,
                ssh_authorized_keys=keys if r.deploy_type == DeployType.IMAGE else "",
                deletion_protection=r.protected,
                project=project,
            )
        except (ValidationError, services.MachineError) as e:
            why = " ".join(e.messages) if isinstance(e, ValidationError) else str(e)
            raise ValidationError({"template": f"Nothing was made: {r.name}: {why}"}) from None
        lab_add_machine(lab=lab, machine=machine, group=r.group)
    return lab


# --- Acting on a lab: machine by machine, through the machine services, with the actor. ---


@dataclass
class LabResult:
    done: list[str] = field(default_factory=list)  # machine names
    refused: list[str] = field(default_factory=list)  # "name: why"


@audited("lab.power", obj_kwarg="lab")
def lab_power(*, lab: Lab, action: str, actor) -> LabResult:
    """Queue a power action on each of the lab's machines the actor sees; each is the machine service's to
    allow (role, state), and what it refuses is said per machine."""
    lab_require(actor, lab, access.OPERATE)
    if action not in PowerAction.values:
        raise LabError(f"Unknown action {action!r}; use one of {', '.join(PowerAction.values)}.")
    result = LabResult()
    for machine in lab_machines(lab, actor).select_related(None).select_related("hypervisor"):
        try:
            services.machine_power(machine=machine, action=action, actor=actor)
        except PermissionDenied:
            result.refused.append(f"{machine.name}: your role does not allow this")
        except (services.MachineError, ValidationError) as e:
            result.refused.append(f"{machine.name}: {' '.join(getattr(e, 'messages', [str(e)]))}")
        else:
            result.done.append(machine.name)
    if not result.done and not result.refused:
        raise LabError(f"Lab {lab.name} has no machines.")
    return result


def _why(machine: Machine, refusal: str) -> str:
    """A policy refusal (machines.policy: ROLE, STATE, BUSY...) in words, for a lab's message."""
    if refusal == policy.ROLE:
        return "your role does not allow it"
    if refusal == policy.BUSY:
        return f"busy ({machine.operation})"
    return f"it is {machine.get_status_display().lower()}"


@audited("lab.delete", obj_kwarg="lab")
@transaction.atomic
def lab_delete(*, lab: Lab, actor) -> list[str]:
    """Delete every machine of the lab, then the lab; all or nothing. Refused, touching nothing, while any
    machine is protected (named), refused for its state, or not the actor's to delete."""
    lab_require(actor, lab, access.ADMIN)
    members = list(Machine.objects.select_for_update().filter(lab_membership__lab=lab).order_by("name"))
    visible = set(lab_machines(lab, actor).values_list("pk", flat=True))
    hidden = [m for m in members if m.pk not in visible]
    if hidden:
        raise LabError(f"Lab {lab.name} holds {len(hidden)} machine(s) you may not see; ask its owner or staff.")
    protected = [m.name for m in members if m.deletion_protection]
    if protected:
        raise LabError(f"Lab {lab.name} has machines protected from deletion: {', '.join(protected)}.")
    refused = [f"{m.name}: {_why(m, why)}" for m in members if (why := policy.refusal(actor, m, "delete"))]
    if refused:
        raise LabError(f"Lab {lab.name} cannot be deleted now ({'; '.join(refused)}); try again when they are done.")
    for machine in members:
        services.machine_delete(machine=machine, actor=actor)
    names = [m.name for m in members]
    lab.delete()
    return names


def lab_instackenv(*, lab: Lab, user) -> dict:
    """instackenv.json of the lab's network-boot machines whose BMC credentials the user may see; each export
    is recorded on the machine and in the audit trail (machines.services.instackenv)."""
    roles, need = access.project_roles(user), policy.need("reveal_bmc")
    machines = [m for m in lab_machines(lab, user).filter(bmc_port__isnull=False) if access.can(user, m, need, roles)]
    return services.instackenv(machines, user=user)
