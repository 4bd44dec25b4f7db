"""Who may put a NIC on which network.

Staff may use every NIC kind. Everyone else may use the tenant network (PORTAL_TENANT_NETWORK, which the
portal defines isolated from the hypervisor) and what staff published to them (hypervisors.models.
PublishedNetwork): a libvirt network, host bridge or host interface published to everyone, or to the
project the machine is created in, on that hypervisor or on any, with the macvtap modes and VLAN tags the
row allows. User-mode networking (QEMU's slirp maps the hypervisor's loopback into the guest as 10.0.2.2)
and macvtap passthrough (the host's interface handed to the guest) are never published.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Q

from hypervisors.models import PUBLISHABLE_MODES, Hypervisor, NicKind, PublishedNetwork

WHERE_TO_ASK = "ask staff to publish it (Admin → Published networks)"
KIND_LABEL = {NicKind.NETWORK: "libvirt network", NicKind.BRIDGE: "host bridge", NicKind.DIRECT: "host interface"}


@dataclass(frozen=True)
class Choice:
    """A network a user may pick: kind and source, with what the publication allows."""

    kind: str
    source: str
    modes: tuple[str, ...] = ()
    vlans: tuple[int, ...] = ()
    untagged: bool = True
    tenant: bool = False

    @property
    def value(self) -> str:
        return f"{self.kind}:{self.source}"

    @property
    def label(self) -> str:
        if self.tenant:
            return f"{self.source} (tenant network: isolated from the hypervisor)"
        extra = []
        if self.kind == NicKind.DIRECT:
            extra.append("macvtap " + "/".join(self.modes))
        if self.vlans:
            extra.append(("VLAN " if self.untagged else "VLAN only ") + ", ".join(map(str, self.vlans)))
        return f"{self.source} ({'; '.join(extra)})" if extra else self.source


def tenant_network() -> str:
    return settings.PORTAL_TENANT_NETWORK


def has_tenant_network(hypervisor: Hypervisor) -> bool:
    return any(n["name"] == tenant_network() and n.get("active", True) for n in hypervisor.networks)


def published_to(user, *, hypervisor: Hypervisor | None, project=None):
    """The publications a user's machine (in `project`, or none) may use on `hypervisor` (None: on any)."""
    audience = Q(everyone=True)
    if project is not None:
        audience |= Q(projects=project)
    rows = PublishedNetwork.objects.filter(audience)
    if hypervisor is not None:
        rows = rows.filter(Q(hypervisor__isnull=True) | Q(hypervisor=hypervisor))
    return rows.select_related("hypervisor").distinct().order_by("pk")


def _names_on(hypervisor: Hypervisor, kind: str) -> set[str]:
    if kind == NicKind.NETWORK:
        return {n["name"] for n in hypervisor.networks if n.get("active", True)}
    if kind == NicKind.BRIDGE:
        return {i["name"] for i in hypervisor.interfaces if i.get("type") == "bridge"}
    return {i["name"] for i in hypervisor.interfaces if i.get("type") != "bridge" and i["name"] != "lo"}


def choices_for(user, hypervisors: list[Hypervisor], project=None) -> list[Choice]:
    """What a non-staff user may pick on these hypervisors (one, or every online one for "any"): the
    tenant network where one has it, then each publication whose source one of them has."""
    out: dict[str, Choice] = {}
    if any(has_tenant_network(h) for h in hypervisors):
        tenant = Choice(NicKind.NETWORK, tenant_network(), tenant=True)
        out[tenant.value] = tenant
    single = hypervisors[0] if len(hypervisors) == 1 else None
    for row in published_to(user, hypervisor=single, project=project):
        hvs = [h for h in hypervisors if row.hypervisor_id in (None, h.pk)]
        if not any(row.source in _names_on(h, row.kind) for h in hvs):
            continue
        value = f"{row.kind}:{row.source}"
        seen = out.get(value)
        modes = set(row.modes) | set(seen.modes if seen else ())
        vlans = set(row.vlans) | set(seen.vlans if seen else ())
        out[value] = Choice(
            row.kind,
            row.source,
            tuple(m for m in PUBLISHABLE_MODES if m in modes),
            tuple(sorted(vlans)),
            row.untagged or bool(seen and seen.untagged),
        )
    return list(out.values())


def default_choice(user, hypervisors: list[Hypervisor], project=None) -> Choice | None:
    """The default NIC: the tenant network where it exists (for staff too); else, for those who are not
    staff, the first network published to them; else none (staff's forms fall back to user-mode)."""
    if any(has_tenant_network(h) for h in hypervisors):
        return Choice(NicKind.NETWORK, tenant_network(), tenant=True)
    if user is not None and user.is_staff:
        return None
    choices = choices_for(user, hypervisors, project)
    return choices[0] if choices else None


def no_network_message(hypervisor: Hypervisor | None) -> str:
    """What a user with nothing to plug into is told, and which staff action fixes it."""
    where = hypervisor.name if hypervisor else "any online hypervisor"
    define = (
        f"define the tenant network on {hypervisor.name} (Hypervisors → {hypervisor.name} → Define a network "
        f"→ Tenant network)"
        if hypervisor
        else "define the tenant network on a hypervisor (Hypervisors → "
        "a hypervisor → Define a network → Tenant network)"
    )
    return (
        f"No network is available to you on {where}: there is no tenant network ({tenant_network()}) and staff "
        f"have published none to you. Staff fix this: {define}, or publish a network to you or your project "
        f"(Admin → Published networks)."
    )


def follows_rules(user, project=None) -> bool:
    """Whether a machine of `user` (in `project`) follows the rules for those who are not staff: every
    machine but a staff member's own outside projects. A machine in a project follows them even when
    staff create it: its members operate it (consoles included), so a staff-only NIC would hand them what
    staff keep to themselves. Such machines' NICs on host bridges also carry the host guard."""
    return not user.is_staff or project is not None


def refusal(user, nic, *, index: int, hypervisor: Hypervisor, project=None) -> str | None:
    """Why this user's machine (in `project`) may not have this NIC on this hypervisor, or None (see
    follows_rules for whose machines the rules bind)."""
    if not follows_rules(user, project):
        return None
    reason = _refusal(user, nic, index=index, hypervisor=hypervisor, project=project)
    if reason and user.is_staff:
        reason += (
            f" (The machine is in project {project.name}, whose members operate it, so it follows their rules;"
            f" publish the network to the project to allow it.)"
        )
    return reason


def _refusal(user, nic, *, index: int, hypervisor: Hypervisor, project=None) -> str | None:
    where = hypervisor.name
    if nic.type == "user":
        return (
            f"NIC {index}: user-mode networking is for staff only: QEMU maps {where}'s own loopback into the "
            f"guest (10.0.2.2), where consoles and other services listen. Use the tenant network "
            f"{tenant_network()} or a network published to you."
        )
    if nic.type == NicKind.NETWORK and nic.source == tenant_network():
        return None
    label = KIND_LABEL.get(nic.type, nic.type)
    owning = next((n["name"] for n in hypervisor.networks if n.get("bridge") and n["bridge"] == nic.source), "")
    if nic.type in (NicKind.BRIDGE, NicKind.DIRECT) and owning:
        # Its guard is on the network's NICs only: straight onto its bridge, a guest would pass it by.
        return (
            f"NIC {index}: {nic.source} is the bridge of libvirt network {owning} on {where}; put the NIC on "
            f"that network instead, where its traffic filter applies."
        )
    if nic.type == NicKind.DIRECT and nic.mode == "passthrough":
        return (
            f"NIC {index}: macvtap passthrough hands {where}'s interface {nic.source} over to the guest; it is "
            f"for staff only and is never published. Use mode bridge, vepa or private on a published interface."
        )
    rows = [
        r
        for r in published_to(user, hypervisor=hypervisor, project=project)
        if (r.kind, r.source) == (nic.type, nic.source)
    ]
    if not rows:
        hint = _project_hint(user, nic, hypervisor, project)
        return f"NIC {index}: {label} {nic.source} is not published to you on {where}{hint}; {WHERE_TO_ASK}."
    if nic.type == NicKind.NETWORK and not next(
        (n.get("guard") for n in hypervisor.networks if n["name"] == nic.source), ""
    ):
        return (
            f"NIC {index}: network {nic.source} on {where} has no portal guard (the portal did not define it), so "
            f"its guests could reach {where} itself; staff: define networks through the portal (Hypervisors → "
            f"{where} → Define a network) to publish them."
        )
    if nic.type == NicKind.DIRECT:
        allowed = sorted({m for r in rows for m in r.modes})
        rows = [r for r in rows if nic.mode in r.modes]
        if not rows:
            return (
                f"NIC {index}: macvtap mode {nic.mode} is not published on host interface {nic.source} on {where} "
                f"(allowed: {', '.join(allowed) or 'none'}); choose one of those or {WHERE_TO_ASK}."
            )
    if nic.vlan is None:
        if not any(r.untagged for r in rows):
            tags = ", ".join(str(v) for v in sorted({v for r in rows for v in r.vlans}))
            return f"NIC {index}: {label} {nic.source} is published on {where} only with a VLAN tag ({tags}); give one."
        return None
    if not any(nic.vlan in r.vlans for r in rows):
        tags = ", ".join(str(v) for v in sorted({v for r in rows for v in r.vlans})) or "none"
        return (
            f"NIC {index}: VLAN {nic.vlan} is not published on {label} {nic.source} on {where} (allowed: {tags}); "
            f"{WHERE_TO_ASK}."
        )
    return None


def _project_hint(user, nic, hypervisor: Hypervisor, project) -> str:
    """When the network is published to a project the user may create machines in, say so."""
    from machines.access import project_choices

    names = list(
        project_choices(user)
        .filter(published_networks__kind=nic.type, published_networks__source=nic.source)
        .filter(Q(published_networks__hypervisor__isnull=True) | Q(published_networks__hypervisor=hypervisor))
        .exclude(pk=getattr(project, "pk", None))
        .values_list("name", flat=True)
        .distinct()[:3]
    )
    return f" (it is published to project {', '.join(names)}: create the machine in that project)" if names else ""


def machines_against_policy():
    """Machines of users who are not staff, or in a project, with a NIC the policy now refuses (made before
    it, or left on a network staff since unpublished): (machine, reason) pairs, for staff to move or to publish."""
    from machines.models import Machine

    found = []
    machines = Machine.objects.filter(Q(owner__is_staff=False) | Q(project__isnull=False))
    machines = machines.select_related("owner", "project", "hypervisor")
    for machine in machines.prefetch_related("nics").order_by("hypervisor__name", "name"):
        for index, nic in enumerate(machine.nics.all(), start=1):
            reason = refusal(machine.owner, nic, index=index, hypervisor=machine.hypervisor, project=machine.project)
            if reason:
                found.append((machine, reason))
    return found
