"""Rollup and retention (metrics/rollup.py, metrics/tasks.py): hour points and usage rows from the minute points,
idempotent; old points dropped; a deleted machine's usage kept."""

from datetime import UTC, datetime, timedelta

import pytest

from machines.states import Status
from metrics import tasks
from metrics.models import HostSample, MachineSample, Resolution, UsageHour
from metrics.rollup import prune, rollup
from tests.factories import MachineFactory, ProjectFactory

pytestmark = pytest.mark.django_db

H0 = datetime(2027, 1, 15, 8, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def minutes(m, start, n, *, cpu=lambda i: 10.0, running=60, vcpus=2, memory_mib=2048, disk_gib=10):
    MachineSample.objects.bulk_create(
        MachineSample(
            machine=m,
            resolution=Resolution.MINUTE,
            at=start + i * MINUTE,
            seconds_running=running,
            cpu_pct=cpu(i) if running else None,
            net_rx_bps=100.0 if running else None,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
        )
        for i in range(n)
    )


def host_minutes(hv, start, n):
    HostSample.objects.bulk_create(
        HostSample(
            hypervisor=hv,
            resolution=Resolution.MINUTE,
            at=start + i * MINUTE,
            cpu_pct=float(i),
            memory_used_mib=1000.0,
            memory_total_mib=4000.0,
            vcpus_allocated=2 + (i == 7),
            vcpus_capacity=16,
            machines_running=1,
        )
        for i in range(n)
    )


@pytest.fixture
def machine():
    return MachineFactory(status=Status.ACTIVE, project=ProjectFactory(), vcpus=2, memory_mib=2048, disk_gib=10)


def hour_point(m, at):
    return MachineSample.objects.get(machine=m, resolution=Resolution.HOUR, at=at)


def test_complete_hours_become_hour_points_and_usage_rows(machine, settings):
    settings.PORTAL_METRICS_MINUTE_RETENTION_HOURS = 1000  # nothing pruned here
    minutes(machine, H0, 60, cpu=lambda i: float(i % 2) * 20)  # averages 10 %
    minutes(machine, H0 + timedelta(hours=1), 30, running=0)  # the next hour: off, half of it sampled
    minutes(machine, H0 + timedelta(hours=2), 5)  # the current hour: not complete
    host_minutes(machine.hypervisor, H0, 60)
    counts = rollup(now=H0 + timedelta(hours=2, minutes=10))
    assert counts["machine_hours"] == 2 and counts["usage_rows"] == 2 and counts["host_hours"] == 1
    first = hour_point(machine, H0)
    assert first.cpu_pct == pytest.approx(10.0) and first.net_rx_bps == 100.0 and first.seconds_running == 3600
    assert (first.vcpus, first.memory_mib, first.disk_gib) == (2, 2048, 10)
    second = hour_point(machine, H0 + timedelta(hours=1))
    assert second.cpu_pct is None and second.seconds_running == 0
    assert not MachineSample.objects.filter(resolution=Resolution.HOUR, at=H0 + timedelta(hours=2)).exists()
    used = UsageHour.objects.get(at=H0)
    assert (used.machine_id, used.machine_uuid, used.machine_name) == (machine.pk, machine.uuid, machine.name)
    assert (used.owner_id, used.project_id) == (machine.owner_id, machine.project_id)
    assert used.vcpu_hours == pytest.approx(2.0) and used.memory_gib_hours == pytest.approx(2.0)
    assert used.disk_gib_days == pytest.approx(10 / 24)
    off = UsageHour.objects.get(at=H0 + timedelta(hours=1))
    assert off.vcpu_hours == 0 and off.memory_gib_hours == 0 and off.disk_gib_days == pytest.approx(10 / 48)
    host = HostSample.objects.get(resolution=Resolution.HOUR)
    assert host.cpu_pct == pytest.approx(29.5) and host.vcpus_allocated == 3 and host.memory_total_mib == 4000


def test_a_second_rollup_changes_nothing(machine, settings):
    settings.PORTAL_METRICS_MINUTE_RETENTION_HOURS = 1000
    minutes(machine, H0, 60)
    host_minutes(machine.hypervisor, H0, 60)
    now = H0 + timedelta(hours=1, minutes=5)
    rollup(now=now)
    before = (
        list(MachineSample.objects.order_by("pk").values()),
        list(HostSample.objects.order_by("pk").values()),
        list(UsageHour.objects.order_by("pk").values()),
    )
    assert rollup(now=now) == {"machine_hours": 0, "host_hours": 0, "usage_rows": 0, "deleted": 0}
    after = (
        list(MachineSample.objects.order_by("pk").values()),
        list(HostSample.objects.order_by("pk").values()),
        list(UsageHour.objects.order_by("pk").values()),
    )
    assert before == after


def test_an_hour_just_ended_waits_for_its_last_minute_points(machine):
    minutes(machine, H0, 60)
    assert rollup(now=H0 + timedelta(hours=1, minutes=1))["machine_hours"] == 0
    assert rollup(now=H0 + timedelta(hours=1, minutes=4))["machine_hours"] == 1


def test_retention_drops_old_minute_and_hour_points(machine, settings):
    settings.PORTAL_METRICS_MINUTE_RETENTION_HOURS = 24
    settings.PORTAL_METRICS_HOUR_RETENTION_DAYS = 90
    now = H0 + timedelta(days=100)
    minutes(machine, now - timedelta(hours=25), 2)  # past the day
    minutes(machine, now - timedelta(hours=23), 2)
    for at in (now - timedelta(days=91), now - timedelta(days=89)):
        MachineSample.objects.create(machine=machine, resolution=Resolution.HOUR, at=at)
        HostSample.objects.create(hypervisor=machine.hypervisor, resolution=Resolution.HOUR, at=at)
    host_minutes(machine.hypervisor, now - timedelta(hours=25), 1)
    assert prune(now) == {"deleted": 2 + 1 + 1 + 1}
    kept = MachineSample.objects.filter(machine=machine)
    assert sorted(kept.values_list("resolution", flat=True)) == [60, 60, 3600]
    assert min(kept.values_list("at", flat=True)) == now - timedelta(days=89)


def test_a_deleted_machine_keeps_the_usage_it_had_not_rolled_up(machine, settings):
    settings.PORTAL_METRICS_MINUTE_RETENTION_HOURS = 1000
    other = MachineFactory(status=Status.ACTIVE, vcpus=4, memory_mib=1024, disk_gib=1)
    minutes(other, H0, 60)
    minutes(machine, H0, 60)
    rollup(now=H0 + timedelta(hours=1, minutes=5))  # H0 is rolled up, for both
    minutes(machine, H0 + timedelta(hours=1), 20)  # not yet
    uuid, name, owner, project = machine.uuid, machine.name, machine.owner_id, machine.project_id
    machine.delete()
    rows = {u.at: u for u in UsageHour.objects.filter(machine_uuid=uuid)}
    assert set(rows) == {H0, H0 + timedelta(hours=1)}
    kept = rows[H0 + timedelta(hours=1)]
    assert kept.machine_id is None and kept.machine_name == name
    assert (kept.owner_id, kept.project_id) == (owner, project)
    assert kept.vcpu_hours == pytest.approx(2 * 20 / 60) and kept.disk_gib_days == pytest.approx(10 * 20 / 1440)
    assert rows[H0].machine_id is None  # the rolled-up row lost its link, not its figures
    assert rows[H0].vcpu_hours == pytest.approx(2.0)
    rollup(now=H0 + timedelta(hours=2, minutes=5))  # its minutes went with it: nothing counted twice
    assert UsageHour.objects.filter(machine_uuid=uuid).count() == 2


def test_the_hourly_task_runs_the_rollup(machine, monkeypatch):
    ran = []
    monkeypatch.setattr("metrics.rollup.rollup", lambda: ran.append(True) or {})
    tasks.metrics_rollup_task.call_local()
    assert ran == [True]
    assert tasks.metrics_rollup_task.task_class().validate_datetime(datetime(2027, 1, 1, 3, 5))
    assert not tasks.metrics_rollup_task.task_class().validate_datetime(datetime(2027, 1, 1, 3, 6))
