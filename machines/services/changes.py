"""Changing a machine after create: vCPUs and memory (live up to the maxima chosen at create, else at the next
cold start), its name, description and tags, deletion protection and autostart.

The request (machine_change) checks and records everything under the locks a create takes (the project, the
owner's quota, the machine, the hypervisor), then queues one worker run (machine_change_run) for what needs the
hypervisor: the new vCPUs and memory go into the domain's persistent config at once and into the running guest
where it can take them; what it cannot take waits in Machine.pending until the next cold start, which clears it
(pending_applied). A rename of a machine the portal made renames its libvirt domain (`<name>-<uuid8>`), which
libvirt does only while the domain is shut off, so it is refused while the machine runs; an adopted machine
keeps its domain's own name and is renamed in the portal only.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import DomainSize, HypervisorError, HypervisorUnavailable
from hypervisors.models import Hypervisor
from machines import policy, tasks
from machines.capacity import check_quota, held_by, lock_quotas, room_for_growth
from machines.models import Machine, MachineEvent, hostname_validator
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from machines.services.operations import machine_set_autostart, machine_set_protection
from machines.states import Status
from portal import audit

log = logging.getLogger(__name__)

HARDWARE = ("vcpus", "memory_mib")
MAXIMA = {"max_vcpus": "vcpus", "max_memory_mib": "memory_mib"}  # each maximum and the value under it
CHANGEABLE = frozenset({*HARDWARE, *MAXIMA, "name", "description", "tags", "deletion_protection", "autostart"})
# The role each change needs (machines.policy RULES): labels are an operator's, the rest an admin's.
ACTION_OF = {
    "vcpus": "resize",
    "memory_mib": "resize",
    "max_vcpus": "resize",
    "max_memory_mib": "resize",
    "name": "rename",
    "description": "label",
    "tags": "label",
    "deletion_protection": "protect",
    "autostart": "autostart",
}
MAX_VCPUS, MIN_MEMORY_MIB, MAX_MEMORY_MIB = 64, 128, 1 << 20
TAG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
MAX_TAGS, MAX_DESCRIPTION = 20, 2000


def clean_tags(tags) -> list[str]:
    """Tags as a list of short labels (lower-case letters, digits, `_`, `.`, `-`; 1 to 32), in order, each once."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [t for t in re.split(r"[\s,]+", tags) if t]
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
        raise ValidationError({"tags": "Give the tags as a list of strings."})
    cleaned = list(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))
    bad = [t for t in cleaned if not TAG.match(t)]
    if bad:
        raise ValidationError(
            {"tags": f"Not a tag: {bad[0][:40]!r}; 1 to 32 lower-case letters, digits, '_', '.' or '-'."}
        )
    if len(cleaned) > MAX_TAGS:
        raise ValidationError({"tags": f"At most {MAX_TAGS} tags."})
    return cleaned


def clean_maxima(vcpus: int, memory_mib: int, max_vcpus, max_memory_mib, cpu_topology=None) -> tuple[int | None, ...]:
    """The maxima asked at create: none, or at least the values and within the machine limits."""
    errors = {}
    if max_vcpus is not None:
        if not isinstance(max_vcpus, int) or not vcpus <= max_vcpus <= MAX_VCPUS:
            errors["max_vcpus"] = f"From the {vcpus} vCPUs to {MAX_VCPUS}."
        elif cpu_topology and max_vcpus != vcpus:
            errors["max_vcpus"] = "A machine with a CPU topology keeps its vCPUs: leave the maximum out."
    if max_memory_mib is not None and (
        not isinstance(max_memory_mib, int) or not memory_mib <= max_memory_mib <= MAX_MEMORY_MIB
    ):
        errors["max_memory_mib"] = f"From the {memory_mib} MiB to {MAX_MEMORY_MIB} MiB."
    if errors:
        raise ValidationError(errors)
    return (
        None if max_vcpus in (None, vcpus) else max_vcpus,
        None if max_memory_mib in (None, memory_mib) else max_memory_mib,
    )


def _clean(machine: Machine, fields: dict) -> dict:
    """The changes asked, checked for shape; those equal to what the machine has are left out."""
    unknown = set(fields) - CHANGEABLE
    if unknown:
        raise ValidationError({k: "This cannot be changed here." for k in sorted(unknown)})
    errors: dict[str, str] = {}
    out = {}
    maxima = {}
    for key, value in fields.items():
        if key in MAXIMA:
            low, high = (1, MAX_VCPUS) if key == "max_vcpus" else (MIN_MEMORY_MIB, MAX_MEMORY_MIB)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
            ):
                errors[key] = f"A whole number from {low} to {high}, or none (no more than the value)."
            else:
                maxima[key] = value
            continue
        if key in HARDWARE:
            low, high = (1, MAX_VCPUS) if key == "vcpus" else (MIN_MEMORY_MIB, MAX_MEMORY_MIB)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                errors[key] = f"A whole number from {low} to {high}."
                continue
        elif key == "name":
            value = str(value).strip().lower() if isinstance(value, str) else value
            try:
                hostname_validator(value)
            except ValidationError as e:
                errors[key] = e.messages[0]
                continue
        elif key == "description":
            if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
                errors[key] = f"Text of at most {MAX_DESCRIPTION} characters."
                continue
            value = value.replace("\r\n", "\n").strip()
        elif key == "tags":
            value = clean_tags(value)
        elif not isinstance(value, bool):
            errors[key] = "true or false."
            continue
        if value != getattr(machine, key):
            out[key] = value
    for key, value in maxima.items():  # against the value as this change leaves it; its own is None
        base = MAXIMA[key]
        under = out.get(base, getattr(machine, base))
        if value is not None and value < under:
            errors[key] = f"At least the {under} {'vCPUs' if base == 'vcpus' else 'MiB'} (the value); none for no more."
        elif key == "max_vcpus" and value not in (None, under) and machine.cpu_topology:
            errors[key] = "The machine has a CPU topology (sockets × cores × threads): it keeps its vCPUs."
        elif (value if value != under else None) != getattr(machine, key):
            out[key] = value if value != under else None
    if errors:
        raise ValidationError(errors)
    return out


def machine_change(*, machine: Machine, actor, **fields) -> Machine:
    """Change what `fields` name (CHANGEABLE); the machine as it is afterwards. Audited as machine.change with
    each field's old -> new (or the refusal); protection and autostart through their own services."""
    old = {k: getattr(machine, k) for k in CHANGEABLE}
    try:
        changed = _change(machine=machine, actor=actor, fields=fields)
    except Exception as e:
        if isinstance(e, ValidationError | MachineError) or e.__class__.__name__ == "PermissionDenied":
            detail = "; ".join(getattr(e, "messages", None) or [str(e)])
            audit.record("machine.change", machine, outcome="refused", detail=detail, user=actor)
        raise
    if changed:
        text = ", ".join(f"{k} {old[k]!r} -> {v!r}" for k, v in changed.items())
        audit.record("machine.change", machine, detail=text, user=actor)
    return Machine.objects.get(pk=machine.pk)


@transaction.atomic
def _change(*, machine: Machine, actor, fields: dict) -> dict:
    for key in fields:
        if key in ACTION_OF:
            policy.require(actor, machine, ACTION_OF[key])
    changes = _clean(machine, fields)
    for key in changes:
        policy.require(actor, machine, ACTION_OF[key])
    hardware = {k: changes[k] for k in HARDWARE if k in changes}
    maxima = {k: changes[k] for k in MAXIMA if k in changes}
    new_name = changes.get("name", "")
    if hardware or maxima or new_name:
        machine = _lock(machine)
        if machine.status != Status.ACTIVE:
            raise MachineError(f"{machine.name} is {machine.get_status_display().lower()}; this needs it active.")
        if machine.operation:
            raise MachineError(f"{machine.name} is busy with another operation; try again when it is done.")
    if hardware:
        _check_hardware(machine, hardware)
    if maxima:
        _check_maxima(machine, maxima)
    if new_name:
        _check_rename(machine, new_name)
    labels = {k: changes[k] for k in ("description", "tags") if k in changes}
    if new_name and machine.adopted:  # its domain keeps its own name: nothing to do on the hypervisor
        labels["name"] = new_name
        new_name = ""
    if labels:
        try:
            with transaction.atomic():
                Machine.objects.filter(pk=machine.pk).update(**labels)
        except IntegrityError:
            raise ValidationError({"name": f"You already have a machine called {labels['name']}."}) from None
        machine.log("change", ", ".join(f"{k} changed" for k in labels))
    if hardware or maxima or new_name:
        _claim_operation(machine, "change", action="resize" if hardware or maxima else "rename")
        if hardware or maxima:
            values = {**hardware, **maxima}
            for key, base in MAXIMA.items():
                most = values.get(key, getattr(machine, key))
                if most is not None and values.get(base, 0) > most:
                    values[key] = values[base]  # the maximum is never below the value
            Machine.objects.filter(pk=machine.pk).update(**values)
        asked = ", ".join(
            f"{k} {getattr(machine, k)} -> {'none' if v is None else v}"
            for k, v in {**hardware, **maxima, "name": new_name}.items()
            if v or k in maxima
        )
        machine.log("change", f"{asked} requested")
        _enqueue(tasks.machine_change_task, machine.pk, bool(hardware or maxima), new_name)
    if "deletion_protection" in changes:
        machine_set_protection(machine=machine, protected=changes["deletion_protection"], actor=actor)
    if "autostart" in changes:
        machine_set_autostart(machine=machine, enabled=changes["autostart"], actor=actor)
    return changes


def _lock(machine: Machine) -> Machine:
    """The machine's row, after its project's and owner's quota rows (the order every allocating path takes)."""
    current = Machine.objects.select_related("owner", "project").get(pk=machine.pk)
    lock_quotas(current.owner, current.project)
    locked = Machine.objects.select_for_update().select_related("owner", "project", "hypervisor").get(pk=machine.pk)
    if (locked.owner_id, locked.project_id) != (current.owner_id, current.project_id):
        raise MachineError(f"{machine.name} changed owner or project meanwhile; try again.")
    return locked


def _check_hardware(machine: Machine, hardware: dict) -> None:
    """Quota (user and project) and the hypervisor's room for what grows, as a create checks them."""
    if "vcpus" in hardware and machine.cpu_topology:
        raise ValidationError(
            {"vcpus": "The machine has a CPU topology (sockets × cores × threads): it keeps its vCPUs."}
        )
    before, after = held_by(machine), held_by(machine, **hardware)
    grow = {k: max(after[k] - before[k], 0) for k in after}
    check_quota(machine.owner, **grow, project=machine.project)
    hv = Hypervisor.objects.select_for_update().get(pk=machine.hypervisor_id)
    if why := room_for_growth(hv, vcpus=grow["vcpus"], memory_mib=grow["memory_mib"]):
        raise ValidationError({"vcpus" if "vcpus" in hardware else "memory_mib": f"Hypervisor {hv.name}: {why}."})


def _check_maxima(machine: Machine, maxima: dict) -> None:
    """The maxima within what the machine's hypervisor has: its vCPUs (times its allocation ratio) and its
    memory, where known. They are not charged (quota and room count the values), so nothing else limits them."""
    hv = machine.hypervisor
    vcpus = int((hv.cpus or 0) * Decimal(hv.cpu_allocation_ratio))
    if vcpus and (maxima.get("max_vcpus") or 0) > vcpus:
        raise ValidationError({"max_vcpus": f"Hypervisor {hv.name} gives at most {vcpus} vCPUs."})
    if hv.memory_mib and (maxima.get("max_memory_mib") or 0) > hv.memory_mib:
        raise ValidationError({"max_memory_mib": f"Hypervisor {hv.name} has {hv.memory_mib} MiB of memory."})


def _check_rename(machine: Machine, name: str) -> None:
    if Machine.objects.filter(owner_id=machine.owner_id, name=name).exclude(pk=machine.pk).exists():
        raise ValidationError({"name": f"You already have a machine called {name}."})
    if not policy.renamable(machine):
        raise MachineError(
            f"{machine.name} is {machine.get_power_state_display().lower()}: its libvirt domain can be renamed "
            "only while it is shut off. Shut it down, then rename it."
        )
    if not machine.adopted and machine.snapshots.exists():
        raise MachineError(f"{machine.name} has snapshots, and libvirt renames no domain with snapshots.")


def machine_change_run(machine_id: int, hardware: bool, new_name: str) -> None:
    """Worker: the machine's vCPUs and memory into its domain (live where the running guest takes them, the rest
    pending until its next cold start), then the rename. Every outcome is an event; the operation is released."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        if hardware:
            _apply_size(machine, driver)
        if new_name:
            _apply_rename(machine, driver, new_name)
    except HypervisorUnavailable as e:
        machine.log("change", f"not applied, the hypervisor did not answer: {e}; ask again", level="error")
    except HypervisorError as e:
        machine.log("change", f"not applied: {e}", level="error")
    finally:
        _release_operation(machine)


def _apply_size(machine: Machine, driver) -> None:
    uuid = str(machine.uuid)
    size = driver.domain_size(uuid)
    pending, live = {}, []
    for key, value, maximum, now, live_max, setter, max_key in (
        (
            "vcpus",
            machine.vcpus,
            machine.max_vcpus or 0,
            size.live_vcpus,
            size.live_max_vcpus,
            driver.set_vcpus,
            "max_vcpus",
        ),
        (
            "memory_mib",
            machine.memory_mib,
            machine.max_memory_mib or 0,
            size.live_memory_mib,
            size.live_max_memory_mib,
            driver.set_memory,
            "max_memory_mib",
        ),
    ):
        # Live only upwards within the running domain's maximum: taking vCPUs or memory away needs the guest's
        # help (an unplug, a balloon driver), so a smaller value waits for the next cold start.
        hot = size.running and now <= value <= live_max
        setter(uuid, value, maximum=maximum, live=hot and value != now)
        if hot:
            live.append(key)
        elif size.running:
            pending[key] = value
        if size.running and key not in pending and max(maximum, value) != live_max:
            pending[max_key] = max(maximum, value)  # a maximum changes only at a cold start
    Machine.objects.filter(pk=machine.pk).update(pending=pending)
    parts = [f"{machine.vcpus} vCPUs", f"{machine.memory_mib} MiB"]
    parts += [f"at most {machine.max_vcpus} vCPUs"] if machine.max_vcpus else []
    parts += [f"at most {machine.max_memory_mib} MiB"] if machine.max_memory_mib else []
    where = "the running machine has them now" if not pending else "applies at next cold start: " + ", ".join(pending)
    machine.log("change", f"{', '.join(parts)} set in the domain's config; {where}")


def _apply_rename(machine: Machine, driver, new_name: str) -> None:
    old = machine.name
    domain = f"{new_name}-{machine.uuid.hex[:8]}"  # Machine.domain_name's rule, for the new name
    try:
        with transaction.atomic():
            Machine.objects.filter(pk=machine.pk).update(name=new_name)
            driver.rename_domain(str(machine.uuid), domain, title=new_name)
    except IntegrityError:
        machine.log("change", f"not renamed: the owner has a machine called {new_name} now", level="error")
        return
    machine.log("change", f"renamed from {old} to {new_name}; its domain is {domain}")


def pending_applied(machine: Machine, driver) -> None:
    """After a cold start: the domain booted its config, so what was pending is what runs; cleared once the
    running domain shows it (else kept, and said)."""
    if not machine.pending:
        return
    try:
        size = driver.domain_size(str(machine.uuid))
    except HypervisorError as e:
        log.info("machine %s: pending changes not checked: %s", machine.pk, e)
        return
    if not size.running:
        return
    # The cold start booted the persistent config, which has had the values since the change was asked (a
    # guest without a balloon driver may show more memory than its balloon's target, so that is not compared).
    done = ", ".join(f"{k} {v}" for k, v in machine.pending.items())
    Machine.objects.filter(pk=machine.pk).update(pending={})
    machine.log("change", f"applied at this cold start: {done}")
    machine.pending = {}


def pending_left(pending: dict, size: DomainSize) -> dict:
    """What of `pending` the running domain does not run yet. vCPUs: its live count. Memory: its live balloon
    and maximum as the config has them (a smaller value is in the balloon a cold start sets; a larger one needed
    a larger maximum, which only a cold start gives). A domain that is off runs nothing."""
    if not size.running:
        return dict(pending)
    runs = {
        "vcpus": lambda v: size.live_vcpus == v,
        "memory_mib": lambda v: size.live_memory_mib == v and size.live_max_memory_mib == size.max_memory_mib,
        "max_vcpus": lambda v: size.live_max_vcpus == v,
        "max_memory_mib": lambda v: size.live_max_memory_mib == v,
    }
    return {k: v for k, v in pending.items() if k not in runs or not runs[k](v)}


def pending_seen_running(machine_id: int, pending: dict, size: DomainSize) -> None:
    """The reconcile saw the machine's domain in a run it had not seen (a start from outside the portal: virsh,
    its BMC, the host's autostart, or one the portal made before this process saw it): what of `pending` it runs
    is cleared, with an event; the rest stays. Over the pending read, on an active machine with no operation (a
    change or a start of the portal's under way decides itself)."""
    left = pending_left(pending, size)
    if left == pending:
        return
    mine = Machine.objects.filter(pk=machine_id, pending=pending, status=Status.ACTIVE, operation="")
    if not mine.update(pending=left):
        return
    done = ", ".join(f"{k} {v}" for k, v in pending.items() if k not in left)
    still = f"; still pending: {', '.join(f'{k} {v}' for k, v in left.items())}" if left else ""
    MachineEvent.objects.create(
        machine_id=machine_id, step="change", message=f"running since a start outside the portal: {done}{still}"
    )


def machines_tagged(machines: QuerySet[Machine], tag: str) -> QuerySet[Machine]:
    """The machines with `tag` (none for a text that is no tag). Tags are stored as a JSON list of checked
    labels, so the quoted tag in its text is exactly that tag, on SQLite and PostgreSQL alike."""
    tag = tag.strip().lower()
    if not TAG.match(tag):
        return machines.none()
    return machines.annotate(tags_text=Cast("tags", TextField())).filter(tags_text__contains=f'"{tag}"')
