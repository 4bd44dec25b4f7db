"""An in-memory hypervisor at the driver seam, for fast unit tests of the pipeline.

FakeDriver implements the whole HypervisorDriver interface (hypervisors/drivers/base.py).
tests/hypervisors/test_driver_contract.py runs one suite against it and against
LibvirtDriver("test:///default"), so the two cannot drift apart; tests/integration
tests the real driver against libvirtd. Tests reach it through the `host` fixture
(tests/conftest.py), which puts it behind get_driver.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace

from hypervisors.drivers.base import (
    PORTAL_METADATA_NS,
    DomainCounters,
    DomainInfo,
    DomainInspected,
    DomainObserved,
    DomainSize,
    HostCountersRead,
    HostInfo,
    HostObserved,
    HypervisorDriver,
    HypervisorFatalError,
    MigrationAborted,
    MigrationProgress,
    MigrationResult,
    NetworkInfo,
    PoolInfo,
    PowerState,
    SnapshotInfo,
    VolumeInfo,
)
from hypervisors.drivers.domxml import (
    HOT_PLUG_BUSES,
    _target_names,
    build_domain_xml,
    foreign_domain,
    free_disk_target,
    guard_name,
    new_vnc_password,
)
from machines.bmc import BmcClient, BmcError, BmcFatalError, BmcTarget

# What the fake's screenshot() returns for a running domain: a 1x1 black PPM, as QEMU sends it.
SCREEN = b"P6\n1 1\n255\n\x00\x00\x00"
POOL_BYTES = 100 << 30  # what each fake pool holds


@dataclass
class FakeHost:
    pools: dict[str, dict[str, dict]] = field(default_factory=lambda: {"default": {}})
    domains: dict[str, dict] = field(default_factory=dict)
    guards: dict[str, str] = field(default_factory=dict)  # nwfilter name -> XML
    networks: dict[str, str] = field(default_factory=dict)  # network name -> XML
    fail: dict[str, Exception] = field(default_factory=dict)  # method name -> error to raise once
    calls: list[str] = field(default_factory=list)
    runs: int = 0  # the last domain id given to a start (libvirt numbers each run)
    leases: dict[str, list[str]] = field(default_factory=dict)  # MAC -> addresses the networks' DHCP leased
    # What domains_observed tells of the host's CPU and memory (None: as a host that tells none); a running
    # domain's counters are its dict's "counters" (a DomainCounters, set by the test; None when unset).
    host_counters: HostCountersRead | None = None
    # The virtual BMCs listening: (address, port) -> (username, password, domain name), as the BMC server
    # runs them; FakeBmc also finds those of the machines in the database, as the BMC server does.
    bmcs: dict[tuple[str, int], tuple[str, str, str]] = field(default_factory=dict)

    def add_foreign(self, xml: str, state: PowerState = PowerState.OFF) -> str:
        """A domain defined by hand, not by the portal (as `virsh define` would): kept as its XML; its UUID."""
        root = ET.fromstring(xml)
        uuid = root.findtext("uuid") or ""
        graphics = root.find("devices/graphics[@type='vnc']")
        protected = graphics is None or bool(graphics.get("passwd"))
        self.domains[uuid] = {
            "xml": xml,
            "state": state,
            "autostart": False,
            "vnc_config_protected": protected,
            "vnc_protected": protected,
            "macs": [m.get("address", "").lower() for m in root.findall("devices/interface/mac")],
        }
        return uuid

    def get_driver(self, uri: str, driver: str = "libvirt") -> FakeDriver:
        """Stands in for hypervisors.drivers.get_driver: every driver it gives shares this host."""
        return FakeDriver(uri, self)


class FakeDriver(HypervisorDriver):
    def __init__(self, uri: str, host: FakeHost) -> None:
        super().__init__(uri)
        self.host = host

    def _hit(self, name: str) -> None:
        self.host.calls.append(name)
        if name in self.host.fail:
            raise self.host.fail.pop(name)

    def _pool(self, pool: str) -> dict:
        if pool not in self.host.pools:
            raise HypervisorFatalError(f"storage pool {pool!r} does not exist on this hypervisor")
        return self.host.pools[pool]

    def _vol(self, pool: str, name: str) -> dict:
        vol = self._pool(pool).get(name)
        if vol is None:
            raise HypervisorFatalError(f"volume {name!r} does not exist")
        return vol

    def host_info(self):
        self._hit("host_info")
        pools = []
        for name, vols in sorted(self.host.pools.items()):
            used = sum(v["capacity"] for v in vols.values())
            pools.append(
                PoolInfo(
                    name=name,
                    active=True,
                    type="dir",
                    path=f"/fake/{name}",
                    capacity_bytes=POOL_BYTES,
                    allocation_bytes=used,
                    available_bytes=POOL_BYTES - used,
                )
            )
        networks = []
        for name, xml in sorted(self.host.networks.items()):
            root = ET.fromstring(xml)
            forward, bridge = root.find("forward"), root.find("bridge")
            networks.append(
                NetworkInfo(
                    name=name,
                    active=True,
                    forward_mode="isolated" if forward is None else forward.get("mode", "nat"),
                    bridge="" if bridge is None else bridge.get("name", ""),
                    guard=guard_name(name) if guard_name(name) in self.host.guards else "",
                )
            )
        return HostInfo(
            hostname="fake",
            arch="x86_64",
            cpus=4,
            memory_mib=8192,
            cpu_model="qemu64",
            libvirt_version="9.0.0",
            hypervisor_version="7.2.0",
            domain_type="qemu",
            domain_types=["qemu"],
            guest_arches=["x86_64"],
            machine_types=["pc", "q35"],
            cpu_modes=["host-model", "custom"],
            cpu_models=["qemu64"],
            firmwares=["bios"],
            pools=pools,
            networks=networks,
            domains=sorted(
                (replace(d, shape=None if d.managed else self.domain_shape(d.uuid)) for d in self.list_domains()),
                key=lambda d: d.name,
            ),
        )

    def list_domains(self):
        found = []
        for u, d in self.host.domains.items():
            if d.get("xml"):
                root = ET.fromstring(d["xml"])
                name, managed = root.findtext("name") or u, root.find(f"metadata/{{{PORTAL_METADATA_NS}}}machine")
                found.append(DomainInfo(uuid=u, name=name, state=d["state"], managed=managed is not None))
            else:
                found.append(
                    DomainInfo(uuid=u, name=d["spec"].name if d.get("spec") else u, state=d["state"], managed=True)
                )
        return found

    def domain_shape(self, uuid):
        self._hit("domain_shape")
        if uuid not in self.host.domains:
            return None
        shape = foreign_domain(self.domain_xml(uuid, inactive=True))
        shape["persistent"] = True
        shape["autostart"] = bool(self.host.domains[uuid].get("autostart"))
        for disk in shape["disks"]:
            vol = self._volume_at(disk["path"]) if disk["type"] == "file" and disk["path"] else None
            if vol is None:
                disk["pool"] = ""
                continue
            disk["pool"], disk["volume"] = disk["path"].split("/")[2], disk["path"].split("/", 3)[3]
            disk["capacity_bytes"] = vol["capacity"]
        return shape

    def domain_mark(self, uuid, attributes):
        self._hit("domain_mark")
        dom = self._dom(uuid)
        wanted = {k: str(v) for k, v in attributes.items()}
        if not dom.get("xml"):
            if {k: str(v) for k, v in dom["spec"].metadata.items()} == wanted:
                return False
            dom["spec"] = replace(dom["spec"], metadata=wanted)
            return True
        root = ET.fromstring(dom["xml"])
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        mark = metadata.find(f"{{{PORTAL_METADATA_NS}}}machine")
        if mark is not None and dict(mark.attrib) == wanted:
            return False
        if mark is not None:
            metadata.remove(mark)
        ET.SubElement(metadata, f"{{{PORTAL_METADATA_NS}}}machine", wanted)
        dom["xml"] = ET.tostring(root, encoding="unicode")
        return True

    def pool_path(self, pool: str) -> str:
        self._pool(pool)
        return f"/fake/{pool}"

    def volume_info(self, *, pool, name):
        self._hit("volume_info")
        vol = self._pool(pool).get(name)
        return (
            None
            if vol is None
            else VolumeInfo(
                name=name,
                path=f"/fake/{pool}/{name}",
                format=vol["format"],
                capacity_bytes=vol["capacity"],
                allocation_bytes=len(vol["data"]),
                backing_path=vol["backing"],
            )
        )

    def create_volume(self, *, pool, name, fmt, capacity_bytes, backing_path="", backing_format=""):
        self._hit("create_volume")
        self._pool(pool).setdefault(
            name, {"format": fmt, "capacity": capacity_bytes, "backing": backing_path, "data": b""}
        )
        return self.volume_info(pool=pool, name=name)

    def upload_volume(self, *, pool, name, source, length):
        self._hit("upload_volume")
        self._vol(pool, name)["data"] = source.read(length)

    def download_volume(self, *, pool, name, sink, offset=0, length=0):
        self._hit("download_volume")
        data = self._vol(pool, name)["data"][offset:]
        sink(data[:length] if length else data)

    def delete_volume(self, *, pool, name):
        self._hit("delete_volume")
        return self._pool(pool).pop(name, None) is not None

    def clone_volume(self, *, pool, name, new_name, backing_path="", backing_format=""):
        self._hit("clone_volume")
        if new_name not in self._pool(pool):
            source = self._vol(pool, name)
            if backing_path and backing_path != source["backing"]:
                raise HypervisorFatalError(f"volume {name!r} stands on {source['backing'] or 'nothing'}")
            fmt = "qcow2" if backing_path else source["format"]
            self._pool(pool)[new_name] = {**source, "format": fmt, "backing": backing_path, "data": source["data"]}
        return self.volume_info(pool=pool, name=new_name)

    def resize_volume(self, *, pool, name, capacity_bytes):
        vol = self._vol(pool, name)
        vol["capacity"] = max(vol["capacity"], capacity_bytes)

    def refresh_pool(self, pool):
        self._pool(pool)

    def volume_names(self, pool):
        self._hit("volume_names")
        return sorted(self._pool(pool))

    def define_guard(self, xml):
        self._hit("define_guard")
        self.host.guards[ET.fromstring(xml).get("name")] = xml

    def remove_guard(self, name):
        self._hit("remove_guard")
        return self.host.guards.pop(name, None) is not None

    def define_network(self, xml):
        self._hit("define_network")
        name = ET.fromstring(xml).findtext("name")
        if name in self.host.networks:
            return False
        self.host.networks[name] = xml
        return True

    def remove_network(self, name):
        self._hit("remove_network")
        return self.host.networks.pop(name, None) is not None

    def filter_bridge_nics(self, uuid, filters):
        self._hit("filter_bridge_nics")
        dom = self._dom(uuid)
        nics = tuple(
            replace(n, guard=filters[n.source]) if n.type == "bridge" and n.source in filters else n
            for n in dom["spec"].nics
        )
        if nics == dom["spec"].nics:
            return False
        dom["spec"] = replace(dom["spec"], nics=nics)
        return True

    def define_domain(self, spec):
        self._hit("define_domain")
        if spec.uuid in self.host.domains:
            return False
        self.host.domains[spec.uuid] = {
            "spec": spec,
            "state": PowerState.OFF,
            "autostart": False,
            "vnc_config_protected": True,
            "vnc_protected": False,
        }
        return True

    def _dom(self, uuid):
        if uuid not in self.host.domains:
            raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
        return self.host.domains[uuid]

    def _running(self, uuid):
        dom = self.host.domains.get(uuid)
        return dom if dom and dom["state"] == PowerState.RUNNING else None

    def _cold_start(self, uuid):
        """Start unless running; like the real driver, a cold start protects VNC first (and the domain gets a new
        run: libvirt's domain id)."""
        dom = self._dom(uuid)
        if dom["state"] != PowerState.RUNNING:
            self.vnc_protect(uuid)
            dom["vnc_protected"] = dom["vnc_config_protected"]
            self.host.runs += 1
            dom["run"] = self.host.runs
            dom.pop("counters", None)  # a new run's counters begin again (whatever a test set was the last run's)
            dom["live_size"] = self._config_size(dom) if "spec" in dom else None  # what the config boots
        dom["state"] = PowerState.RUNNING

    def domain_xml(self, uuid, *, inactive=False, secure=False):
        # The XML as libvirt would give it back: the password only with `secure`, none once it has none.
        dom = self._dom(uuid)
        if dom.get("xml"):  # a domain defined by hand: its own XML, with a password once it has one
            root = ET.fromstring(dom["xml"])
            graphics = root.find("devices/graphics[@type='vnc']")
            if graphics is not None and dom.get("vnc_config_protected") and secure:
                graphics.set(
                    "passwd", graphics.get("passwd") or dom.setdefault("vnc_config_password", new_vnc_password())
                )
            elif graphics is not None:
                graphics.attrib.pop("passwd", None)
            return ET.tostring(root, encoding="unicode")
        password = dom["spec"].vnc_password or dom.setdefault("vnc_config_password", new_vnc_password())
        xml = build_domain_xml(replace(dom["spec"], vnc_password=password))
        if not secure or not dom.get("vnc_config_protected", True):
            xml = re.sub(r" passwd=(['\"])[^'\"]*\1", "", xml)
        return xml

    def change_media(self, uuid, *, target, path):
        self._hit("change_media")
        dom = self._dom(uuid)
        disks = list(dom["spec"].disks)
        for i, (disk, name) in enumerate(zip(disks, _target_names(dom["spec"].disks), strict=True)):
            if name == target and disk.device == "cdrom":
                disks[i] = replace(disk, path=path)
                dom["spec"] = replace(dom["spec"], disks=tuple(disks))
                return
        raise HypervisorFatalError(f"no CD-ROM drive {target} in domain {uuid}")  # libvirt: "target not found"

    # Devices after create: one spec stands for the config and the running guest, as both change together (the
    # fake's guest lets a device go at once). A new disk goes last on its bus, which is its first free target.
    def _portal_spec(self, uuid):
        dom = self._dom(uuid)
        if "spec" not in dom:
            raise HypervisorFatalError(f"domain {uuid} was not defined from a spec; the fake changes only those")
        return dom

    def attach_disk(self, uuid, disk):
        self._hit("attach_disk")
        dom = self._portal_spec(uuid)
        spec = dom["spec"]
        for have, name in zip(spec.disks, _target_names(spec.disks), strict=True):
            if disk.path and have.path == disk.path:
                return name
        if dom["state"] == PowerState.RUNNING and (disk.device != "disk" or disk.bus not in HOT_PLUG_BUSES):
            raise HypervisorFatalError(f"a {disk.bus} {disk.device} cannot be added to a running domain")
        target = free_disk_target(self.domain_xml(uuid), disk.bus)
        dom["spec"] = replace(spec, disks=(*spec.disks, replace(disk, boot_order=None)))
        return target

    def detach_disk(self, uuid, *, target="", path=""):
        self._hit("detach_disk")
        dom = self._portal_spec(uuid)
        disks = dom["spec"].disks
        keep = tuple(
            d
            for d, name in zip(disks, _target_names(disks), strict=True)
            if not ((target and name == target) or (path and d.path == path))
        )
        dom["spec"] = replace(dom["spec"], disks=keep)
        return len(keep) != len(disks)

    def attach_nic(self, uuid, nic):
        self._hit("attach_nic")
        dom = self._portal_spec(uuid)
        if any(n.mac.lower() == nic.mac.lower() for n in dom["spec"].nics):
            return False
        dom["spec"] = replace(dom["spec"], nics=(*dom["spec"].nics, replace(nic, boot_order=None)))
        return True

    def detach_nic(self, uuid, *, mac):
        self._hit("detach_nic")
        dom = self._portal_spec(uuid)
        keep = tuple(n for n in dom["spec"].nics if n.mac.lower() != mac.lower())
        found = len(keep) != len(dom["spec"].nics)
        dom["spec"] = replace(dom["spec"], nics=keep)
        return found

    def boot_once(self, uuid, *, target):
        self._hit("boot_once")
        dom = self._dom(uuid)
        dom["state"] = PowerState.OFF  # a cold start: destroyed first if it ran
        self._cold_start(uuid)
        dom["booted_from"] = target

    def serial_console(self, uuid, *, take_over=False):
        # libvirt lends a serial port to one client at a time; the fake's "guest" end is kept in the domain.
        self._hit("serial_console")
        dom = self._running(uuid)
        if dom is None:
            raise HypervisorFatalError("the machine is not running")
        held = dom.get("serial")
        if held is not None and held.fileno() != -1:
            if not take_over:
                raise HypervisorFatalError("Active console session exists for this domain")
            held.close()
        dom["serial"], theirs = socket.socketpair()
        return theirs

    def screenshot(self, uuid):
        self._hit("screenshot")
        return SCREEN if self._running(uuid) else None

    def domain_state(self, uuid):
        dom = self.host.domains.get(uuid)
        return None if dom is None else dom["state"]

    def domain_states(self):
        return {u: d["state"] for u, d in self.host.domains.items()}

    def domains_observed(self):
        # From domain_states, so a test that patches that sees the bulk read through it too. A domain made
        # running by a test (not started) counts as run 0; "leases" on the host stand for the networks' DHCP.
        self._hit("domains_observed")
        states = self.domain_states()
        domains = {}
        for u, s in states.items():
            dom, running = self.host.domains[u], s == PowerState.RUNNING
            counters: DomainCounters | None = dom.get("counters") if running else None
            domains[u] = DomainObserved(state=s, run=dom.get("run", 0) if running else -1, counters=counters)
        return HostObserved(
            domains=domains,
            leases={mac.lower(): list(a) for mac, a in self.host.leases.items()},
            counters=self.host.host_counters,
        )

    def domain_inspect(self, uuid, *, leases=None):
        self._hit("domain_inspect")
        dom = self.host.domains.get(uuid)
        if not dom:
            return None
        if dom["state"] != PowerState.RUNNING:
            return DomainInspected(console_unprotected=False, addresses={})
        addresses = self.domain_addresses(uuid)
        if leases is not None:
            macs = [n.mac.lower() for n in dom["spec"].nics] if dom.get("spec") else dom.get("macs", [])
            addresses = {**{m: list(leases[m]) for m in macs if m in leases}, **addresses}
        return DomainInspected(console_unprotected=not dom.get("vnc_protected", True), addresses=addresses)

    def domain_addresses(self, uuid):
        dom = self.host.domains.get(uuid)
        if not dom or dom["state"] != PowerState.RUNNING:
            return {}
        if isinstance(dom.get("addresses"), Exception):
            raise dom["addresses"]
        return dict(dom.get("addresses", {}))

    # vCPUs and memory as libvirt keeps them: the spec (the config) and, while running, "live_size" (vcpus, most,
    # memory, most), taken from the config when the domain booted.
    def _config_size(self, dom):
        spec = dom["spec"]
        return (spec.vcpus, max(spec.vcpus, spec.max_vcpus), spec.memory_mib, max(spec.memory_mib, spec.max_memory_mib))

    def _live_size(self, dom):
        if dom["state"] != PowerState.RUNNING:
            return None
        if dom.get("live_size") is None:  # made running by a test, not started
            dom["live_size"] = self._config_size(dom)
        return dom["live_size"]

    def domain_size(self, uuid):
        dom = self._dom(uuid)
        live = self._live_size(dom)
        return DomainSize(dom["state"] == PowerState.RUNNING, *self._config_size(dom), *(live or (0, 0, 0, 0)))

    def set_vcpus(self, uuid, count, *, maximum, live):
        self._hit("set_vcpus")
        dom = self._dom(uuid)
        if live:
            size = self._live_size(dom)
            if size is None or count > size[1]:
                raise HypervisorFatalError(f"the running domain takes at most {size and size[1]} vCPUs")
            dom["live_size"] = (count, *size[1:])
        dom["spec"] = replace(dom["spec"], vcpus=count, max_vcpus=max(maximum, count))

    def set_memory(self, uuid, memory_mib, *, maximum, live):
        self._hit("set_memory")
        dom = self._dom(uuid)
        if live:
            size = self._live_size(dom)
            if size is None or memory_mib > size[3]:
                raise HypervisorFatalError(f"the running domain takes at most {size and size[3]} MiB")
            dom["live_size"] = (*size[:2], memory_mib, size[3])
        dom["spec"] = replace(dom["spec"], memory_mib=memory_mib, max_memory_mib=max(maximum, memory_mib))

    def rename_domain(self, uuid, name, *, title=""):
        self._hit("rename_domain")
        dom = self._dom(uuid)
        if dom["state"] == PowerState.RUNNING:
            raise HypervisorFatalError(f"domain {dom['spec'].name} is running: libvirt renames only shut-off domains")
        renamed = dom["spec"].name != name
        dom["spec"] = replace(dom["spec"], name=name, title=title or dom["spec"].title)
        return renamed

    def set_autostart(self, uuid, enabled):
        self._dom(uuid)["autostart"] = enabled

    def start(self, uuid):
        self._hit("start")
        self._cold_start(uuid)

    # VNC, as the libvirt driver does it: a domain carries "vnc_config_protected" (its persistent config has a
    # password), "vnc_protected" (the running server asks for one), "vnc_address" and the live "vnc_password".
    def vnc_address(self, uuid):
        dom = self.host.domains.get(uuid)
        if not dom or dom["state"] != PowerState.RUNNING:
            return None
        return dom.get("vnc_address", ("127.0.0.1", 5900))

    def vnc_open(self, uuid, *, valid_for=15.0):
        self._hit("vnc_open")
        address = self.vnc_address(uuid)
        if address is None:
            return None
        dom = self.host.domains[uuid]
        if not dom.get("vnc_protected", True):
            return (*address, "")
        dom["vnc_password"] = new_vnc_password()
        return (*address, dom["vnc_password"])

    def vnc_protect(self, uuid):
        dom = self._dom(uuid)
        if dom.get("vnc_config_protected", True):
            return False
        dom["vnc_config_protected"] = True
        return True

    def vnc_unprotected(self):
        return {
            u
            for u, d in self.host.domains.items()
            if d["state"] == PowerState.RUNNING and not d.get("vnc_protected", True)
        }

    def shutdown(self, uuid):
        self._dom(uuid)["state"] = PowerState.OFF

    power_off = shutdown

    def reboot(self, uuid):
        self._cold_start(uuid)  # off: a cold start, as in start(); running: stays running

    reset = reboot

    def block_resize(self, uuid, *, path, capacity_bytes):
        if self._dom(uuid)["state"] != PowerState.RUNNING:
            raise HypervisorFatalError("Requested operation is not valid: domain is not running")
        name = path.rsplit("/", 1)[1]
        self.resize_volume(pool=path.split("/")[2], name=name, capacity_bytes=capacity_bytes)

    def undefine(self, uuid):
        self._hit("undefine")
        return self.host.domains.pop(uuid, None) is not None

    def _volume_at(self, path):
        """The volume dict at a fake path (/fake/<pool>/<name>), or None."""
        _, _, pool, name = (path.split("/", 3) + ["", "", "", ""])[:4]
        return self.host.pools.get(pool, {}).get(name)

    # Snapshots: a domain's "snapshots" list in creation order, each with the bytes its disks held then (restored
    # on revert), as libvirt keeps them; an external one also makes its overlay volumes, as libvirt does.
    def _disk_paths(self, dom):
        spec = dom.get("spec")
        return [d.path for d in spec.disks if d.device == "disk" and d.path] if spec else []

    def snapshot_create(self, uuid, *, name, description="", memory=False, overlays=None):
        self._hit("snapshot_create")
        dom = self._dom(uuid)
        snaps = dom.setdefault("snapshots", [])
        if any(s["name"] == name for s in snaps):
            raise HypervisorFatalError(f"domain {uuid} has a snapshot named {name!r} already")
        running = dom["state"] == PowerState.RUNNING
        if overlays is None and running and not memory:
            raise HypervisorFatalError("an internal snapshot of a running domain holds its memory: ask for it")
        if overlays is not None and memory:
            raise HypervisorFatalError("an external disk-only snapshot holds no memory")
        data = {p: (self._volume_at(p) or {}).get("data", b"") for p in self._disk_paths(dom)}
        tops = dom.setdefault("tops", {})  # disk target -> the file it writes now
        for target, path in (overlays or {}).items():
            _, _, pool, volname = (path.split("/", 3) + ["", "", "", ""])[:4]
            below = tops.get(target) or next(iter(self._disk_paths(dom)), "")
            self._pool(pool)[volname] = {"format": "qcow2", "capacity": 0, "backing": below, "data": b""}
            tops[target] = path
        current = next((s for s in snaps if s["current"]), None)
        for s in snaps:
            s["current"] = False
        snap = {
            "name": name,
            "parent": current["name"] if current else "",
            "kind": "internal" if overlays is None else "external",
            "memory": bool(memory and running and overlays is None),
            "state": "disk-snapshot" if overlays is not None else ("running" if running else "shutoff"),
            "created": len(snaps) + 1,
            "current": True,
            "description": description,
            "overlays": tuple((overlays or {}).values()),
            "data": data,
            "size": 0
            if overlays is not None
            else (len(data) and 4096) + (dom.get("memory_state", 0) if running else 0),
        }
        snaps.append(snap)
        return replace(self._snapshot_info(snap), quiesced=bool(overlays is not None and running and dom.get("agent")))

    def _snapshot_info(self, snap):
        size = sum(len((self._volume_at(p) or {}).get("data", b"")) for p in snap["overlays"])
        return SnapshotInfo(
            name=snap["name"],
            parent=snap["parent"],
            kind=snap["kind"],
            memory=snap["memory"],
            state=snap["state"],
            created=snap["created"],
            current=snap["current"],
            description=snap["description"],
            overlays=snap["overlays"],
            size_bytes=size if snap["kind"] == "external" else snap["size"],
        )

    def snapshot_list(self, uuid):
        self._hit("snapshot_list")
        return [self._snapshot_info(s) for s in self._dom(uuid).get("snapshots", [])]

    def _find_snapshot(self, uuid, name):
        snaps = self._dom(uuid).get("snapshots", [])
        return snaps, next((s for s in snaps if s["name"] == name), None)

    def snapshot_revert(self, uuid, name):
        self._hit("snapshot_revert")
        snaps, snap = self._find_snapshot(uuid, name)
        if snap is None:
            raise HypervisorFatalError(f"domain {uuid} has no snapshot named {name!r}")
        dom = self._dom(uuid)
        if snap["kind"] == "external" and any(s["parent"] == name for s in snaps):
            raise HypervisorFatalError(f"snapshot {name!r} has later snapshots; revert to the newest, or delete those")
        for path, data in snap["data"].items():
            if (vol := self._volume_at(path)) is not None:
                vol["data"] = data
        for path in snap["overlays"]:
            if (vol := self._volume_at(path)) is not None:
                vol["data"] = b""
        for s in snaps:
            s["current"] = s is snap
        if snap["memory"] and dom["state"] != PowerState.RUNNING:
            self._cold_start(uuid)
        elif not snap["memory"]:
            dom["state"] = PowerState.OFF
        return dom["state"]

    def snapshot_copy_disks(self, uuid, name, *, pool, copies, keep):
        """As libvirt_driver does it (keep, revert, copy, revert to keep, delete it): the copies hold the bytes the
        snapshot kept of each disk, flattened; the domain's disks, snapshots and current one are left as they were."""
        self._hit("snapshot_copy_disks")
        snaps, snap = self._find_snapshot(uuid, name)
        if snap is None:
            raise HypervisorFatalError(f"domain {uuid} has no snapshot named {name!r}")
        if snap["kind"] != "internal":
            raise HypervisorFatalError(f"snapshot {name!r} is external: its disks are the volumes below its overlays")
        dom = self._dom(uuid)
        if dom["state"] != PowerState.OFF:
            raise HypervisorFatalError(f"domain {uuid} is running: its disks are copied from a snapshot when it is off")
        _, kept = self._find_snapshot(uuid, keep)
        if kept is not None:  # left by an interrupted copy: the domain's own state is in it
            for path, data in kept["data"].items():
                if (vol := self._volume_at(path)) is not None:
                    vol["data"] = data
            self.snapshot_delete(uuid, keep)
        todo = {old: new for old, new in copies.items() if new not in self._pool(pool)}
        sources = {old: self._vol(pool, old) for old in todo}
        for old, new in todo.items():
            self._pool(pool)[new] = {
                **sources[old],
                "format": "qcow2",
                "backing": "",
                "data": snap["data"].get(f"/fake/{pool}/{old}", sources[old]["data"]),
            }

    def snapshot_delete(self, uuid, name):
        self._hit("snapshot_delete")
        snaps, snap = self._find_snapshot(uuid, name)
        if snap is None:
            return False
        for s in snaps:
            if s["parent"] == name:
                s["parent"] = snap["parent"]
        if snap["current"] and snap["parent"]:
            next(s for s in snaps if s["name"] == snap["parent"])["current"] = True
        tops = self._dom(uuid).setdefault("tops", {})
        for path in snap["overlays"]:  # merged into the file below it; what was above it now rests on that
            _, _, pool, volname = (path.split("/", 3) + ["", "", "", ""])[:4]
            gone = self.host.pools.get(pool, {}).pop(volname, None) or {"backing": ""}
            for vols in self.host.pools.values():
                for vol in vols.values():
                    if vol["backing"] == path:
                        vol["backing"] = gone["backing"]
            for target, top in list(tops.items()):
                if top == path:
                    tops[target] = gone["backing"]
        snaps.remove(snap)
        return True

    def migrate_live(
        self,
        uuid,
        *,
        target,
        address,
        paths,
        vnc_listen,
        max_downtime_ms=300,
        bandwidth_mib_s=0,
        timeout=600.0,
        progress=None,
        cancelled=None,
    ):
        """As the libvirt driver does it, in memory: refusals first; then the writable disks' own data into the
        volumes the caller made on the target, two progress reports, a cancel asked before the switch, and the
        domain running there (at the new paths, VNC on vnc_listen) and gone from here. `host.fail["migrate_live"]`
        raises at the switch, the domain left here."""
        if not isinstance(target, FakeDriver):
            raise HypervisorFatalError("a live migration runs between two libvirt hypervisors")
        if target.uri == self.uri:
            raise HypervisorFatalError("the machine is on that hypervisor already")
        if max_downtime_ms <= 0 or bandwidth_mib_s < 0 or timeout <= 0:
            raise HypervisorFatalError(
                "the downtime bound and the timeout must be positive, the bandwidth not negative"
            )
        dom = self._dom(uuid)
        if dom["state"] != PowerState.RUNNING:
            raise HypervisorFatalError("the machine is not running: a live migration moves a running one")
        spec = dom["spec"]
        named = [d.path for d in spec.disks if d.path] + ([spec.serial_log] if spec.serial_log else [])
        missing = sorted({p for p in named if p not in paths})
        if missing:
            raise HypervisorFatalError(
                "no path on the target for " + ", ".join(missing) + ": every file the domain names needs one"
            )
        if uuid in target.host.domains:
            raise HypervisorFatalError("the target has a domain with this UUID already")
        copied = [(d, self._volume_at(d.path), target._volume_at(paths[d.path])) for d in spec.disks if d.path]
        for disk, _mine, theirs in copied:
            if theirs is None:  # libvirt: the target's QEMU cannot open it
                raise HypervisorFatalError(
                    f"Cannot access storage file '{paths[disk.path]}': No such file or directory"
                )
        writable = [(d, mine, theirs) for d, mine, theirs in copied if d.device != "cdrom"]
        disk_total = sum(len(mine["data"]) for _d, mine, _t in writable if mine is not None)
        memory = spec.memory_mib << 20
        reports = 0
        for done in (0, 1):
            if cancelled is not None and cancelled():
                raise MigrationAborted("the live migration was cancelled", reason="cancelled")
            if progress is not None:
                progress(
                    MigrationProgress(
                        elapsed_s=0.0,
                        memory_total=memory,
                        memory_processed=memory * done,
                        memory_remaining=memory * (1 - done),
                        disk_total=disk_total,
                        disk_processed=disk_total * done,
                        disk_remaining=disk_total * (1 - done),
                        max_downtime_ms=max_downtime_ms,
                    )
                )
                reports += 1
        self._hit("migrate_live")
        for _disk, mine, theirs in writable:
            theirs["data"] = b"" if mine is None else mine["data"]  # the overlay's own data; its base is theirs
        disks = tuple(replace(d, path=paths[d.path]) if d.path else d for d in spec.disks)
        moved = replace(spec, disks=disks, serial_log=paths.get(spec.serial_log, ""), vnc_listen=vnc_listen)
        target.host.domains[uuid] = {**dom, "spec": moved, "vnc_address": (vnc_listen, 5900)}
        del self.host.domains[uuid]
        return MigrationResult(
            seconds=0.0,
            memory_bytes=memory,
            disk_bytes=disk_total,
            downtime_ms=min(50, max_downtime_ms),
            max_downtime_ms=max_downtime_ms,
            disks=tuple(
                t for d, t in zip(spec.disks, _target_names(spec.disks), strict=True) if d.path and d.device != "cdrom"
            ),
            progress_reports=reports,
        )


class FakeBmc(BmcClient):
    """The BMC client on FakeHost's domains, as the portal's BMC server (machines/bmc_server.py) and
    ipmitool would have it: power and boot devices of the domain behind each listening BMC, with its
    next-boot-only device put back after the cold start that used it."""

    BOOT = {"pxe": "network", "disk": "hd", "cdrom": "cdrom"}  # the client's names -> the domain's boot devices

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def _domain(self, target: BmcTarget) -> tuple[FakeDriver, str, dict]:
        key = (target.address, target.port)
        if key not in self.host.bmcs:
            from machines.bmc_server import BmcManager  # the BMCs the server would run now, from the database
            from machines.crypto import decrypt

            for address, port, username, encrypted, domain_name, _uri in BmcManager().desired().values():
                self.host.bmcs[(address, port)] = (username, decrypt(encrypted), domain_name)
        if key not in self.host.bmcs:
            raise BmcError(f"the BMC at {target.address}:{target.port}: no answer")
        username, password, name = self.host.bmcs[key]
        if (target.username, target.password) != (username, password):
            raise BmcFatalError("the BMC refused the credentials: RAKP 2 HMAC is invalid")
        driver = FakeDriver("fake:///bmc", self.host)
        for info in driver.list_domains():  # by name, as virtualbmc finds it (an adopted domain keeps its own)
            if info.name == name:
                return driver, info.uuid, self.host.domains[info.uuid]
        raise BmcError(f"the BMC at {target.address}:{target.port}: its domain {name} is gone")

    def power_state(self, target: BmcTarget) -> str:
        _, _, dom = self._domain(target)
        return "on" if dom["state"] == PowerState.RUNNING else "off"

    def power(self, target: BmcTarget, action: str, *, wait: float = 30) -> str:
        driver, uuid, dom = self._domain(target)
        if action == "cycle":
            self.power(target, "off")
            return self.power(target, "on")
        if action not in ("on", "off", "soft", "reset"):
            raise BmcFatalError(f"unknown power action {action!r}")
        if action == "on" and dom["state"] != PowerState.RUNNING:
            driver.start(uuid)
            if "restore_boot" in dom:
                dom["boot_device"] = dom.pop("restore_boot")
        elif action in ("off", "soft"):
            driver.power_off(uuid)
        elif action == "reset" and dom["state"] == PowerState.RUNNING:
            driver.reset(uuid)
        return self.power_state(target)

    def set_boot_device(self, target: BmcTarget, device: str, *, persistent: bool) -> None:
        _, _, dom = self._domain(target)
        if device not in self.BOOT:
            raise BmcFatalError(f"unknown boot device {device!r}; use {', '.join(self.BOOT)}")
        current = self.boot_device(target)
        if persistent:
            dom.pop("restore_boot", None)
        else:
            dom.setdefault("restore_boot", current)
        dom["boot_device"] = device

    def boot_device(self, target: BmcTarget) -> str:
        _, _, dom = self._domain(target)
        if "boot_device" in dom:
            return dom["boot_device"]
        first = (dom["spec"].boot_devices or ("hd",))[0]
        return {v: k for k, v in self.BOOT.items()}.get(first, "disk")
