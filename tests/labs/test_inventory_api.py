"""GET /api/v1/inventory/ (token auth, `lab`, `project`, `bmc`) and the YAML downloads /labs/inventory.yaml and
/labs/<id>/inventory.yaml: answers, bad parameters (400, never 500), visibility; the YAML read back by
ansible-core's own inventory loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from hypervisors.models import ImageStatus
from labs.services import lab_add_machine, lab_get_or_create
from machines import crypto
from machines.models import MachineNic
from portal.models import ApiToken, AuditEvent
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"
URL = "/api/v1/inventory/"


@pytest.fixture
def world(user):
    hv = HypervisorFactory(name="kvm1")
    image = ImageFactory(status=ImageStatus.READY, default_user="cloud")
    web = MachineFactory(name="web1", owner=user, hypervisor=hv, image=image, tags=["frontend"])
    MachineNic.objects.create(machine=web, index=0, mac="52:54:00:00:01:01", addresses=["192.0.2.21/24"])
    ctrl = MachineFactory(
        name="ctrl-1", owner=user, hypervisor=hv, deploy_type="network", bmc_address="127.0.0.1", bmc_port=17101,
        bmc_username="bmc-a", bmc_password_encrypted=crypto.encrypt("pw-ctrl"),
    )  # fmt: skip
    lab = lab_get_or_create(name="lab-a", owner=user)
    lab_add_machine(lab=lab, machine=web, group="provisioned_vms")
    lab_add_machine(lab=lab, machine=ctrl, group="bootable_vms")
    project = ProjectFactory(name="proj-a")
    in_project = MachineFactory(name="p1", owner=user, project=project, hypervisor=hv)
    other = UserFactory(username="bob")
    theirs = MachineFactory(name="bobs-box", owner=other, hypervisor=hv)
    their_lab = lab_get_or_create(name="bob-lab", owner=other)
    lab_add_machine(lab=their_lab, machine=theirs)
    return {"lab": lab, "their_lab": their_lab, "project": project, "in_project": in_project, "ctrl": ctrl}


@pytest.fixture
def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {ApiToken.issue(user=user)[1]}")
    return client


def test_it_answers_ansibles_json_inventory_with_a_token(api, world):
    r = api.get(URL)
    assert r.status_code == 200 and r["Content-Type"] == "application/json"
    body = r.json()
    assert set(body["_meta"]["hostvars"]) == {"web1", "ctrl-1", "p1"}
    assert body["lab_lab_a"]["hosts"] == ["ctrl-1", "web1"] and body["project_proj_a"]["hosts"] == ["p1"]
    web = body["_meta"]["hostvars"]["web1"]
    assert web["ansible_host"] == "192.0.2.21" and web["ansible_user"] == "cloud"
    assert web["portal_url"].startswith("http://testserver/machines/")
    assert "bobs-box" not in r.content.decode() and "pw-ctrl" not in r.content.decode()


def test_it_wants_credentials(world):
    assert APIClient().get(URL).status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert bad.get(URL).status_code == 401


def test_it_reads_only(api, world):
    assert api.post(URL, {}).status_code == 405


@pytest.mark.parametrize("by", ["pk", "name"])
def test_one_lab_by_id_or_name(api, world, by):
    r = api.get(URL, {"lab": getattr(world["lab"], by)})
    assert r.status_code == 200
    assert set(r.json()["_meta"]["hostvars"]) == {"web1", "ctrl-1"}


def test_one_project(api, world):
    r = api.get(URL, {"project": "proj-a"})
    assert r.status_code == 200 and set(r.json()["_meta"]["hostvars"]) == {"p1"}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lab": "nope"}, "lab"),
        ({"lab": "99999999999999999999999"}, "lab"),
        ({"lab": "²"}, "lab"),
        ({"lab": "x" * 500}, "lab"),
        ({"project": "nope"}, "project"),
        ({"bmc": "maybe"}, "bmc"),
    ],
)
def test_bad_parameters_are_400_with_the_field(api, world, params, field):
    r = api.get(URL, params)
    assert r.status_code == 400, r.content
    assert field in r.json()


def test_an_empty_parameter_is_left_out(api, world):
    r = api.get(URL, {"lab": "", "project": ""})
    assert r.status_code == 200 and len(r.json()["_meta"]["hostvars"]) == 3


def test_another_users_lab_is_no_lab(api, world):
    r = api.get(URL, {"lab": world["their_lab"].pk})
    assert r.status_code == 400 and "No lab" in r.json()["lab"][0]


def test_two_visible_labs_of_one_name_need_the_id(staff, world):
    lab_get_or_create(name="lab-a", owner=UserFactory())
    client = APIClient()
    client.force_authenticate(staff)
    r = client.get(URL, {"lab": "lab-a"})
    assert r.status_code == 400 and "give its id" in r.json()["lab"][0]


def test_bmc_adds_the_credentials_recorded_and_not_cached(api, world):
    r = api.get(URL, {"bmc": "1"})
    assert r.status_code == 200 and r["Cache-Control"] == "no-store"
    ctrl = r.json()["_meta"]["hostvars"]["ctrl-1"]
    assert (ctrl["portal_bmc_port"], ctrl["portal_bmc_password"]) == (17101, "pw-ctrl")
    assert ctrl["portal_console_url"] == f"http://testserver/machines/{world['ctrl'].pk}/console/"
    assert AuditEvent.objects.filter(action="inventory.bmc_export", username="alice").count() == 1
    assert AuditEvent.objects.filter(action="machine.bmc_reveal", object_id=str(world["ctrl"].pk)).count() == 1


def test_the_schema_documents_it():
    schema = Client().get("/api/v1/schema/?format=json").json()
    op = schema["paths"][URL]["get"]
    assert {p["name"] for p in op["parameters"]} == {"lab", "project", "bmc"}
    assert "_meta" in op["responses"]["200"]["content"]["application/json"]["schema"]["properties"]


# --- The YAML downloads ---


def test_the_yaml_download_is_ansistacks_lab_inventory(user_client, world):
    r = user_client.get(reverse("inventory-yaml"))
    assert r.status_code == 200 and r["Content-Type"].startswith("application/yaml")
    assert r["Content-Disposition"] == 'attachment; filename="vm-lab-inventory.yaml"'
    vms = yaml.safe_load(r.content)["vms"]
    assert set(vms["hosts"]) == {"web1", "ctrl-1", "p1"}
    assert vms["hosts"]["web1"]["ansible_host"] == "192.0.2.21" and vms["hosts"]["web1"]["vm_virt_host"] == "kvm1"
    assert "vm_vbmc_password" not in vms["hosts"]["ctrl-1"]
    assert vms["children"]["provisioned_vms"] == {"hosts": {"web1": {}}}


def test_one_labs_yaml(user_client, world):
    r = user_client.get(reverse("inventory-yaml-lab", args=[world["lab"].pk]), {"bmc": "1"})
    assert r.status_code == 200 and r["Cache-Control"] == "no-store"
    assert r["Content-Disposition"] == 'attachment; filename="vm-lab-lab-a-inventory.yaml"'
    hosts = yaml.safe_load(r.content)["vms"]["hosts"]
    assert set(hosts) == {"web1", "ctrl-1"} and hosts["ctrl-1"]["vm_vbmc_password"] == "pw-ctrl"


def test_the_whole_download_takes_a_lab_by_name(user_client, world):
    r = user_client.get(reverse("inventory-yaml"), {"lab": "lab-a"})
    assert r.status_code == 200 and set(yaml.safe_load(r.content)["vms"]["hosts"]) == {"web1", "ctrl-1"}
    assert user_client.get(reverse("inventory-yaml"), {"lab": "bob-lab"}).status_code == 400


def test_the_yaml_of_another_users_lab_is_404(user_client, world):
    assert user_client.get(reverse("inventory-yaml-lab", args=[world["their_lab"].pk])).status_code == 404
    assert user_client.get("/labs/999999999/inventory.yaml").status_code == 404


def test_the_yaml_wants_a_login_and_a_get(client, user_client, world):
    r = client.get(reverse("inventory-yaml"))
    assert r.status_code == 302 and r["Location"].startswith("/login/")
    assert user_client.post(reverse("inventory-yaml")).status_code == 405
    assert user_client.post(reverse("inventory-yaml-lab", args=[world["lab"].pk])).status_code == 405


@pytest.mark.parametrize("query", [{"bmc": "maybe"}, {"project": "nope"}, {"lab": "x" * 300}, {"lab": "99" * 20}])
def test_bad_yaml_parameters_are_400(user_client, world, query):
    r = user_client.get(reverse("inventory-yaml"), query)
    assert r.status_code == 400 and r["Content-Type"].startswith("text/plain")
    assert next(iter(query)) in r.content.decode()


def test_ansible_reads_the_yaml_download(user_client, world, tmp_path):
    """ansible-core's own YAML inventory plugin loads the download: hosts, groups and variables as written."""
    path = tmp_path / "vm-lab-inventory.yaml"
    path.write_bytes(user_client.get(reverse("inventory-yaml")).content)
    env = {**os.environ, "HOME": str(tmp_path), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"}
    r = subprocess.run(
        [str(ANSIBLE_INVENTORY), "-i", str(path), "--list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert set(listed["vms"]["hosts"]) == {"web1", "ctrl-1", "p1"}
    assert {"provisioned_vms", "bootable_vms", "lab_lab_a", "undercloud"} <= set(listed["vms"]["children"])
    assert listed["provisioned_vms"]["hosts"] == ["web1"]
    assert sorted(listed["lab_lab_a"]["hosts"]) == ["ctrl-1", "web1"]
    web = listed["_meta"]["hostvars"]["web1"]
    assert web["ansible_host"] == "192.0.2.21" and web["ansible_ssh_common_args"] == "-o StrictHostKeyChecking=no"
    assert web["portal_hypervisor"] == "kvm1"
