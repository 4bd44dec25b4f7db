"""The graphs in Chromium: a machine page and a hypervisor page with a day of points in the database (as the
collection writes them) draw uPlot's canvases, switch between hour, day and month, and show a stopped period
as a gap; the dashboard's capacity bar has its sparkline. gunicorn serves the pages, uPlot and metrics.js as
`make run` does, under the Content-Security-Policy (the page fixture fails on any violation)."""

import time
from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect

from machines.states import Status
from metrics.models import MachineSample, Resolution
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS
from tests.factories import HypervisorFactory, MachineFactory, UserFactory
from tests.metrics.graph_samples import MachineSampleFactory, host_day, machine_day

pytestmark = pytest.mark.browser

STOPPED = range(10, 20)  # minutes ago the machine was stopped: a gap in the hour


def painted(page, selector: str) -> int:
    """How many pixels of the canvas under `selector` are not blank (uPlot drew on it)."""
    return page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) n++;
            return n;
        }""",
        selector,
    )


def card_data(page):
    return page.evaluate(
        """() => {
            const data = document.querySelector("#metrics-card").metricsCard.data;
            return {n: data.timestamps.length, step: data.step, timestamps: data.timestamps, series: data.series};
        }"""
    )


def month_of_hours(machine, now: float) -> None:
    """Hourly points for the month, as the rollup leaves them (the newest hours only as minutes yet)."""
    last = int(now) // 3600 * 3600 - 3600
    MachineSample.objects.bulk_create(
        MachineSampleFactory.build(
            machine=machine,
            resolution=Resolution.HOUR,
            at=datetime.fromtimestamp(last - h * 3600, UTC),
            seconds_running=3600,
            cpu_pct=20 + 15 * ((h // 24) % 3),
        )
        for h in range(0, 30 * 24, 1)
        if not 100 <= h < 140  # stopped for a day and a half: a gap in the month
    )


def test_a_machine_page_and_a_hypervisor_page_draw_their_graphs(page, web_server, transactional_db):
    owner = UserFactory(username="grapher", password="correct-horse-battery")
    UserFactory(username="ops", password="correct-horse-battery", is_staff=True, is_superuser=True)
    hv = HypervisorFactory(name="graphs-host", uri="test:///default", cpus=8, memory_mib=16000)
    machine = MachineFactory(name="graphed", owner=owner, hypervisor=hv, status=Status.ACTIVE, memory_mib=256)
    quiet = MachineFactory(name="quiet", owner=owner, hypervisor=hv, status=Status.ACTIVE)
    now = time.time()
    machine_day(machine, now, stopped=STOPPED)
    month_of_hours(machine, now)
    host_day(hv, now)

    # A machine without points says so instead of drawing empty axes.
    login(page, web_server, "grapher", "correct-horse-battery")
    page.goto(f"{web_server}/machines/{quiet.pk}/")
    expect(page.locator("#metrics-card")).to_have_attribute("data-metrics-state", "empty")
    expect(page.locator("#metrics-empty")).to_have_text(
        "No points yet: the first appear a minute or two after the machine runs."
    )

    page.goto(f"{web_server}/machines/{machine.pk}/")
    card = page.locator("#metrics-card")
    expect(card).to_have_attribute("data-metrics-drawn", "hour")
    for graph in ("cpu", "memory", "disk", "net"):
        expect(page.locator(f"#graph-{graph} .uplot canvas")).to_be_visible()
        assert painted(page, f"#graph-{graph} .uplot canvas") > 1000, graph
    data = card_data(page)
    assert data["n"] == 60 and data["step"] == 60
    # The stopped minutes are nulls (uPlot leaves a gap), the minutes around them points. (Counted from the rows'
    # own times: a minute that ends while the page loads moves the window by a slot, and its new slot is empty.)
    newest = int(now) // 60 * 60 - 60
    stopped = [t for t in data["timestamps"] if (newest - t) // 60 in STOPPED or t > newest]
    assert len(stopped) >= len(STOPPED)
    for t, cpu, given in zip(data["timestamps"], data["series"]["cpu_pct"], data["series"]["memory_mib"], strict=True):
        assert (cpu is None) == (given is None) == (t in stopped), (t, cpu, given)
    expect(page.locator("#graph-cpu .u-legend")).to_contain_text("CPU")
    card.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "browser-metrics-machine-hour.png"), full_page=True)
    card.screenshot(path=str(ARTIFACTS / "browser-metrics-machine-hour-card.png"))

    page.locator("#metrics-day").click()
    expect(card).to_have_attribute("data-metrics-drawn", "day")
    expect(page.locator("#metrics-day")).to_have_attribute("aria-pressed", "true")
    assert card_data(page)["n"] == 1440
    assert painted(page, "#graph-net .uplot canvas") > 1000

    page.locator("#metrics-month").click()
    expect(card).to_have_attribute("data-metrics-drawn", "month")
    data = card_data(page)
    assert data["n"] == 720 and data["step"] == 3600
    newest = int(now) // 3600 * 3600 - 3600
    gaps = [t for t, v in zip(data["timestamps"], data["series"]["cpu_pct"], strict=True) if v is None]
    assert gaps == [t for t in data["timestamps"] if 100 <= (newest - t) // 3600 < 140 or t > newest]
    card.screenshot(path=str(ARTIFACTS / "browser-metrics-machine-month.png"))

    # The live update asks for what came after its last point and merges it in (here, nothing new: the same).
    page.locator("#metrics-hour").click()
    expect(card).to_have_attribute("data-metrics-drawn", "hour")
    before = card_data(page)
    page.evaluate("""() => { const card = document.querySelector("#metrics-card");
                             card.dataset.metricsDrawn = "updating"; card.metricsCard.update(); }""")
    expect(card).to_have_attribute("data-metrics-drawn", "hour")
    after = card_data(page)
    # Still the hour's 60 slots, the points kept (a minute that ended meanwhile moves the window by one slot).
    assert after["n"] == 60
    assert (
        sum(v is not None for v in after["series"]["cpu_pct"])
        >= sum(v is not None for v in before["series"]["cpu_pct"]) - 1
    )

    # Staff: the hypervisor's graphs and the dashboard's sparkline.
    page.locator("form[action='/logout/'] button").click()
    login(page, web_server, "ops", "correct-horse-battery")
    expect(page.locator(f"#sparkline-{hv.pk} polyline").first).to_be_attached()
    page.locator("#dashboard-hypervisors").screenshot(path=str(ARTIFACTS / "browser-metrics-sparkline.png"))
    page.goto(f"{web_server}/hypervisors/{hv.pk}/")
    card = page.locator("#metrics-card")
    expect(card).to_have_attribute("data-metrics-drawn", "hour")
    for graph in ("cpu", "memory", "vcpus", "allocation"):
        expect(page.locator(f"#graph-{graph} .uplot canvas")).to_be_visible()
        assert painted(page, f"#graph-{graph} .uplot canvas") > 1000, graph
    page.locator("#metrics-day").click()
    expect(card).to_have_attribute("data-metrics-drawn", "day")
    assert card_data(page)["n"] == 1440
    card.scroll_into_view_if_needed()
    card.screenshot(path=str(ARTIFACTS / "browser-metrics-hypervisor-day.png"))
