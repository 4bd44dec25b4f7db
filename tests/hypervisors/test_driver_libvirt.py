import pytest

from hypervisors.drivers.base import HypervisorUnavailable, PowerState
from hypervisors.drivers.libvirt_driver import LibvirtDriver, check_reachable


@pytest.fixture
def driver(test_hv_state):
    with LibvirtDriver("test:///default") as d:
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
