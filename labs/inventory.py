"""The Ansible inventory of the machines a user may see: Ansible's JSON inventory (`_meta.hostvars`, `all.children`)
for the API and the inventory script, and the same in the shape of AnsiStack's `vm-lab-inventory.yaml` for the
download.

Groups: `project_<name>`, `lab_<name>`, `deploy_<type>`, `hypervisor_<name>`, `tag_<tag>`, and each lab member's
group as the lab names it (`provisioned_vms`, `bootable_vms`, `controllers`), bare, so AnsiStack playbooks that
target those groups run unchanged. Every group name is made a valid Ansible group name (letters, digits and
underscores, not starting with a digit: a member group that would not be one, or would read as one of the
portal's own, gets `group_` in front).

Everything is read in a constant number of queries, whatever the number of machines. Console links and BMC
credentials come only when asked (`bmc=True`); the credentials through the BMC reveal service, which checks the
role and records each reveal (a few queries per BMC revealed), and one audit record says what the export gave.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from typing import Any

from django.db.models import Q, QuerySet
from django.urls import reverse

from labs.models import Lab, LabMachine
from machines import access, policy
from machines.models import Machine, Project
from machines.services.bmcs import machine_bmc_reveal
from machines.states import DeployType, Status
from portal import audit

# The group names the portal makes itself; a lab member group that would read as one of them (or as Ansible's
# own `all` and `ungrouped`) gets `group_` in front, so a lab cannot add its machines to another lab's group.
_PREFIXES = ("project_", "lab_", "deploy_", "hypervisor_", "tag_", "group_")
_RESERVED = {"all", "ungrouped", "vms"}  # `vms`: the YAML download's top group

# AnsiStack's lab inventory puts TripleO roles in these children of `vms` (infrastructure/vm-inventory.yml).
ANSISTACK_CHILDREN = ("overcloud", "undercloud", "minion", "standalone")


def group_name(text: str) -> str:
    """`text` as the part of an Ansible group name after its prefix: any character but an ASCII letter, digit
    or underscore becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(text))


def _member_group(group: str) -> str:
    """A lab member group's own name where it is a valid one of its own; else with `group_` in front."""
    name = group_name(group)
    bare = name and not name[0].isdigit() and name.lower() not in _RESERVED and not name.startswith(_PREFIXES)
    return name if bare else f"group_{name}"


def projects_for(user) -> QuerySet[Project]:
    """The projects a user may ask the inventory of: those they are a member of or own a machine in; staff: all."""
    if not user.is_authenticated or not user.is_active:
        return Project.objects.none()
    if user.is_staff:
        return Project.objects.all()
    return Project.objects.filter(Q(memberships__user=user) | Q(machines__owner=user)).distinct()


def _machines(user, lab: Lab | None, project: Project | None) -> list[Machine]:
    qs = access.for_lists(access.machines_for(user)).exclude(status=Status.DELETING)
    qs = qs.defer("user_data", "ssh_authorized_keys", "script", "packages")
    qs = qs.select_related("lab_membership__lab").prefetch_related("nics")
    if lab is not None:
        qs = qs.filter(lab_membership__lab=lab)
    if project is not None:
        qs = qs.filter(project=project)
    return sorted(qs, key=lambda m: (m.name, m.pk))


def _usable(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_interface(str(address)).ip
    except ValueError:
        return None
    return None if ip.is_loopback or ip.is_link_local or ip.is_unspecified else ip


def _first(addresses: list[str]) -> str | None:
    """The first IPv4 address of the list, else the first IPv6 one (without its prefix)."""
    ips = [ip for ip in (_usable(a) for a in addresses) if ip is not None]
    ips.sort(key=lambda ip: ip.version)  # stable: the list's order within each family
    return str(ips[0]) if ips else None


def ansible_host(machine: Machine) -> str | None:
    """Where Ansible reaches the machine: a static address on one of its NICs first (in NIC order), then what
    the running guest was last seen with (its NICs' MACs in order, then any other); None when nothing is known."""
    nics = sorted(machine.nics.all(), key=lambda n: n.index)
    static = _first([a for nic in nics for a in (nic.addresses or [])])
    if static:
        return static
    seen = machine.last_observed.guest_addresses or {}
    ordered = [nic.mac.lower() for nic in nics if nic.mac.lower() in seen]
    ordered += [mac for mac in seen if mac not in ordered]
    return _first([a for mac in ordered for a in (seen.get(mac) or [])])


def _all_addresses(machine: Machine) -> list[str]:
    nics = sorted(machine.nics.all(), key=lambda n: n.index)
    found = [str(a).split("/")[0] for nic in nics for a in (nic.addresses or [])]
    found += [a for a in machine.last_observed.address_list if a not in found]
    return found


def _host_names(machines: list[Machine]) -> dict[int, str]:
    """Inventory host names: the machine's name, or its domain name (`name-<uuid8>`) where two machines the
    user sees share a name (names are unique per owner only)."""
    count: dict[str, int] = defaultdict(int)
    for m in machines:
        count[m.name] += 1
    return {m.pk: m.name if count[m.name] == 1 else m.domain_name for m in machines}


def _lab_groups(machines: list[Machine]) -> dict[int, str]:
    """`lab_<name>` per lab; `lab_<name>_<id>` for labs that share a name (in different projects)."""
    labs = {}
    for m in machines:
        member = _membership(m)
        if member is not None:
            labs[member.lab_id] = member.lab
    names: dict[str, int] = defaultdict(int)
    for lab in labs.values():
        names[group_name(lab.name)] += 1
    return {
        pk: f"lab_{group_name(lab.name)}" + (f"_{pk}" if names[group_name(lab.name)] > 1 else "")
        for pk, lab in labs.items()
    }


def _membership(machine: Machine) -> LabMachine | None:
    try:
        return machine.lab_membership
    except LabMachine.DoesNotExist:
        return None


def _url(request, path: str) -> str:
    return request.build_absolute_uri(path) if request is not None else path


def _hostvars(machine: Machine, name: str, request) -> dict[str, Any]:
    member = _membership(machine)
    image = machine.image
    hostvars: dict[str, Any] = {}
    address = ansible_host(machine)
    if address:
        hostvars["ansible_host"] = address
    # Only an image machine's login user is known: the image's cloud-init user. An ISO machine has whatever its
    # installer made, a network-boot one whatever was put on it.
    if machine.deploy_type == DeployType.IMAGE and image is not None and image.default_user:
        hostvars["ansible_user"] = image.default_user
    hostvars.update(
        {
            "portal_id": machine.pk,
            "portal_uuid": str(machine.uuid),
            "portal_name": machine.name,
            "portal_domain": machine.domain_name,
            "portal_owner": machine.owner.get_username(),
            "portal_project": machine.project.name if machine.project else None,
            "portal_lab": member.lab.name if member else None,
            "portal_lab_group": (member.group or None) if member else None,
            "portal_hypervisor": machine.hypervisor.name,
            "portal_deploy_type": machine.deploy_type,
            "portal_status": machine.status,
            "portal_power_state": machine.power_state,
            "portal_vcpus": machine.vcpus,
            "portal_memory_mib": machine.memory_mib,
            "portal_disk_gib": machine.disk_gib,
            "portal_image": image.name if image else None,
            "portal_macs": [n.mac for n in sorted(machine.nics.all(), key=lambda n: n.index)],
            "portal_addresses": _all_addresses(machine),
            "portal_tags": [str(t) for t in (machine.tags or [])],
            "portal_url": _url(request, machine.get_absolute_url()),
        }
    )
    if name != machine.name:
        hostvars["portal_inventory_name"] = name
    return hostvars


def _groups_of(machine: Machine, labs: dict[int, str]) -> list[str]:
    groups = [f"deploy_{group_name(machine.deploy_type)}", f"hypervisor_{group_name(machine.hypervisor.name)}"]
    if machine.project is not None:
        groups.append(f"project_{group_name(machine.project.name)}")
    member = _membership(machine)
    if member is not None:
        groups.append(labs[member.lab_id])
        if member.group:
            groups.append(_member_group(member.group))
    groups += [f"tag_{group_name(t)}" for t in (machine.tags or []) if str(t).strip()]
    return groups


def _add_secrets(user, machines: list[Machine], names: dict[int, str], hostvars: dict, request) -> tuple[int, int]:
    """Console links for every machine, BMC credentials for those the user may reveal (each through the reveal
    service: checked and recorded); the others are marked withheld. (revealed, withheld)."""
    roles = access.project_roles(user)
    need = policy.need("reveal_bmc")
    revealed = withheld = 0
    for m in machines:
        hv = hostvars[names[m.pk]]
        hv["portal_console_url"] = _url(request, reverse("machines:console", args=[m.pk]))
        if access.can(user, m, policy.need("serial"), roles):
            hv["portal_serial_console_url"] = _url(request, reverse("machines:serial", args=[m.pk]))
        if not m.has_bmc:
            continue
        if not access.can(user, m, need, roles):
            hv["portal_bmc_withheld"] = True
            withheld += 1
            continue
        bmc = machine_bmc_reveal(machine=m, actor=user)
        hv.update(
            {
                "portal_bmc_address": bmc["address"],
                "portal_bmc_port": bmc["port"],
                "portal_bmc_username": bmc["username"],
                "portal_bmc_password": bmc["password"],
            }
        )
        revealed += 1
    return revealed, withheld


def build_inventory(
    user, *, lab: Lab | None = None, project: Project | None = None, bmc: bool = False, request=None
) -> dict:
    """Ansible's JSON inventory of the machines `user` may see (of one lab, of one project): groups, and the
    host variables in `_meta.hostvars`. `bmc`: also console links and the BMC credentials the user may reveal
    (recorded). `request` makes the portal URLs absolute."""
    machines = _machines(user, lab, project)
    names = _host_names(machines)
    labs = _lab_groups(machines)
    hostvars: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    for m in machines:
        name = names[m.pk]
        hostvars[name] = _hostvars(m, name, request)
        for group in _groups_of(m, labs):
            if name not in groups[group]:
                groups[group].append(name)
    if bmc:
        revealed, withheld = _add_secrets(user, machines, names, hostvars, request)
        scope = f"lab={lab.pk} " if lab is not None else ""
        scope += f"project={project.pk} " if project is not None else ""
        audit.record(
            "inventory.bmc_export",
            lab,
            detail=f"{scope}machines={len(machines)} bmc_revealed={revealed} bmc_withheld={withheld}",
            request=request,
            user=user,
        )
    inventory: dict[str, Any] = {"_meta": {"hostvars": hostvars}, "all": {"children": sorted(groups)}}
    for group in sorted(groups):
        inventory[group] = {"hosts": groups[group]}
    return inventory


def _ansistack_host(name: str, hostvars: dict[str, Any]) -> dict[str, Any]:
    """One host as AnsiStack's vm-inventory playbook writes it, followed by the portal's own variables."""
    member_group = hostvars.get("portal_lab_group") or ""
    entry: dict[str, Any] = {}
    if "ansible_user" in hostvars:  # never null: Ansible would take it for a user named "None"
        entry["ansible_user"] = hostvars["ansible_user"]
    entry |= {
        # The portal does not know the guest's Python; Ansible finds it ("auto" is its discovery).
        "ansible_python_interpreter": "auto",
        "vm_job_target": name,
        "vm_virt_host": hostvars["portal_hypervisor"],
        "tripleo_deploy_type": member_group if member_group in ("undercloud", "minion", "standalone") else "undefined",
        "tripleo_ceph_enabled": False,
        "vm_disk_size": hostvars["portal_disk_gib"],
        "vm_cores": hostvars["portal_vcpus"],
        "vm_ram": hostvars["portal_memory_mib"],
    }
    if "ansible_host" in hostvars:
        entry["ansible_host"] = hostvars["ansible_host"]
    if "portal_console_url" in hostvars:
        entry["vm_console_uri"] = hostvars["portal_console_url"]
    if "portal_bmc_port" in hostvars:
        entry["vm_vbmc_port"] = hostvars["portal_bmc_port"]
        entry["vm_vbmc_username"] = hostvars["portal_bmc_username"]
        entry["vm_vbmc_password"] = hostvars["portal_bmc_password"]
    entry.update({k: v for k, v in hostvars.items() if k not in entry})
    return entry


def ansistack_inventory(inventory: dict) -> dict:
    """A build_inventory() result in the shape of AnsiStack's `vm-lab-inventory.yaml`: every host under `vms`
    with AnsiStack's variables, the TripleO children it writes (`overcloud`, `undercloud`, `minion`,
    `standalone`, by the lab member group), and the portal's groups as further children of `vms`."""
    hostvars = inventory["_meta"]["hostvars"]
    children: dict[str, Any] = {
        child: {"hosts": {h: {} for h, v in hostvars.items() if v.get("portal_lab_group") == child}}
        for child in ANSISTACK_CHILDREN
    }
    for group in inventory["all"]["children"]:
        if group not in children:
            children[group] = {"hosts": {h: {} for h in inventory[group]["hosts"]}}
    return {
        "vms": {
            "vars": {"ansible_ssh_common_args": "-o StrictHostKeyChecking=no"},
            "hosts": {name: _ansistack_host(name, v) for name, v in hostvars.items()},
            "children": children,
        }
    }
