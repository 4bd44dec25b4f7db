import pytest

from hypervisors.drivers.base import HypervisorUnavailable, PowerState
from hypervisors.drivers.connections import check_reachable
from hypervisors.drivers.libvirt_driver import LibvirtDriver


@pytest.fixture
def driver(test_hv_state):
    d = LibvirtDriver("test:///default")
    yield d


def test_host_info_reports_the_test_hosts_facts(driver):
    info = driver.host_info()
    assert info.arch == "i686"
    assert info.cpus == 16
    assert info.memory_mib == 3072
    assert info.domain_type == "test"
    assert info.libvirt_version.count(".") == 2


def test_host_info_lists_pools_networks_and_domains(driver):
    info = driver.host_info()
    pool = next(p for p in info.pools if p.name == "default-pool")
    assert pool.active and pool.capacity_bytes > 0 and pool.path == "/default-pool"
    net = next(n for n in info.networks if n.name == "default")
    assert net.forward_mode == "nat" and net.bridge == "virbr0"
    dom = next(d for d in info.domains if d.name == "test")
    assert dom.state == PowerState.RUNNING
    assert dom.managed is False  # no portal metadata element


def test_list_domains_matches_host_info(driver):
    assert [d.name for d in driver.list_domains()] == ["test"]


def test_connection_is_reused_within_a_thread(driver):
    assert driver.conn is driver.conn


def test_a_refused_port_is_unavailable_at_once():
    with pytest.raises(HypervisorUnavailable, match="cannot reach 127.0.0.1:1"):
        LibvirtDriver("qemu+tcp://127.0.0.1:1/system").host_info()


def test_a_missing_socket_is_unavailable():
    with pytest.raises(HypervisorUnavailable, match="nonexistent"):
        LibvirtDriver("qemu:///system?socket=/nonexistent/libvirt-sock").host_info()


def test_reachability_is_not_checked_for_local_uris():
    check_reachable("qemu:///system")  # no host part: nothing to reach over TCP


# A test driver host with node devices to pass through and a bridge (libvirt reads <device> and
# <interface> elements of a custom test:/// file as the host's own).
NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><nodes>1</nodes><sockets>1</sockets><cores>4</cores>
    <threads>1</threads></cpu>
  <memory>8388608</memory>
  <device><name>pci_0000_03_00_0</name><parent>computer</parent>
    <capability type='pci'><domain>0</domain><bus>3</bus><slot>0</slot><function>0</function>
      <product id='0x1533'>I210 Gigabit Network Connection</product><vendor id='0x8086'>Intel Corporation</vendor>
    </capability></device>
  <device><name>usb_1_2</name><parent>computer</parent>
    <capability type='usb_device'><bus>1</bus><device>2</device><product id='0x5678'>Token</product>
      <vendor id='0x1234'>Acme</vendor></capability></device>
  <interface type='bridge' name='br0'><start mode='onboot'/><bridge stp='off'>
    <interface type='ethernet' name='eno1'><mac address='52:54:00:00:00:01'/></interface></bridge></interface>
</node>"""


def test_node_devices_of_the_test_driver_are_listed_and_passed_through(tmp_path):
    from hypervisors.drivers.base import DomainSpec

    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    d = LibvirtDriver(f"test://{path}")
    info = d.host_info()
    pci, usb = info.devices
    assert (pci["name"], pci["type"], pci["vendor"], pci["product"], pci["bus"]) == (
        "pci_0000_03_00_0",
        "pci",
        "0x8086",
        "0x1533",
        3,
    )
    assert (usb["name"], usb["type"], usb["bus"], usb["device"]) == ("usb_1_2", "usb", 1, 2)
    br0 = next(i for i in info.interfaces if i["name"] == "br0")
    # No addresses from a libvirtd that is not this machine's qemu:///system; the test driver keeps no
    # bridge MAC (a real one does: tests/integration/test_guest_reach.py uses it).
    assert br0 == {"name": "br0", "type": "bridge", "active": True, "mac": "", "addresses": []}
    spec = DomainSpec(
        uuid="5d1a3f60-0d55-4a37-8a4c-2d7c9b1e0f11",
        name="passthrough",
        domain_type="test",
        vcpus=1,
        memory_mib=128,
        hostdevs=(pci, usb),
    )
    assert d.define_domain(spec)
    xml = d.domain_xml(spec.uuid)
    assert "<hostdev mode='subsystem' type='pci' managed='yes'>" in xml
    assert "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>" in xml
    assert "<hostdev mode='subsystem' type='usb' managed='yes'>" in xml and "<vendor id='0x1234'/>" in xml


def test_a_serial_console_takes_the_spare_connection_and_leaves_a_new_one(monkeypatch):
    """Each serial console needs a connection of its own; the spare saves the handshake on its critical path."""
    import threading

    from hypervisors.drivers import connections

    opened = []

    class Conn:
        def __init__(self, alive=True):
            self.alive, self.closed = alive, False
            opened.append(self)

        def isAlive(self):
            return self.alive

        def close(self):
            self.closed = True

    monkeypatch.setattr(connections, "new_connection", lambda uri, timeout=0: Conn())
    monkeypatch.setattr(connections, "_spares", {})

    def settle():
        for t in threading.enumerate():
            if t.name == "libvirt-spare":
                t.join(5)

    first = connections.take_connection("qemu+ssh://hv/system")  # no spare yet: a new one, and a spare opened
    settle()
    spare = connections._spares["qemu+ssh://hv/system"]
    assert first is not spare and len(opened) == 2
    assert connections.take_connection("qemu+ssh://hv/system") is spare  # the next console gets it
    settle()
    assert connections._spares["qemu+ssh://hv/system"] is not spare  # and a new spare is there
    connections._spares["qemu+ssh://hv/system"].alive = False  # e.g. the host restarted meanwhile
    dead = connections._spares["qemu+ssh://hv/system"]
    fresh = connections.take_connection("qemu+ssh://hv/system")
    settle()
    assert fresh is not dead and dead.closed and fresh.alive


def test_define_guard_turns_a_lost_race_into_an_update(monkeypatch):
    """Two workers defining the same new host guard (two machines on one bridge): the second's define fails
    with "already exists"; it looks the filter up again and updates it under its UUID."""
    import libvirt

    from hypervisors.drivers.libvirt_driver import LibvirtDriver

    defined = []

    class Filter:
        def UUIDString(self):
            return "11111111-2222-3333-4444-555555555555"

    class Conn:
        lookups = 0

        def nwfilterLookupByName(self, name):
            Conn.lookups += 1
            if Conn.lookups == 1:  # not there yet when this worker looked
                err = libvirt.libvirtError("no filter")
                err.err = (libvirt.VIR_ERR_NO_NWFILTER, 0, "no filter", 0, "", "", "", 0, 0)
                raise err
            return Filter()

        def nwfilterDefineXML(self, xml):
            if "<uuid>" not in xml:
                raise libvirt.libvirtError("operation failed: filter 'portal-hostguard-br0' already exists with uuid x")
            defined.append(xml)

    driver = LibvirtDriver("qemu:///system")
    monkeypatch.setattr(LibvirtDriver, "conn", property(lambda self: Conn()))
    driver.define_guard("<filter name='portal-hostguard-br0' chain='root'/>")
    assert len(defined) == 1 and "11111111-2222-3333-4444-555555555555" in defined[0]
