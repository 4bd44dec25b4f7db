"""The graphs' routes: the pages' JSON (/metrics-data/…) and the API's (/api/v1/{machines,hypervisors}/{id}/metrics/):
who sees what (a machine's for who may see the machine, 404 for others; a hypervisor's for staff), windows and
since= checked with a message (400, never 500), and the cards on the machine, hypervisor and dashboard pages."""

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from machines.models import Membership, Role
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory
from tests.metrics.graph_samples import HostSampleFactory, MachineSampleFactory, aligned

pytestmark = pytest.mark.django_db


NOW = 1_800_000_000 + 37  # 37 s into a minute: the answers' last slot is a whole minute before


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setattr("metrics.series.clock", lambda: NOW)
    owner, stranger = UserFactory(), UserFactory()
    viewer, staff = UserFactory(), UserFactory(is_staff=True)
    project = ProjectFactory()
    Membership.objects.create(project=project, user=viewer, role=Role.VIEWER)
    machine = MachineFactory(owner=owner, project=project)
    last = NOW // 60 * 60 - 60
    MachineSampleFactory(machine=machine, at=aligned(last), cpu_pct=42.0)
    HostSampleFactory(hypervisor=machine.hypervisor, at=aligned(last), cpu_pct=21.0)
    return {"owner": owner, "stranger": stranger, "viewer": viewer, "staff": staff, "machine": machine}


def client_for(user, api=False):
    client = APIClient() if api else Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("api", [False, True])
@pytest.mark.parametrize("who,code", [("owner", 200), ("viewer", 200), ("staff", 200), ("stranger", 404)])
def test_a_machines_graphs_are_for_who_may_see_the_machine(world, who, code, api):
    machine = world["machine"]
    url = reverse("machine-metrics", args=[machine.pk]) if api else reverse("metrics:machine", args=[machine.pk])
    r = client_for(world[who], api).get(url)
    assert r.status_code == code
    if code == 200:
        data = r.json()
        assert data["window"] == "hour" and len(data["timestamps"]) == 60
        assert data["series"]["cpu_pct"][-1] == 42.0
        assert r["Cache-Control"] == "no-store"


@pytest.mark.parametrize("api", [False, True])
def test_a_stranger_gets_the_same_404_for_a_machine_that_exists_and_one_that_does_not(world, api):
    client = client_for(world["stranger"], api)
    name = "machine-metrics" if api else "metrics:machine"
    there = client.get(reverse(name, args=[world["machine"].pk]), {"window": "bogus"})
    absent = client.get(reverse(name, args=[world["machine"].pk + 1000]), {"window": "bogus"})
    assert there.status_code == absent.status_code == 404
    if api:
        assert there.json() == absent.json()


@pytest.mark.parametrize("api", [False, True])
@pytest.mark.parametrize("who,code", [("staff", 200), ("owner", 403), ("viewer", 403)])
def test_a_hypervisors_graphs_are_for_staff(world, who, code, api):
    hv = world["machine"].hypervisor
    url = reverse("hypervisor-metrics", args=[hv.pk]) if api else reverse("metrics:hypervisor", args=[hv.pk])
    r = client_for(world[who], api).get(url, {"window": "day"})
    assert r.status_code == code
    if code == 200:
        data = r.json()
        assert data["window"] == "day" and len(data["timestamps"]) == 1440
        assert data["series"]["cpu_pct"][-1] == 21.0


def test_staff_asking_for_a_hypervisor_that_does_not_exist_get_404(world):
    staff = world["staff"]
    assert client_for(staff, True).get(reverse("hypervisor-metrics", args=[10**6])).status_code == 404
    assert client_for(staff).get(reverse("metrics:hypervisor", args=[10**6])).status_code == 404
    assert client_for(staff, True).get(f"/api/v1/hypervisors/{10**30}/metrics/").status_code == 404
    assert client_for(staff, True).get(f"/api/v1/machines/{10**30}/metrics/").status_code == 404
    assert client_for(staff).get(f"/metrics-data/machines/{10**30}/").status_code == 404


def test_anonymous_callers_are_sent_to_log_in_or_refused(world):
    machine = world["machine"]
    assert Client().get(reverse("metrics:machine", args=[machine.pk])).status_code == 302
    assert Client().get(reverse("metrics:hypervisor", args=[machine.hypervisor_id])).status_code == 302
    assert APIClient().get(reverse("machine-metrics", args=[machine.pk])).status_code == 401
    assert APIClient().get(reverse("hypervisor-metrics", args=[machine.hypervisor_id])).status_code == 401


@pytest.mark.parametrize("query", [{"window": "week"}, {"window": "x" * 300}, {"since": "soon"}, {"since": "-5"}])
def test_a_bad_window_or_since_is_a_400_with_a_message(world, query):
    machine = world["machine"]
    page = client_for(world["owner"]).get(reverse("metrics:machine", args=[machine.pk]), query)
    assert page.status_code == 400
    key = next(iter(query))
    assert page.json()["detail"].startswith(f"{key} must be")
    api = client_for(world["owner"], True).get(reverse("machine-metrics", args=[machine.pk]), query)
    assert api.status_code == 400 and key in api.json()


def test_since_on_the_api(world):
    machine = world["machine"]
    r = client_for(world["owner"], True).get(reverse("machine-metrics", args=[machine.pk]), {"since": 0})
    assert r.status_code == 200 and r.json()["since"] == 0 and len(r.json()["timestamps"]) == 60
    last = r.json()["end"]
    r = client_for(world["owner"], True).get(reverse("machine-metrics", args=[machine.pk]), {"since": last - 60})
    assert r.json()["timestamps"] == [last] and r.json()["series"]["cpu_pct"] == [42.0]


def test_the_machine_page_has_the_metrics_card_outside_its_refreshed_part(world):
    machine = world["machine"]
    client = client_for(world["viewer"])
    html = client.get(reverse("machines:detail", args=[machine.pk])).content.decode()
    assert f'data-metrics-url="{reverse("metrics:machine", args=[machine.pk])}"' in html
    assert 'data-metrics-kind="machine"' in html and "vendor/uplot/dist/uPlot.iife.min.js" in html
    assert "No points yet: the first appear a minute or two after the machine runs." in html
    # The htmx refresh of the machine's state does not carry the card (it would redraw the graphs every 10 s).
    partial = client.get(reverse("machines:detail", args=[machine.pk]), headers={"HX-Request": "true"})
    assert partial.status_code == 200 and b"data-metrics-url" not in partial.content


def test_the_hypervisor_page_has_the_card_for_staff_only(world):
    hv = world["machine"].hypervisor
    url = reverse("hypervisors:detail", args=[hv.pk])
    staff_html = client_for(world["staff"]).get(url).content.decode()
    assert f'data-metrics-url="{reverse("metrics:hypervisor", args=[hv.pk])}"' in staff_html
    assert 'data-metrics-kind="host"' in staff_html
    assert b"data-metrics-url" not in client_for(world["owner"]).get(url).content


def test_the_dashboard_draws_a_sparkline_next_to_each_capacity_bar_for_staff(world):
    hv = world["machine"].hypervisor
    HypervisorFactory(name="quiet", memory_mib=8192, cpus=4)  # no points: an empty sparkline
    hv.memory_mib, hv.cpus = 16000, 8
    hv.save()
    html = client_for(world["staff"]).get(reverse("home")).content.decode()
    assert f'id="sparkline-{hv.pk}"' in html and "<polyline" in html
    assert "Memory given to machines over the last 24 hours" in html
    assert "no points in the last 24 hours yet" in html  # the quiet one
    assert b'class="sparkline' not in client_for(world["owner"]).get(reverse("home")).content
