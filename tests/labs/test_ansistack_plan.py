"""The plan made from AnsiStack inventories (dry-run): nothing changes, every problem has its file and line."""

from pathlib import Path

import pytest

from hypervisors.models import Hypervisor, HypervisorStatus, Image
from labs.ansistack import count_steps, plan_inventory, report_lines
from machines.models import Machine
from tests.factories import HypervisorFactory, ImageFactory, UserFactory

FIXTURES = Path(__file__).parent / "fixtures"


def files(*names: str) -> list[dict]:
    return [{"name": n, "text": (FIXTURES / n).read_text()} for n in names]


def vars_file() -> dict:
    return {"name": "main.yml", "text": (FIXTURES / "vars-main.yml").read_text()}


def plan_of(*names: str, **kw) -> dict:
    return plan_inventory(files(*names), vars_file=kw.pop("vars_file", vars_file()), **kw).as_dict()


def problems(plan: dict) -> list[str]:
    return [line for line in report_lines(plan) if line.startswith(("error", "warning", "note"))]


@pytest.mark.django_db
def test_it_plans_the_example_inventories():
    plan = plan_of("inventory-phys.yaml", "inventory-vms.yaml")
    assert plan["lab"] == "inventory-vms"
    hvs = {h["name"]: h for h in plan["hypervisors"]}
    assert hvs["kvm-a"]["uri"] == "qemu+ssh://labops@198.51.100.10/system"
    assert hvs["kvm-b"]["uri"] == "qemu+ssh://root@198.51.100.11/system"  # the host's own ansible_user wins
    assert {h["action"] for h in hvs.values()} == {"register"}
    nets = {(n["hypervisor"], n["name"]): n for n in plan["networks"]}
    assert nets["kvm-a", "mgmt"] | {} == nets["kvm-a", "mgmt"] and nets["kvm-a", "mgmt"]["mode"] == "macvtap"
    assert nets["kvm-b", "prov"]["mode"] == "bridge" and nets["kvm-b", "prov"]["bridge"] == "br-prov"
    assert plan["images"] == [
        {
            "name": "debian12",
            "url": "https://images.example.org/debian-12-genericcloud-amd64.qcow2",
            "file": "inventory-vms.yaml",
            "line": 27,
            "action": "import",
            "format": "qcow2",
            "default_user": "debian",
        }
    ]
    machines = {m["name"]: m for m in plan["machines"]}
    web0 = machines["web-0"]
    assert (web0["deploy_type"], web0["hypervisor"], web0["vcpus"], web0["memory_mib"], web0["disk_gib"]) == (
        "image",
        "kvm-a",
        2,
        2048,
        20,
    )
    assert web0["nics"][1]["addresses"] == ["10.20.0.10/24"] and web0["nics"][1]["dhcp4"] is False
    assert web0["nics"][0]["source"] == "mgmt" and web0["nics"][0]["dhcp4"] is True
    assert machines["web-1"]["deletion_protection"] is True
    assert machines["db-0"]["vcpus"] == 4 and machines["db-0"]["hypervisor"] == "kvm-b"  # from db_tier
    node0 = machines["node-0"]
    assert (node0["deploy_type"], node0["group"], node0["nics"][0]["source"]) == ("network", "bootable_vms", "prov")
    assert machines["stray-0"]["action"] == "skip"
    # Two registrations, four network definitions, one image import, six machines to create.
    assert count_steps(plan) == 2 + 4 + 1 + 6
    assert Hypervisor.objects.count() == 0 and Image.objects.count() == 0 and Machine.objects.count() == 0


@pytest.mark.django_db
def test_every_problem_has_its_file_and_line():
    lines = problems(plan_of("inventory-phys.yaml", "inventory-vms.yaml"))
    text = "\n".join(lines)
    assert (
        "error: inventory-vms.yaml:48: stray-0: vm_virt_host kvm-z is not in the inventory's libvirt_hosts; "
        "not created" in lines
    ), text
    assert any(
        line.startswith(
            "warning: inventory-vms.yaml:73: node-2: BMC port 16231 is also node-1's (inventory-vms.yaml:68)"
        )
        for line in lines
    ), text
    assert (
        "warning: inventory-vms.yaml:8: the shared BMC credentials admin/secrete (3 machines) are replaced by "
        "per-machine ones: each machine's page shows its own BMC user and password" in lines
    ), text
    assert "warning: inventory-vms.yaml:47: db_role (db-0) is not imported: the portal does not support it" in lines
    assert any(
        line.startswith("warning: inventory-vms.yaml:69: vm_extra_disks (node-1) is not imported") for line in lines
    )
    assert any(line.startswith("warning: inventory-phys.yaml:19: server_ipmi_address (kvm-a)") for line in lines)
    assert any(line.startswith("warning: inventory-phys.yaml:6: ansible_python_interpreter") for line in lines)
    assert any(
        line.startswith("note: inventory-phys.yaml:17: host kvm-a: the portal reaches a new qemu+ssh hypervisor once")
        for line in lines
    ), text


@pytest.mark.django_db
def test_broken_yaml_names_its_line():
    lines = problems(plan_of("broken.yaml"))
    assert any(line.startswith("error: broken.yaml:7: broken YAML:") for line in lines), lines
    assert any("nothing of this file is imported" in line for line in lines)


@pytest.mark.django_db
def test_a_missing_image_and_a_missing_host_are_errors():
    plan = plan_of("inventory-vms.yaml", vars_file=None)
    lines = problems(plan)
    assert any(
        line.startswith("error: inventory-vms.yaml:27: image debian12: the portal does not have it") for line in lines
    ), lines
    assert any(
        "web-0: vm_virt_host kvm-a is not in the inventory's libvirt_hosts; not created" in line for line in lines
    )
    assert all(m["action"] == "skip" for m in plan["machines"])
    assert count_steps(plan) == 0


@pytest.mark.django_db
def test_it_finds_what_the_portal_already_has():
    owner = UserFactory()
    hv = HypervisorFactory(
        name="kvm-a",
        uri="qemu+ssh://someone@198.51.100.10/system",
        status=HypervisorStatus.ONLINE,
        networks=[{"name": "mgmt"}, {"name": "prov"}],
        unmanaged_domains=[{"uuid": "0b7d1c1e-1111-4a4a-9b9b-222233334444", "name": "web-1", "state": "running"}],
    )
    ImageFactory(
        name="debian-12", ready=True, source_url="https://images.example.org/debian-12-genericcloud-amd64.qcow2"
    )
    plan = plan_of("inventory-phys.yaml", "inventory-vms.yaml", owner=owner)
    hvs = {h["name"]: h for h in plan["hypervisors"]}
    assert hvs["kvm-a"]["action"] == "registered" and hvs["kvm-a"]["hypervisor_id"] == hv.pk  # same host
    assert {n["action"] for n in plan["networks"] if n["hypervisor"] == "kvm-a"} == {"exists"}
    assert plan["images"][0]["action"] == "exists" and plan["images"][0]["portal_name"] == "debian-12"
    machines = {m["name"]: m for m in plan["machines"]}
    assert machines["web-1"]["action"] == "adopt"
    assert machines["web-1"]["domain_uuid"] == "0b7d1c1e-1111-4a4a-9b9b-222233334444"
    assert machines["web-0"]["action"] == "create"


@pytest.mark.django_db
def test_a_hypervisor_the_portal_cannot_reach_is_an_error():
    HypervisorFactory(
        name="kvm-a",
        uri="qemu+ssh://labops@198.51.100.10/system",
        status=HypervisorStatus.DOWN,
        status_error="connection timed out",
    )
    lines = problems(plan_of("inventory-phys.yaml", "inventory-vms.yaml"))
    assert (
        "error: inventory-phys.yaml:17: host kvm-a: the portal cannot reach hypervisor kvm-a (down: connection timed "
        "out); its machines wait until it is online" in lines
    ), lines


ISO_VMS = """\
all:
  children:
    all_vms:
      children:
        provisioned_vms:
          hosts:
            win-0:
              vm_virt_host: kvm-a
              vm_bootable_iso: installer.iso
              vm_additional_isos: drivers.iso
              vm_networks:
                mgmt: {interface: eth0}
"""


@pytest.mark.django_db
def test_iso_machines_take_the_portals_isos():
    ImageFactory(name="installer", iso=True)
    plan = plan_inventory(
        [*files("inventory-phys.yaml"), {"name": "iso-vms.yaml", "text": ISO_VMS}], vars_file=None
    ).as_dict()
    win = plan["machines"][0]
    assert (win["deploy_type"], win["isos"], win["action"]) == ("iso", ["installer"], "skip")
    assert "error: iso-vms.yaml:10: win-0: the portal has no ISO drivers.iso; upload it first; not created" in problems(
        plan
    )
    ImageFactory(name="drivers", iso=True)
    win = plan_inventory(
        [*files("inventory-phys.yaml"), {"name": "iso-vms.yaml", "text": ISO_VMS}], vars_file=None
    ).as_dict()["machines"][0]
    assert (win["isos"], win["action"]) == (["installer", "drivers"], "create")


@pytest.mark.django_db
def test_an_owner_who_is_not_the_projects_admin_is_refused():
    from django.core.exceptions import ValidationError

    from labs.importer import inventory_import_create
    from tests.factories import ProjectFactory

    owner = UserFactory()
    with pytest.raises(ValidationError, match="is not an admin of project"):
        inventory_import_create(actor=owner, owner=owner, files=files("inventory-vms.yaml"), project=ProjectFactory())
