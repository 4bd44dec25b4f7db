"""AnsiStack inventories read with ansible-core's own loader, into a plan of what importing them would do.

The files are written to a private temporary directory and loaded by ansible-core's InventoryManager (YAML
plugin only) with a VariableManager, so group inheritance is exactly Ansible's. ansible-core 2.19 tags every
loaded value with its Origin (file, line), which is how each problem names its file and line. Nothing here
changes anything: `make_plan` only reads the database; labs.importer applies a plan.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from django.db.models import Q

from hypervisors.drivers.base import remote_host
from hypervisors.models import Hypervisor, Image, ImageKind
from machines.models import Machine

GROUP_IMAGE = "provisioned_vms"
GROUP_NETWORK = "bootable_vms"
ALL_VMS = "all_vms"
HOSTS_GROUP = "libvirt_hosts"
SHARED_BMC = ("admin", "secrete")  # AnsiStack's example BMC credentials, the same for every machine
MAX_FILES, MAX_FILE_BYTES = 20, 1024 * 1024

# Variables the import turns into portal settings.
MACHINE_VARS = {
    "vm_virt_host",
    "vm_cores",
    "vm_ram",
    "vm_disk_size",
    "vm_image_name",
    "vm_bootable_iso",
    "vm_additional_isos",
    "vm_networks",
    "vm_preprov_networks",
    "vm_vbmc_port",
    "vm_vbmc_username",
    "vm_vbmc_password",
    "vm_pci_passthrough_devices",
    "vm_passthrough_lookup_regex",
    "vm_machine",
    "vm_boot_loader",
    "vm_qemu_commandline",
    "vm_protected",
}
HOST_VARS = {"ansible_host", "ansible_user", "ansible_port", "ansible_connection", "server_networks"}
# What Ansible sets on every host itself: not the inventory's variables.
MAGIC_VARS = {"inventory_file", "inventory_dir", "inventory_hostname", "inventory_hostname_short", "group_names"}
# Why some AnsiStack variables are not taken, said in the report next to their name.
NOT_TAKEN = {
    "vm_extra_disks": "AnsiStack copies existing disk files; the portal makes blank extra disks only",
    "vm_bootable_disks": "AnsiStack copies existing disk files; the portal boots its own disk",
    "vm_bios": "virt-install --sysinfo text; set the machine's SMBIOS fields in the portal instead",
    "vm_variant": "the portal needs no OS variant",
    "vm_flags": "virt-install flags; the portal builds the domain itself",
    "vm_keys_links": "add the keys to the owner's SSH keys instead",
    "vm_inventory_file": "the portal's inventory export replaces it",
    "vm_instackenv_file": "the portal's instackenv export replaces it",
    "vm_management_interface": "playbook setting, not a machine's",
    "vm_management_net": "playbook setting, not a machine's",
    "vm_image_path": "the portal keeps its own image catalogue",
    "vm_iso_path": "the portal keeps its own image catalogue",
}


@dataclass
class Problem:
    file: str
    line: int | None
    message: str
    level: str = "error"  # error: that part is not imported; warning: imported differently; note: for the record

    def text(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{self.level}: {where}: {self.message}"


@dataclass
class Plan:
    lab: str = ""
    hypervisors: list[dict] = field(default_factory=list)
    networks: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    machines: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)

    def problem(self, file: str, line: int | None, message: str, level: str = "error") -> None:
        self.problems.append(asdict(Problem(file, line, message, level)))

    def as_dict(self) -> dict:
        return asdict(self)


class InventoryFiles:
    """Uploaded texts in a private temporary directory, named as uploaded, and the map back from its paths."""

    def __init__(self, files: list[dict]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="ansistack-")  # mode 0700
        self.paths: dict[str, str] = {}  # path on disk -> the name the user gave
        self.host_lines: dict[str, dict[str, int]] = {}  # path on disk -> host -> line
        for n, f in enumerate(files):
            name = Path(str(f["name"])).name or f"inventory-{n}.yaml"
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            if not safe.endswith((".yaml", ".yml", ".json")):
                safe += ".yaml"  # ansible's YAML plugin only reads these
            path = Path(self._dir.name) / f"{n}-{safe}"
            path.write_text(str(f["text"]))
            self.paths[str(path)] = name
            self.host_lines[str(path)] = _host_lines(str(f["text"]))

    def host_where(self, host) -> tuple[str, int | None]:
        """The file and line where a host is written."""
        path = str(host.vars.get("inventory_file", ""))
        return (self.paths.get(path, ""), self.host_lines.get(path, {}).get(host.name))

    def close(self) -> None:
        self._dir.cleanup()


def _where(value: Any, files: dict[str, str]) -> tuple[str, int | None]:
    """The (file, line) ansible-core's Origin tag gives a loaded value."""
    from ansible._internal._datatag._tags import Origin  # type: ignore[import-untyped]

    origin = Origin.get_tag(value)
    if origin is None or origin.path is None:
        return ("", None)
    return (files.get(origin.path, Path(origin.path).name), origin.line_num)


def _host_lines(text: str) -> dict[str, int]:
    """Each host's line (the key under a `hosts:` mapping), from a YAML pass of our own: ansible-core tags the
    host's variables with their lines, not the host's name."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, under_hosts: bool) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if under_hosts and isinstance(key, yaml.ScalarNode):
                    lines.setdefault(str(key.value), key.start_mark.line + 1)
                walk(value, isinstance(key, yaml.ScalarNode) and key.value == "hosts")
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, False)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, False)
    return lines


def _yaml_problem(name: str, text: str) -> Problem | None:
    """A YAML pass of our own before ansible sees the file: a syntax error with its line, a top level that is
    not a mapping (ansible would only say it failed)."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        return Problem(name, line, f"broken YAML: {e.problem or e.context}; nothing of this file is imported")
    except yaml.YAMLError as e:
        return Problem(name, None, f"broken YAML: {e}; nothing of this file is imported")
    if data is None:
        return Problem(name, None, "the file is empty", "warning")
    if not isinstance(data, dict):
        return Problem(name, 1, "an inventory is a mapping of groups (all: ...); nothing of this file is imported")
    return None


def _load(files: InventoryFiles, plan: Plan):
    """ansible-core's inventory of the files that passed the YAML pass, and its VariableManager."""
    from ansible.errors import AnsibleError  # type: ignore[import-untyped]
    from ansible.inventory.data import InventoryData  # type: ignore[import-untyped]
    from ansible.inventory.manager import InventoryManager  # type: ignore[import-untyped]
    from ansible.parsing.dataloader import DataLoader  # type: ignore[import-untyped]
    from ansible.plugins.loader import inventory_loader  # type: ignore[import-untyped]
    from ansible.vars.manager import VariableManager  # type: ignore[import-untyped]

    class _YamlInventory(InventoryManager):
        def _fetch_inventory_plugins(self):  # only the YAML plugin: these are YAML inventories
            return [inventory_loader.get("yaml")]

    loader = DataLoader()
    good = []
    for path, name in files.paths.items():
        if problem := _yaml_problem(name, Path(path).read_text()):
            plan.problems.append(asdict(problem))
            continue
        try:  # the YAML plugin alone first, for its own message when the file is not an inventory
            inventory_loader.get("yaml").parse(InventoryData(), loader, path, cache=False)
        except AnsibleError as e:
            plan.problem(name, None, f"not an Ansible inventory: {e.message}; nothing of this file is imported")
            continue
        good.append(path)
    inventory = _YamlInventory(loader=loader, sources=good, parse=False)
    if good:
        inventory.parse_sources(cache=False)
    return inventory, VariableManager(loader=loader, inventory=inventory)


def _host_vars(inventory, variables, host) -> dict:
    """The host's variables as Ansible resolves them (group inheritance), only those the inventory set."""
    resolved = variables.get_vars(host=host, include_hostvars=False)
    keys = set(host.vars)
    for group in host.get_groups():
        keys |= set(group.get_vars())
    return {k: resolved[k] for k in keys - MAGIC_VARS if k in resolved}


def _defined_at(host, key: str, files: dict[str, str]) -> tuple[str, int | None]:
    """Where the value the host gets for `key` is written: the host's own line, else the deepest group's."""
    if key in host.vars:
        return _key_where(host.vars, key, files)
    for group in sorted(host.get_groups(), key=lambda g: -g.depth):
        if key in group.vars:
            return _key_where(group.vars, key, files)
    return ("", None)


def _key_where(mapping: dict, key: str, files: dict[str, str]) -> tuple[str, int | None]:
    for k in mapping:
        if k == key:
            where = _where(k, files)
            return where if where[1] else _where(mapping[k], files)
    return ("", None)


def plan_inventory(
    files: list[dict], *, vars_file: dict | None = None, owner=None, lab: str = "", project=None
) -> Plan:
    """The plan for these inventory files ([{"name", "text"}]) and the optional vars file ({"name", "text"}
    with vm_image_data). Reads the database, changes nothing."""
    plan = Plan()
    store = InventoryFiles(files)
    try:
        inventory, variables = _load(store, plan)
        image_data = _image_data(vars_file, plan)
        hosts = {h.name: h for h in inventory.get_hosts()}
        groups = inventory.groups
        libvirt_hosts = [h for h in hosts.values() if _in_group(h, HOSTS_GROUP)]
        vms = [h for h in hosts.values() if _in_group(h, ALL_VMS)]
        vm_file = next((store.host_where(h)[0] for h in vms), "")
        plan.lab = lab or _lab_name(vm_file or (files[0]["name"] if files else "inventory"))
        unsupported: dict[tuple, set[str]] = {}
        by_host = _plan_hypervisors(plan, libvirt_hosts, inventory, variables, store, unsupported)
        _plan_images(plan, vms, inventory, variables, store.paths, image_data)
        _plan_machines(plan, vms, inventory, variables, store, by_host, owner, unsupported)
        _plan_networks_used(plan, by_host)
        for (key, file, line), names in sorted(unsupported.items(), key=lambda i: (i[0][1], i[0][2] or 0, i[0][0])):
            why = NOT_TAKEN.get(key) or (
                "an Ansible connection setting; the portal reaches hosts through libvirt"
                if key.startswith("ansible_")
                else "the portal does not support it"
            )
            who = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            plan.problem(file, line, f"{key} ({who}) is not imported: {why}", "warning")
        if not groups.get(ALL_VMS) and not libvirt_hosts and inventory.get_hosts():
            plan.problem(vm_file or "", None, "no libvirt_hosts and no all_vms group: nothing to import", "warning")
    finally:
        store.close()
    return plan


def _in_group(host, name: str) -> bool:
    return any(g.name == name for g in host.get_groups())


def _lab_name(file_name: str) -> str:
    stem = Path(file_name).stem.lower()
    name = re.sub(r"[^a-z0-9-]+", "-", stem).strip("-")[:63].strip("-")
    return name or "inventory"


def _portal_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")


def _image_data(vars_file: dict | None, plan: Plan) -> dict:
    """vm_image_data from the vars file (infrastructure/vars/main.yml's shape): name -> {url, name, access_user}."""
    if not vars_file or not vars_file.get("text"):
        return {}
    name = str(vars_file.get("name") or "vars.yml")
    if problem := _yaml_problem(name, str(vars_file["text"])):
        plan.problems.append(asdict(problem))
        return {}
    data = yaml.safe_load(str(vars_file["text"])).get("vm_image_data")
    if not isinstance(data, dict):
        plan.problem(name, None, "no vm_image_data mapping in this file", "warning")
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def _hypervisor_uri(hv: dict) -> str:
    if hv.get("connection") == "local":
        return "qemu:///system"
    user = f"{hv['user']}@" if hv.get("user") else ""
    address = hv["address"]
    host = f"[{address}]" if ":" in address else address
    port = f":{hv['port']}" if hv.get("port") else ""
    return f"qemu+ssh://{user}{host}{port}/system"


def _existing_hypervisor(uri: str, address: str) -> Hypervisor | None:
    """A hypervisor already registered with this URI, or at this host."""
    for hv in Hypervisor.objects.all():
        if hv.uri == uri or (address and remote_host(hv.uri) == address):
            return hv
    return None


def _plan_hypervisors(plan, hosts, inventory, variables, store, unsupported) -> dict[str, dict]:
    by_host: dict[str, dict] = {}
    files = store.paths
    for host in sorted(hosts, key=lambda h: h.name):
        hv_vars = _host_vars(inventory, variables, host)
        file, line = store.host_where(host)
        entry: dict[str, Any] = {
            "inventory_name": host.name,
            "name": _portal_name(host.name),
            "address": str(hv_vars.get("ansible_host") or host.name),
            "user": str(hv_vars.get("ansible_user") or ""),
            "port": int(hv_vars["ansible_port"]) if str(hv_vars.get("ansible_port", "")).isdigit() else None,
            "connection": str(hv_vars.get("ansible_connection") or ""),
            "file": file or _first_file(files),
            "line": line,
        }
        entry["uri"] = _hypervisor_uri(entry)
        existing = _existing_hypervisor(entry["uri"], remote_host(entry["uri"]))
        if existing is not None:
            entry.update(action="registered", hypervisor_id=existing.pk, name=existing.name)
            if not existing.is_online:
                why = f": {existing.status_error}" if existing.status_error else ""
                plan.problem(
                    entry["file"],
                    line,
                    f"host {host.name}: the portal cannot reach hypervisor {existing.name} "
                    f"({existing.get_status_display().lower()}{why}); its machines wait until it is online",
                )
        elif Hypervisor.objects.filter(name=entry["name"]).exists():
            entry.update(action="conflict", hypervisor_id=None)
            plan.problem(
                entry["file"],
                line,
                f"host {host.name}: a hypervisor named {entry['name']} has another URI; not registered",
            )
        else:
            entry.update(action="register", hypervisor_id=None)
            if not hv_vars.get("ansible_host") and entry["connection"] != "local":
                plan.problem(
                    entry["file"], line, f"host {host.name} has no ansible_host: its name is the address", "note"
                )
            if entry["connection"] != "local":
                plan.problem(
                    entry["file"],
                    line,
                    f"host {host.name}: the portal reaches a new qemu+ssh hypervisor once staff trust its SSH host "
                    f"key (on its page, after the first check); import again then for its networks and machines",
                    "note",
                )
        entry["networks"] = _server_networks(plan, host, hv_vars, files, entry, existing)
        plan.hypervisors.append(entry)
        by_host[host.name] = entry
        for key in set(hv_vars) - HOST_VARS:
            unsupported.setdefault((key, *_defined_at(host, key, files)), set()).add(host.name)
    return by_host


def _first_file(files: dict[str, str]) -> str:
    return next(iter(files.values()), "")


def _server_networks(plan, host, hv_vars, files, entry, existing) -> list[str]:
    """server_networks (name -> {interface, type: macvlan|bridge}) as networks to define on the hypervisor."""
    nets = hv_vars.get("server_networks") or {}
    file, line = _defined_at(host, "server_networks", files)
    if not isinstance(nets, dict):
        plan.problem(file, line, f"host {host.name}: server_networks is a mapping of network names")
        return []
    have = {n.get("name") for n in (existing.networks if existing else [])}
    names = []
    for name, spec in nets.items():
        spec = spec if isinstance(spec, dict) else {}
        kind, dev = str(spec.get("type", "")), str(spec.get("interface", ""))
        n_file, n_line = _where(name, files)
        names.append(str(name))
        item = {"hypervisor": entry["name"], "name": str(name), "file": n_file or file, "line": n_line or line}
        if name in have:
            item.update(action="exists")
        elif kind not in ("macvlan", "bridge") or not dev:
            item.update(action="skip")
            plan.problem(
                item["file"],
                item["line"],
                f"network {name} on {host.name}: give interface and type macvlan or bridge; not defined",
            )
        else:
            mode = "macvtap" if kind == "macvlan" else "bridge"
            item.update(action="define", mode=mode, **({"interface": dev} if mode == "macvtap" else {"bridge": dev}))
        plan.networks.append(item)
    return names


def _plan_images(plan, vms, inventory, variables, files, image_data) -> None:
    """Each vm_image_name the machines use, found in the portal's catalogue or imported from vm_image_data's URL."""
    seen: dict[str, dict] = {}
    for host in vms:
        hv_vars = _host_vars(inventory, variables, host)
        if not _in_group(host, GROUP_IMAGE) or hv_vars.get("vm_bootable_iso"):
            continue
        name = hv_vars.get("vm_image_name")
        if not name or str(name) in seen:
            continue
        name = str(name)
        file, line = _defined_at(host, "vm_image_name", files)
        data = image_data.get(name, {})
        url = str(data.get("url") or "")
        existing = (
            Image.objects.filter(kind=ImageKind.DISK)
            .filter(Q(name=name) | Q(name=str(data.get("name") or name)) | (Q(source_url=url) if url else Q(pk__in=[])))
            .first()
        )
        entry: dict[str, Any] = {"name": name, "url": url, "file": file, "line": line}
        if existing is not None:
            entry.update(action="exists", image_id=existing.pk, portal_name=existing.name)
            if not existing.is_ready:
                plan.problem(file, line, f"image {name}: the portal's {existing.name} is {existing.status}", "warning")
        elif url:
            fmt = "raw" if url.endswith((".raw", ".img.raw")) else "qcow2"
            entry.update(action="import", format=fmt, default_user=str(data.get("access_user") or ""))
        else:
            entry.update(action="missing")
            plan.problem(
                file,
                line,
                f"image {name}: the portal does not have it and no vm_image_data entry gives its URL "
                f"(add --vars with vm_image_data, or add the image first); its machines are not created",
            )
        seen[name] = entry
        plan.images.append(entry)


def _iso(name: str) -> Image | None:
    stem = name.rsplit(".", 1)[0]
    return Image.objects.filter(kind=ImageKind.ISO).filter(Q(name=name) | Q(name=stem)).first()


def _plan_machines(plan, vms, inventory, variables, store, by_host, owner, unsupported) -> None:
    files = store.paths
    bmc_ports: dict[int, tuple[str, str, int | None]] = {}
    images = {i["name"]: i for i in plan.images}
    shared_bmc: list[str] = []
    for host in sorted(vms, key=lambda h: h.name):
        v = _host_vars(inventory, variables, host)
        m = _machine_entry(plan, host, v, store, by_host, images, owner)
        if m is None:
            continue
        plan.machines.append(m)
        if m["deploy_type"] == "network":
            port = v.get("vm_vbmc_port")
            p_file, p_line = _defined_at(host, "vm_vbmc_port", files)
            if isinstance(port, int) and port in bmc_ports:
                other = bmc_ports[port]
                plan.problem(
                    p_file,
                    p_line,
                    f"{host.name}: BMC port {port} is also {other[0]}'s ({other[1]}:{other[2]}); "
                    f"the portal gives each machine a free port of its own",
                    "warning",
                )
            elif isinstance(port, int):
                bmc_ports[port] = (host.name, p_file, p_line)
            if (str(v.get("vm_vbmc_username", "")), str(v.get("vm_vbmc_password", ""))) == SHARED_BMC:
                shared_bmc.append(host.name)
        for key in v:
            if key not in MACHINE_VARS and key not in HOST_VARS:
                unsupported.setdefault((key, *_defined_at(host, key, files)), set()).add(host.name)
    if shared_bmc:
        host = next(h for h in vms if h.name == shared_bmc[0])
        file, line = _defined_at(host, "vm_vbmc_password", files)
        plan.problem(
            file,
            line,
            f"the shared BMC credentials admin/secrete ({len(shared_bmc)} machines) are replaced by per-machine "
            f"ones: each machine's page shows its own BMC user and password",
            "warning",
        )


def _machine_entry(plan, host, v, store, by_host, images, owner) -> dict | None:
    files = store.paths
    file, line = store.host_where(host)
    file = file or _first_file(files)
    group = GROUP_NETWORK if _in_group(host, GROUP_NETWORK) else GROUP_IMAGE if _in_group(host, GROUP_IMAGE) else ""
    if not group:
        plan.problem(file, line, f"{host.name} is in all_vms but neither provisioned_vms nor bootable_vms; skipped")
        return None
    deploy = "network" if group == GROUP_NETWORK else "iso" if v.get("vm_bootable_iso") else "image"
    m: dict[str, Any] = {
        "name": _portal_name(host.name),
        "inventory_name": host.name,
        "group": group,
        "deploy_type": deploy,
        "file": file,
        "line": line,
        "vcpus": _int(v.get("vm_cores"), 1),
        "memory_mib": _int(v.get("vm_ram"), 1024),
        "disk_gib": _int(v.get("vm_disk_size"), 10),
        "deletion_protection": bool(v.get("vm_protected")),
        "nics": _nics(v),
        "hardware": _hardware(plan, host, v, files),
        "action": "create",
        "reasons": [],
    }
    if m["name"] != host.name:
        plan.problem(file, line, f"{host.name} becomes {m['name']} (portal names are lower-case with hyphens)", "note")
    virt = str(v.get("vm_virt_host") or "")
    hv = by_host.get(virt)
    if hv is None:
        existing = Hypervisor.objects.filter(name=_portal_name(virt)).first() if virt else None
        msg = f"{host.name}: vm_virt_host {virt or '(none)'} is not in the inventory's libvirt_hosts"
        if existing is not None:
            plan.problem(file, line, f"{msg}; the portal's hypervisor {existing.name} is used", "warning")
            m.update(hypervisor=existing.name, hypervisor_id=existing.pk)
        else:
            plan.problem(file, line, f"{msg}; not created")
            m.update(hypervisor="", hypervisor_id=None, action="skip")
            m["reasons"].append(f"no hypervisor {virt or '(vm_virt_host missing)'}")
    else:
        m.update(hypervisor=hv["name"], hypervisor_id=hv.get("hypervisor_id"), hypervisor_networks=hv["networks"])
        if hv["action"] == "conflict":
            m["action"] = "skip"
            m["reasons"].append(f"hypervisor {hv['name']} not registered")
    if m["action"] == "create":  # a machine or domain already there needs no image
        _match_existing(plan, m, owner)
    if m["action"] == "create":
        _machine_media(plan, m, v, host, files, images)
    return m


def _list(value: Any) -> list:
    """A list variable, or one value given alone (vm_additional_isos: one.iso)."""
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _nics(v: dict) -> list[dict]:
    """vm_networks (network -> {interface, dhcp, mac, router, dns}) in order, with vm_preprov_networks' static
    addresses (interface -> [address/prefix]) on the NIC of that interface."""
    nets = v.get("vm_networks") or {}
    static = v.get("vm_preprov_networks") or {}
    nics = []
    for name, spec in nets.items() if isinstance(nets, dict) else []:
        spec = spec if isinstance(spec, dict) else {}
        addresses = [str(a) for a in _list(static.get(spec.get("interface")))] if isinstance(static, dict) else []
        dns = spec.get("dns") or []
        nics.append(
            {
                "source": str(name),
                "mac": str(spec.get("mac") or ""),
                "dhcp4": bool(spec.get("dhcp", not addresses)) and not addresses,
                "addresses": addresses,
                "gateway4": str(spec.get("router") or ""),
                "nameservers": [str(d) for d in dns] if isinstance(dns, list) else [],
            }
        )
    return nics


def _hardware(plan, host, v, files) -> dict:
    hw: dict[str, Any] = {}
    if v.get("vm_machine"):
        hw["machine_type"] = str(v["vm_machine"])
    if v.get("vm_boot_loader"):
        hw["firmware"] = "uefi"
        file, line = _defined_at(host, "vm_boot_loader", files)
        plan.problem(file, line, f"{host.name}: vm_boot_loader becomes the host's UEFI firmware", "note")
    if v.get("vm_pci_passthrough_devices"):
        hw["hostdevs"] = [str(d) for d in _list(v["vm_pci_passthrough_devices"])]
    elif v.get("vm_passthrough_lookup_regex"):
        hw["hostdev_match"] = str(v["vm_passthrough_lookup_regex"])
    if v.get("vm_qemu_commandline"):
        args = v["vm_qemu_commandline"]
        hw["qemu_args"] = [str(a) for a in args] if isinstance(args, list) else str(args).split()
    return hw


def _machine_media(plan, m, v, host, files, images) -> None:
    if m["deploy_type"] == "image":
        image = images.get(str(v.get("vm_image_name") or ""))
        if image is None:
            file, line = m["file"], m["line"]
            plan.problem(file, line, f"{host.name}: no vm_image_name for an image machine; not created")
            m["action"] = "skip"
            m["reasons"].append("no image")
        else:
            m["image"] = image["name"]
            if image["action"] == "missing":
                m["action"] = "skip"
                m["reasons"].append(f"image {image['name']} missing")
    elif m["deploy_type"] == "iso":
        names = [("vm_bootable_iso", str(v["vm_bootable_iso"]))]
        names += [("vm_additional_isos", str(i)) for i in _list(v.get("vm_additional_isos"))]
        found = []
        for key, name in names:
            iso = _iso(name)
            if iso is None:
                file, line = _defined_at(host, key, files)
                plan.problem(file, line, f"{host.name}: the portal has no ISO {name}; upload it first; not created")
                m["action"] = "skip"
                m["reasons"].append(f"ISO {name} missing")
            else:
                found.append(iso.name)
        m["isos"] = found


def _match_existing(plan, m, owner) -> None:
    """Already a portal machine (same name on the same hypervisor): nothing to do; a domain of that name the
    portal does not manage on that hypervisor: adopt it."""
    if m.get("hypervisor_id") is None:
        return
    machine = Machine.objects.filter(name=m["name"], hypervisor_id=m["hypervisor_id"]).first()
    if machine is not None:
        m.update(action="exists", machine_id=machine.pk)
        return
    hv = Hypervisor.objects.get(pk=m["hypervisor_id"])
    domain = next((d for d in hv.unmanaged_domains if d.get("name") in (m["name"], m["inventory_name"])), None)
    if domain is not None:
        m.update(action="adopt", domain_uuid=str(domain["uuid"]))
        return
    if owner is not None and Machine.objects.filter(owner=owner, name=m["name"]).exists():
        m.update(action="skip")
        m["reasons"].append("name taken")
        plan.problem(
            m["file"], m["line"], f"{m['inventory_name']}: {owner} already has a machine {m['name']} elsewhere"
        )


def _plan_networks_used(plan: Plan, by_host: dict[str, dict]) -> None:
    """A machine's vm_networks must be on its hypervisor: defined there already or by this import."""
    for m in plan.machines:
        if m["action"] != "create" or not m["hypervisor"]:
            continue
        hv = Hypervisor.objects.filter(pk=m["hypervisor_id"]).first() if m.get("hypervisor_id") else None
        have = {n.get("name") for n in (hv.networks if hv else [])} | set(m.get("hypervisor_networks", []))
        for nic in m["nics"]:
            if nic["source"] not in have:
                plan.problem(
                    m["file"],
                    m["line"],
                    f"{m['inventory_name']}: network {nic['source']} is neither on {m['hypervisor']} nor in its "
                    f"server_networks; not created",
                )
                m["action"] = "skip"
                m["reasons"].append(f"network {nic['source']} missing")
                break
        for nic in m["nics"]:
            for a in nic["addresses"]:
                try:
                    ipaddress.ip_interface(a)
                except ValueError:
                    plan.problem(m["file"], m["line"], f"{m['inventory_name']}: {a!r} is not an address/prefix")


ACTION_WORDS = {
    "register": "register",
    "registered": "already registered",
    "conflict": "not registered",
    "define": "define",
    "exists": "already there",
    "skip": "not done",
    "import": "import",
    "missing": "missing",
    "create": "create",
    "adopt": "adopt",
}


def report_lines(plan: dict) -> list[str]:
    """The plan as readable lines, for the command and the page."""
    lines = [f"lab: {plan.get('lab', '')}"]
    for h in plan.get("hypervisors", []):
        lines.append(f"hypervisor {h['name']} ({h['uri']}): {ACTION_WORDS[h['action']]}")
    for n in plan.get("networks", []):
        how = f" ({n.get('mode')} on {n.get('interface') or n.get('bridge')})" if n["action"] == "define" else ""
        lines.append(f"network {n['name']} on {n['hypervisor']}: {ACTION_WORDS[n['action']]}{how}")
    for i in plan.get("images", []):
        src = f" from {i['url']}" if i["action"] == "import" else ""
        lines.append(f"image {i['name']}: {ACTION_WORDS[i['action']]}{src}")
    for m in plan.get("machines", []):
        what = f"{m['deploy_type']}, {m['vcpus']} vCPU, {m['memory_mib']} MiB, {m['disk_gib']} GiB"
        why = f" ({'; '.join(m['reasons'])})" if m.get("reasons") else ""
        lines.append(
            f"machine {m['name']} on {m['hypervisor'] or '?'} [{m['group']}; {what}]: {ACTION_WORDS[m['action']]}{why}"
        )
    for p in plan.get("problems", []):
        lines.append(Problem(**p).text())
    return lines


def count_steps(plan: dict) -> int:
    """What applying the plan does, one step each: registrations, definitions, imports, creations, adoptions."""
    return (
        sum(h["action"] == "register" for h in plan.get("hypervisors", []))
        + sum(n["action"] == "define" for n in plan.get("networks", []))
        + sum(i["action"] == "import" for i in plan.get("images", []))
        + sum(m["action"] in ("create", "adopt") for m in plan.get("machines", []))
    )
