"""Metrics from the real libvirtd (issue 17): a running tiny guest's one-minute series shows the CPU it used, from
the reconcile's own bulk read (getAllDomainStats with the CPU, balloon, block and interface groups), and the
host's point its CPU and memory. The reconcile is driven here (not waited for from the crontab); only the
baseline's time is moved back, so two reads a few seconds apart count as a minute's, over real counters."""

from __future__ import annotations

import time

import pytest

from machines import services
from machines.models import Machine
from machines.services import observation
from metrics.collect import MIN_INTERVAL
from metrics.models import HostCounters, HostSample, MachineSample, Resolution
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def a_minute_later(hv_id: int, attempt: int) -> None:
    """One reconcile cycle of the hypervisor, its baseline moved back (MIN_INTERVAL, and a minute more at each
    attempt, so each attempt's point falls in a minute of its own; the worker's crontab cycle may have taken the
    baseline meanwhile: whichever it is, its counters are real)."""
    back = MIN_INTERVAL + 5 + 60 * attempt
    HostCounters.objects.filter(hypervisor_id=hv_id).update(read_at=time.time() - back)
    observation.hypervisor_reconcile_run(hv_id)


def test_a_running_tiny_guest_shows_its_cpu_and_the_host_its_cpu_and_memory(local, tiny_image):
    owner = UserFactory(username="measured", is_staff=True)
    machine = services.machine_create(
        owner=owner, hypervisor=local, name="metrics1", image=tiny_image, vcpus=1, memory_mib=128, disk_gib=1
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 180)
    assert machine.status == "active", machine.status_message
    observation.hypervisor_reconcile_run(local.pk)  # a baseline (or a point over one the worker took)
    assert Machine.objects.get(pk=machine.pk).power_state == "running"
    counters = HostCounters.objects.get(hypervisor=local).domains[str(machine.uuid)]
    assert counters["run"] >= 0 and counters["cpu_time_ns"] > 0 and counters["vcpus"] == 1
    assert counters["memory_current_kib"] and counters["disk_read_bytes"] is not None

    attempts = iter(range(9))  # a baseline at most MAX_INTERVAL old

    def busy_point():
        a_minute_later(local.pk, next(attempts))
        points = MachineSample.objects.filter(machine=machine, resolution=Resolution.MINUTE, cpu_pct__gt=0)
        return points.order_by("-at").first()

    point = wait_for(busy_point, 40, interval=3)  # the booting guest uses CPU every few seconds
    assert 0 < point.cpu_pct <= 100 and point.seconds_running > 0
    assert point.disk_read_bps is not None and point.memory_used_mib and point.memory_used_mib > 0
    assert (point.vcpus, point.memory_mib, point.disk_gib) == (1, 128, 1)
    host = HostSample.objects.filter(hypervisor=local, resolution=Resolution.MINUTE).order_by("-at").first()
    assert host is not None and host.cpu_pct is not None and host.cpu_pct > 0
    assert (
        host.memory_total_mib and host.memory_total_mib > 0 and 0 < (host.memory_used_mib or 0) < host.memory_total_mib
    )
    assert host.vcpus_allocated >= 1 and host.vcpus_capacity > 0 and host.machines_running >= 1
