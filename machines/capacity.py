"""Quotas and placement: what a user may still use, and which hypervisor has room."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db.models import Count, Sum

from hypervisors.models import Hypervisor, HypervisorStatus, Image
from machines.models import Machine, Quota

RESOURCES = {"machines": "machines", "vcpus": "vCPUs", "memory_mib": "MiB of memory", "disk_gib": "GiB of disk"}


class QuotaExceeded(ValidationError):
    pass


def usage(user) -> dict[str, int]:
    return _usage_of(Machine.objects.filter(owner=user))


def quota_of(user, *, lock: bool = False) -> Quota:
    """The user's quota row; with lock, held until the transaction ends so concurrent checks queue up."""
    quota, _ = Quota.objects.get_or_create(user=user)
    if lock:
        quota = Quota.objects.select_for_update().get(pk=quota.pk)
    return quota


def usage_report(user) -> list[dict]:
    """For the dashboard and the create form: used, limit and percent per resource."""
    used = usage(user)
    limits = None if user.is_staff else quota_of(user).limits()
    titles = {"machines": "Machines", "vcpus": "vCPUs", "memory_mib": "Memory (MiB)", "disk_gib": "Disk (GiB)"}
    return [{"key": k, "label": label, "title": titles[k], "used": used[k], "limit": limits[k] if limits else None,
             "percent": min(100, round(100 * used[k] / limits[k])) if limits and limits[k] else 0}
            for k, label in RESOURCES.items()]  # fmt: skip


def _usage_of(machines) -> dict[str, int]:
    totals = machines.aggregate(machines=Count("pk"), vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"),
                                disk_gib=Sum("disk_gib"))  # fmt: skip
    return {k: v or 0 for k, v in totals.items()}


def check_quota(user, *, machines: int = 0, vcpus: int = 0, memory_mib: int = 0, disk_gib: int = 0,
                project=None) -> None:  # fmt: skip
    """Raise QuotaExceeded unless the user (and the project, if any) can add this much. Call inside the
    transaction that saves it: the quota rows are locked, so concurrent requests are checked in turn."""
    wanted = {"machines": machines, "vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib}
    if project is not None:
        from machines.models import Project

        limits = Project.objects.select_for_update().get(pk=project.pk).limits()
        used = _usage_of(Machine.objects.filter(project=project))
        over = [f"{used[k] + wanted[k]} {RESOURCES[k]} of {limits[k]} allowed (using {used[k]})"
                for k in RESOURCES if limits[k] is not None and wanted[k] and used[k] + wanted[k] > limits[k]]  # fmt: skip
        if over:
            raise QuotaExceeded(f"This would exceed project {project.name}'s quota: {'; '.join(over)}.")
    if user.is_staff:
        return
    limits = quota_of(user, lock=True).limits()
    used = usage(user)
    over = [f"{used[k] + wanted[k]} {RESOURCES[k]} of {limits[k]} allowed (using {used[k]})"
            for k in RESOURCES if wanted[k] and used[k] + wanted[k] > limits[k]]  # fmt: skip
    if over:
        raise QuotaExceeded(f"This would exceed your quota: {'; '.join(over)}. Delete a machine or ask staff for more.")


@dataclass(frozen=True)
class Fit:
    hypervisor: Hypervisor
    free_memory_mib: int
    free_vcpus: int
    free_disk_gib: int

    def reason(self) -> str:
        return (f"placed on {self.hypervisor.name}: {self.free_memory_mib} MiB memory, {self.free_vcpus} vCPUs "
                f"and {self.free_disk_gib} GiB of pool space free before this machine")  # fmt: skip


def _fit(hv: Hypervisor, *, vcpus: int, memory_mib: int, disk_gib: int, pool: str, arch: str) -> Fit | str:
    """A Fit if the machine fits on hv, else why not."""
    if arch and hv.arch != arch and arch not in (hv.guest_arches or []):
        return f"{hv.name}: {hv.arch or 'unknown'} host that cannot emulate {arch}"
    placed = hv.machines.aggregate(vcpus=Sum("vcpus"), memory=Sum("memory_mib"))
    free_memory = (hv.memory_mib or 0) - (placed["memory"] or 0)
    free_vcpus = int((hv.cpus or 0) * Decimal(hv.cpu_allocation_ratio)) - (placed["vcpus"] or 0)
    pools = {p["name"]: p for p in hv.pools if p.get("active")}
    free_disk = pools[pool]["available_bytes"] >> 30 if pool in pools else -1
    if free_memory < memory_mib:
        return f"{hv.name}: {max(free_memory, 0)} MiB memory free, needs {memory_mib}"
    if free_vcpus < vcpus:
        return f"{hv.name}: {max(free_vcpus, 0)} vCPUs free, needs {vcpus}"
    if free_disk < disk_gib:
        return f"{hv.name}: no active pool {pool}" if free_disk < 0 else f"{hv.name}: {free_disk} GiB free in {pool}, needs {disk_gib}"
    return Fit(hv, free_memory, free_vcpus, free_disk)


def place(*, vcpus: int, memory_mib: int, disk_gib: int, pool: str, image: Image | None) -> Fit:
    """The online hypervisor with the most free memory that fits the machine, or a clear refusal."""
    arch = image.arch if image is not None else ""
    candidates = Hypervisor.objects.filter(enabled=True, status=HypervisorStatus.ONLINE)
    fits, reasons = [], []
    for hv in candidates:
        result = _fit(hv, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, pool=pool, arch=arch)
        (fits if isinstance(result, Fit) else reasons).append(result)
    if not fits:
        why = "; ".join(reasons) if reasons else "no hypervisor is online"
        raise ValidationError({"hypervisor": f"No hypervisor has room for this machine ({why})."})
    return max(fits, key=lambda f: (f.free_memory_mib, f.free_vcpus, f.hypervisor.name))
