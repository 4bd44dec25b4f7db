"""Machines on host bridges carry the host guard (hypervisors.drivers.domxml.host_guard_xml), written from
the bridge's MAC before the domain is defined and before each start."""

import xml.etree.ElementTree as ET

import pytest

from hypervisors.drivers.base import HypervisorFatalError
from hypervisors.drivers.domxml import build_domain_xml
from machines import provisioning
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory
from tests.fakes import FakeDriver, FakeHost

pytestmark = pytest.mark.django_db

BRIDGE = {"name": "br-lab", "type": "bridge", "active": True, "mac": "02:aa:00:00:00:01", "addresses": ["198.51.100.1"]}


def machine_on_bridge(*, staff=False, project=None, interfaces=(BRIDGE,), name="m"):
    hv = HypervisorFactory(name=f"lab-{name}", console_address="127.0.0.1", interfaces=list(interfaces))
    owner = UserFactory(username=f"owner-{name}", is_staff=staff)
    machine = MachineFactory(name=name, owner=owner, hypervisor=hv, deploy_type="network", project=project)
    machine.nics.create(index=0, type="bridge", source="br-lab", mac=f"52:54:00:00:00:{len(name):02x}")
    return machine


def filters(machine):
    spec = provisioning.domain_spec(machine, disks=(), serial_log="")
    return [f.get("filter") for f in ET.fromstring(build_domain_xml(spec)).iter("filterref")]


def test_a_users_bridge_nic_is_guarded_with_the_bridges_mac_and_the_hypervisors_addresses():
    machine = machine_on_bridge()
    assert filters(machine) == ["portal-hostguard-br-lab"]
    host = FakeHost()
    provisioning.ensure_host_guards(machine, FakeDriver("test:///", host))
    xml = host.guards["portal-hostguard-br-lab"]
    assert "02:aa:00:00:00:01" in xml and "198.51.100.1" in xml


def test_a_staff_machine_in_a_project_is_guarded_and_one_of_their_own_is_not():
    in_project = machine_on_bridge(staff=True, project=ProjectFactory(name="team"), name="shared")
    assert filters(in_project) == ["portal-hostguard-br-lab"]
    own = machine_on_bridge(staff=True, name="own")
    assert filters(own) == []
    host = FakeHost()
    provisioning.ensure_host_guards(own, FakeDriver("test:///", host))
    assert host.guards == {}


def test_no_mac_known_means_no_define_and_no_start():
    machine = machine_on_bridge(interfaces=[{**BRIDGE, "mac": ""}])
    host = FakeHost()
    with pytest.raises(HypervisorFatalError, match="br-lab on lab-m: its MAC is not known"):
        provisioning.ensure_host_guards(machine, FakeDriver("test:///", host))
    assert host.guards == {}


def test_local_addresses_are_read_only_for_a_libvirtd_on_this_machine():
    from hypervisors.drivers.libvirt_driver import local_addresses

    assert local_addresses("qemu+ssh://root@192.0.2.7/system") == {}
    assert local_addresses("qemu:///system?socket=/tmp/other/libvirt-sock") == {}  # another namespace's
    assert local_addresses("qemu+tls://hv1/system") == {}
    found = local_addresses("qemu:///system")
    assert "127.0.0.1" in found.get("lo", [])  # read from this machine (ip -j addr)


def test_a_start_gives_a_domain_defined_without_the_guard_its_filter(host):
    from hypervisors.drivers.base import DomainSpec, NicSpec
    from machines import services

    machine = machine_on_bridge(name="legacy")
    # Defined before its bridge NIC carried the guard (e.g. the bridge was published afterwards).
    unguarded = NicSpec(type="bridge", source="br-lab", mac="52:54:00:00:00:06")
    spec = DomainSpec(
        uuid=str(machine.uuid), name="legacy", domain_type="qemu", vcpus=1, memory_mib=64, nics=(unguarded,)
    )
    FakeDriver("test:///", host).define_domain(spec)
    services.machine_power_run(machine.pk, "start")
    assert [n.guard for n in host.domains[str(machine.uuid)]["spec"].nics] == ["portal-hostguard-br-lab"]
    assert "portal-hostguard-br-lab" in host.guards
    assert host.calls.index("define_guard") < host.calls.index("filter_bridge_nics") < host.calls.index("start")
    assert machine.events.filter(step="start", message__contains="host guard added").exists()
    host.calls.clear()
    services.machine_power_run(machine.pk, "start")  # the second time: nothing to add
    assert machine.events.filter(message__contains="host guard added").count() == 1


def test_with_bridge_filters_names_the_filter_on_bridge_nics_only():
    from hypervisors.drivers.domxml import with_bridge_filters

    xml = (
        "<domain><devices><interface type='bridge'><source bridge='br-lab'/></interface>"
        "<interface type='bridge'><source bridge='br-other'/></interface>"
        "<interface type='network'><source network='br-lab'/></interface></devices></domain>"
    )
    changed = ET.fromstring(with_bridge_filters(xml, {"br-lab": "portal-hostguard-br-lab"}))
    refs = [(i.find("source").attrib, i.find("filterref")) for i in changed.iter("interface")]
    assert refs[0][1].attrib == {"filter": "portal-hostguard-br-lab"}
    assert refs[1][1] is None and refs[2][1] is None
    assert with_bridge_filters(ET.tostring(changed, encoding="unicode"), {"br-lab": "portal-hostguard-br-lab"}) is None


def test_the_reconcile_gives_an_old_domain_the_guard_for_whoever_starts_it_next(host):
    from hypervisors.drivers.base import DomainSpec, NicSpec
    from machines import services

    machine = machine_on_bridge(name="old-bmc")
    machine.status = "active"
    machine.save(update_fields=["status"])
    unguarded = NicSpec(type="bridge", source="br-lab", mac="52:54:00:00:00:07")
    FakeDriver("test:///", host).define_domain(
        DomainSpec(
            uuid=str(machine.uuid), name="old-bmc", domain_type="qemu", vcpus=1, memory_mib=64, nics=(unguarded,)
        )
    )
    services.hypervisor_reconcile_run(machine.hypervisor.pk)  # e.g. its BMC or libvirt's autostart starts it next
    assert [n.guard for n in host.domains[str(machine.uuid)]["spec"].nics] == ["portal-hostguard-br-lab"]
    assert machine.events.filter(step="reconcile", message__contains="host guard added").count() == 1
    services.hypervisor_reconcile_run(machine.hypervisor.pk)
    assert machine.events.filter(step="reconcile", message__contains="host guard added").count() == 1


def test_the_host_guard_goes_with_the_last_machine_on_its_bridge():
    first = machine_on_bridge(name="first")
    second = MachineFactory(name="second", owner=first.owner, hypervisor=first.hypervisor, deploy_type="network")
    second.nics.create(index=0, type="bridge", source="br-lab", mac="52:54:00:00:01:01")
    host = FakeHost()
    driver = FakeDriver("test:///", host)
    provisioning.ensure_host_guards(first, driver)
    assert "portal-hostguard-br-lab" not in " ".join(provisioning.deprovision(first, driver))  # second still uses it
    assert "portal-hostguard-br-lab" in host.guards
    first.delete()
    assert "host guard portal-hostguard-br-lab" in provisioning.deprovision(second, driver)
    assert host.guards == {}
