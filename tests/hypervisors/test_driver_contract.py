"""One contract, every driver: HypervisorDriver (hypervisors/drivers/base.py) as the pipeline relies on it.

Each test runs against the in-memory FakeDriver (tests/fakes.py), against LibvirtDriver("test:///default")
(libvirt's own in-memory driver, no daemon) and, in the integration layer (`-m integration`), against
LibvirtDriver("qemu:///system"), the host's real libvirtd. The fake therefore cannot drift from the real
driver without a test here failing.

The test driver lacks a few things (volume streams, growing a volume or a running disk, live device
updates, console streams, nwfilter, a live VNC port). The tests of those run on the fake and on the real
libvirtd only, and `test_what_the_test_driver_cannot_do` asserts each gap, naming the test that covers it
instead: nothing is skipped, and when libvirt's test driver learns one, that test fails and says so.
"""

from __future__ import annotations

import inspect
import io
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import pytest

from hypervisors.drivers.base import (
    DiskSpec,
    DomainCounters,
    DomainSpec,
    HostCountersRead,
    HypervisorDriver,
    HypervisorFatalError,
    MigrationAborted,
    NicSpec,
    PowerState,
)
from hypervisors.drivers.domxml import guard_name, portal_domain
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from tests.fakes import FakeDriver, FakeHost

MIB = 1 << 20


@dataclass
class Kit:
    """A driver under test and what the contract tests need to know about its host."""

    name: str
    driver: HypervisorDriver
    pool: str
    domain_type: str
    autostart: Callable[[str], bool]  # read back what set_autostart did (no driver method reads it)
    define_xml: Callable[[str], None]  # define a domain by hand, as `virsh define` would (not through the portal)
    prefix: str = field(default_factory=lambda: f"contract-{uuidlib.uuid4().hex[:8]}")
    domains: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)

    def vol(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.volumes.append(name)
        return name

    def spec(self, **kw) -> DomainSpec:
        uuid = kw.pop("uuid", None) or str(uuidlib.uuid4())
        self.domains.append(uuid)
        values = {
            "uuid": uuid,
            "name": f"{self.prefix}-{uuid[:4]}",
            "domain_type": self.domain_type,
            "vcpus": 1,
            "memory_mib": 64,
            "metadata": {"machine": "1"},
            **kw,
        }
        return DomainSpec(**values)

    def disk_spec(self, **kw) -> DomainSpec:
        """A domain with a disk (boot order 1) and an empty CD-ROM drive (order 2), as ISO machines have."""
        disk = self.driver.create_volume(pool=self.pool, name=self.vol("disk.qcow2"), fmt="qcow2", capacity_bytes=MIB)
        drives = (
            DiskSpec(path=disk.path, boot_order=1),
            DiskSpec(path="", device="cdrom", format="raw", bus="sata", boot_order=2),
        )
        return self.spec(disks=drives, **kw)

    def cleanup(self) -> None:
        d = self.driver
        for uuid in self.domains:
            d.undefine(uuid)
        for name in self.volumes:
            d.delete_volume(pool=self.pool, name=name)
        for name in self.networks:
            d.remove_network(name)
        for network in self.guards:
            d.remove_guard(guard_name(network))


def _fake() -> Kit:
    host = FakeHost()
    return Kit(
        "fake",
        host.get_driver("fake:///"),
        "default",
        "qemu",
        lambda uuid: host.domains[uuid]["autostart"],
        lambda xml: host.add_foreign(xml) and None,
    )


def _libvirt(uri: str, pool: str, domain_type: str) -> Kit:
    driver = LibvirtDriver(uri)
    return Kit(
        uri,
        driver,
        pool,
        domain_type,
        lambda uuid: bool(driver.conn.lookupByUUIDString(uuid).autostart()),
        lambda xml: driver.conn.defineXML(xml) and None,
    )


FAKE = pytest.param("fake", id="fake")
TEST = pytest.param("test", id="test-driver")
REAL = pytest.param("real", id="libvirtd", marks=pytest.mark.integration)


@pytest.fixture
def kit(request) -> Kit:
    if request.param == "fake":
        made = _fake()
    elif request.param == "test":
        request.getfixturevalue("test_hv_state")  # a fresh test:///default for this test
        made = _libvirt("test:///default", "default-pool", "test")
    else:
        made = _libvirt(request.getfixturevalue("libvirtd"), "default", "qemu")
    yield made
    made.cleanup()


every_driver = pytest.mark.parametrize("kit", [FAKE, TEST, REAL], indirect=True)
# What libvirt's test driver cannot do: test_what_the_test_driver_cannot_do asserts it.
beyond_the_test_driver = pytest.mark.parametrize("kit", [FAKE, REAL], indirect=True)


def test_the_fake_and_the_libvirt_driver_implement_the_whole_interface():
    assert len(HypervisorDriver.__abstractmethods__) >= 30
    for cls in (FakeDriver, LibvirtDriver):
        assert not cls.__abstractmethods__, f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
        for name in HypervisorDriver.__abstractmethods__:
            declared = inspect.signature(getattr(HypervisorDriver, name)).parameters
            actual = inspect.signature(getattr(cls, name)).parameters
            assert [(p.name, p.kind, p.default) for p in declared.values()] == [
                (p.name, p.kind, p.default) for p in actual.values()
            ], f"{cls.__name__}.{name} takes other arguments than the interface"


# --- volumes ---------------------------------------------------------------------------


@every_driver
def test_create_volume_makes_it_once_and_then_returns_the_existing_one(kit):
    d, name = kit.driver, kit.vol("a.qcow2")
    assert d.volume_info(pool=kit.pool, name=name) is None
    made = d.create_volume(pool=kit.pool, name=name, fmt="qcow2", capacity_bytes=MIB)
    assert (made.name, made.format, made.capacity_bytes) == (name, "qcow2", MIB)
    assert made.path == f"{d.pool_path(kit.pool)}/{name}"
    again = d.create_volume(pool=kit.pool, name=name, fmt="raw", capacity_bytes=2 * MIB)
    assert again == made == d.volume_info(pool=kit.pool, name=name)


@every_driver
def test_an_overlay_names_its_backing_volume(kit):
    d = kit.driver
    base = d.create_volume(pool=kit.pool, name=kit.vol("base.qcow2"), fmt="qcow2", capacity_bytes=MIB)
    overlay = d.create_volume(
        pool=kit.pool,
        name=kit.vol("overlay.qcow2"),
        fmt="qcow2",
        capacity_bytes=4 * MIB,
        backing_path=base.path,
        backing_format="qcow2",
    )
    assert (overlay.backing_path, overlay.capacity_bytes) == (base.path, 4 * MIB)


@every_driver
def test_delete_volume_says_whether_there_was_one(kit):
    d, name = kit.driver, kit.vol("gone.img")
    d.create_volume(pool=kit.pool, name=name, fmt="raw", capacity_bytes=MIB)
    assert d.delete_volume(pool=kit.pool, name=name) is True
    assert d.volume_info(pool=kit.pool, name=name) is None
    assert d.delete_volume(pool=kit.pool, name=name) is False


@every_driver
def test_resize_never_shrinks(kit):
    d, name = kit.driver, kit.vol("big.qcow2")
    d.create_volume(pool=kit.pool, name=name, fmt="qcow2", capacity_bytes=4 * MIB)
    d.resize_volume(pool=kit.pool, name=name, capacity_bytes=MIB)
    assert d.volume_info(pool=kit.pool, name=name).capacity_bytes == 4 * MIB


@beyond_the_test_driver
def test_resize_grows(kit):
    d, name = kit.driver, kit.vol("grow.qcow2")
    d.create_volume(pool=kit.pool, name=name, fmt="qcow2", capacity_bytes=MIB)
    d.resize_volume(pool=kit.pool, name=name, capacity_bytes=3 * MIB)
    assert d.volume_info(pool=kit.pool, name=name).capacity_bytes == 3 * MIB


@beyond_the_test_driver
def test_upload_then_download_gives_the_bytes_back(kit):
    d, name = kit.driver, kit.vol("seed.img")
    data = bytes(range(256)) * 16
    d.create_volume(pool=kit.pool, name=name, fmt="raw", capacity_bytes=len(data))
    d.upload_volume(pool=kit.pool, name=name, source=io.BytesIO(data), length=len(data))
    whole: list[bytes] = []
    d.download_volume(pool=kit.pool, name=name, sink=whole.append)
    assert b"".join(whole) == data
    part: list[bytes] = []
    d.download_volume(pool=kit.pool, name=name, sink=part.append, offset=10, length=20)
    assert b"".join(part) == data[10:30]


@every_driver
def test_refresh_pool_is_harmless(kit):
    kit.driver.refresh_pool(kit.pool)
    kit.driver.refresh_pool(kit.pool)


@every_driver
def test_volume_names_lists_the_pools_volumes_and_no_more(kit):
    d, a, b = kit.driver, kit.vol("listed-a.img"), kit.vol("listed-b.qcow2")
    before = set(d.volume_names(kit.pool))
    d.create_volume(pool=kit.pool, name=a, fmt="raw", capacity_bytes=MIB)
    d.create_volume(pool=kit.pool, name=b, fmt="qcow2", capacity_bytes=MIB)
    assert set(d.volume_names(kit.pool)) == before | {a, b}
    d.delete_volume(pool=kit.pool, name=a)
    assert set(d.volume_names(kit.pool)) == before | {b}


@every_driver
def test_a_missing_pool_is_fatal(kit):
    d = kit.driver
    calls = [
        lambda: d.pool_path("no-such-pool"),
        lambda: d.volume_info(pool="no-such-pool", name="x"),
        lambda: d.create_volume(pool="no-such-pool", name="x", fmt="raw", capacity_bytes=MIB),
        lambda: d.delete_volume(pool="no-such-pool", name="x"),
        lambda: d.refresh_pool("no-such-pool"),
        lambda: d.volume_names("no-such-pool"),
    ]
    for call in calls:
        with pytest.raises(HypervisorFatalError, match="no-such-pool"):
            call()


@every_driver
def test_a_missing_volume_is_fatal_where_it_must_exist(kit):
    d, name = kit.driver, kit.vol("never-made")
    with pytest.raises(HypervisorFatalError, match=name):
        d.upload_volume(pool=kit.pool, name=name, source=io.BytesIO(b"x"), length=1)
    with pytest.raises(HypervisorFatalError, match=name):
        d.download_volume(pool=kit.pool, name=name, sink=lambda data: None)
    with pytest.raises(HypervisorFatalError, match=name):
        d.resize_volume(pool=kit.pool, name=name, capacity_bytes=MIB)


# --- domains -----------------------------------------------------------------------------


@every_driver
def test_define_domain_is_idempotent_by_uuid(kit):
    d, spec = kit.driver, kit.spec()
    assert d.domain_state(spec.uuid) is None
    assert d.define_domain(spec) is True
    assert d.define_domain(replace(spec, name=f"{kit.prefix}-other", vcpus=2)) is False  # the first one stays
    assert d.domain_state(spec.uuid) == PowerState.OFF
    xml = d.domain_xml(spec.uuid)
    assert spec.name in xml and f"{kit.prefix}-other" not in xml and spec.uuid in xml
    listed = [dom for dom in d.list_domains() if dom.uuid == spec.uuid]
    assert [(dom.name, dom.state, dom.managed) for dom in listed] == [(spec.name, PowerState.OFF, True)]
    assert d.domain_states()[spec.uuid] == PowerState.OFF


@every_driver
def test_power_actions_reach_the_state_and_repeat_harmlessly(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    uuid = spec.uuid
    d.start(uuid)
    d.start(uuid)
    assert d.domain_state(uuid) == PowerState.RUNNING and d.domain_states()[uuid] == PowerState.RUNNING
    d.reboot(uuid)
    d.reset(uuid)
    assert d.domain_state(uuid) == PowerState.RUNNING
    d.power_off(uuid)
    d.power_off(uuid)
    assert d.domain_state(uuid) == PowerState.OFF
    d.shutdown(uuid)  # off: no-op
    d.reboot(uuid)  # off: a cold start
    assert d.domain_state(uuid) == PowerState.RUNNING
    d.power_off(uuid)
    d.reset(uuid)  # off: a cold start too
    assert d.domain_state(uuid) == PowerState.RUNNING


@every_driver
def test_set_autostart_sets_it_both_ways(kit):
    d, spec = kit.driver, kit.spec()
    d.define_domain(spec)
    d.set_autostart(spec.uuid, True)
    d.set_autostart(spec.uuid, True)
    assert kit.autostart(spec.uuid) is True
    d.set_autostart(spec.uuid, False)
    assert kit.autostart(spec.uuid) is False


@every_driver
def test_undefine_stops_and_removes_and_says_whether_there_was_one(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    assert d.undefine(spec.uuid) is True
    assert d.domain_state(spec.uuid) is None and spec.uuid not in d.domain_states()
    assert d.undefine(spec.uuid) is False


@every_driver
def test_a_missing_domain_is_fatal_or_absent_as_each_method_says(kit):
    d, uuid = kit.driver, str(uuidlib.uuid4())
    fatal = {
        "start": lambda: d.start(uuid),
        "shutdown": lambda: d.shutdown(uuid),
        "power_off": lambda: d.power_off(uuid),
        "reboot": lambda: d.reboot(uuid),
        "reset": lambda: d.reset(uuid),
        "set_autostart": lambda: d.set_autostart(uuid, True),
        "domain_xml": lambda: d.domain_xml(uuid),
        "block_resize": lambda: d.block_resize(uuid, path="/nowhere", capacity_bytes=MIB),
        "change_media": lambda: d.change_media(uuid, target="sda", path=""),
        "attach_disk": lambda: d.attach_disk(uuid, DiskSpec(path="/nowhere")),
        "detach_disk": lambda: d.detach_disk(uuid, target="vdb"),
        "attach_nic": lambda: d.attach_nic(uuid, NicSpec(type="user", source="", mac="52:54:00:c0:ff:a2")),
        "detach_nic": lambda: d.detach_nic(uuid, mac="52:54:00:c0:ff:a2"),
        "boot_once": lambda: d.boot_once(uuid, target="vda"),
        "vnc_protect": lambda: d.vnc_protect(uuid),
        "filter_bridge_nics": lambda: d.filter_bridge_nics(uuid, {"br0": "portal-hostguard-br0"}),
        "serial_console": lambda: d.serial_console(uuid),
    }
    for name, call in fatal.items():
        with pytest.raises(HypervisorFatalError):
            call()
            pytest.fail(f"{name} of a missing domain did not raise")
    assert d.domain_state(uuid) is None and d.undefine(uuid) is False
    assert d.vnc_address(uuid) is None and d.vnc_open(uuid) is None and d.screenshot(uuid) is None
    assert d.domain_addresses(uuid) == {}


@every_driver
def test_a_domain_that_is_off_shows_nothing_live(kit):
    d, spec = kit.driver, kit.spec()
    d.define_domain(spec)
    assert d.vnc_address(spec.uuid) is None and d.vnc_open(spec.uuid) is None
    assert d.screenshot(spec.uuid) is None and d.domain_addresses(spec.uuid) == {}
    with pytest.raises(HypervisorFatalError, match="not running"):
        d.serial_console(spec.uuid)


@every_driver
def test_a_running_domain_shows_its_screen_and_addresses(kit):
    d, spec = kit.driver, kit.disk_spec(nics=(NicSpec(type="user", source="", mac="52:54:00:c0:ff:ee"),))
    d.define_domain(spec)
    d.start(spec.uuid)
    shot = d.screenshot(spec.uuid)
    assert isinstance(shot, bytes) and shot[:2] in (b"P6", b"\x89P")  # PPM from QEMU and the fake, PNG from test://
    addresses = d.domain_addresses(spec.uuid)
    assert set(addresses) <= {"52:54:00:c0:ff:ee"} and all(isinstance(a, list) for a in addresses.values())


@every_driver
def test_the_vnc_password_is_in_the_secure_xml_only_and_a_portal_domain_needs_no_protection(kit):
    d, spec = kit.driver, kit.spec()
    d.define_domain(spec)
    assert "passwd=" in d.domain_xml(spec.uuid, inactive=True, secure=True)
    assert "passwd=" not in d.domain_xml(spec.uuid, inactive=True)
    assert d.vnc_protect(spec.uuid) is False
    d.start(spec.uuid)
    assert spec.uuid not in d.vnc_unprotected()


@every_driver
def test_boot_once_starts_the_domain_and_keeps_the_saved_boot_order(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    before = d.domain_xml(spec.uuid, inactive=True)
    d.boot_once(spec.uuid, target="sda")  # the CD-ROM drive (SATA), second in the saved order
    assert d.domain_state(spec.uuid) == PowerState.RUNNING
    assert d.domain_xml(spec.uuid, inactive=True) == before


@every_driver
def test_filter_bridge_nics_names_the_filter_once(kit):
    d = kit.driver
    spec = kit.spec(nics=(NicSpec(type="bridge", source="br-contract", mac="52:54:00:c0:ff:01"),))
    d.define_domain(spec)
    assert d.filter_bridge_nics(spec.uuid, {"br-contract": "portal-hostguard-br-contract"}) is True
    assert "portal-hostguard-br-contract" in d.domain_xml(spec.uuid, inactive=True)
    assert "passwd=" in d.domain_xml(spec.uuid, inactive=True, secure=True)  # the VNC password stays
    assert d.filter_bridge_nics(spec.uuid, {"br-contract": "portal-hostguard-br-contract"}) is False
    assert d.filter_bridge_nics(spec.uuid, {"br-other": "portal-hostguard-br-other"}) is False


@beyond_the_test_driver
def test_block_resize_grows_a_running_disk_and_refuses_a_stopped_domain(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    disk = spec.disks[0]
    with pytest.raises(HypervisorFatalError, match="not running"):
        d.block_resize(spec.uuid, path=disk.path, capacity_bytes=2 * MIB)
    d.start(spec.uuid)
    d.block_resize(spec.uuid, path=disk.path, capacity_bytes=2 * MIB)
    d.refresh_pool(kit.pool)
    assert d.volume_info(pool=kit.pool, name=disk.path.rsplit("/", 1)[1]).capacity_bytes == 2 * MIB


@beyond_the_test_driver
def test_change_media_inserts_and_ejects(kit):
    d, spec = kit.driver, kit.disk_spec()
    iso = d.create_volume(pool=kit.pool, name=kit.vol("media.iso"), fmt="raw", capacity_bytes=MIB)
    d.define_domain(spec)
    d.change_media(spec.uuid, target="sda", path=iso.path)
    assert iso.path in d.domain_xml(spec.uuid, inactive=True)
    d.start(spec.uuid)
    d.change_media(spec.uuid, target="sda", path="")  # live and persistent
    assert iso.path not in d.domain_xml(spec.uuid) and iso.path not in d.domain_xml(spec.uuid, inactive=True)
    with pytest.raises(HypervisorFatalError):
        d.change_media(spec.uuid, target="sdz", path="")


@beyond_the_test_driver
def test_disks_and_cdrom_drives_attach_to_the_first_free_target_and_detach(kit):
    d, spec = kit.driver, kit.disk_spec()  # vda and an empty SATA CD-ROM drive sda
    extra = d.create_volume(pool=kit.pool, name=kit.vol("extra.qcow2"), fmt="qcow2", capacity_bytes=MIB)
    d.define_domain(spec)
    assert d.attach_disk(spec.uuid, DiskSpec(path=extra.path)) == "vdb"
    assert d.attach_disk(spec.uuid, DiskSpec(path=extra.path)) == "vdb"  # there already: nothing added
    assert d.attach_disk(spec.uuid, DiskSpec(path="", device="cdrom", format="raw", bus="sata")) == "sdb"
    config = d.domain_xml(spec.uuid, inactive=True)
    assert extra.path in config and config.count("<disk ") == 4
    assert d.detach_disk(spec.uuid, path=extra.path) is True
    assert d.detach_disk(spec.uuid, target="sdb") is True
    assert d.detach_disk(spec.uuid, target="sdb") is False
    config = d.domain_xml(spec.uuid, inactive=True)
    assert extra.path not in config and config.count("<disk ") == 2
    d.start(spec.uuid)  # a running domain takes a virtio disk, never a SATA one or a drive
    for refused in (DiskSpec(path=extra.path, bus="sata"), DiskSpec(path="", device="cdrom", format="raw", bus="sata")):
        with pytest.raises(HypervisorFatalError, match="running"):
            d.attach_disk(spec.uuid, refused)
    assert d.attach_disk(spec.uuid, DiskSpec(path=extra.path)) == "vdb"
    assert extra.path in d.domain_xml(spec.uuid) and extra.path in d.domain_xml(spec.uuid, inactive=True)
    with pytest.raises(HypervisorFatalError):
        d.attach_disk(str(uuidlib.uuid4()), DiskSpec(path=extra.path))


@beyond_the_test_driver
def test_nics_attach_once_by_mac_and_detach(kit):
    d, spec = kit.driver, kit.spec()
    d.define_domain(spec)
    nic = NicSpec(type="user", source="", mac="52:54:00:c0:ff:a1", model="e1000")
    assert d.attach_nic(spec.uuid, nic) is True
    assert d.attach_nic(spec.uuid, replace(nic, mac="52:54:00:C0:FF:A1")) is False
    assert "52:54:00:c0:ff:a1" in d.domain_xml(spec.uuid, inactive=True)
    assert d.detach_nic(spec.uuid, mac="52:54:00:c0:ff:a1") is True
    assert d.detach_nic(spec.uuid, mac="52:54:00:c0:ff:a1") is False
    assert "52:54:00:c0:ff:a1" not in d.domain_xml(spec.uuid, inactive=True)
    d.start(spec.uuid)  # hot-plugged into the running domain too
    assert d.attach_nic(spec.uuid, nic) is True
    assert "52:54:00:c0:ff:a1" in d.domain_xml(spec.uuid) and "52:54:00:c0:ff:a1" in d.domain_xml(
        spec.uuid, inactive=True
    )


@beyond_the_test_driver
def test_the_serial_console_is_one_clients_at_a_time_unless_taken_over(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    first = d.serial_console(spec.uuid)
    try:
        with pytest.raises(HypervisorFatalError, match="[Aa]ctive console session"):
            d.serial_console(spec.uuid)
        second = d.serial_console(spec.uuid, take_over=True)
        second.close()
    finally:
        first.close()


@beyond_the_test_driver
def test_vnc_open_gives_a_fresh_password_for_the_live_address(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    host, port = d.vnc_address(spec.uuid)
    opened = d.vnc_open(spec.uuid)
    again = d.vnc_open(spec.uuid)
    assert opened[:2] == again[:2] == (host, port) and port > 0
    assert len(opened[2]) == 8 and opened[2] != again[2]


# --- networks and traffic filters ---------------------------------------------------------------


@every_driver
def test_define_network_is_idempotent_and_remove_says_whether_there_was_one(kit):
    d = kit.driver
    name = kit.prefix
    kit.networks.append(name)
    xml = f"<network><name>{name}</name><bridge name='vb{name[-8:]}'/></network>"  # isolated, no address
    assert d.define_network(xml) is True
    assert d.define_network(xml) is False
    assert [(n.active, n.forward_mode) for n in d.host_info().networks if n.name == name] == [(True, "isolated")]
    assert d.remove_network(name) is True
    assert name not in [n.name for n in d.host_info().networks]
    assert d.remove_network(name) is False


@beyond_the_test_driver
def test_define_guard_defines_or_updates_and_remove_guard_says_whether_there_was_one(kit):
    d = kit.driver
    network = kit.prefix
    kit.guards.append(network)
    rule = "<rule action='{}' direction='out' priority='500'><all/></rule>"
    d.define_guard(f"<filter name='{guard_name(network)}' chain='root'>{rule.format('drop')}</filter>")
    d.define_guard(f"<filter name='{guard_name(network)}' chain='root'>{rule.format('accept')}</filter>")  # update
    assert d.remove_guard(guard_name(network)) is True
    assert d.remove_guard(guard_name(network)) is False


@every_driver
def test_host_info_reports_the_pool_and_the_domains(kit):
    d, spec = kit.driver, kit.spec()
    d.define_domain(spec)
    info = d.host_info()
    pool = next(p for p in info.pools if p.name == kit.pool)
    assert pool.active and pool.path == d.pool_path(kit.pool) and pool.capacity_bytes > 0
    assert [(x.name, x.managed) for x in info.domains if x.uuid == spec.uuid] == [(spec.name, True)]
    assert info.arch and info.cpus > 0 and info.memory_mib > 0 and info.domain_type


@every_driver
def test_domain_shape_reads_a_hand_made_domain_and_domain_mark_makes_it_the_portals(kit):
    """A domain defined outside the portal: its shape with the disk found as a volume of the pool (the other
    disk in none), its NIC and MAC; the mark goes in once, the domain keeps its name and counts as managed."""
    d, uuid = kit.driver, str(uuidlib.uuid4())
    kit.domains.append(uuid)
    disk = d.create_volume(pool=kit.pool, name=kit.vol("hand.qcow2"), fmt="qcow2", capacity_bytes=MIB)
    name = f"{kit.prefix}-hand"
    kit.define_xml(
        f"<domain type='{kit.domain_type}'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk.path}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>"
        "<interface type='user'><mac address='52:54:00:0a:0b:0c'/><model type='virtio'/></interface>"
        "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/></devices></domain>"
    )
    assert d.domain_shape(str(uuidlib.uuid4())) is None
    shape = d.domain_shape(uuid)
    assert shape is not None and shape["persistent"] and not shape["marked"] and not shape["autostart"]
    assert (shape["name"], shape["vcpus"], shape["memory_mib"], shape["boot"]) == (name, 1, 64, ["hd"])
    vda, cdrom = shape["disks"]
    assert (vda["pool"], vda["volume"], vda["path"], vda["capacity_bytes"]) == (kit.pool, disk.name, disk.path, MIB)
    assert (cdrom["device"], cdrom["path"], cdrom["pool"]) == ("cdrom", "", "")
    assert [(n["type"], n["mac"]) for n in shape["nics"]] == [("user", "52:54:00:0a:0b:0c")]
    assert [x.managed for x in d.list_domains() if x.uuid == uuid] == [False]
    assert [x.shape["name"] for x in d.host_info().domains if x.uuid == uuid and x.shape] == [name]
    mark = {"id": "9", "adopted": uuid}
    assert d.domain_mark(uuid, mark) is True
    assert d.domain_mark(uuid, mark) is False
    assert portal_domain(d.domain_xml(uuid)) == (name, mark)
    assert [(x.name, x.managed, x.shape) for x in d.host_info().domains if x.uuid == uuid] == [(name, True, None)]
    d.start(uuid)  # a running one takes a new mark live and in its config
    assert d.domain_mark(uuid, {**mark, "id": "10"}) is True
    assert (
        portal_domain(d.domain_xml(uuid))[1]["id"] == portal_domain(d.domain_xml(uuid, inactive=True))[1]["id"] == "10"
    )
    with pytest.raises(HypervisorFatalError):
        d.domain_mark(str(uuidlib.uuid4()), mark)


# --- the gaps of libvirt's test driver, each covered by the real libvirtd instead ------------------------

GAPS = {
    # what: (the call on a test:/// domain or volume, the test that holds it on the real libvirtd)
    "volume upload": ("upload", "test_upload_then_download_gives_the_bytes_back[libvirtd]"),
    "volume download": ("download", "test_upload_then_download_gives_the_bytes_back[libvirtd]"),
    "growing a volume": ("resize", "test_resize_grows[libvirtd]"),
    "growing a running disk": ("block_resize", "test_block_resize_grows_a_running_disk_and_refuses_a_stopped_domain"),
    "changing media": ("change_media", "test_change_media_inserts_and_ejects[libvirtd]"),
    "attaching devices": ("attach_disk", "test_disks_and_cdrom_drives_attach_to_the_first_free_target_and_detach"),
    "serial console": ("serial_console", "test_the_serial_console_is_one_clients_at_a_time_unless_taken_over"),
    "nwfilter": ("define_guard", "test_define_guard_defines_or_updates_and_remove_guard_says_whether_there_was_one"),
}


@pytest.mark.parametrize("gap", sorted(GAPS))
@pytest.mark.parametrize("kit", [TEST], indirect=True)
def test_what_the_test_driver_cannot_do(kit, gap):
    d = kit.driver
    call, covered_by = GAPS[gap]
    vol = d.create_volume(pool=kit.pool, name=kit.vol("gap.img"), fmt="raw", capacity_bytes=MIB)
    spec = kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    calls = {
        "upload": lambda: d.upload_volume(pool=kit.pool, name=vol.name, source=io.BytesIO(b"x"), length=1),
        "download": lambda: d.download_volume(pool=kit.pool, name=vol.name, sink=lambda data: None),
        "resize": lambda: d.resize_volume(pool=kit.pool, name=vol.name, capacity_bytes=2 * MIB),
        "block_resize": lambda: d.block_resize(spec.uuid, path=spec.disks[0].path, capacity_bytes=2 * MIB),
        "change_media": lambda: d.change_media(spec.uuid, target="sda", path=vol.path),
        "attach_disk": lambda: d.attach_disk(spec.uuid, DiskSpec(path=vol.path)),
        "serial_console": lambda: d.serial_console(spec.uuid),
        "define_guard": lambda: d.define_guard("<filter name='portal-guard-x' chain='root'/>"),
    }
    with pytest.raises(HypervisorFatalError, match="not supported"):
        calls[call]()
        pytest.fail(f"the test driver now does {gap}: move {covered_by} to every_driver")


@pytest.mark.parametrize("kit", [TEST], indirect=True)
def test_the_test_driver_has_no_live_vnc_port(kit):
    """So vnc_address and vnc_open answer None for a running test:/// domain; the real libvirtd's port is held
    by test_vnc_open_gives_a_fresh_password_for_the_live_address[libvirtd] and tests/integration/test_console_auth.py."""
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    assert d.domain_state(spec.uuid) == PowerState.RUNNING
    assert d.vnc_address(spec.uuid) is None and d.vnc_open(spec.uuid) is None


@every_driver
def test_domains_observed_gives_every_domains_state_and_a_new_run_at_each_start(kit):
    d, spec = kit.driver, kit.disk_spec(nics=(NicSpec(type="user", source="", mac="52:54:00:c0:ff:e1"),))
    d.define_domain(spec)
    seen = d.domains_observed()
    assert seen.domains[spec.uuid].state == PowerState.OFF and seen.domains[spec.uuid].run == -1
    assert all(isinstance(a, list) for a in seen.leases.values())
    d.start(spec.uuid)
    first = d.domains_observed().domains[spec.uuid]
    assert first.state == PowerState.RUNNING and first.run >= 0
    d.power_off(spec.uuid)
    d.start(spec.uuid)
    assert d.domains_observed().domains[spec.uuid].run not in (first.run, -1)  # a restart is a new run
    d.undefine(spec.uuid)
    assert spec.uuid not in d.domains_observed().domains


def _plain_counters(counters) -> bool:
    """Every field None or a non-negative int (what the metrics' rates are computed from)."""
    return all(v is None or (isinstance(v, int) and v >= 0) for v in asdict(counters).values())


@every_driver
def test_domains_observed_gives_a_running_domains_counters_and_the_hosts_from_the_same_read(kit):
    """The metrics' source: counters of running domains only, plain non-negative numbers. The real libvirtd
    tells CPU time, vCPUs and the host's CPU and memory; the test driver tells no domain counters and no host
    memory (when it learns them, this fails and says so); the fake tells what a test set."""
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    assert d.domains_observed().domains[spec.uuid].counters is None  # off: nothing counts
    d.start(spec.uuid)
    if isinstance(d, FakeDriver):
        d.host.domains[spec.uuid]["counters"] = DomainCounters(cpu_time_ns=5, vcpus=1, disk_read_bytes=7)
        d.host.host_counters = HostCountersRead(cpus=2, cpu_busy_ns=1, cpu_idle_ns=2, memory_total_kib=1024)
    seen = d.domains_observed()
    counters, host = seen.domains[spec.uuid].counters, seen.counters
    if kit.name == "test:///default":
        assert counters is None, "the test driver now tells domain counters: assert them here as for the others"
        assert host is not None and host.memory_total_kib is None and host.cpus
    else:
        assert counters is not None and _plain_counters(counters)
        assert counters.cpu_time_ns is not None and counters.vcpus == 1
        assert host is not None and _plain_counters(host) and host.cpus and host.memory_total_kib
    assert host is not None and _plain_counters(host) and host.cpu_busy_ns is not None


@every_driver
def test_domain_inspect_tells_the_console_and_the_addresses_of_a_running_domain_only(kit):
    d, spec = kit.driver, kit.disk_spec(nics=(NicSpec(type="user", source="", mac="52:54:00:c0:ff:e2"),))
    assert d.domain_inspect(str(uuidlib.uuid4())) is None
    d.define_domain(spec)
    off = d.domain_inspect(spec.uuid)
    assert off is not None and off.addresses == {} and off.console_unprotected is False
    d.start(spec.uuid)
    for leases in (None, {}, {"52:54:00:c0:ff:e2": ["192.0.2.44/24"]}):
        found = d.domain_inspect(spec.uuid, leases=leases)
        assert found is not None and found.console_unprotected is False  # a portal domain asks a password
        assert set(found.addresses) <= {"52:54:00:c0:ff:e2"}
        if leases:
            assert "192.0.2.44/24" in found.addresses["52:54:00:c0:ff:e2"]  # given leases count as its own


# --- live migration ----------------------------------------------------------------------------------------
# A migration needs two hypervisors that run QEMU: here only its refusals are held on every driver (they come
# before anything moves, and leave the domain running where it was). The migration itself is held on two real
# libvirtds by tests/integration/test_live_migration.py (a running guest's counter goes on, progress, the
# downtime bound, cancel); the fake's test below does what that test asserts, in memory.


def _other(kit, tmp_path) -> HypervisorDriver:
    """A second hypervisor of the kit's kind: another fake host, or a libvirt test driver of its own."""
    if isinstance(kit.driver, FakeDriver):
        return FakeHost().get_driver("fake:///other")
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    return LibvirtDriver(f"test://{node}")


@every_driver
def test_migrate_live_refuses_before_anything_moves(kit, tmp_path):
    d, spec, other = kit.driver, kit.disk_spec(), _other(kit, tmp_path)
    disk = spec.disks[0].path
    paths = {disk: "/elsewhere/disk.qcow2"}

    def migrate(uuid=spec.uuid, target=other, **kw):
        return d.migrate_live(
            uuid, target=target, address="192.0.2.7", vnc_listen="192.0.2.7", **{"paths": paths, **kw}
        )

    with pytest.raises(HypervisorFatalError, match="does not exist"):
        migrate(str(uuidlib.uuid4()))
    d.define_domain(spec)
    with pytest.raises(HypervisorFatalError, match="not running"):
        migrate()
    d.start(spec.uuid)
    with pytest.raises(HypervisorFatalError, match=f"no path on the target for {disk}"):
        migrate(paths={})
    with pytest.raises(HypervisorFatalError, match="on that hypervisor already"):
        migrate(target=type(d)(d.uri, *([d.host] if isinstance(d, FakeDriver) else [])))
    for bad in ({"max_downtime_ms": 0}, {"timeout": 0}, {"bandwidth_mib_s": -1}):
        with pytest.raises(HypervisorFatalError, match="must be positive"):
            migrate(**bad)
    assert d.domain_state(spec.uuid) == PowerState.RUNNING and other.domain_state(spec.uuid) is None


@beyond_the_test_driver
def test_migrate_live_refuses_a_target_that_has_the_domain_already(kit):
    """The same hypervisor under another URI (a fake sharing the host; the host's libvirtd by its socket)."""
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    same = FakeDriver("fake:///alias", d.host) if isinstance(d, FakeDriver) else LibvirtDriver(f"{d.uri}?socket={SOCK}")
    with pytest.raises(HypervisorFatalError, match="has a domain with this UUID already"):
        d.migrate_live(
            spec.uuid, target=same, address="192.0.2.7", paths={spec.disks[0].path: "/x"}, vnc_listen="192.0.2.7"
        )
    assert d.domain_state(spec.uuid) == PowerState.RUNNING


SOCK = "/var/run/libvirt/libvirt-sock"


@pytest.mark.parametrize("kit", [TEST], indirect=True)
def test_the_test_driver_cannot_migrate(kit, tmp_path):
    """A well-formed call reaches libvirt, whose test driver has no migration: the real one is held by
    tests/integration/test_live_migration.py. When the test driver learns it, this fails and says so."""
    d, spec, other = kit.driver, kit.disk_spec(), _other(kit, tmp_path)
    d.define_domain(spec)
    d.start(spec.uuid)
    with pytest.raises(HypervisorFatalError, match="not supported"):
        d.migrate_live(
            spec.uuid, target=other, address="192.0.2.7", paths={spec.disks[0].path: "/x"}, vnc_listen="192.0.2.7"
        )
        pytest.fail("the test driver now migrates: hold the migration on every driver")
    assert d.domain_state(spec.uuid) == PowerState.RUNNING and other.domain_state(spec.uuid) is None


@pytest.mark.parametrize("kit", [FAKE], indirect=True)
def test_the_fake_migrates_live_as_libvirt_does_in_the_integration_test(kit):
    d, other = kit.driver, FakeHost().get_driver("fake:///other")
    base = other.create_volume(pool="default", name="base.qcow2", fmt="qcow2", capacity_bytes=MIB)
    spec = kit.disk_spec(serial_log="/fake/default/serial.log")
    disk, d.host.pools["default"][spec.disks[0].path.rsplit("/", 1)[1]]["data"] = spec.disks[0].path, b"written"
    made = other.create_volume(
        pool="default",
        name="disk.qcow2",
        fmt="qcow2",
        capacity_bytes=MIB,
        backing_path=base.path,
        backing_format="qcow2",
    )
    paths = {disk: made.path, spec.serial_log: "/fake/default/serial-there.log"}
    d.define_domain(spec)
    d.start(spec.uuid)

    def migrate(**kw):
        return d.migrate_live(
            spec.uuid, target=other, address="192.0.2.7", vnc_listen="192.0.2.7", **{"paths": paths, **kw}
        )

    # Cancelled: still running here, nothing there (the caller's volumes stay for it to remove).
    with pytest.raises(MigrationAborted) as aborted:
        migrate(cancelled=lambda: True)
    assert aborted.value.reason == "cancelled"
    assert d.domain_state(spec.uuid) == PowerState.RUNNING and other.domain_state(spec.uuid) is None
    assert other.volume_info(pool="default", name="disk.qcow2").allocation_bytes == 0
    # A target volume the caller did not make: refused, as the target's QEMU would.
    with pytest.raises(HypervisorFatalError, match="Cannot access storage file"):
        migrate(paths={**paths, disk: "/fake/default/never-made.qcow2"})

    seen = []
    result = migrate(progress=seen.append, max_downtime_ms=200)
    assert other.domain_state(spec.uuid) == PowerState.RUNNING and d.domain_state(spec.uuid) is None
    assert made.path in other.domain_xml(spec.uuid) and "serial-there.log" in other.domain_xml(spec.uuid)
    assert other.vnc_address(spec.uuid)[0] == "192.0.2.7"
    assert other.volume_info(pool="default", name="disk.qcow2").backing_path == base.path  # its base stays theirs
    assert other.host.pools["default"]["disk.qcow2"]["data"] == b"written"  # the overlay's own data came
    assert result.disks == ("vda",) and result.disk_bytes == len(b"written") and result.max_downtime_ms == 200
    assert len(seen) == result.progress_reports == 2 and seen[-1].memory_remaining == 0


# --- snapshots ---------------------------------------------------------------------------------------


@every_driver
def test_internal_snapshots_make_a_tree_revert_with_memory_and_delete(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    d.start(spec.uuid)
    first = d.snapshot_create(spec.uuid, name="first", description="before the change", memory=True)
    assert (first.kind, first.memory, first.parent, first.current, first.state) == (
        "internal",
        True,
        "",
        True,
        "running",
    )
    second = d.snapshot_create(spec.uuid, name="second", memory=True)
    assert second.parent == "first"
    with pytest.raises(HypervisorFatalError, match="already"):
        d.snapshot_create(spec.uuid, name="first", memory=True)
    with pytest.raises(HypervisorFatalError, match="memory"):
        d.snapshot_create(spec.uuid, name="no-memory")
    listed = d.snapshot_list(spec.uuid)
    assert [(s.name, s.parent, s.current, s.description) for s in listed] == [
        ("first", "", False, "before the change"),
        ("second", "first", True, ""),
    ]
    d.power_off(spec.uuid)
    assert d.snapshot_revert(spec.uuid, "first") == PowerState.RUNNING  # a memory snapshot comes back running
    assert d.domain_state(spec.uuid) == PowerState.RUNNING
    assert [s.name for s in d.snapshot_list(spec.uuid) if s.current] == ["first"]
    assert d.snapshot_delete(spec.uuid, "first") is True
    assert [(s.name, s.parent) for s in d.snapshot_list(spec.uuid)] == [("second", "")]
    assert d.snapshot_delete(spec.uuid, "first") is False
    with pytest.raises(HypervisorFatalError):
        d.snapshot_revert(spec.uuid, "first")
    assert d.snapshot_delete(spec.uuid, "second") is True and d.snapshot_list(spec.uuid) == []


@every_driver
def test_an_internal_snapshot_of_a_stopped_domain_holds_its_disks_and_comes_back_off(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    taken = d.snapshot_create(spec.uuid, name="cold", memory=True)  # memory asked of a domain that is off: none
    assert (taken.kind, taken.memory, taken.state) == ("internal", False, "shutoff")
    d.start(spec.uuid)
    assert d.snapshot_revert(spec.uuid, "cold") == PowerState.OFF
    assert d.domain_state(spec.uuid) == PowerState.OFF
    assert d.snapshot_delete(spec.uuid, "cold") and d.snapshot_list(spec.uuid) == []


@beyond_the_test_driver
def test_external_disk_only_snapshots_revert_the_newest_and_merge_back_on_delete(kit, request):
    """As the portal takes them for UEFI machines: overlays named as pool volumes; a revert empties the newest one's
    overlay; a delete merges it back, on a running domain and on one that is off with children (which libvirt 9.0
    refuses by itself), and leaves neither volume nor metadata."""
    d, spec = kit.driver, kit.disk_spec()
    request.addfinalizer(lambda: d.refresh_pool(kit.pool))  # a failure midway: the overlays are volumes to clean up
    d.define_domain(spec)
    base = spec.disks[0].path
    here = d.pool_path(kit.pool)
    one, two = f"{here}/{kit.vol('s1.qcow2')}", f"{here}/{kit.vol('s2.qcow2')}"
    d.start(spec.uuid)
    with pytest.raises(HypervisorFatalError, match="memory"):
        d.snapshot_create(spec.uuid, name="with-memory", memory=True, overlays={"vda": one})
    s1 = d.snapshot_create(spec.uuid, name="s1", overlays={"vda": one})
    assert (s1.kind, s1.memory, s1.overlays, s1.quiesced) == ("external", False, (one,), False)  # no guest agent
    d.power_off(spec.uuid)
    s2 = d.snapshot_create(spec.uuid, name="s2", overlays={"vda": two})  # off: libvirt makes the overlay itself
    assert s2.parent == "s1"
    names = set(d.volume_names(kit.pool))
    assert {one.rsplit("/", 1)[1], two.rsplit("/", 1)[1]} <= names
    with pytest.raises(HypervisorFatalError, match="later snapshots"):
        d.snapshot_revert(spec.uuid, "s1")
    d.start(spec.uuid)
    assert d.snapshot_revert(spec.uuid, "s2") == PowerState.OFF
    assert d.volume_info(pool=kit.pool, name=two.rsplit("/", 1)[1]).backing_path == one
    assert d.snapshot_delete(spec.uuid, "s1") is True  # off, with a child
    assert [(s.name, s.parent) for s in d.snapshot_list(spec.uuid)] == [("s2", "")]
    assert d.domain_state(spec.uuid) == PowerState.OFF
    d.start(spec.uuid)
    assert d.snapshot_delete(spec.uuid, "s2") is True  # running
    assert d.snapshot_list(spec.uuid) == []
    d.refresh_pool(kit.pool)
    left = set(d.volume_names(kit.pool))
    assert one.rsplit("/", 1)[1] not in left and two.rsplit("/", 1)[1] not in left
    if kit.name != "fake":
        from hypervisors.drivers.domxml import disk_targets

        assert disk_targets(d.domain_xml(spec.uuid)) == {"vda": base}
        assert disk_targets(d.domain_xml(spec.uuid, inactive=True)) == {"vda": base}


@pytest.mark.parametrize("kit", [TEST], indirect=True)
def test_the_test_driver_takes_no_external_snapshots(kit):
    """Held on the fake and the real libvirtd by test_external_disk_only_snapshots_revert_the_newest_and_merge_back_on_delete."""
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    with pytest.raises(HypervisorFatalError, match="unsupported flags"):
        d.snapshot_create(spec.uuid, name="x", overlays={"vda": f"{d.pool_path(kit.pool)}/{kit.vol('x.qcow2')}"})
        pytest.fail("the test driver now takes external snapshots: run that test on every_driver")


@every_driver
def test_snapshot_copy_disks_copies_what_an_internal_snapshot_holds_and_leaves_the_domain_as_it_was(kit):
    """Through the API alone: the stopped domain kept in a temporary snapshot, reverted to the one asked (a memory
    snapshot too: paused, then off), its disk copied flattened, reverted back and the temporary one deleted; one
    left by a crash is reverted to and deleted first. What the copies hold: tests/integration/test_clones.py."""
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    disk = spec.disks[0].path.rsplit("/", 1)[1]
    d.start(spec.uuid)
    d.snapshot_create(spec.uuid, name="warm", memory=True)
    d.power_off(spec.uuid)
    d.snapshot_create(spec.uuid, name="cold")
    before = d.snapshot_list(spec.uuid)
    one, two = kit.vol("from-warm.qcow2"), kit.vol("from-cold.qcow2")
    d.start(spec.uuid)
    with pytest.raises(HypervisorFatalError, match="running"):
        d.snapshot_copy_disks(spec.uuid, "warm", pool=kit.pool, copies={disk: one}, keep="portal_keep")
    d.power_off(spec.uuid)
    with pytest.raises(HypervisorFatalError, match="no snapshot"):
        d.snapshot_copy_disks(spec.uuid, "absent", pool=kit.pool, copies={disk: one}, keep="portal_keep")
    d.snapshot_copy_disks(spec.uuid, "warm", pool=kit.pool, copies={disk: one}, keep="portal_keep")
    d.snapshot_copy_disks(spec.uuid, "cold", pool=kit.pool, copies={disk: two}, keep="portal_keep")
    for name in (one, two):
        info = d.volume_info(pool=kit.pool, name=name)
        assert info is not None and (info.format, info.backing_path) == ("qcow2", "")
    assert d.snapshot_list(spec.uuid) == before and d.domain_state(spec.uuid) == PowerState.OFF
    d.snapshot_create(spec.uuid, name="portal_keep")  # as a crash midway leaves it
    d.snapshot_copy_disks(spec.uuid, "cold", pool=kit.pool, copies={disk: two}, keep="portal_keep")  # two: kept
    assert d.snapshot_list(spec.uuid) == before and d.domain_state(spec.uuid) == PowerState.OFF
    for name in ("warm", "cold"):
        d.snapshot_delete(spec.uuid, name)


@every_driver
def test_clone_volume_makes_a_standalone_copy_once(kit):
    d = kit.driver
    base = d.create_volume(pool=kit.pool, name=kit.vol("cbase.qcow2"), fmt="qcow2", capacity_bytes=MIB)
    top = d.create_volume(
        pool=kit.pool,
        name=kit.vol("ctop.qcow2"),
        fmt="qcow2",
        capacity_bytes=2 * MIB,
        backing_path=base.path,
        backing_format="qcow2",
    )
    copy = d.clone_volume(pool=kit.pool, name=top.name, new_name=kit.vol("ccopy.qcow2"))
    assert (copy.format, copy.capacity_bytes, copy.backing_path) == ("qcow2", 2 * MIB, "")
    assert d.clone_volume(pool=kit.pool, name=top.name, new_name=copy.name) == copy
    with pytest.raises(HypervisorFatalError):
        d.clone_volume(pool=kit.pool, name=kit.vol("absent.qcow2"), new_name=kit.vol("never.qcow2"))


@beyond_the_test_driver
def test_clone_volume_with_its_backing_copies_only_its_own_layer(kit):
    """A linked clone's disk: the volume's own layer, standing on the same read-only base; a wrong base refused.
    (libvirt's test:/// driver has no volume streams, which this copy uses.)"""
    d = kit.driver
    base = d.create_volume(pool=kit.pool, name=kit.vol("lbase.qcow2"), fmt="qcow2", capacity_bytes=MIB)
    top = d.create_volume(
        pool=kit.pool,
        name=kit.vol("ltop.qcow2"),
        fmt="qcow2",
        capacity_bytes=2 * MIB,
        backing_path=base.path,
        backing_format="qcow2",
    )
    with pytest.raises(HypervisorFatalError, match="stands on"):
        d.clone_volume(pool=kit.pool, name=top.name, new_name=kit.vol("lnever.qcow2"), backing_path="/elsewhere")
    link = d.clone_volume(
        pool=kit.pool, name=top.name, new_name=kit.vol("llink.qcow2"), backing_path=base.path, backing_format="qcow2"
    )
    assert (link.format, link.capacity_bytes, link.backing_path) == ("qcow2", 2 * MIB, base.path)
    assert link.path != top.path
    assert d.volume_info(pool=kit.pool, name=kit.vol("lnever.qcow2")) is None


# --- changing a machine after create: vCPUs, memory, its name (machines.services.changes) ---------------------


@every_driver
def test_a_domain_defined_with_maxima_grows_live_within_them_and_its_config_follows(kit):
    d, spec = kit.driver, kit.disk_spec(vcpus=1, max_vcpus=2, memory_mib=64, max_memory_mib=128)
    d.define_domain(spec)
    size = d.domain_size(spec.uuid)
    assert (size.running, size.vcpus, size.max_vcpus, size.memory_mib, size.max_memory_mib) == (False, 1, 2, 64, 128)
    assert (size.live_vcpus, size.live_memory_mib) == (0, 0)
    d.start(spec.uuid)
    d.set_vcpus(spec.uuid, 2, maximum=2, live=True)
    d.set_memory(spec.uuid, 96, maximum=128, live=True)
    size = d.domain_size(spec.uuid)
    assert (size.live_vcpus, size.live_max_vcpus, size.live_max_memory_mib) == (2, 2, 128)
    # The balloon needs the guest's driver: a guest without one (this one has no OS) keeps the whole maximum,
    # and QEMU says so.
    assert size.live_memory_mib >= 96 and (kit.name != "fake" or size.live_memory_mib == 96)
    assert (size.vcpus, size.memory_mib) == (2, 96)
    with pytest.raises(HypervisorFatalError, match="at most 2 vCPUs"):
        d.set_vcpus(spec.uuid, 3, maximum=3, live=True)
    with pytest.raises(HypervisorFatalError, match="at most 128 MiB"):
        d.set_memory(spec.uuid, 256, maximum=256, live=True)


@every_driver
def test_beyond_the_maxima_only_the_config_changes_and_the_next_cold_start_boots_it(kit):
    d, spec = kit.driver, kit.disk_spec(vcpus=1, memory_mib=64)
    d.define_domain(spec)
    d.start(spec.uuid)
    d.set_vcpus(spec.uuid, 2, maximum=2, live=False)
    d.set_memory(spec.uuid, 128, maximum=128, live=False)
    size = d.domain_size(spec.uuid)
    assert (size.vcpus, size.max_vcpus, size.memory_mib, size.max_memory_mib) == (2, 2, 128, 128)
    assert (size.live_vcpus, size.live_memory_mib) == (1, 64)
    d.power_off(spec.uuid)
    d.start(spec.uuid)
    size = d.domain_size(spec.uuid)
    assert (size.live_vcpus, size.live_memory_mib) == (2, 128)
    d.power_off(spec.uuid)
    d.set_vcpus(spec.uuid, 1, maximum=1, live=False)  # lowered: the count first, then the maximum
    d.set_memory(spec.uuid, 64, maximum=64, live=False)
    size = d.domain_size(spec.uuid)
    assert (size.vcpus, size.max_vcpus, size.memory_mib, size.max_memory_mib) == (1, 1, 64, 64)


@every_driver
def test_rename_domain_renames_a_shut_off_domain_once_and_refuses_a_running_one(kit):
    d, spec = kit.driver, kit.disk_spec()
    d.define_domain(spec)
    new = f"{kit.prefix}-renamed"
    assert d.rename_domain(spec.uuid, new, title="renamed") is True
    assert d.rename_domain(spec.uuid, new, title="renamed") is False
    assert {i.uuid: i.name for i in d.list_domains()}[spec.uuid] == new
    d.start(spec.uuid)
    with pytest.raises(HypervisorFatalError, match="renames only shut-off domains"):
        d.rename_domain(spec.uuid, f"{kit.prefix}-again")
    with pytest.raises(HypervisorFatalError):
        d.domain_size(str(uuidlib.uuid4()))
