"""An in-memory hypervisor at the driver seam, for fast unit tests of the pipeline.

The real driver is tested against libvirtd in tests/integration; this fake only
has to keep the same contract (idempotent calls, errors as HypervisorError).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace

from hypervisors.drivers.base import HypervisorDriver, HypervisorFatalError, PowerState, VolumeInfo
from hypervisors.drivers.domxml import new_vnc_password


@dataclass
class FakeHost:
    pools: dict[str, dict[str, dict]] = field(default_factory=lambda: {"default": {}})
    domains: dict[str, dict] = field(default_factory=dict)
    guards: dict[str, str] = field(default_factory=dict)  # nwfilter name -> XML
    fail: dict[str, Exception] = field(default_factory=dict)  # method name -> error to raise once
    calls: list[str] = field(default_factory=list)


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

    def host_info(self):
        raise NotImplementedError

    def list_domains(self):
        return []

    def pool_path(self, pool: str) -> str:
        self._pool(pool)
        return f"/fake/{pool}"

    def volume_info(self, *, pool, name):
        self._hit("volume_info")
        vol = self._pool(pool).get(name)
        return None if vol is None else VolumeInfo(name=name, path=f"/fake/{pool}/{name}", format=vol["format"],
                                                   capacity_bytes=vol["capacity"], allocation_bytes=len(vol["data"]),
                                                   backing_path=vol["backing"])  # fmt: skip

    def create_volume(self, *, pool, name, fmt, capacity_bytes, backing_path="", backing_format=""):
        self._hit("create_volume")
        self._pool(pool).setdefault(
            name, {"format": fmt, "capacity": capacity_bytes, "backing": backing_path, "data": b""}
        )
        return self.volume_info(pool=pool, name=name)

    def upload_volume(self, *, pool, name, source, length):
        self._hit("upload_volume")
        self._pool(pool)[name]["data"] = source.read(length)

    def download_volume(self, *, pool, name, sink, offset=0, length=0):
        self._hit("download_volume")
        data = self._pool(pool)[name]["data"][offset:]
        sink(data[:length] if length else data)

    def delete_volume(self, *, pool, name):
        self._hit("delete_volume")
        return self._pool(pool).pop(name, None) is not None

    def resize_volume(self, *, pool, name, capacity_bytes):
        vol = self._pool(pool)[name]
        vol["capacity"] = max(vol["capacity"], capacity_bytes)

    def refresh_pool(self, pool):
        self._pool(pool)

    def define_guard(self, xml):
        self._hit("define_guard")
        self.host.guards[ET.fromstring(xml).get("name")] = xml

    def filter_bridge_nics(self, uuid, filters):
        self._hit("filter_bridge_nics")
        dom = self._dom(uuid)
        nics = tuple(replace(n, guard=filters[n.source]) if n.type == "bridge" and n.source in filters else n
                     for n in dom["spec"].nics)  # fmt: skip
        if nics == dom["spec"].nics:
            return False
        dom["spec"] = replace(dom["spec"], nics=nics)
        return True

    def define_domain(self, spec):
        self._hit("define_domain")
        if spec.uuid in self.host.domains:
            return False
        self.host.domains[spec.uuid] = {"spec": spec, "state": PowerState.OFF, "autostart": False,
                                        "vnc_config_protected": True, "vnc_protected": False}  # fmt: skip
        return True

    def _dom(self, uuid):
        if uuid not in self.host.domains:
            raise HypervisorFatalError(f"domain {uuid} does not exist on this hypervisor")
        return self.host.domains[uuid]

    def domain_state(self, uuid):
        dom = self.host.domains.get(uuid)
        return None if dom is None else dom["state"]

    def domain_states(self):
        return {u: d["state"] for u, d in self.host.domains.items()}

    def domain_addresses(self, uuid):
        dom = self.host.domains.get(uuid)
        if not dom or dom["state"] != PowerState.RUNNING:
            return {}
        if isinstance(dom.get("addresses"), Exception):
            raise dom["addresses"]
        return dict(dom.get("addresses", {}))

    def set_autostart(self, uuid, enabled):
        self._dom(uuid)["autostart"] = enabled

    def start(self, uuid):
        self._hit("start")
        dom = self._dom(uuid)
        if dom["state"] != PowerState.RUNNING:  # a cold start: like the real driver, it protects VNC first
            self.vnc_protect(uuid)
            dom["vnc_protected"] = dom["vnc_config_protected"]
        dom["state"] = PowerState.RUNNING

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
        return {u for u, d in self.host.domains.items()
                if d["state"] == PowerState.RUNNING and not d.get("vnc_protected", True)}  # fmt: skip

    def shutdown(self, uuid):
        self._dom(uuid)["state"] = PowerState.OFF

    power_off = shutdown

    def reboot(self, uuid):
        dom = self._dom(uuid)
        if dom["state"] != PowerState.RUNNING:  # off: a cold start, as in start()
            self.vnc_protect(uuid)
            dom["vnc_protected"] = dom["vnc_config_protected"]
        dom["state"] = PowerState.RUNNING

    reset = reboot

    def block_resize(self, uuid, *, path, capacity_bytes):
        name = path.rsplit("/", 1)[1]
        self.resize_volume(pool=path.split("/")[2], name=name, capacity_bytes=capacity_bytes)

    def undefine(self, uuid):
        self._hit("undefine")
        return self.host.domains.pop(uuid, None) is not None
