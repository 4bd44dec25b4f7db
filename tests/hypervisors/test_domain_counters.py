"""The counters the reconcile's bulk read takes from a getAllDomainStats record (libvirt_driver._domain_counters):
summed over disks and NICs, None for what the record does not tell (the record's keys as libvirt documents them;
the real libvirtd's are read in the driver contract's libvirtd run and tests/integration/test_metrics_real.py)."""

from hypervisors.drivers.base import DomainCounters
from hypervisors.drivers.libvirt_driver import _domain_counters


def test_disks_and_nics_are_summed_and_the_balloon_read_as_told():
    record = {
        "state.state": 1,
        "cpu.time": 12_000_000_000,
        "vcpu.current": 2,
        "balloon.current": 1048576,
        "balloon.rss": 300000,
        "block.count": 2,
        "block.0.rd.bytes": 100,
        "block.0.wr.bytes": 10,
        "block.0.rd.reqs": 3,
        "block.0.wr.reqs": 1,
        "block.1.rd.bytes": 50,  # a CD-ROM: reads only
        "block.1.rd.reqs": 2,
        "net.count": 2,
        "net.0.rx.bytes": 7,
        "net.0.tx.bytes": 8,
        "net.1.rx.bytes": 1,
        "net.1.tx.bytes": 2,
    }
    assert _domain_counters(record) == DomainCounters(
        cpu_time_ns=12_000_000_000,
        vcpus=2,
        memory_current_kib=1048576,
        memory_rss_kib=300000,
        disk_read_bytes=150,
        disk_write_bytes=10,
        disk_read_reqs=5,
        disk_write_reqs=1,
        net_rx_bytes=8,
        net_tx_bytes=10,
    )


def test_a_record_with_state_only_tells_no_counters():
    """As libvirt's test driver answers."""
    assert _domain_counters({"state.state": 1, "state.reason": 0}) is None
    no_disks = _domain_counters({"cpu.time": 5, "block.count": 0, "net.count": 0})
    assert no_disks is not None and no_disks.disk_read_bytes is None and no_disks.net_rx_bytes is None
