"""The portal against the host's real libvirtd, with a real Huey consumer doing the work."""

import os
import platform
import re
import subprocess
import time
import uuid
from datetime import timedelta

import pytest

from hypervisors import services
from hypervisors.models import Hypervisor, HypervisorStatus
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

DOWN_BOUND = 30  # seconds within which an unreachable hypervisor must show as down


def virsh(*args: str, input: str | None = None) -> str:
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], input=input, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def status_of(pk: int, *wanted: str):
    hv = Hypervisor.objects.get(pk=pk)
    return hv if hv.status in wanted else None


def expected_domain_type() -> str:
    """kvm only where the CPU has hardware virtualisation; /dev/kvm alone is not enough (PVM hosts)."""
    flags = open("/proc/cpuinfo").read()
    return "kvm" if os.path.exists("/dev/kvm") and re.search(r"\b(vmx|svm)\b", flags) else "qemu"


@pytest.fixture
def outside_objects(libvirtd):
    """A network and two domains defined on the host behind the portal's back; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {"net": f"itest-net-{tag}", "dom": f"itest-handmade-{tag}", "ours": f"itest-ours-{tag}"}
    with open("/tmp/itest-net.xml", "w") as f:
        f.write(f"<network><name>{names['net']}</name></network>")  # isolated, never started
    virsh("net-define", "/tmp/itest-net.xml")
    for key, metadata in [
        ("dom", ""),
        ("ours", '<metadata><p:machine xmlns:p="https://ansistack-portal.invalid/xmlns/machine/1" id="1"/></metadata>'),
    ]:
        with open("/tmp/itest-dom.xml", "w") as f:
            f.write(
                f"<domain type='qemu'><name>{names[key]}</name><memory unit='MiB'>32</memory>{metadata}"
                "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
            )
        virsh("define", "/tmp/itest-dom.xml")
    yield names
    virsh("net-undefine", names["net"])
    virsh("undefine", names["dom"])
    virsh("undefine", names["ours"])


def test_local_hypervisor_comes_online_with_its_capabilities(worker, outside_objects):
    started = time.monotonic()
    hv = services.hypervisor_create(name="local", uri="qemu:///system")
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE, HypervisorStatus.DOWN), 30)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    print(f"local online after {time.monotonic() - started:.2f} s")

    assert hv.arch == platform.machine()
    assert hv.cpus == os.cpu_count()
    assert hv.domain_type == expected_domain_type()
    assert "qemu" in hv.domain_types
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    assert hv.hypervisor_version in qemu
    assert hv.libvirt_version in virsh("version")
    pool = next(p for p in hv.pools if p["name"] == "default")
    assert pool["active"] and pool["path"] == "/var/lib/libvirt/images" and pool["capacity_bytes"] > 0
    net = next(n for n in hv.networks if n["name"] == outside_objects["net"])
    assert net == {
        "name": outside_objects["net"],
        "active": False,
        "forward_mode": "isolated",
        "bridge": net["bridge"],
        "guard": "",
    }  # not defined by the portal: no guard
    unmanaged = {d["name"]: d for d in hv.unmanaged_domains}
    assert unmanaged[outside_objects["dom"]]["state"] == "off"
    assert outside_objects["ours"] not in unmanaged  # carries the portal's metadata
    assert any(d["type"] == "pci" for d in hv.devices)  # passthrough candidates from the node devices
    assert any(i["type"] == "ethernet" for i in hv.interfaces)  # for macvtap NICs
    assert hv.managed_domain_count >= 1


def test_a_refused_hypervisor_is_down_with_the_error(worker):
    started = time.monotonic()
    hv = services.hypervisor_create(name="refused", uri="qemu+tcp://127.0.0.1:1/system")
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN, HypervisorStatus.ONLINE), DOWN_BOUND)
    assert hv.status == HypervisorStatus.DOWN
    assert "Connection refused" in hv.status_error
    assert time.monotonic() - started < DOWN_BOUND


def test_a_silent_hypervisor_is_down_within_the_bound(worker, silent_port):
    # Accepts TCP and never answers: libvirt alone would wait for ever.
    started = time.monotonic()
    hv = services.hypervisor_create(name="silent", uri=f"qemu+tcp://127.0.0.1:{silent_port}/system")
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN, HypervisorStatus.ONLINE), DOWN_BOUND)
    elapsed = time.monotonic() - started
    assert hv.status == HypervisorStatus.DOWN
    assert "did not answer" in hv.status_error
    print(f"silent hypervisor marked down after {elapsed:.1f} s")


def test_an_online_hypervisor_that_goes_away_is_marked_down_and_comes_back(worker, libvirt_tcp_proxy):
    """The periodic sync notices an outage within the bound and a recovery by itself."""
    hv = services.hypervisor_create(name="remote", uri=f"qemu+tcp://127.0.0.1:{libvirt_tcp_proxy.port}/system")
    wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE), 30, message="never came online through the proxy")

    libvirt_tcp_proxy.stop()
    outage = time.monotonic()
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN), DOWN_BOUND + 15, message="outage not noticed")
    noticed = time.monotonic() - outage
    print(f"outage noticed after {noticed:.1f} s: {hv.status_error}")
    assert noticed <= DOWN_BOUND

    libvirt_tcp_proxy.start()
    wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE), DOWN_BOUND + 15, message="did not come back")


def test_the_real_worker_beats_and_the_dashboard_says_it_runs(worker, client):
    from portal.models import Heartbeat
    from tests.factories import UserFactory

    client.force_login(UserFactory(username="watcher"))
    # The consumer's own thread beats again and again (every second in the tests, PORTAL_WORKER_HEARTBEAT),
    # busy or not: two beats in a row, not just the one each worker thread writes when it starts.
    first = wait_for(lambda: Heartbeat.objects.filter(name="worker").first(), 15, message="the worker never beat")
    later = wait_for(
        lambda: (h := Heartbeat.objects.get(name="worker")).seen > first.seen + timedelta(seconds=0.5) and h,
        10,
        message="the worker beat once, then stopped",
    )
    assert f"pid {worker.pid}" in later.detail  # the consumer process, not this one
    assert b"worker running" in client.get("/").content
    assert client.get("/healthz").json()["worker_ok"] is True
