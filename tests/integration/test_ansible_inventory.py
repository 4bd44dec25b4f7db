"""Ansible reads the running portal: `ansible-inventory --list -i scripts/portal-inventory` and `ansible-playbook -i`
against the portal under gunicorn (the `web_server` fixture), with an API token the test issued, list the machines,
groups and host variables the test made, and only those the token's user may see."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisors.models import ImageStatus
from labs.services import lab_add_machine, lab_get_or_create
from machines import crypto
from machines.models import MachineNic, MachineObserved, Membership, Role
from machines.states import Status
from portal.models import ApiToken, AuditEvent
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "portal-inventory"
BIN = Path(sys.executable).parent
PLAYBOOK = """\
- hosts: lab_ansible_lab
  gather_facts: false
  tasks:
    - ansible.builtin.debug:
        msg: "{{ inventory_hostname }} at {{ ansible_host | default('-') }} as {{ ansible_user | default('-') }} uuid {{ portal_uuid }}"
"""


@pytest.fixture
def made(transactional_db):
    """Rows only (nothing runs on a hypervisor): a lab of an image machine and a network-boot one with a BMC, a
    machine of the user's project, another user's machine."""
    user = UserFactory(username="ansible-user")
    hv = HypervisorFactory(name="kvm-a")
    image = ImageFactory(name="debian-12-genericcloud", status=ImageStatus.READY, default_user="debian")
    web = MachineFactory(
        name="web1", owner=user, hypervisor=hv, image=image, vcpus=2, memory_mib=1024, tags=["frontend"],
        status=Status.ACTIVE,
    )  # fmt: skip
    MachineNic.objects.create(machine=web, index=0, mac="52:54:00:a0:00:01", addresses=["192.0.2.31/24"])
    ctrl = MachineFactory(
        name="ctrl-1", owner=user, hypervisor=hv, deploy_type="network", bmc_address="127.0.0.1", bmc_port=17201,
        bmc_username="bmc-ctrl", bmc_password_encrypted=crypto.encrypt("ctrl-secret"),
    )  # fmt: skip
    MachineNic.objects.create(machine=ctrl, index=0, mac="52:54:00:a0:00:02")
    MachineObserved.objects.create(machine=ctrl, guest_addresses={"52:54:00:a0:00:02": ["198.51.100.40/24"]})
    lab = lab_get_or_create(name="ansible-lab", owner=user)
    lab_add_machine(lab=lab, machine=web, group="provisioned_vms")
    lab_add_machine(lab=lab, machine=ctrl, group="bootable_vms")
    project = ProjectFactory(name="team-x")
    Membership.objects.create(project=project, user=user, role=Role.OPERATOR)
    MachineFactory(name="db1", owner=UserFactory(), project=project, hypervisor=hv)
    MachineFactory(name="not-yours", owner=UserFactory(), hypervisor=hv)
    _, token = ApiToken.issue(user=user, read_only=True)
    return {"token": token, "web": web, "ctrl": ctrl, "lab": lab}


def _env(web_server, made, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "ANSIBLE_"))}
    return env | {
        "PORTAL_URL": web_server,
        "PORTAL_TOKEN": made["token"],
        "HOME": str(tmp_path),
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true",  # a script that fails fails the command
        "ANSIBLE_NOCOLOR": "1",
        **extra,
    }


def _ansible_inventory(env) -> dict:
    r = subprocess.run(
        [str(BIN / "ansible-inventory"), "--list", "-i", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ansible_inventory_lists_the_portals_machines(web_server, made, tmp_path):
    listed = _ansible_inventory(_env(web_server, made, tmp_path))
    hostvars = listed["_meta"]["hostvars"]
    assert set(hostvars) == {"web1", "ctrl-1", "db1"}  # never another user's machine
    assert sorted(listed["lab_ansible_lab"]["hosts"]) == ["ctrl-1", "web1"]
    assert listed["provisioned_vms"]["hosts"] == ["web1"] and listed["bootable_vms"]["hosts"] == ["ctrl-1"]
    assert listed["project_team_x"]["hosts"] == ["db1"] and listed["tag_frontend"]["hosts"] == ["web1"]
    assert sorted(listed["deploy_image"]["hosts"]) == ["db1", "web1"]
    assert sorted(listed["hypervisor_kvm_a"]["hosts"]) == ["ctrl-1", "db1", "web1"]
    assert {"lab_ansible_lab", "provisioned_vms", "project_team_x"} <= set(listed["all"]["children"])
    web = hostvars["web1"]
    assert web["ansible_host"] == "192.0.2.31" and web["ansible_user"] == "debian"
    assert web["portal_uuid"] == str(made["web"].uuid) and web["portal_vcpus"] == 2
    assert web["portal_url"] == f"{web_server}/machines/{made['web'].pk}/"
    assert hostvars["ctrl-1"]["ansible_host"] == "198.51.100.40"  # seen by the reconcile: no static address
    assert not any(k.startswith("portal_bmc") for v in hostvars.values() for k in v)


def test_one_lab_with_its_bmcs(web_server, made, tmp_path):
    env = _env(web_server, made, tmp_path, PORTAL_INVENTORY_LAB="ansible-lab", PORTAL_INVENTORY_BMC="1")
    hostvars = _ansible_inventory(env)["_meta"]["hostvars"]
    assert set(hostvars) == {"web1", "ctrl-1"}
    ctrl = hostvars["ctrl-1"]
    assert (ctrl["portal_bmc_port"], ctrl["portal_bmc_username"], ctrl["portal_bmc_password"]) == (
        17201,
        "bmc-ctrl",
        "ctrl-secret",
    )
    export = AuditEvent.objects.get(action="inventory.bmc_export")
    assert export.username == "ansible-user" and export.address == "127.0.0.1"
    assert AuditEvent.objects.filter(action="machine.bmc_reveal", object_id=str(made["ctrl"].pk)).exists()


def test_ansible_playbook_runs_on_the_portals_groups(web_server, made, tmp_path):
    playbook = tmp_path / "site.yml"
    playbook.write_text(PLAYBOOK)
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(SCRIPT), str(playbook)],
        capture_output=True,
        text=True,
        env=_env(web_server, made, tmp_path),
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"web1 at 192.0.2.31 as debian uuid {made['web'].uuid}" in r.stdout
    assert f"ctrl-1 at 198.51.100.40 as - uuid {made['ctrl'].uuid}" in r.stdout
    assert "db1" not in r.stdout  # not in the lab the play targets


def test_a_revoked_token_fails_the_command_with_the_portals_reason(web_server, made, tmp_path):
    ApiToken.objects.all().delete()
    r = subprocess.run(
        [str(BIN / "ansible-inventory"), "--list", "-i", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=_env(web_server, made, tmp_path),
        timeout=180,
    )
    assert r.returncode != 0
    assert "portal answered 401" in r.stderr and "Invalid token." in r.stderr
