"""metrics.series: the graphs' columnar data, a slot per interval with gaps where nothing was measured, at one
query whatever the window; since= for live updates; the dashboard's sparklines."""

import pytest

from metrics import series
from metrics.models import Resolution
from tests.factories import HypervisorFactory, MachineFactory
from tests.metrics.graph_samples import HostSampleFactory, MachineSampleFactory, aligned

pytestmark = pytest.mark.django_db

NOW = 1_800_000_000 + 37  # 37 s into a minute (1,800,000,000 is a whole hour)
LAST = NOW // 60 * 60 - 60  # the last minute that is over


def test_the_hour_is_sixty_minute_slots_ending_at_the_last_minute_that_is_over(django_assert_num_queries):
    machine = MachineFactory()
    MachineSampleFactory(machine=machine, at=aligned(LAST), cpu_pct=40.0)
    MachineSampleFactory(machine=machine, at=aligned(LAST - 59 * 60), cpu_pct=10.0)
    MachineSampleFactory(machine=machine, at=aligned(LAST - 60 * 60), cpu_pct=99.0)  # before the window
    MachineSampleFactory(machine=machine, at=aligned(NOW), cpu_pct=77.0)  # the minute under way: not yet
    MachineSampleFactory(at=aligned(LAST - 60), cpu_pct=55.0)  # another machine's
    with django_assert_num_queries(1):
        data = series.machine_series(machine.pk, series.WINDOWS["hour"], now=NOW)
    assert (data["window"], data["step"], data["since"]) == ("hour", 60, None)
    assert len(data["timestamps"]) == 60
    assert data["timestamps"][0] == LAST - 59 * 60 and data["timestamps"][-1] == LAST == data["end"]
    cpu = data["series"]["cpu_pct"]
    assert cpu[0] == 10.0 and cpu[-1] == 40.0
    assert cpu[1:-1] == [None] * 58  # no point: a gap, not a line
    assert set(data["series"]) == set(series.MACHINE_FIELDS)
    assert data["series"]["disk_write_bps"][-1] == 8192.0 and data["series"]["memory_mib"][-1] == 256.0


def test_a_stopped_interval_is_a_gap_in_every_series_including_what_it_was_given():
    machine = MachineFactory()
    MachineSampleFactory(machine=machine, at=aligned(LAST - 60))
    MachineSampleFactory(
        machine=machine,
        at=aligned(LAST),
        seconds_running=0,
        cpu_pct=None,
        memory_used_mib=None,
        disk_read_bps=None,
        disk_write_bps=None,
        disk_read_iops=None,
        disk_write_iops=None,
        net_rx_bps=None,
        net_tx_bps=None,
        memory_mib=256,
    )
    data = series.machine_series(machine.pk, series.WINDOWS["hour"], now=NOW)
    assert all(column[-1] is None for column in data["series"].values()), data["series"]
    assert data["series"]["memory_mib"][-2] == 256.0 and data["series"]["cpu_pct"][-2] == 12.5


def test_day_and_month_read_their_resolutions_at_one_query_each(django_assert_num_queries):
    machine = MachineFactory()
    MachineSampleFactory(machine=machine, at=aligned(LAST - 23 * 3600), cpu_pct=20.0)
    last_hour = NOW // 3600 * 3600 - 3600
    MachineSampleFactory(machine=machine, resolution=Resolution.HOUR, at=aligned(last_hour, 3600), cpu_pct=33.0)
    MachineSampleFactory(
        machine=machine, resolution=Resolution.HOUR, at=aligned(last_hour - 29 * 86400, 3600), cpu_pct=3.0
    )
    with django_assert_num_queries(2):
        day = series.machine_series(machine.pk, series.WINDOWS["day"], now=NOW)
        month = series.machine_series(machine.pk, series.WINDOWS["month"], now=NOW)
    assert len(day["timestamps"]) == 1440 and day["step"] == 60
    assert [v for v in day["series"]["cpu_pct"] if v is not None] == [20.0]  # not the hourly points
    assert len(month["timestamps"]) == 720 and month["step"] == 3600 and month["end"] == last_hour
    cpu = month["series"]["cpu_pct"]
    assert cpu[-1] == 33.0 and cpu[719 - 29 * 24] == 3.0 and sum(v is not None for v in cpu) == 2


def test_since_answers_only_the_slots_after_it():
    machine = MachineFactory()
    for ago in range(5):
        MachineSampleFactory(machine=machine, at=aligned(LAST - ago * 60), cpu_pct=float(ago))
    data = series.machine_series(machine.pk, series.WINDOWS["hour"], since=LAST - 2 * 60, now=NOW)
    assert data["since"] == LAST - 120
    assert data["timestamps"] == [LAST - 60, LAST]
    assert data["series"]["cpu_pct"] == [1.0, 0.0]
    # A since before the window: the whole window; at or after its end: nothing.
    assert len(series.machine_series(machine.pk, series.WINDOWS["hour"], since=0, now=NOW)["timestamps"]) == 60
    empty = series.machine_series(machine.pk, series.WINDOWS["hour"], since=LAST, now=NOW)
    assert empty["timestamps"] == [] and empty["series"]["cpu_pct"] == []


def test_a_machine_without_points_has_a_window_of_gaps():
    data = series.machine_series(MachineFactory().pk, series.WINDOWS["hour"], now=NOW)
    assert len(data["timestamps"]) == 60 and all(v is None for c in data["series"].values() for v in c)


def test_host_series_has_use_and_allocation_against_capacity(django_assert_num_queries):
    hv = HypervisorFactory()
    HostSampleFactory(hypervisor=hv, at=aligned(LAST), cpu_pct=45.0, vcpus_allocated=8)
    HostSampleFactory(at=aligned(LAST), cpu_pct=99.0)  # another host's
    with django_assert_num_queries(1):
        data = series.host_series(hv.pk, series.WINDOWS["hour"], now=NOW)
    assert set(data["series"]) == set(series.HOST_FIELDS)
    assert data["series"]["cpu_pct"][-1] == 45.0 and data["series"]["vcpus_allocated"][-1] == 8.0
    assert data["series"]["vcpus_capacity"][-1] == 32.0 and data["series"]["memory_capacity_mib"][-1] == 16000.0
    assert data["series"]["cpu_pct"][-2] is None


@pytest.mark.parametrize("value", ["week", "HOUR", "1", " ", "hour;", "x" * 500])
def test_a_window_not_offered_says_which_are(value):
    with pytest.raises(series.BadWindow, match="window must be one of hour, day, month"):
        series.window_named(value)


def test_no_window_is_the_hour():
    assert series.window_named(None).name == series.window_named("").name == "hour"


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "١٢", "9" * 13, "1e9"])
def test_a_since_that_is_not_whole_seconds_is_refused(value):
    with pytest.raises(series.BadWindow, match="since must be"):
        series.since_value(value)


def test_since_values():
    assert series.since_value(None) is None and series.since_value("") is None
    assert series.since_value("1800000000") == 1_800_000_000


def test_sparklines_are_each_hosts_memory_given_per_hour_in_one_query(django_assert_num_queries):
    busy, idle, silent = HypervisorFactory(), HypervisorFactory(), HypervisorFactory()
    hour = NOW // 3600 * 3600
    # The hour under way (minute points, no rollup yet) and one 5 hours ago; a minute point at 25 % and one at
    # 75 % in the same hour average to 50 %.
    HostSampleFactory(hypervisor=busy, at=aligned(hour), memory_allocated_mib=4000, memory_capacity_mib=16000)
    HostSampleFactory(hypervisor=busy, at=aligned(hour + 60), memory_allocated_mib=12000, memory_capacity_mib=16000)
    HostSampleFactory(hypervisor=busy, at=aligned(hour - 5 * 3600), memory_allocated_mib=1600)
    HostSampleFactory(hypervisor=busy, at=aligned(hour - 30 * 3600), memory_allocated_mib=16000)  # too old
    HostSampleFactory(hypervisor=idle, at=aligned(hour - 60), memory_allocated_mib=0)
    HostSampleFactory(hypervisor=silent, at=aligned(hour), memory_capacity_mib=0)  # capacity unknown: no line
    with django_assert_num_queries(1):
        lines = series.sparklines([busy.pk, idle.pk, silent.pk], now=NOW)
    assert set(lines) == {busy.pk, idle.pk}
    values = lines[busy.pk]["values"]
    assert len(values) == 24 and values[-1] == 50.0 and values[-6] == 10.0
    assert sum(v is not None for v in values) == 2
    assert lines[busy.pk]["last"] == 50.0 and lines[busy.pk]["peak"] == 50.0
    assert len(lines[busy.pk]["segments"]) == 2  # two runs: a gap between them
    assert lines[idle.pk]["values"][-2] == 0.0 and lines[idle.pk]["last"] == 0.0


def test_polyline_segments_split_at_gaps_and_fit_the_box():
    segments = series.polyline_segments([0.0, 100.0, None, 50.0], width=30, height=20)
    assert segments == ["0,19 10,1", "28.5,10 30,10"]  # a lone point: a short flat stroke
    assert series.polyline_segments([None, None]) == []
    assert series.polyline_segments([250.0, -5.0], width=10, height=20) == ["0,1 10,19"]  # clipped to the box
    assert series.polyline_segments([10.0, 20.0], width=10, height=20, top=20.0) == ["0,10 10,1"]


def test_a_sparklines_top_is_above_its_peak_but_never_below_a_quarter():
    quiet, busy = HypervisorFactory(), HypervisorFactory()
    hour = NOW // 3600 * 3600
    HostSampleFactory(hypervisor=quiet, at=aligned(hour), memory_allocated_mib=800, memory_capacity_mib=16000)
    HostSampleFactory(hypervisor=busy, at=aligned(hour), memory_allocated_mib=12800, memory_capacity_mib=16000)
    lines = series.sparklines([quiet.pk, busy.pk], now=NOW)
    # 5 % on a top of 25 %: a fifth of the way up; 80 % on a top of 100 % (80 x 1.25).
    assert lines[quiet.pk]["segments"] == ["94.5,15.4 96,15.4"]
    assert lines[busy.pk]["segments"] == ["94.5,4.6 96,4.6"]
