"""One contract, every BMC client: machines.bmc.BmcClient as the power and boot-device services rely on it.

Each test runs against FakeBmc (tests/fakes.py, on FakeHost's domains) and, in the integration layer
(`-m integration`), against IpmitoolClient, the portal's real client: ipmitool over IPMI to the
portal's own BMC (machines.bmc_server's PortalVirtualBMC, in a process of its own as the BMC server
runs it) for a domain on the host's real libvirtd. The fake therefore cannot drift from what ipmitool
and the BMC server really do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hypervisors.drivers.base import DomainSpec, HypervisorDriver, PowerState
from hypervisors.drivers.libvirt_driver import LibvirtDriver
from machines.bmc import BmcClient, BmcError, BmcFatalError, BmcTarget, IpmitoolClient
from tests.conftest import wait_for
from tests.fakes import FakeBmc, FakeHost

# The portal's BMC, as machines/bmc_server.py's children run it; its spec comes on stdin (it holds the password).
pytestmark = pytest.mark.django_db  # FakeBmc also looks for the BMCs of machines in the database

SERVE = textwrap.dedent("""\
    import json, os, sys
    import django
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from machines.bmc_server import _serve
    _serve(json.loads(sys.stdin.readline()))
""")


@dataclass
class Kit:
    client: BmcClient
    driver: HypervisorDriver
    uuid: str
    target: BmcTarget


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(domain_type: str) -> DomainSpec:
    uuid = str(uuidlib.uuid4())
    return DomainSpec(
        uuid=uuid,
        name=f"bmc-contract-{uuid[:8]}",
        domain_type=domain_type,
        vcpus=1,
        memory_mib=64,
        boot_devices=("network", "hd"),
        metadata={"machine": "1"},
    )


def _target(port: int) -> BmcTarget:
    return BmcTarget(address="127.0.0.1", port=port, username="bmc-contract", password=secrets.token_urlsafe(15))


@contextlib.contextmanager
def _fake() -> Iterator[Kit]:
    host = FakeHost()
    driver = host.get_driver("fake:///")
    spec = _spec("qemu")
    driver.define_domain(spec)
    target = _target(_udp_port())
    host.bmcs[(target.address, target.port)] = (target.username, target.password, spec.name)
    yield Kit(FakeBmc(host), driver, spec.uuid, target)


@contextlib.contextmanager
def _ipmitool(uri: str) -> Iterator[Kit]:
    driver = LibvirtDriver(uri)
    spec = _spec("qemu")
    driver.define_domain(spec)
    target = _target(_udp_port())
    served = {
        "address": target.address,
        "port": target.port,
        "username": target.username,
        "password": target.password,
        "domain_name": spec.name,
        "uri": uri,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE],
        stdin=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(served) + "\n")
        proc.stdin.close()
        client = IpmitoolClient()
        wait_for(lambda: proc.poll() is not None or client.answers(target), 60, message="the BMC never answered")
        assert proc.poll() is None, "the BMC process ended"
        yield Kit(client, driver, spec.uuid, target)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        driver.power_off(spec.uuid)
        driver.undefine(spec.uuid)


@pytest.fixture
def kit(request) -> Iterator[Kit]:
    made = _fake() if request.param == "fake" else _ipmitool(request.getfixturevalue("libvirtd"))
    with made as k:
        yield k


every_client = pytest.mark.parametrize(
    "kit",
    [pytest.param("fake", id="fake"), pytest.param("ipmitool", id="ipmitool", marks=pytest.mark.integration)],
    indirect=True,
)


def test_the_fake_implements_the_whole_interface():
    assert {"power_state", "power", "set_boot_device", "boot_device"} <= BmcClient.__abstractmethods__
    for cls in (FakeBmc, IpmitoolClient):
        assert not cls.__abstractmethods__, f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"


@every_client
def test_power_on_and_off_are_seen_by_the_hypervisor(kit):
    assert kit.client.power_state(kit.target) == "off"
    assert kit.client.power(kit.target, "on") == "on"
    assert kit.driver.domain_state(kit.uuid) == PowerState.RUNNING and kit.client.power_state(kit.target) == "on"
    assert kit.client.power(kit.target, "off") == "off"
    assert kit.driver.domain_state(kit.uuid) == PowerState.OFF


@every_client
def test_a_cycle_leaves_it_on_and_an_unknown_action_is_fatal(kit):
    assert kit.client.power(kit.target, "cycle") == "on"
    assert kit.driver.domain_state(kit.uuid) == PowerState.RUNNING
    with pytest.raises(BmcFatalError, match="unknown power action"):
        kit.client.power(kit.target, "explode")


@every_client
def test_boot_devices_persist_or_apply_to_the_next_cold_start_only(kit):
    assert kit.client.boot_device(kit.target) == "pxe"  # the network-boot machine's first device
    kit.client.set_boot_device(kit.target, "disk", persistent=True)
    assert kit.client.boot_device(kit.target) == "disk"
    kit.client.set_boot_device(kit.target, "cdrom", persistent=False)
    assert kit.client.boot_device(kit.target) == "cdrom"
    kit.client.power(kit.target, "on")  # the cold start that uses it
    kit.client.power(kit.target, "off")
    assert kit.client.boot_device(kit.target) == "disk"  # the next one uses the persistent device again
    with pytest.raises(BmcFatalError, match="unknown boot device"):
        kit.client.set_boot_device(kit.target, "floppy", persistent=True)


@every_client
def test_wrong_credentials_are_fatal_and_no_bmc_is_retryable(kit):
    wrong = BmcTarget(kit.target.address, kit.target.port, kit.target.username, "not-the-password")
    with pytest.raises(BmcFatalError, match="refused the credentials"):
        kit.client.power_state(wrong)
    nobody = BmcTarget(kit.target.address, _udp_port(), kit.target.username, kit.target.password)
    with pytest.raises(BmcError) as raised:
        kit.client.power_state(nobody)
    assert not isinstance(raised.value, BmcFatalError)
    assert kit.client.answers(kit.target) and not kit.client.answers(nobody)
