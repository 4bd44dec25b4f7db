"""Sample rows for the graphs' tests (metrics.series, its views, the browser test), made as the collection and
the rollup write them: a point per interval at its aligned start."""

from datetime import UTC, datetime

import factory

from metrics.models import HostSample, MachineSample, Resolution
from tests.factories import HypervisorFactory, MachineFactory


def aligned(epoch: int, step: int = Resolution.MINUTE) -> datetime:
    return datetime.fromtimestamp(epoch // step * step, UTC)


class MachineSampleFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = MachineSample

    machine = factory.SubFactory(MachineFactory)
    resolution = Resolution.MINUTE
    seconds_running = 60
    cpu_pct = 12.5
    memory_used_mib = 180.0
    disk_read_bps = 4096.0
    disk_write_bps = 8192.0
    disk_read_iops = 1.0
    disk_write_iops = 2.0
    net_rx_bps = 1500.0
    net_tx_bps = 700.0
    vcpus = 1
    memory_mib = 256
    disk_gib = 1


class HostSampleFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = HostSample

    hypervisor = factory.SubFactory(HypervisorFactory)
    resolution = Resolution.MINUTE
    cpu_pct = 30.0
    memory_used_mib = 6000.0
    memory_total_mib = 16000.0
    vcpus_allocated = 6
    vcpus_capacity = 32
    memory_allocated_mib = 4096
    memory_capacity_mib = 16000
    disk_allocated_gib = 40
    machines_running = 3


def machine_day(machine, now: float, *, stopped: range = range(0), minutes: int = 24 * 60) -> None:
    """A machine's minute points over the last `minutes` before `now`, with a wave in its CPU; the minutes
    ago in `stopped` are rows of a stopped machine (nothing measured, nothing running)."""
    end = int(now) // 60 * 60 - 60
    rows = []
    for ago in range(minutes):
        at = aligned(end - ago * 60)
        if ago in stopped:
            rows.append(MachineSample(machine=machine, resolution=60, at=at, seconds_running=0, memory_mib=256))
            continue
        wave = (ago % 30) / 30
        rows.append(
            MachineSampleFactory.build(
                machine=machine,
                at=at,
                cpu_pct=5 + 60 * wave,
                memory_used_mib=150 + 50 * wave,
                disk_read_bps=2048 * (1 + wave) * 1024,
                disk_write_bps=1024 * (2 - wave) * 1024,
                net_rx_bps=300_000 * wave,
                net_tx_bps=120_000 * (1 - wave),
            )
        )
    MachineSample.objects.bulk_create(rows)


def host_day(hypervisor, now: float, *, minutes: int = 24 * 60) -> None:
    end = int(now) // 60 * 60 - 60
    rows = []
    for ago in range(minutes):
        wave = (ago % 90) / 90
        rows.append(
            HostSampleFactory.build(
                hypervisor=hypervisor,
                at=aligned(end - ago * 60),
                cpu_pct=20 + 50 * wave,
                memory_used_mib=5000 + 3000 * wave,
                vcpus_allocated=4 + ago // 240,
                memory_allocated_mib=2048 + 512 * (ago // 240),
            )
        )
    HostSample.objects.bulk_create(rows)
