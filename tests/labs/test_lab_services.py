"""labs.services: a lab from a template (quota at once, spread or pack over several hypervisors, on the fake
host), power and delete on the lab through the machine services, who may do what."""

import pytest
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError

from labs import services
from labs.models import Lab, LabTemplate
from machines.models import Machine, Membership, Quota
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

POOL = [
    {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}
]


def spec(controllers=3, computes=2, ram=1024):
    net = settings.PORTAL_TENANT_NETWORK
    return f"""
all_vms:
  children:
    bootable_vms:
      vars:
        vm_networks:
          {net}: {{interface: eth0, dhcp: false, address: 10.9.0.10, netmask: 24}}
      children:
        controllers:
          vars: {{vm_count: {controllers}, vm_cores: 1, vm_ram: {ram}, vm_disk_size: 1}}
        computes:
          vars: {{vm_count: {computes}, vm_cores: 1, vm_ram: {ram}, vm_disk_size: 1, vm_address_offsets: {{{net}: 10}}}}
"""


def hv(name, memory_mib=8192, cpus=8):
    networks = [{"name": settings.PORTAL_TENANT_NETWORK, "active": True}]
    return HypervisorFactory(
        name=name, uri="qemu:///system", arch="x86_64", memory_mib=memory_mib, cpus=cpus, pools=POOL, networks=networks
    )


@pytest.fixture(autouse=True)
def bmc_ports(settings):
    settings.PORTAL_BMC_PORT_RANGE = "17600-17699"


@pytest.fixture
def owner():
    return UserFactory(username="labber")


@pytest.fixture
def template(owner):
    staff = UserFactory(username="tmpl-staff", is_staff=True)
    return services.lab_template_save(actor=staff, name="ctrl-and-compute", spec=spec())


def hosts_of(lab):
    return sorted(
        Machine.objects.filter(lab_membership__lab=lab).values_list("name", "hypervisor__name"), key=lambda r: r[0]
    )


def test_spread_puts_each_machine_where_the_lab_has_fewest(owner, template, host):
    hv("a"), hv("b"), hv("c")
    lab = services.lab_instantiate(template=template, actor=owner, name="lab1", placement="spread")
    per_host = {}
    for _, h in hosts_of(lab):
        per_host[h] = per_host.get(h, 0) + 1
    assert sorted(per_host.values()) == [1, 2, 2] and set(per_host) == {"a", "b", "c"}
    members = {m.machine.name: m.group for m in lab.members.select_related("machine")}
    assert members == {
        "lab1-controllers-0": "controllers",
        "lab1-controllers-1": "controllers",
        "lab1-controllers-2": "controllers",
        "lab1-computes-0": "computes",
        "lab1-computes-1": "computes",
    }
    ctrl = Machine.objects.get(name="lab1-computes-1")
    assert ctrl.nics.get().addresses == ["10.9.0.21/24"] and ctrl.has_bmc and ctrl.deploy_type == "network"
    assert AuditEvent.objects.filter(action="lab.create", outcome="success", object_repr="lab1").exists()


def test_pack_fills_one_host_before_the_next(owner, template, host):
    hv("a", memory_mib=3 * 1024), hv("big", memory_mib=4 * 1024), hv("c", memory_mib=2048)
    lab = services.lab_instantiate(template=template, actor=owner, name="lab2", placement="pack")
    on = [h for _, h in hosts_of(lab)]
    assert on.count("big") == 4 and on.count("a") == 1  # the roomiest first, full, then the next roomiest


def test_a_lab_that_does_not_fit_anywhere_makes_nothing(owner, template, host):
    hv("a", memory_mib=2048), hv("b", memory_mib=2048)  # room for 4 of the 5
    with pytest.raises(ValidationError) as e:
        services.lab_instantiate(template=template, actor=owner, name="lab3", placement="spread")
    assert "Nothing was made: no hypervisor has room for lab3-computes-1" in str(e.value)
    assert "a: 0 MiB" in str(e.value)
    assert not Machine.objects.exists() and not Lab.objects.exists()


def test_the_whole_lab_is_quota_checked_at_once(owner, template, host):
    hv("a")
    Quota.objects.create(user=owner, machines=4)
    with pytest.raises(ValidationError) as e:
        services.lab_instantiate(template=template, actor=owner, name="lab4")
    assert "Nothing was made: the lab (5 machines" in str(e.value) and "5 machines of 4 allowed" in str(e.value)
    assert not Machine.objects.exists() and not Lab.objects.exists()
    assert services.lab_instantiate(template=template, actor=owner, name="lab4", counts={"computes": 1})


def test_names_taken_and_bad_requests_are_refused_before_anything_is_made(owner, template, host):
    hv("a")
    services.lab_instantiate(template=template, actor=owner, name="lab5", counts={"computes": 0})
    with pytest.raises(ValidationError, match="already a lab lab5"):
        services.lab_instantiate(template=template, actor=owner, name="lab5")
    with pytest.raises(ValidationError, match="already have machines named lab5-controllers-0"):
        services.lab_instantiate(
            template=template, actor=owner, name="lab6", patterns={"controllers": "lab5-controllers-{n}"}
        )
    with pytest.raises(ValidationError, match="Placement is"):
        services.lab_instantiate(template=template, actor=owner, name="lab7", placement="random")
    with pytest.raises(ValidationError, match="host name"):
        services.lab_instantiate(template=template, actor=owner, name="Bad_Name")
    assert Lab.objects.count() == 1 and Machine.objects.count() == 3


def test_power_and_delete_act_on_each_machine_through_the_machine_services(
    owner, template, host, django_capture_on_commit_callbacks
):
    hv("a")
    with django_capture_on_commit_callbacks(execute=True):
        lab = services.lab_instantiate(template=template, actor=owner, name="lab8", counts={"computes": 0})
    assert set(Machine.objects.values_list("status", flat=True)) == {"active"}
    with django_capture_on_commit_callbacks(execute=True):
        result = services.lab_power(lab=lab, action="start", actor=owner)
    assert sorted(result.done) == ["lab8-controllers-0", "lab8-controllers-1", "lab8-controllers-2"]
    assert set(Machine.objects.values_list("power_state", flat=True)) == {"running"}
    assert AuditEvent.objects.filter(action="machine.power").count() == 3  # each machine, audited
    Machine.objects.filter(name="lab8-controllers-1").update(deletion_protection=True)
    with pytest.raises(services.LabError, match="protected from deletion: lab8-controllers-1"):
        services.lab_delete(lab=lab, actor=owner)
    assert Machine.objects.count() == 3 and not Machine.objects.filter(status="deleting").exists()  # nothing touched
    Machine.objects.update(deletion_protection=False)
    with django_capture_on_commit_callbacks(execute=True):
        names = services.lab_delete(lab=lab, actor=owner)
    assert len(names) == 3 and not Machine.objects.exists() and not Lab.objects.exists()
    assert host.domains == {}


def test_project_members_act_on_a_lab_by_their_role(template, host, django_capture_on_commit_callbacks):
    hv("a")
    project = ProjectFactory(name="team")
    roles = {r: UserFactory(username=f"p-{r}") for r in ("viewer", "operator", "admin")}
    for role, user in roles.items():
        Membership.objects.create(project=project, user=user, role=role)
    stranger = UserFactory(username="stranger")
    with django_capture_on_commit_callbacks(execute=True):
        lab = services.lab_instantiate(
            template=template,
            actor=roles["admin"],
            name="shared",
            project=project,
            counts={"computes": 0, "controllers": 1},
        )
    assert set(services.labs_for(roles["viewer"])) == {lab} and not services.labs_for(stranger).exists()
    assert (
        services.lab_machines(lab, stranger).count() == 0 and services.lab_machines(lab, roles["viewer"]).count() == 1
    )
    with pytest.raises(PermissionDenied):
        services.lab_power(lab=lab, action="start", actor=roles["viewer"])
    with django_capture_on_commit_callbacks(execute=True):
        assert services.lab_power(lab=lab, action="start", actor=roles["operator"]).done == ["shared-controllers-0"]
    with pytest.raises(PermissionDenied):
        services.lab_delete(lab=lab, actor=roles["operator"])
    # Only an admin of the project makes labs in it.
    with pytest.raises(ValidationError, match="not an admin of project team"):
        services.lab_instantiate(template=template, actor=roles["operator"], name="other", project=project)


def test_instackenv_of_a_lab_holds_its_network_boot_machines_and_is_audited(owner, template, host):
    hv("a")
    lab = services.lab_instantiate(
        template=template, actor=owner, name="lab9", counts={"computes": 0, "controllers": 2}
    )
    doc = services.lab_instackenv(lab=lab, user=owner)
    assert sorted(n["name"] for n in doc["nodes"]) == ["lab9-controllers-0", "lab9-controllers-1"]
    assert all(n["pm_password"] and n["pm_user"].startswith("bmc-") for n in doc["nodes"])
    assert AuditEvent.objects.filter(action="machine.bmc_export").count() == 2
    assert services.lab_instackenv(lab=lab, user=UserFactory(username="nobody")) == {"nodes": []}


def test_templates_are_written_by_staff_and_a_projects_admins(owner):
    project = ProjectFactory(name="tp")
    Membership.objects.create(project=project, user=owner, role="admin")
    with pytest.raises(PermissionDenied):
        services.lab_template_save(actor=owner, name="global", spec=spec())  # for everyone: staff only
    mine = services.lab_template_save(actor=owner, name="team", spec=spec(), project=project)
    assert mine.owner == owner
    viewer = UserFactory(username="tv")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    assert list(services.templates_for(viewer)) == [mine]
    with pytest.raises(PermissionDenied):
        services.lab_template_save(actor=viewer, name="team", spec=spec(), project=project, template=mine)
    with pytest.raises(ValidationError) as e:
        services.lab_template_save(actor=owner, name="team2", spec="g: [", project=project)
    assert "spec" in e.value.message_dict and "not valid YAML" in e.value.message_dict["spec"][0]
    with pytest.raises(ValidationError, match="already has a template team"):
        services.lab_template_save(actor=owner, name="team", spec=spec(), project=project)
    assert LabTemplate.objects.count() == 1


def test_hosts_without_the_labs_network_take_none_of_it_and_image_and_iso_groups_are_made(owner, host):
    from tests.factories import ImageFactory

    hv("with-net")
    HypervisorFactory(name="no-net", uri="qemu:///system", arch="x86_64", memory_mib=65536, cpus=32, pools=POOL)
    ImageFactory(name="cloud", ready=True, default_user="cloud")
    ImageFactory(name="installer", iso=True)
    net = settings.PORTAL_TENANT_NETWORK
    text = f"""
provisioned_vms:
  vars:
    vm_networks: {{{net}: {{interface: eth0, address: 10.1.0.5/24, gateway: 10.1.0.1, dns: [10.1.0.1]}}}}
  children:
    apps: {{vars: {{vm_count: 2, vm_image_name: cloud, vm_ram: 512, vm_disk_size: 2}}}}
    installs: {{vars: {{vm_count: 1, vm_bootable_iso: installer, vm_ram: 512, vm_disk_size: 2}}}}
"""
    staff = UserFactory(username="iso-staff", is_staff=True)
    template = services.lab_template_save(actor=staff, name="mixed", spec=text)
    lab = services.lab_instantiate(template=template, actor=owner, name="mix", placement="spread")
    assert {h for _, h in hosts_of(lab)} == {"with-net"}  # spread, but only where the network is
    apps = Machine.objects.filter(lab_membership__group="apps").order_by("name")
    assert [m.deploy_type for m in apps] == ["image", "image"] and apps[0].image.name == "cloud"
    nic = apps[1].nics.get()
    assert (nic.addresses, nic.gateway4, nic.nameservers, nic.dhcp4) == (
        ["10.1.0.6/24"],
        "10.1.0.1",
        ["10.1.0.1"],
        False,
    )
    iso = Machine.objects.get(lab_membership__group="installs")
    assert iso.deploy_type == "iso" and iso.cdroms.get(slot=0).image.name == "installer"
    missing = services.lab_template_save(actor=staff, name="missing", spec=text.replace("cloud", "nowhere"))
    with pytest.raises(ValidationError, match="no disk image nowhere"):
        services.lab_instantiate(template=missing, actor=owner, name="mix2")


def test_a_lab_with_a_busy_machine_is_not_deleted_and_the_message_says_why(owner, template, host):
    hv("a")
    lab = services.lab_instantiate(template=template, actor=owner, name="busy", counts={"computes": 0})
    Machine.objects.filter(name="busy-controllers-0").update(status="active", operation="reboot")
    Machine.objects.filter(name="busy-controllers-1").update(status="active")
    Machine.objects.filter(name="busy-controllers-2").update(status="deleting")
    with pytest.raises(services.LabError) as e:
        services.lab_delete(lab=lab, actor=owner)
    assert "busy-controllers-0: busy (reboot)" in str(e.value) and "busy-controllers-2: it is deleting" in str(e.value)
    assert Machine.objects.filter(status="deleting").count() == 1 and Lab.objects.filter(pk=lab.pk).exists()


def test_a_machine_service_refusal_mid_lab_makes_nothing(owner, template, host, monkeypatch):
    from machines.services import MachineError

    hv("a")
    calls = []

    def refuse_third(**kw):
        calls.append(kw["name"])
        if len(calls) == 3:
            raise MachineError("could not find a free MAC address under the configured prefix")
        return real(**kw)

    real = services.services.machine_create
    monkeypatch.setattr(services.services, "machine_create", refuse_third)
    with pytest.raises(ValidationError, match="Nothing was made: lab10-controllers-2: could not find a free MAC"):
        services.lab_instantiate(template=template, actor=owner, name="lab10")
    assert not Machine.objects.exists() and not Lab.objects.exists()
