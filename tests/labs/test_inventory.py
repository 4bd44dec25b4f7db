"""labs.inventory.build_inventory: the Ansible inventory of the machines a user may see (groups, host variables,
visibility, BMC secrets only when asked and allowed, recorded), and its AnsiStack-shaped YAML form."""

import re

import pytest
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from hypervisors.models import ImageStatus
from labs import inventory
from labs.inventory import ansible_host, ansistack_inventory, build_inventory, group_name
from labs.services import lab_add_machine, lab_get_or_create
from machines import crypto
from machines.models import MachineEvent, MachineNic, MachineObserved, Membership, Role
from machines.states import Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


def _nic(machine, index, mac, addresses=()):
    return MachineNic.objects.create(
        machine=machine, index=index, type="network", source="default", mac=mac, addresses=list(addresses)
    )


def _bmc(machine, port):
    machine.bmc_address, machine.bmc_port, machine.bmc_username = "127.0.0.1", port, f"bmc-{port}"
    machine.bmc_password_encrypted = crypto.encrypt(f"secret-{port}")
    machine.save()
    return machine


@pytest.fixture
def world(user):
    """alice's lab of an image machine and a network-boot one; a project machine of someone else that alice
    views; and a stranger's machine alice never sees."""
    hv = HypervisorFactory(name="kvm-01")
    image = ImageFactory(name="debian-12", status=ImageStatus.READY, default_user="debian")
    project = ProjectFactory(name="web-team")
    Membership.objects.create(project=project, user=user, role=Role.VIEWER)
    web = MachineFactory(
        name="web1", owner=user, hypervisor=hv, image=image, deploy_type="image", vcpus=2, memory_mib=2048,
        disk_gib=20, tags=["frontend", "blue green"], status=Status.ACTIVE,
    )  # fmt: skip
    _nic(web, 0, "52:54:00:00:00:01", ["192.0.2.10/24"])
    MachineObserved.objects.create(machine=web, guest_addresses={"52:54:00:00:00:01": ["198.51.100.7/24"]})
    ctrl = _bmc(MachineFactory(name="ctrl-1", owner=user, hypervisor=hv, deploy_type="network"), 17001)
    _nic(ctrl, 0, "52:54:00:00:00:02")
    lab = lab_get_or_create(name="overcloud-lab", owner=user)
    lab_add_machine(lab=lab, machine=web, group="provisioned_vms")
    lab_add_machine(lab=lab, machine=ctrl, group="bootable_vms")
    shared = _bmc(MachineFactory(name="db1", owner=UserFactory(), project=project, hypervisor=hv, image=image), 17002)
    _nic(shared, 0, "52:54:00:00:00:03")
    MachineObserved.objects.create(
        machine=shared, guest_addresses={"52:54:00:00:00:03": ["fe80::1/64", "2001:db8::5/64", "203.0.113.9/24"]}
    )
    stranger = _bmc(MachineFactory(name="secret-box", hypervisor=hv), 17003)
    return {"web": web, "ctrl": ctrl, "shared": shared, "stranger": stranger, "lab": lab, "project": project}


def test_it_groups_by_project_lab_deploy_type_hypervisor_tag_and_lab_member_group(user, world):
    inv = build_inventory(user)
    assert inv["deploy_image"]["hosts"] == ["db1", "web1"]
    assert inv["deploy_network"]["hosts"] == ["ctrl-1"]
    assert inv["hypervisor_kvm_01"]["hosts"] == ["ctrl-1", "db1", "web1"]
    assert inv["project_web_team"]["hosts"] == ["db1"]
    assert inv["lab_overcloud_lab"]["hosts"] == ["ctrl-1", "web1"]
    assert inv["provisioned_vms"]["hosts"] == ["web1"]
    assert inv["bootable_vms"]["hosts"] == ["ctrl-1"]
    assert inv["tag_frontend"]["hosts"] == inv["tag_blue_green"]["hosts"] == ["web1"]
    assert inv["all"]["children"] == sorted(k for k in inv if k not in ("_meta", "all"))
    assert set(inv["_meta"]["hostvars"]) == {"web1", "ctrl-1", "db1"}


def test_host_variables_say_where_and_as_whom_with_the_portal_facts(user, world):
    request = RequestFactory().get("/api/v1/inventory/")
    web = build_inventory(user, request=request)["_meta"]["hostvars"]["web1"]
    assert web["ansible_host"] == "192.0.2.10"  # the static address before the one the guest was seen with
    assert web["ansible_user"] == "debian"
    m = world["web"]
    assert web["portal_uuid"] == str(m.uuid) and web["portal_id"] == m.pk
    assert web["portal_hypervisor"] == "kvm-01" and web["portal_deploy_type"] == "image"
    assert (web["portal_vcpus"], web["portal_memory_mib"], web["portal_disk_gib"]) == (2, 2048, 20)
    assert web["portal_macs"] == ["52:54:00:00:00:01"]
    assert web["portal_addresses"] == ["192.0.2.10", "198.51.100.7"]
    assert web["portal_lab"] == "overcloud-lab" and web["portal_lab_group"] == "provisioned_vms"
    assert web["portal_url"] == f"http://testserver/machines/{m.pk}/"
    assert web["portal_tags"] == ["frontend", "blue green"]
    db1 = build_inventory(user)["_meta"]["hostvars"]["db1"]
    assert db1["ansible_host"] == "203.0.113.9"  # seen: IPv4 before IPv6, never link-local
    assert db1["portal_project"] == "web-team" and db1["portal_url"] == f"/machines/{world['shared'].pk}/"
    ctrl = build_inventory(user)["_meta"]["hostvars"]["ctrl-1"]
    assert "ansible_host" not in ctrl and "ansible_user" not in ctrl  # nothing known of a network-boot machine


def test_ansible_host_falls_back_to_ipv6_and_to_macs_no_nic_has(world):
    m = MachineFactory()
    MachineObserved.objects.create(machine=m, guest_addresses={"52:54:00:aa:00:01": ["fe80::2/64", "2001:db8::9/64"]})
    assert ansible_host(m) == "2001:db8::9"
    bare = MachineFactory()
    assert ansible_host(bare) is None


def test_another_users_machines_never_appear(user, world):
    inv = build_inventory(user, bmc=True)
    text = repr(inv)
    assert "secret-box" not in text and "secret-17003" not in text
    assert "secret-box" in repr(build_inventory(UserFactory(is_staff=True)))
    assert build_inventory(UserFactory())["_meta"]["hostvars"] == {}


def test_without_bmc_there_are_no_secrets_and_nothing_is_recorded(user, world):
    before = AuditEvent.objects.count()
    inv = build_inventory(user)
    assert not any(k.startswith(("portal_bmc", "portal_console")) for v in inv["_meta"]["hostvars"].values() for k in v)
    assert "secret-" not in repr(inv)
    assert AuditEvent.objects.count() == before


def test_bmc_reveals_what_the_role_allows_and_records_it(user, world):
    inv = build_inventory(user, bmc=True)["_meta"]["hostvars"]
    ctrl, db1 = inv["ctrl-1"], inv["db1"]
    assert (ctrl["portal_bmc_address"], ctrl["portal_bmc_port"]) == ("127.0.0.1", 17001)
    assert (ctrl["portal_bmc_username"], ctrl["portal_bmc_password"]) == ("bmc-17001", "secret-17001")
    assert ctrl["portal_console_url"] == f"/machines/{world['ctrl'].pk}/console/"
    # A viewer of the project's machine gets its console link, never its BMC password.
    assert db1["portal_bmc_withheld"] is True and "portal_bmc_password" not in db1
    assert "secret-17002" not in repr(inv) and "portal_serial_console_url" not in db1
    assert db1["portal_console_url"] == f"/machines/{world['shared'].pk}/console/"
    reveals = AuditEvent.objects.filter(action="machine.bmc_reveal")
    assert list(reveals.values_list("object_id", "outcome", "username")) == [
        (str(world["ctrl"].pk), "success", "alice")
    ]
    export = AuditEvent.objects.get(action="inventory.bmc_export")
    assert export.username == "alice" and "bmc_revealed=1 bmc_withheld=1" in export.detail
    assert MachineEvent.objects.filter(machine=world["ctrl"], message__contains="revealed to alice").exists()


def test_a_project_admin_may_reveal_a_project_machines_bmc(user, world):
    Membership.objects.filter(user=user).update(role=Role.ADMIN)
    db1 = build_inventory(user, bmc=True)["_meta"]["hostvars"]["db1"]
    assert db1["portal_bmc_password"] == "secret-17002" and "portal_bmc_withheld" not in db1


def test_one_lab_or_one_project(user, world):
    assert set(build_inventory(user, lab=world["lab"])["_meta"]["hostvars"]) == {"web1", "ctrl-1"}
    assert set(build_inventory(user, project=world["project"])["_meta"]["hostvars"]) == {"db1"}
    # A lab filter never shows a machine the user may not see, even one put in their lab.
    lab_add_machine(lab=world["lab"], machine=world["stranger"], group="bootable_vms")
    assert "secret-box" not in build_inventory(user, lab=world["lab"])["_meta"]["hostvars"]


def test_group_names_are_valid_ansible_names(user, world):
    assert group_name("web-team.eu") == "web_team_eu"
    m = MachineFactory(owner=user, tags=["x y", "ünï", "1st"])
    lab = lab_get_or_create(name="odd", owner=user)
    lab_add_machine(lab=lab, machine=m, group="all")
    m2 = MachineFactory(owner=user)
    lab_add_machine(lab=lab_get_or_create(name="odd2", owner=user), machine=m2, group="2nd-row")
    inv = build_inventory(user)
    for group in inv["all"]["children"]:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", group), group
    # A lab group `all` is not Ansible's all, and a group name does not start with a digit.
    assert {"tag_x_y", "tag__n_", "tag_1st", "group_all", "group_2nd_row"} <= set(inv)
    assert inv["all"] == {"children": inv["all"]["children"]}


def test_machines_of_the_same_name_get_their_domain_names(staff, world):
    twin = MachineFactory(name="web1", hypervisor=world["web"].hypervisor)
    hostvars = build_inventory(staff)["_meta"]["hostvars"]
    assert "web1" not in hostvars
    assert {world["web"].domain_name, twin.domain_name} <= set(hostvars)
    assert hostvars[twin.domain_name]["portal_name"] == "web1"


def test_machines_being_deleted_are_left_out(user, world):
    MachineFactory(name="going", owner=user, status=Status.DELETING)
    assert "going" not in build_inventory(user)["_meta"]["hostvars"]


def test_queries_do_not_grow_with_machines(user, world):
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            build_inventory(user, request=RequestFactory().get("/"))
        return len(queries.captured_queries)

    small = count()
    hv, lab = HypervisorFactory(), world["lab"]
    for i in range(20):
        m = MachineFactory(owner=user, hypervisor=hv, tags=[f"t{i}"], image=ImageFactory(status=ImageStatus.READY))
        _nic(m, 0, f"52:54:00:10:00:{i:02x}", [f"192.0.2.{100 + i}/24"])
        MachineObserved.objects.create(machine=m, guest_addresses={})
        lab_add_machine(lab=lab, machine=m, group="provisioned_vms")
    assert count() == small


def test_the_ansistack_shape(user, world):
    doc = ansistack_inventory(build_inventory(user, bmc=True))
    vms = doc["vms"]
    assert vms["vars"] == {"ansible_ssh_common_args": "-o StrictHostKeyChecking=no"}
    web = vms["hosts"]["web1"]
    assert web["ansible_user"] == "debian" and web["ansible_host"] == "192.0.2.10"
    assert web["vm_job_target"] == "web1" and web["vm_virt_host"] == "kvm-01" and web["vm_disk_size"] == 20
    assert web["tripleo_deploy_type"] == "undefined" and web["tripleo_ceph_enabled"] is False
    assert web["vm_console_uri"].endswith("/console/")
    ctrl = vms["hosts"]["ctrl-1"]
    assert (ctrl["vm_vbmc_port"], ctrl["vm_vbmc_username"], ctrl["vm_vbmc_password"]) == (
        17001,
        "bmc-17001",
        "secret-17001",
    )
    assert "ansible_user" not in ctrl  # unknown: left out, not null
    assert set(inventory.ANSISTACK_CHILDREN) <= set(vms["children"])
    assert vms["children"]["provisioned_vms"] == {"hosts": {"web1": {}}}
    assert vms["children"]["lab_overcloud_lab"] == {"hosts": {"ctrl-1": {}, "web1": {}}}


def test_an_undercloud_member_is_in_ansistacks_undercloud_child(user):
    m = MachineFactory(name="uc", owner=user)
    lab_add_machine(lab=lab_get_or_create(name="tripleo", owner=user), machine=m, group="undercloud")
    vms = ansistack_inventory(build_inventory(user))["vms"]
    assert vms["children"]["undercloud"] == {"hosts": {"uc": {}}}
    assert vms["hosts"]["uc"]["tripleo_deploy_type"] == "undercloud"
