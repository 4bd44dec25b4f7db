"""The labs' API with the test client: create from a template, list and retrieve with machines, power, delete,
instackenv; templates; bad input answers 400, never 500."""

import pytest
from rest_framework.test import APIClient

from labs import services
from labs.models import Lab, LabTemplate
from machines.models import Machine, Membership
from portal.models import AuditEvent
from tests.factories import ProjectFactory, UserFactory
from tests.labs.test_lab_pages import world  # noqa: F401 - the hypervisor and BMC ports
from tests.labs.test_lab_services import spec

pytestmark = pytest.mark.django_db


def api_for(user):
    api = APIClient()
    api.force_authenticate(user)
    return api


@pytest.fixture
def template():
    staff = UserFactory(username="api-staff", is_staff=True)
    return services.lab_template_save(actor=staff, name="api", spec=spec(controllers=2, computes=1, ram=256))


def test_a_lab_is_made_listed_powered_and_deleted_through_the_api(
    user, template, host, django_capture_on_commit_callbacks
):
    api = api_for(user)
    body = {
        "template": template.pk,
        "name": "apilab",
        "placement": "pack",
        "groups": {"controllers": {"count": 1, "pattern": "c-{n:02d}"}, "computes": {"offsets": {"portal-tenants": 7}}},
    }
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post("/api/v1/labs/", body, format="json")
    assert r.status_code == 201, r.content
    lab_id = r.json()["id"]
    got = api.get(f"/api/v1/labs/{lab_id}/").json()
    assert sorted(m["name"] for m in got["machines"]) == ["apilab-computes-0", "c-00"]
    assert {m["group"] for m in got["machines"]} == {"controllers", "computes"}
    assert Machine.objects.get(name="apilab-computes-0").nics.get().addresses == ["10.9.0.17/24"]
    assert [lab["name"] for lab in api.get("/api/v1/labs/").json()["results"]] == ["apilab"]
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post(f"/api/v1/labs/{lab_id}/power/", {"action": "start"}, format="json")
    assert r.status_code == 202 and sorted(r.json()["done"]) == ["apilab-computes-0", "c-00"]
    r = api.get(f"/api/v1/labs/{lab_id}/instackenv/")
    assert r.status_code == 200 and len(r.json()["nodes"]) == 2
    Machine.objects.filter(name="c-00").update(deletion_protection=True)
    r = api.delete(f"/api/v1/labs/{lab_id}/")
    assert r.status_code == 409 and "c-00" in r.json()["detail"]
    Machine.objects.update(deletion_protection=False)
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/labs/{lab_id}/").status_code == 202
    assert not Lab.objects.exists() and not Machine.objects.exists()


@pytest.mark.parametrize(
    "body",
    [
        {"template": None},
        {"template": 999999, "name": "x"},
        {"template": "abc", "name": "x"},
        {"template": None, "name": "x"},
        {"name": "Bad Name"},
        {"name": "ok", "groups": {"nope": {"count": 1}}},
        {"name": "ok", "groups": {"controllers": {"count": -1}}},
        {"name": "ok", "groups": {"controllers": {"pattern": "{x}"}}},
        {"name": "ok", "groups": {"controllers": "three"}},
        {"name": "ok", "groups": ["controllers"]},
        {"name": "ok", "placement": "up"},
        {"name": "ok", "first": "many"},
        {"name": "ok", "project": "no-such-project"},
    ],
)
def test_bad_lab_creates_answer_400(user, template, host, body):
    body = {"template": template.pk, **body}  # a test's own "template" replaces it
    r = api_for(user).post("/api/v1/labs/", body, format="json")
    assert r.status_code == 400, (body, r.status_code, r.content)
    assert not Lab.objects.exists()


def test_a_strangers_lab_is_404_and_a_viewer_may_not_power_it(user, template, host):
    project = ProjectFactory(name="apiteam")
    Membership.objects.create(project=project, user=user, role="admin")
    lab = services.lab_instantiate(template=template, actor=user, name="team-lab", project=project)
    stranger = api_for(UserFactory(username="api-stranger"))
    assert stranger.get(f"/api/v1/labs/{lab.pk}/").status_code == 404
    assert stranger.post(f"/api/v1/labs/{lab.pk}/power/", {"action": "start"}, format="json").status_code == 404
    viewer = UserFactory(username="api-viewer")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    v = api_for(viewer)
    assert len(v.get(f"/api/v1/labs/{lab.pk}/").json()["machines"]) == 3
    assert v.post(f"/api/v1/labs/{lab.pk}/power/", {"action": "start"}, format="json").status_code == 403
    assert v.delete(f"/api/v1/labs/{lab.pk}/").status_code == 403
    assert v.get(f"/api/v1/labs/{lab.pk}/instackenv/").json() == {"nodes": []}  # BMC passwords are for admins


def test_templates_through_the_api(user, template):
    api = api_for(user)
    listed = api.get("/api/v1/lab-templates/").json()["results"]
    assert [t["name"] for t in listed] == ["api"] and [g["name"] for g in listed[0]["groups"]] == [
        "controllers",
        "computes",
    ]
    assert api.post("/api/v1/lab-templates/", {"name": "mine", "spec": spec()}, format="json").status_code == 403
    assert api.patch(f"/api/v1/lab-templates/{template.pk}/", {"name": "x"}, format="json").status_code == 403
    project = ProjectFactory(name="tplproj")
    Membership.objects.create(project=project, user=user, role="admin")
    r = api.post("/api/v1/lab-templates/", {"name": "mine", "spec": "g: [", "project": "tplproj"}, format="json")
    assert r.status_code == 400 and "not valid YAML" in r.json()["spec"][0]
    r = api.post("/api/v1/lab-templates/", {"name": "mine", "spec": spec(), "project": "tplproj"}, format="json")
    assert r.status_code == 201
    mine = r.json()["id"]
    assert api.patch(f"/api/v1/lab-templates/{mine}/", {"description": "d"}, format="json").json()["description"] == "d"
    assert api.delete(f"/api/v1/lab-templates/{mine}/").status_code == 204
    assert LabTemplate.objects.count() == 1


def test_the_labs_list_costs_the_same_queries_for_3_labs_as_for_12(user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from labs.models import LabMachine
    from tests.factories import MachineFactory

    api = api_for(user)

    def grow_to(n):
        for i in range(Lab.objects.count(), n):
            lab = Lab.objects.create(name=f"l{i}", owner=user)
            for j in range(2):
                LabMachine.objects.create(lab=lab, machine=MachineFactory(name=f"l{i}-m{j}", owner=user), group="g")
        with CaptureQueriesContext(connection) as queries:
            r = api.get("/api/v1/labs/?limit=100")
        assert r.status_code == 200 and len(r.json()["results"]) == n
        assert all(len(lab["machines"]) == 2 and lab["machines"][0]["group"] == "g" for lab in r.json()["results"])
        return len(queries)

    assert grow_to(3) == grow_to(12)


def test_a_lab_is_renamed_by_its_admins_only_and_a_taken_name_is_refused_on_the_field(user, template, host):
    project = ProjectFactory(name="renames")
    Membership.objects.create(project=project, user=user, role="admin")
    lab = services.lab_instantiate(template=template, actor=user, name="old-name", project=project)
    services.lab_instantiate(template=template, actor=user, name="taken", project=project, first=10)
    operator = UserFactory(username="api-operator")
    Membership.objects.create(project=project, user=operator, role="operator")
    url = f"/api/v1/labs/{lab.pk}/"
    assert api_for(operator).patch(url, {"name": "mine"}, format="json").status_code == 403
    assert api_for(UserFactory(username="api-outsider")).patch(url, {"name": "x"}, format="json").status_code == 404
    api = api_for(user)
    r = api.patch(url, {"name": "taken"}, format="json")
    assert r.status_code == 400 and "already a lab taken in renames" in r.json()["name"][0]
    for bad in ("Upper", "-dash", "a" * 64, "sp ace"):
        assert api.patch(url, {"name": bad}, format="json").status_code == 400
    r = api.patch(url, {"name": "new-name", "description": "the second try"}, format="json")
    assert r.status_code == 200 and r.json()["name"] == "new-name" and r.json()["description"] == "the second try"
    lab.refresh_from_db()
    assert lab.name == "new-name"
    assert sorted(Machine.objects.filter(lab_membership__lab=lab).values_list("name", flat=True)) == sorted(
        ["old-name-computes-0", "old-name-controllers-0", "old-name-controllers-1"]
    )  # the machines keep theirs
    assert AuditEvent.objects.filter(action="lab.change", outcome="success").count() == 1
    assert AuditEvent.objects.filter(action="lab.change", outcome="refused").count() >= 2


def test_the_lab_edit_page_renames_and_shows_a_taken_name_on_the_field(user, template, host):
    from django.test import Client

    lab = services.lab_instantiate(template=template, actor=user, name="page-lab")
    services.lab_instantiate(template=template, actor=user, name="other-lab", first=10)
    c = Client()
    c.force_login(user)
    url = f"/labs/{lab.pk}/edit/"
    assert 'id="btn-lab-edit"' in c.get(f"/labs/{lab.pk}/").content.decode()
    r = c.post(url, {"name": "other-lab", "description": ""})
    assert r.status_code == 200 and "There is already a lab other-lab of alice" in r.content.decode()
    r = c.post(url, {"name": "renamed-lab", "description": "d"})
    assert r.status_code == 302
    lab.refresh_from_db()
    assert (lab.name, lab.description) == ("renamed-lab", "d")
