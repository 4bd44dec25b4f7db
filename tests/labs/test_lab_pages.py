"""The lab pages with the test client: list, a lab's machines live (the htmx partial), power and delete on the
lab, instackenv, templates written and instantiated; bad YAML and bad forms answer with messages, never 500."""

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from labs import services
from labs.models import Lab, LabTemplate
from machines.models import Machine, Membership
from tests.factories import HypervisorFactory, ProjectFactory, UserFactory
from tests.labs.test_lab_services import POOL, spec

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def world(settings):
    settings.PORTAL_BMC_PORT_RANGE = "17700-17799"
    networks = [{"name": settings.PORTAL_TENANT_NETWORK, "active": True}]
    HypervisorFactory(name="a", uri="qemu:///system", arch="x86_64", memory_mib=16384, pools=POOL, networks=networks)


def client_for(user):
    c = Client()
    c.force_login(user)
    return c


@pytest.fixture
def staff():
    return UserFactory(username="lab-staff", is_staff=True)


@pytest.fixture
def template(staff):
    return services.lab_template_save(actor=staff, name="small", spec=spec(controllers=2, computes=1, ram=256))


def test_a_lab_made_from_the_template_page_shows_its_machines_live(
    user, template, host, django_capture_on_commit_callbacks
):
    c = client_for(user)
    page = c.get(reverse("labs:instantiate", args=[template.pk]))
    assert page.status_code == 200 and b"controllers: machines" in page.content
    data = {
        "name": "web1",
        "placement": "spread",
        "first": "1",
        "count__controllers": "2",
        "pattern__controllers": "ctrl-{n}",
        f"offset__controllers__{settings.PORTAL_TENANT_NETWORK}": "0",
        "count__computes": "1",
        "pattern__computes": "{lab}-cmp-{n}",
        f"offset__computes__{settings.PORTAL_TENANT_NETWORK}": "5",
    }
    with django_capture_on_commit_callbacks(execute=True):
        r = c.post(reverse("labs:instantiate", args=[template.pk]), data)
    lab = Lab.objects.get(name="web1")
    assert r.status_code == 302 and r["Location"] == reverse("labs:detail", args=[lab.pk])
    assert sorted(Machine.objects.values_list("name", flat=True)) == ["ctrl-1", "ctrl-2", "web1-cmp-1"]
    assert Machine.objects.get(name="web1-cmp-1").nics.get().addresses == ["10.9.0.16/24"]
    page = c.get(reverse("labs:detail", args=[lab.pk]))
    body = page.content.decode()
    assert 'id="lab-machines"' in body and "hx-trigger" in body and "ctrl-1" in body and "10.9.0.16/24" in body
    assert f'href="/labs/{lab.pk}/inventory.yaml"' in body and f'href="/api/v1/inventory/?lab={lab.pk}"' in body
    assert reverse("labs:instackenv", args=[lab.pk]) in body
    partial = c.get(reverse("labs:detail", args=[lab.pk]), headers={"HX-Request": "true"})
    assert b"<html" not in partial.content and b'id="lab-machines"' in partial.content and b"ctrl-2" in partial.content
    listing = c.get(reverse("labs:list"))
    assert b"web1" in listing.content and b'href="/labs/"' in listing.content  # the nav's Labs link


def test_power_delete_and_instackenv_buttons_act_on_the_lab(user, template, host, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        lab = services.lab_instantiate(template=template, actor=user, name="pw")
    c = client_for(user)
    assert c.get(reverse("labs:power", args=[lab.pk])).status_code == 405
    with django_capture_on_commit_callbacks(execute=True):
        r = c.post(reverse("labs:power", args=[lab.pk]), {"action": "start"}, follow=True)
    assert b"Start: pw-computes-0, pw-controllers-0, pw-controllers-1." in r.content
    assert set(Machine.objects.values_list("power_state", flat=True)) == {"running"}
    r = c.post(reverse("labs:power", args=[lab.pk]), {"action": "explode"}, follow=True)
    assert r.status_code == 200 and b"Unknown action" in r.content
    r = c.post(reverse("labs:instackenv", args=[lab.pk]))
    assert r.status_code == 200 and len(r.json()["nodes"]) == 3 and r["Cache-Control"] == "no-store"
    Machine.objects.filter(name="pw-controllers-0").update(deletion_protection=True)
    assert c.get(reverse("labs:delete", args=[lab.pk])).status_code == 200
    r = c.post(reverse("labs:delete", args=[lab.pk]), follow=True)
    assert b"protected from deletion: pw-controllers-0" in r.content and Machine.objects.count() == 3
    Machine.objects.update(deletion_protection=False)
    with django_capture_on_commit_callbacks(execute=True):
        r = c.post(reverse("labs:delete", args=[lab.pk]))
    assert r.status_code == 302 and not Lab.objects.exists() and not Machine.objects.exists()


def test_someone_elses_lab_is_not_there_and_viewers_see_but_do_not_act(user, template, host):
    lab = services.lab_instantiate(template=template, actor=user, name="mine")
    other = client_for(UserFactory(username="other-one"))
    for name in ("labs:detail", "labs:delete"):
        assert other.get(reverse(name, args=[lab.pk])).status_code == 404
    assert other.post(reverse("labs:power", args=[lab.pk]), {"action": "start"}).status_code == 404
    assert b"mine" not in other.get(reverse("labs:list")).content
    project = ProjectFactory(name="vis")
    Lab.objects.filter(pk=lab.pk).update(project=project)
    viewer = UserFactory(username="vis-viewer")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    v = client_for(viewer)
    page = v.get(reverse("labs:detail", args=[lab.pk]))
    # The machines are the owner's own (no project): a project viewer sees the lab, not them.
    assert (
        page.status_code == 200 and b"mine-controllers-0" not in page.content and b'id="lab-power"' not in page.content
    )
    assert v.post(reverse("labs:power", args=[lab.pk]), {"action": "start"}).status_code == 403
    assert v.get(reverse("labs:delete", args=[lab.pk])).status_code == 403


@pytest.mark.parametrize(
    "text",
    ["all: [", "- just\n- a list", "g:\n  vars: {vm_count: 2}", "x" * 70000, "a: &a {children: {b: *a}}", "[" * 3000],
)
def test_bad_yaml_in_the_template_form_is_a_message_not_a_500(staff, text):
    c = client_for(staff)
    r = c.post(reverse("labs:template-create"), {"name": "bad", "spec": text})
    assert r.status_code == 200 and b"invalid-feedback" in r.content
    assert not LabTemplate.objects.exists()


def test_templates_are_written_by_staff_and_project_admins_only(user, staff, template):
    assert client_for(user).get(reverse("labs:template-create")).status_code == 403
    assert client_for(user).get(reverse("labs:template-edit", args=[template.pk])).status_code == 403
    project = ProjectFactory(name="tproj")
    Membership.objects.create(project=project, user=user, role="admin")
    c = client_for(user)
    assert c.get(reverse("labs:template-create")).status_code == 200
    r = c.post(reverse("labs:template-create"), {"name": "t1", "project": str(project.pk), "spec": spec()})
    made = LabTemplate.objects.get(name="t1")
    assert r.status_code == 302 and made.project == project and made.owner == user
    r = c.post(
        reverse("labs:template-edit", args=[made.pk]), {"name": "t1", "project": str(project.pk), "spec": "g: ["}
    )
    assert r.status_code == 200 and b"not valid YAML" in r.content
    r = client_for(staff).post(reverse("labs:template-create"), {"name": "everyone", "spec": spec()})
    assert r.status_code == 302 and LabTemplate.objects.get(name="everyone").project is None


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"name": "Bad Name", "placement": "spread", "first": "0"},
        {"name": "ok", "placement": "sideways", "first": "0"},
        {"name": "ok", "placement": "pack", "first": "-3"},
        {"name": "ok", "placement": "pack", "first": "0", "count__controllers": "999"},
        {"name": "ok", "placement": "pack", "first": "0", "pattern__controllers": "{oops}"},
        {"name": "ok", "placement": "pack", "first": "0", "count__controllers": "0", "count__computes": "0"},
    ],
)
def test_a_bad_instantiate_form_is_a_message_not_a_500(user, template, data):
    base = {"count__controllers": "2", "pattern__controllers": "{lab}-{group}-{n}", "count__computes": "1"}
    base.update({"pattern__computes": "{lab}-{group}-{n}"})
    r = client_for(user).post(reverse("labs:instantiate", args=[template.pk]), {**base, **data})
    assert r.status_code == 200 and (b"invalid-feedback" in r.content or b"alert-danger" in r.content)
    assert not Lab.objects.exists() and not Machine.objects.exists()


def test_a_template_saved_before_a_rule_tightened_shows_its_error(user, staff):
    broken = LabTemplate.objects.create(name="old", owner=staff, spec="g: [")
    r = client_for(user).get(reverse("labs:instantiate", args=[broken.pk]))
    assert r.status_code == 200 and b'id="spec-error"' in r.content


@pytest.mark.parametrize("htmx", [False, True])
def test_the_lab_page_costs_the_same_queries_for_3_machines_as_for_12(user, htmx):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from labs.models import LabMachine
    from machines.models import MachineNic
    from tests.factories import MachineFactory

    lab = Lab.objects.create(name="big", owner=user)
    c = client_for(user)
    headers = {"HX-Request": "true"} if htmx else {}

    def grow_to(n):
        for i in range(lab.members.count(), n):
            m = MachineFactory(
                name=f"m{i}", owner=user, deploy_type="network", bmc_port=17800 + i, bmc_address="127.0.0.1"
            )
            MachineNic.objects.create(
                machine=m, index=0, mac=f"52:54:00:00:01:{i:02x}", addresses=[f"10.0.0.{i + 2}/24"]
            )
            LabMachine.objects.create(lab=lab, machine=m, group="g")
        with CaptureQueriesContext(connection) as queries:
            r = c.get(reverse("labs:detail", args=[lab.pk]), headers=headers)
        assert r.status_code == 200 and f"m{n - 1}".encode() in r.content
        return len(queries)

    assert grow_to(3) == grow_to(12)


@pytest.mark.django_db
def test_staff_find_the_ansistack_import_from_the_lab_list_and_others_do_not(user, staff):
    page = client_for(staff).get(reverse("labs:list")).content.decode()
    assert f'href="{reverse("imports:upload")}"' in page
    page = client_for(user).get(reverse("labs:list")).content.decode()
    assert reverse("imports:upload") not in page
