"""The reconcile at fleet size (issue 13): one bulk read per hypervisor and a closer look only at what changed,
SQL writes only for rows that changed, hypervisors read in parallel with a deadline so a hung one delays no
other (with the fake driver; the libvirt side is in tests/hypervisors/test_driver_contract.py and
tests/hypervisors/test_hung_hosts.py, the figures in bench/fleet.py)."""

import threading
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from hypervisors.drivers.base import PowerState
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine, MachineNic
from machines.services import observation
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, UserFactory
from tests.fakes import FakeDriver

pytestmark = pytest.mark.django_db


def fleet(host, hv, n: int, *, running: bool = True) -> list[Machine]:
    """n machines on hv, each with a NIC and a domain on the fake host."""
    owner = UserFactory()
    machines = []
    for i in range(n):
        m = MachineFactory(owner=owner, hypervisor=hv, deploy_type="network", status=Status.ACTIVE)
        mac = f"52:54:00:aa:{hv.pk % 256:02x}:{i:02x}"
        MachineNic.objects.create(machine=m, index=0, type="network", source="default", mac=mac)
        host.domains[str(m.uuid)] = {
            "state": PowerState.RUNNING if running else PowerState.OFF,
            "run": 0 if running else -1,
            "addresses": {mac: [f"192.0.2.{i + 1}/24"]},
            "macs": [mac],  # what its XML would say (the fake's domains without a spec)
            "vnc_config_protected": True,
        }
        machines.append(m)
    return machines


def writes(captured) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if q["sql"].split(" ", 1)[0] in ("INSERT", "UPDATE", "DELETE")]


def calls_of_a_cycle(host, hv) -> dict[str, int]:
    host.calls.clear()
    services.hypervisor_reconcile_run(hv.pk)
    return {name: host.calls.count(name) for name in ("domains_observed", "domain_inspect")}


@pytest.mark.parametrize("n", [3, 30])
def test_an_unchanged_cycle_makes_one_bulk_read_a_few_closer_looks_and_no_write(host, n):
    hv = HypervisorFactory(name="lab")
    machines = fleet(host, hv, n)
    services.hypervisor_reconcile_run(hv.pk)  # the first sight of every run: each is looked at
    assert Machine.objects.filter(power_state="running").count() == n
    assert all(m.last_observed.guest_addresses for m in Machine.objects.filter(pk__in=[m.pk for m in machines]))
    with CaptureQueriesContext(connection) as captured:
        calls = calls_of_a_cycle(host, hv)
    assert calls["domains_observed"] == 1
    assert calls["domain_inspect"] == min(n, observation.ADDRESS_REFRESH_PER_CYCLE)  # in turn, not all
    assert writes(captured) == []


def test_a_cycle_writes_the_rows_that_changed_only(host):
    hv = HypervisorFactory(name="lab")
    machines = fleet(host, hv, 8)
    services.hypervisor_reconcile_run(hv.pk)
    stopped, restarted = machines[0], machines[1]
    host.domains[str(stopped.uuid)]["state"] = PowerState.OFF
    FakeDriver(hv.uri, host).power_off(str(restarted.uuid))
    FakeDriver(hv.uri, host).start(str(restarted.uuid))  # a new run between two cycles
    host.domains[str(restarted.uuid)]["addresses"] = {"52:54:00:aa:00:99": ["198.51.100.9/24"]}
    with CaptureQueriesContext(connection) as captured:
        host.calls.clear()
        services.hypervisor_reconcile_run(hv.pk)
    updates = writes(captured)
    # The stopped one: its power state and its observation (no address while off); the restarted one (looked
    # at although its state did not change): its new addresses. Nothing for the six others.
    assert len(updates) == 2 and all(sql.startswith("UPDATE") for sql in updates), updates
    assert Machine.objects.get(pk=stopped.pk).power_state == "off"
    assert Machine.objects.get(pk=stopped.pk).last_observed.guest_addresses == {}
    assert Machine.objects.get(pk=restarted.pk).last_observed.guest_addresses == {
        "52:54:00:aa:00:99": ["198.51.100.9/24"]
    }


def test_leases_from_the_bulk_read_reach_machines_not_looked_at(host):
    hv = HypervisorFactory(name="lab")
    machines = fleet(host, hv, observation.ADDRESS_REFRESH_PER_CYCLE + 3)
    services.hypervisor_reconcile_run(hv.pk)
    host.leases = {m.nics.get().mac: [f"203.0.113.{i}/24"] for i, m in enumerate(machines)}
    for m in machines:  # the closer look (of a few) would tell nothing more
        host.domains[str(m.uuid)]["addresses"] = {}
    host.calls.clear()
    services.hypervisor_reconcile_run(hv.pk)
    assert host.calls.count("domain_inspect") == observation.ADDRESS_REFRESH_PER_CYCLE < len(machines)
    for i, m in enumerate(machines):  # looked at or not, each has its lease
        assert Machine.objects.get(pk=m.pk).last_observed.guest_addresses == {m.nics.get().mac: [f"203.0.113.{i}/24"]}


def test_a_hung_hypervisor_is_given_up_at_its_deadline_and_delays_no_other(host, monkeypatch, settings):
    settings.PORTAL_CONNECT_TIMEOUT = 0.5  # the deadline is twice that
    healthy = [HypervisorFactory(name=f"ok{i}") for i in range(3)]
    hung = HypervisorFactory(name="hung", uri="qemu+tcp://hung.invalid/system")
    for hv in healthy:
        fleet(host, hv, 2)
    for m in fleet(host, hung, 1):
        host.domains.pop(str(m.uuid))
    release = threading.Event()

    class Hung(FakeDriver):
        def domains_observed(self):
            release.wait(10)  # a peer that never answers (until the test lets it go)
            return super().domains_observed()

    monkeypatch.setattr(
        observation, "get_driver", lambda uri: Hung(uri, host) if "hung" in uri else FakeDriver(uri, host)
    )
    done_at = {}
    real_apply = observation._apply

    def apply(plan, looked):
        real_apply(plan, looked)
        done_at[plan.hv.name] = time.monotonic()

    monkeypatch.setattr(observation, "_apply", apply)
    start = time.monotonic()
    services.machines_reconcile()
    took = time.monotonic() - start
    release.set()
    assert max(done_at[hv.name] for hv in healthy) - start < 1.0  # not behind the hung one
    assert 1.0 <= took < 2.5  # the hung one given up at its deadline
    assert Hypervisor.objects.get(pk=hung.pk).status == "down"
    assert "no answer within 1 s" in Hypervisor.objects.get(pk=hung.pk).status_error
    assert Machine.objects.filter(hypervisor__in=healthy, power_state="running").count() == 6
    assert all(Hypervisor.objects.get(pk=hv.pk).status == "online" for hv in healthy)


def test_an_unreachable_hypervisor_is_marked_down_and_a_vanished_domain_still_counts(host, monkeypatch):
    from hypervisors.drivers.base import HypervisorUnavailable

    lab, gone = HypervisorFactory(name="lab"), HypervisorFactory(name="gone", uri="qemu+tcp://gone.invalid/system")
    mine = fleet(host, lab, 2)
    fleet(host, gone, 1)
    host.domains.pop(str(mine[0].uuid))  # vanished behind the portal's back

    class Refused(FakeDriver):
        def domains_observed(self):
            raise HypervisorUnavailable("cannot reach gone.invalid:16509: Connection refused")

    monkeypatch.setattr(
        observation, "get_driver", lambda uri: Refused(uri, host) if "gone" in uri else FakeDriver(uri, host)
    )
    services.machines_reconcile()
    assert Hypervisor.objects.get(pk=gone.pk).status == "down"
    vanished = Machine.objects.get(pk=mine[0].pk)
    assert vanished.power_state == "missing"
    assert vanished.events.filter(step="reconcile", message="the domain vanished from the hypervisor").count() == 1
