"""Quotas and placement: what machines hold, what a user may still use, and which hypervisor has room.

Every path that allocates (create, grow; rebuild and extra disks allocate nothing new after create)
takes the same locks in the same order, inside its transaction: the project row, then the user's
quota row, then the hypervisor row(s). check_quota() takes the first two, claim_room() the third.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet, Sum

from hypervisors.models import Hypervisor, HypervisorStatus, Image
from hypervisors.offers import offers_for
from machines.models import Machine, MachineSnapshot, Project, Quota

RESOURCES = {"machines": "machines", "vcpus": "vCPUs", "memory_mib": "MiB of memory", "disk_gib": "GiB of disk"}


class QuotaExceeded(ValidationError):
    pass


def _extra_disks_gib(extra_disks) -> int:
    # Extra disks are {"size_gib", "image", "boot_order"}; rows from before that shape hold a bare number.
    return sum(int(d["size_gib"] if isinstance(d, dict) else d) for d in extra_disks or [])


# What a machine holds, term by term: (resource, column, how one machine's value of it counts; None: as it is).
# Every count of usage (the dashboard, the create and grow checks, placement, the admin) goes through these
# terms and nothing else, so a new kind of allocation (snapshots, clones) is one more line here. Plain columns
# are summed by the database; JSON ones (the extra disks) in Python, over only the rows that have any. (A kind
# kept in another table gets its own query in _totals: joined into the sums it would repeat the machines' rows.)
TERMS = (
    ("vcpus", "vcpus", None),
    ("memory_mib", "memory_mib", None),
    ("disk_gib", "disk_gib", None),
    ("disk_gib", "extra_disks", _extra_disks_gib),
)


def held(machine: Mapping) -> dict[str, int]:
    """What one machine holds, in the units quotas count: itself, its vCPUs and memory, and its storage (the
    main disk plus every extra disk). `machine` maps the TERMS' columns to values (a .values() row)."""
    total = {"machines": 1, "vcpus": 0, "memory_mib": 0, "disk_gib": 0}
    for resource, column, count in TERMS:
        total[resource] += count(machine[column]) if count else machine[column]
    return total


def held_by(machine: Machine, **changes) -> dict[str, int]:
    """held() of a model instance, saved or not; with changes, what it would hold after them."""
    return held({**{column: getattr(machine, column) for _, column, _ in TERMS}, **changes})


def _totals(machines: QuerySet[Machine], key: str | None) -> dict:
    """{key value: usage} of these machines (key None: one entry, None), by the TERMS and their snapshots: three
    queries."""
    machines = machines.order_by()
    in_db = [(f"t{i}", resource, column) for i, (resource, column, count) in enumerate(TERMS) if count is None]
    sums = {"machines": Count("pk"), **{name: Sum(column) for name, _, column in in_db}}
    rows: Iterable[dict[Any, Any]] = (
        machines.values(key).annotate(**sums) if key else [{None: None, **machines.aggregate(**sums)}]
    )
    out: dict = {}
    for row in rows:
        total = out[row[key]] = {"machines": row["machines"], "vcpus": 0, "memory_mib": 0, "disk_gib": 0}
        for name, resource, _ in in_db:
            total[resource] += row[name] or 0
    for resource, column, count in TERMS:
        if count is not None:
            for k, value in machines.exclude(**{column: []}).values_list(key or "pk", column):
                out[k if key else None][resource] += count(value)
    # Snapshots, kept in their own table: the space each one holds (size_bytes, measured by the worker), in GiB
    # rounded up per machine, so a machine's first snapshot byte counts a GiB, as a disk of one byte would.
    taken = (
        MachineSnapshot.objects.filter(machine__in=machines.values("pk"))
        .order_by()
        .values("machine_id", *([f"machine__{key}"] if key else []))
        .annotate(size=Sum("size_bytes"))
    )
    for row in taken:
        if row["size"]:
            out.setdefault(row[f"machine__{key}"] if key else None, dict.fromkeys(RESOURCES, 0))["disk_gib"] += -(
                -row["size"] // (1 << 30)
            )
    return out


def usage_of(machines: QuerySet[Machine]) -> dict[str, int]:
    """Everything these machines hold, added up (held() over each)."""
    return _totals(machines, None)[None]


def usage_by(machines: QuerySet[Machine], key: str) -> dict:
    """usage_of() grouped by a column (owner, project, hypervisor), for lists: {value: usage}."""
    return _totals(machines, key)


def usage(user) -> dict[str, int]:
    return usage_of(Machine.objects.filter(owner=user))


def project_usage(project: Project) -> dict[str, int]:
    return usage_of(Machine.objects.filter(project=project))


def quota_of(user, *, lock: bool = False) -> Quota:
    """The user's quota row; with lock, held until the transaction ends so concurrent checks queue up."""
    quota, _ = Quota.objects.get_or_create(user=user)
    if lock:
        quota = Quota.objects.select_for_update().get(pk=quota.pk)
    return quota


def _report(used: dict[str, int], limits: Mapping[str, int | None] | None) -> list[dict]:
    titles = {"machines": "Machines", "vcpus": "vCPUs", "memory_mib": "Memory (MiB)", "disk_gib": "Disk (GiB)"}
    rows = []
    for k, label in RESOURCES.items():
        limit = limits[k] if limits else None
        rows.append(
            {
                "key": k,
                "label": label,
                "title": titles[k],
                "used": used[k],
                "limit": limit,
                "percent": min(100, round(100 * used[k] / limit)) if limit else 0,
            }
        )
    return rows


def usage_report(user) -> list[dict]:
    """For the dashboard and the create form: used, limit and percent per resource."""
    return _report(usage(user), None if user.is_staff else quota_of(user).limits())


def project_usage_report(project: Project) -> list[dict]:
    return _report(project_usage(project), project.limits())


def usage_text(used: Mapping[str, int], limits: Mapping[str, int | None] | None) -> str:
    """One line for the admin: '3 machines of 10, 6 vCPUs of 20, …' (no limit: just the figure)."""
    return ", ".join(
        f"{used[k]} {label}" + (f" of {limits[k]}" if limits and limits[k] is not None else "")
        for k, label in RESOURCES.items()
    )


def lock_quotas(user, project: Project | None) -> None:
    """Lock the rows that guard what user and project hold: the project first, then the user's quota.
    Every allocating path takes them in this order (and the hypervisor after), so none deadlocks another."""
    if project is not None:
        Project.objects.select_for_update().filter(pk=project.pk).first()
    if not user.is_staff:
        quota_of(user, lock=True)


def _over(used: dict[str, int], wanted: Mapping[str, int], limits: Mapping[str, int | None]) -> list[str]:
    return [
        f"{used[k] + wanted[k]} {RESOURCES[k]} of {limits[k]} allowed (using {used[k]})"
        for k in RESOURCES
        if (limit := limits[k]) is not None and wanted.get(k) and used[k] + wanted[k] > limit
    ]


def check_quota(
    user, *, machines: int = 0, vcpus: int = 0, memory_mib: int = 0, disk_gib: int = 0, project=None
) -> None:
    """Raise QuotaExceeded unless the user (and the project, if any) can add this much on top of what their
    machines hold (usage_of). Call inside the transaction that saves it: the rows are locked (lock_quotas),
    so concurrent requests are checked in turn."""
    wanted = {"machines": machines, "vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib}
    lock_quotas(user, project)
    if project is not None:
        limits = Project.objects.get(pk=project.pk).limits()
        over = _over(project_usage(project), wanted, limits)
        if over:
            raise QuotaExceeded(f"This would exceed project {project.name}'s quota: {'; '.join(over)}.")
    if user.is_staff:
        return
    over = _over(usage(user), wanted, quota_of(user).limits())
    if over:
        raise QuotaExceeded(f"This would exceed your quota: {'; '.join(over)}. Delete a machine or ask staff for more.")


@dataclass(frozen=True)
class Fit:
    hypervisor: Hypervisor
    free_memory_mib: int
    free_vcpus: int
    free_disk_gib: int

    def reason(self) -> str:
        return (
            f"placed on {self.hypervisor.name}: {self.free_memory_mib} MiB memory, {self.free_vcpus} vCPUs "
            f"and {self.free_disk_gib} GiB of pool space free before this machine"
        )


def _fit(hv: Hypervisor, *, vcpus: int, memory_mib: int, disk_gib: int, pool: str, arch: str) -> Fit | str:
    """A Fit if the machine fits on hv, else why not (without the host's name).

    Memory and vCPUs: the host's, less what its machines hold (usage_of). Pool space: what libvirt last
    reported free, which already reflects what the existing (thin) disks really use; counting their full
    sizes again would refuse hosts with room. The asked size must fit in it. What the host offers (its
    architectures, its pools) is hypervisors.offers' to say."""
    offer = offers_for(hv)
    if why := offer.refuse_placed_arch(arch):
        return why
    placed = usage_of(Machine.objects.filter(Q(hypervisor=hv) | Q(moving_to=hv)))  # and what is on its way there
    free_memory = (hv.memory_mib or 0) - placed["memory_mib"]
    free_vcpus = int((hv.cpus or 0) * Decimal(hv.cpu_allocation_ratio)) - placed["vcpus"]
    free_pool = offer.pool_free_gib(pool)
    free_disk = -1 if free_pool is None else free_pool
    if free_memory < memory_mib:
        return f"{max(free_memory, 0)} MiB memory free, needs {memory_mib}"
    if free_vcpus < vcpus:
        return f"{max(free_vcpus, 0)} vCPUs free, needs {vcpus}"
    if free_disk < disk_gib:
        return f"no active pool {pool}" if free_disk < 0 else f"{free_disk} GiB free in {pool}, needs {disk_gib}"
    return Fit(hv, free_memory, free_vcpus, free_disk)


def place(
    *,
    vcpus: int,
    memory_mib: int,
    disk_gib: int,
    pool: str,
    image: Image | None,
    lock: bool = False,
    networks: tuple[str, ...] = (),
    prefer_network: str = "",
    exclude: int | None = None,
) -> Fit:
    """The online hypervisor with the most free memory that fits the machine, or a clear refusal. With lock,
    every candidate row is locked (in id order) until the transaction ends, so concurrent placements queue.
    Hosts without each of `networks` (the libvirt networks the NICs name) do not fit; hosts with
    `prefer_network` (the tenant network, for NICs left to their default) come first."""
    arch = image.arch if image is not None else ""
    # `exclude`: a host that is no candidate (the one a machine moves away from).
    candidates = Hypervisor.objects.filter(enabled=True, maintenance=False, status=HypervisorStatus.ONLINE)
    if exclude is not None:
        candidates = candidates.exclude(pk=exclude)
    candidates = candidates.order_by("pk")
    if lock:
        candidates = candidates.select_for_update()
    fits, reasons = [], []
    for hv in candidates:
        missing = offers_for(hv).missing_networks(networks)
        if missing:
            reasons.append(f"{hv.name}: no network {', '.join(missing)}")
            continue
        result = _fit(hv, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, pool=pool, arch=arch)
        if isinstance(result, Fit):
            fits.append(result)
        else:
            reasons.append(f"{hv.name}: {result}")
    if not fits:
        drained = Hypervisor.objects.filter(enabled=True, maintenance=True, status=HypervisorStatus.ONLINE)
        if exclude is not None:
            drained = drained.exclude(pk=exclude)
        reasons += [f"{name}: in maintenance" for name in drained.order_by("pk").values_list("name", flat=True)]
        why = "; ".join(reasons) if reasons else "no hypervisor is online"
        raise ValidationError({"hypervisor": f"No hypervisor has room for this machine ({why})."})
    preferred = {f.hypervisor.pk for f in fits if prefer_network in offers_for(f.hypervisor).network_names}
    return max(fits, key=lambda f: (f.hypervisor.pk in preferred, f.free_memory_mib, f.free_vcpus, f.hypervisor.name))


@dataclass(frozen=True)
class Room:
    """Where a new machine goes and on what grounds: `placement` when the portal picked the host,
    `over_capacity` (why it has no room) when staff chose a full host and overrode the check."""

    hypervisor: Hypervisor
    placement: Fit | None = None
    over_capacity: str = ""


def claim_room(
    hypervisor: Hypervisor | None,
    *,
    need: Mapping[str, int],
    pool: str,
    image: Image | None,
    user,
    override: bool = False,
    networks: tuple[str, ...] = (),
    prefer_network: str = "",
    exclude: int | None = None,
) -> Room:
    """The hypervisor for a new machine, checked for room under its row lock (after lock_quotas): placed
    ("any hypervisor") or the one asked for, by the same rules. Staff may override a named host's lack of
    room; anyone else gets the reason."""
    if override and not user.is_staff:
        raise ValidationError({"override_capacity": "Only staff may create a machine on a hypervisor without room."})
    wanted: dict[str, Any] = {
        "vcpus": need["vcpus"],
        "memory_mib": need["memory_mib"],
        "disk_gib": need["disk_gib"],
        "pool": pool,
    }
    if hypervisor is None:
        if override:
            raise ValidationError({"override_capacity": "Name the hypervisor to create a machine over its capacity."})
        fit = place(**wanted, image=image, lock=True, networks=networks, prefer_network=prefer_network, exclude=exclude)
        return Room(fit.hypervisor, placement=fit)
    hv = Hypervisor.objects.select_for_update().get(pk=hypervisor.pk)
    if hv.maintenance:  # read under the lock: a drain that commits first is seen
        raise ValidationError({"hypervisor": f"Hypervisor {hv.name} is in maintenance: it takes no new machines."})
    # Room only: whether a named host runs the image's architecture is the hardware check's to say.
    result = _fit(hv, **wanted, arch="")
    if isinstance(result, Fit):
        return Room(hv)
    if not override:
        raise ValidationError({"hypervisor": f"Hypervisor {hv.name} has no room for this machine ({result})."})
    return Room(hv, over_capacity=result)


def room_on(hv: Hypervisor, *, pool: str, arch: str = "") -> Fit | str:
    """What hv has free now for a machine of `arch` on `pool`, before any is asked for: a Fit, else why it takes
    none. For planners that place several machines at once (a lab) and count their room down themselves."""
    return _fit(hv, vcpus=0, memory_mib=0, disk_gib=0, pool=pool, arch=arch)


def room_for_growth(hv: Hypervisor, *, vcpus: int, memory_mib: int) -> str:
    """Why hv (locked by the caller, after lock_quotas) cannot give one of its machines `vcpus` and `memory_mib`
    more ("" if it can): its memory and vCPUs less what its machines hold, as a create's placement counts them."""
    if not (vcpus or memory_mib):
        return ""
    placed = usage_of(Machine.objects.filter(Q(hypervisor=hv) | Q(moving_to=hv)))
    free_memory = (hv.memory_mib or 0) - placed["memory_mib"]
    free_vcpus = int((hv.cpus or 0) * Decimal(hv.cpu_allocation_ratio)) - placed["vcpus"]
    if memory_mib and free_memory < memory_mib:
        return f"{max(free_memory, 0)} MiB memory free, the change needs {memory_mib} more"
    if vcpus and free_vcpus < vcpus:
        return f"{max(free_vcpus, 0)} vCPUs free, the change needs {vcpus} more"
    return ""
