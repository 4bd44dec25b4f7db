import xml.etree.ElementTree as ET

import pytest
from django.core.exceptions import ValidationError

from hypervisors import networks
from hypervisors.networks import NetworkSpec, validate
from tests.factories import HypervisorFactory, MachineFactory

pytestmark = pytest.mark.django_db


def parse(spec: NetworkSpec) -> ET.Element:
    return ET.fromstring(spec.xml())


def test_isolated_pxe_network():
    root = parse(
        NetworkSpec(
            name="pxe",
            mode="isolated",
            bridge="virbr-pxe",
            cidr="192.168.77.1/24",
            dhcp_start="192.168.77.100",
            dhcp_end="192.168.77.200",
            tftp_root="/srv/tftp",
            boot_file="boot.ipxe",
            ipv6_cidr="fd77::1/64",
        )
    )
    assert root.find("forward") is None
    assert root.find("bridge").get("name") == "virbr-pxe"
    ip = root.find("ip[@address='192.168.77.1']")
    assert ip.get("prefix") == "24" and ip.find("tftp").get("root") == "/srv/tftp"
    assert ip.find("dhcp/range").attrib == {"start": "192.168.77.100", "end": "192.168.77.200"}
    assert ip.find("dhcp/bootp").get("file") == "boot.ipxe"
    assert root.find("ip[@family='ipv6']").attrib == {"family": "ipv6", "address": "fd77::1", "prefix": "64"}


def test_nat_bridge_and_macvtap():
    assert parse(NetworkSpec(name="n", mode="nat", cidr="10.9.0.1/24")).find("forward").get("mode") == "nat"
    bridged = parse(NetworkSpec(name="b", mode="bridge", bridge="br0"))
    assert bridged.find("forward").get("mode") == "bridge" and bridged.find("bridge").get("name") == "br0"
    direct = parse(NetworkSpec(name="m", mode="macvtap", interface="eno1"))
    assert direct.find("forward/interface").get("dev") == "eno1"


def test_names_cannot_inject_xml():
    root = parse(NetworkSpec(name="a<b>&c", mode="isolated"))
    assert root.findtext("name") == "a<b>&c"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (NetworkSpec(name="bad name", mode="isolated"), "name"),
        (NetworkSpec(name="n", mode="teleport"), "mode"),
        (NetworkSpec(name="n", mode="bridge"), "bridge"),
        (NetworkSpec(name="n", mode="macvtap", interface="an-interface-name-too-long"), "interface"),
        (NetworkSpec(name="n", mode="nat", cidr="192.168.77.0/24"), "cidr"),
        (
            NetworkSpec(
                name="n", mode="nat", cidr="192.168.77.1/24", dhcp_start="192.168.78.2", dhcp_end="192.168.78.9"
            ),
            "dhcp_end",
        ),
        (NetworkSpec(name="n", mode="nat", cidr="192.168.77.1/24", dhcp_start="192.168.77.2"), "dhcp_end"),
        (NetworkSpec(name="n", mode="nat", cidr="192.168.77.1/24", tftp_root="srv/tftp"), "tftp_root"),
        (NetworkSpec(name="n", mode="nat", cidr="192.168.77.1/24", boot_file="boot.ipxe"), "boot_file"),
        (NetworkSpec(name="n", mode="nat", dhcp_start="1.2.3.4", dhcp_end="1.2.3.5"), "cidr"),
        (NetworkSpec(name="default", mode="nat"), "name"),
    ],
)
def test_bad_networks_are_refused_per_field(spec, field):
    hv = HypervisorFactory(name="lab", networks=[{"name": "default"}])
    with pytest.raises(ValidationError) as e:
        validate(spec, hv)
    assert field in e.value.message_dict


# --- The tenant network and the traffic filter (guard) that keeps guests away from their hypervisor. ---


def guard_rules(xml: str) -> list[tuple[str, str, dict]]:
    """(action, protocol, match) in the order libvirt applies them (by priority)."""
    root = ET.fromstring(xml)
    rules = sorted(root.findall("rule"), key=lambda r: int(r.get("priority")))
    assert all(r.get("direction") == "out" for r in rules)  # traffic from the guest
    return [
        (
            r.get("action"),
            r[0].tag,
            {**r[0].attrib, **({"statematch": r.get("statematch")} if r.get("statematch") else {})},
        )
        for r in rules
    ]


def test_tenant_spec_is_an_isolated_network_with_dhcp_named_by_the_settings(settings):
    settings.PORTAL_TENANT_NETWORK = "tenants"
    spec = networks.spec_from({"name": "ignored", "mode": "tenant", "cidr": "", "dhcp_start": "", "dhcp_end": ""})
    assert (spec.name, spec.mode, spec.cidr) == ("tenants", "tenant", networks.TENANT_CIDR)
    root = parse(spec)
    assert root.findtext("name") == "tenants" and root.find("forward") is None  # isolated: nothing is routed
    assert root.find("ip").get("address") == "192.168.213.1" and root.find("ip/dhcp/range") is not None
    # Tenants share it, so their guests never reach one another: only the bridge (DHCP, DNS) answers them.
    assert root.find("port").attrib == {"isolated": "yes"}
    assert parse(NetworkSpec(name="lab", mode="isolated", cidr="10.1.0.1/24")).find("port") is None
    validate(spec, HypervisorFactory(name="lab"))


def test_tenant_network_refuses_another_name_tftp_and_ipv6():
    hv = HypervisorFactory(name="lab")
    with pytest.raises(ValidationError) as e:
        validate(
            NetworkSpec(name="mine", mode="tenant", cidr="10.1.0.1/24", dhcp_start="10.1.0.5", dhcp_end="10.1.0.9"), hv
        )
    assert "name" in e.value.message_dict
    with pytest.raises(ValidationError) as e:
        validate(networks.tenant_spec(tftp_root="/srv/tftp"), hv)
    assert "mode" in e.value.message_dict
    with pytest.raises(ValidationError, match="must be the guarded one"):  # everyone may use a network of that name
        validate(NetworkSpec(name="portal-tenants", mode="nat", cidr="10.1.0.1/24"), hv)


def test_guard_of_an_isolated_network_lets_the_guest_reach_its_subnet_dhcp_and_dns_only():
    rules = guard_rules(networks.tenant_spec().guard())
    assert rules[0] == ("accept", "udp", {"srcportstart": "68", "dstportstart": "67"})
    assert ("accept", "udp", {"dstipaddr": "192.168.213.1", "dstportstart": "53"}) in rules[:3]
    assert ("accept", "tcp", {"dstipaddr": "192.168.213.1", "dstportstart": "53"}) in rules[:3]
    # Replies to what the hypervisor began, and nothing else addressed to it, before the subnet is let through.
    assert rules[3] == ("accept", "all", {"dstipaddr": "192.168.213.1", "state": "ESTABLISHED,RELATED"})
    drops_first = rules[4:8]
    assert ("drop", "all", {"dstipaddr": "192.168.213.1"}) in drops_first
    assert ("drop", "all", {"dstipaddr": "192.168.213.255"}) in drops_first  # the broadcast reaches the host too
    assert ("drop", "all", {"dstipaddr": "192.168.213.0"}) in rules  # and the network address, on some kernels
    assert rules[-3:] == [
        ("accept", "all", {"dstipaddr": "192.168.213.0", "dstipmask": "24"}),
        ("drop", "all", {}),
        ("drop", "all-ipv6", {}),
    ]


def test_guard_of_a_nat_network_drops_private_ranges_and_the_hypervisors_addresses():
    spec = NetworkSpec(name="out", mode="nat", cidr="10.9.0.1/24", dhcp_start="10.9.0.5", dhcp_end="10.9.0.50")
    rules = guard_rules(spec.guard(host_addresses=("198.51.100.7",)))
    subnet = rules.index(("accept", "all", {"dstipaddr": "10.9.0.0", "dstipmask": "24"}))
    assert rules.index(("drop", "all", {"dstipaddr": "198.51.100.7"})) < subnet
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"):
        address, mask = cidr.split("/")
        assert rules.index(("drop", "all", {"dstipaddr": address, "dstipmask": mask})) > subnet
    assert rules[-2:] == [("accept", "all", {}), ("drop", "all-ipv6", {})]  # the internet, through NAT


def test_host_bridges_and_macvtap_get_no_guard():
    assert NetworkSpec(name="b", mode="bridge", bridge="br0").guard() == ""
    assert NetworkSpec(name="m", mode="macvtap", interface="eno1").guard() == ""
    assert NetworkSpec(name="i", mode="isolated").guard() == ""  # no address of the host on it


class RecordingDriver:
    def __init__(self, calls):
        self.calls = calls

    def define_guard(self, xml):
        self.calls.append(("guard", ET.fromstring(xml).get("name")))

    def define_network(self, xml):
        self.calls.append(("network", ET.fromstring(xml).findtext("name")))


def test_the_guard_is_defined_before_its_network(monkeypatch):
    calls = []
    monkeypatch.setattr(networks, "get_driver", lambda uri: RecordingDriver(calls))
    monkeypatch.setattr("hypervisors.services.hypervisor_sync", lambda pk: None)
    hv = HypervisorFactory(name="lab", console_address="192.0.2.9")
    assert networks.network_create_run(hv.pk, networks.tenant_spec().__dict__) == "defined"
    assert calls == [("guard", "portal-guard-portal-tenants"), ("network", "portal-tenants")]
    assert networks.host_addresses(hv) == ("192.0.2.9",)


def test_the_hypervisors_own_addresses_are_the_console_the_uri_and_what_its_interfaces_have():
    hv = HypervisorFactory(
        name="lab",
        uri="qemu+ssh://root@192.0.2.7/system",
        console_address="127.0.0.1",
        interfaces=[
            {"name": "eth0", "addresses": ["203.0.113.5", "192.0.2.7"]},
            {"name": "lo", "addresses": ["127.0.0.1"]},
            {"name": "br0"},
        ],
    )
    assert networks.host_addresses(hv) == ("192.0.2.7", "203.0.113.5")  # no loopback, each once
    hv.interfaces[0]["addresses"] += ["2001:db8::5", "fe80::1"]
    hv.interfaces[1]["addresses"] += ["::1"]
    assert networks.host_addresses(hv, version=6) == ("2001:db8::5", "fe80::1")


def test_the_host_guard_keeps_the_guest_off_the_hypervisors_ipv6_addresses_too():
    from hypervisors.drivers.domxml import host_guard_xml

    rules = guard_rules(host_guard_xml(bridge="br0", host_mac="02:aa:bb:cc:dd:01", host_addresses6=("2001:db8::5",)))
    v6 = [r for r in rules if r[1] == "all-ipv6"]
    assert v6 == [
        ("drop", "all-ipv6", {"srcipaddr": "2001:db8::5"}),
        ("accept", "all-ipv6", {"dstipaddr": "2001:db8::5", "state": "ESTABLISHED,RELATED"}),
        ("drop", "all-ipv6", {"dstipaddr": "2001:db8::5"}),
    ]


def test_nics_on_the_tenant_network_always_carry_its_guard():
    from machines.provisioning import nic_guard

    hv = HypervisorFactory(name="lab", networks=[{"name": "pxe", "guard": "portal-guard-pxe"}, {"name": "default"}])
    assert nic_guard(hv, "network", "portal-tenants") == "portal-guard-portal-tenants"  # even before a sync saw it
    assert nic_guard(hv, "network", "pxe") == "portal-guard-pxe"
    assert nic_guard(hv, "network", "default") == ""  # a network the portal did not make
    assert nic_guard(hv, "bridge", "portal-tenants") == ""  # a staff machine's bridge NIC
    assert nic_guard(hv, "bridge", "br0", host_guard=True) == "portal-hostguard-br0"
    assert nic_guard(hv, "direct", "eth0", host_guard=True) == ""  # macvtap: libvirt filters no direct NIC


def test_the_host_guard_of_a_bridge_keeps_the_guest_off_the_hypervisor_only():
    from hypervisors.drivers.domxml import host_guard_xml

    mac = "02:aa:bb:cc:dd:01"
    rules = guard_rules(host_guard_xml(bridge="br0", host_mac=mac, host_addresses=("203.0.113.5",)))
    dhcp = ("accept", "ip", {"protocol": "udp", "srcportstart": "68", "dstportstart": "67"})
    arp = ("accept", "mac", {"dstmacaddr": mac, "protocolid": "arp"})
    to_own = ("accept", "ip", {"dstmacaddr": mac, "dstipaddr": "203.0.113.5"})  # judged by state below
    to_host = ("drop", "mac", {"dstmacaddr": mac})  # every other frame for the hypervisor itself
    broadcast = ("drop", "ip", {"dstmacaddr": "ff:ff:ff:ff:ff:ff"})
    assert rules.index(dhcp) < rules.index(to_host) < rules.index(broadcast)  # DHCP's server may be the hypervisor
    assert rules.index(arp) < rules.index(to_host) and rules.index(to_own) < rules.index(to_host)
    # To its addresses (on the bridge, or behind the LAN's router): replies to what the hypervisor began, only.
    replies = ("accept", "all", {"dstipaddr": "203.0.113.5", "state": "ESTABLISHED,RELATED"})
    renewals = ("accept", "udp", {"dstipaddr": "203.0.113.5", "srcportstart": "68", "dstportstart": "67"})
    assert rules.index(renewals) + 1 == rules.index(replies)
    assert rules.index(replies) + 1 == rules.index(("drop", "all", {"dstipaddr": "203.0.113.5"}))
    # No forged flow makes a "reply": the guest never sends as the hypervisor, in IP or ARP, nor tags a VLAN.
    first_accept = next(i for i, r in enumerate(rules) if r[0] == "accept")
    for spoof in (
        ("drop", "all", {"srcipaddr": "203.0.113.5"}),
        ("drop", "arp", {"arpsrcipaddr": "203.0.113.5"}),
        ("drop", "mac", {"protocolid": "0x8100"}),
        ("drop", "mac", {"protocolid": "0x88a8"}),
    ):
        assert rules.index(spoof) < first_accept, spoof
    assert rules[0] == ("drop", "mac", {"match": "no", "srcmacaddr": "$MAC"})  # its own MAC only, first
    # IPv6 and the all-hosts groups in group frames; each family in the other's multicast frames.
    for dropped in (
        ("drop", "ipv6", {"dstmacaddr": "ff:ff:ff:ff:ff:ff"}),
        ("drop", "ip", {"dstipaddr": "224.0.0.1"}),
        ("drop", "ipv6", {"dstipaddr": "ff02::1"}),
    ):
        assert dropped in rules, dropped
    # A multicast frame passes only with a multicast address in it, for IPv4 and IPv6.
    v4 = {"dstmacaddr": "01:00:5e:00:00:00", "dstmacmask": "ff:ff:ff:80:00:00"}
    v6 = {"dstmacaddr": "33:33:00:00:00:00", "dstmacmask": "ff:ff:00:00:00:00"}
    assert rules.index(("accept", "ip", {**v4, "dstipaddr": "224.0.0.0", "dstipmask": "4"})) + 1 == rules.index(
        ("drop", "ip", v4)
    )
    assert ("drop", "ip", v6) in rules and ("drop", "ipv6", v4) in rules
    assert rules.index(("accept", "ipv6", {**v6, "dstipaddr": "ff00::", "dstipmask": "8"})) + 1 == rules.index(
        ("drop", "ipv6", v6)
    )
    # A bridge without a port of its own takes a guest's tap MAC (fe:...): those are the hypervisor's too.
    taps = {"dstmacaddr": "fe:00:00:00:00:00", "dstmacmask": "ff:00:00:00:00:00"}
    assert rules.index(("drop", "mac", taps)) < rules.index(broadcast)
    assert rules.index(("accept", "ip", {**taps, "dstipaddr": "203.0.113.5"})) < rules.index(("drop", "mac", taps))
    # Addresses unknown (a remote hypervisor): nothing but DHCP and ARP reaches its MAC.
    strict = guard_rules(host_guard_xml(bridge="br0", host_mac=mac))
    assert [r for r in strict if r[2].get("dstmacaddr") in (mac, taps["dstmacaddr"]) and r[0] == "accept"] == [
        arp,
        ("accept", "mac", {**taps, "protocolid": "arp"}),
    ]


def test_the_guard_of_a_pxe_network_lets_tftp_through():
    spec = NetworkSpec(
        name="pxe",
        mode="isolated",
        cidr="192.168.77.1/24",
        dhcp_start="192.168.77.100",
        dhcp_end="192.168.77.200",
        tftp_root="/srv/tftp",
        boot_file="boot.ipxe",
    )
    rules = guard_rules(spec.guard())
    tftp = [
        ("accept", "udp", {"dstipaddr": "192.168.77.1", "dstportstart": "69"}),
        # transfer ports: only flows dnsmasq began (replies), never one the guest starts
        (
            "accept",
            "udp",
            {"dstipaddr": "192.168.77.1", "dstportstart": "32768", "dstportend": "60999", "state": "ESTABLISHED"},
        ),
    ]
    assert all(rules.index(r) < rules.index(("drop", "all", {"dstipaddr": "192.168.77.1"})) for r in tftp)
    assert not set(map(str, tftp)) & set(map(str, guard_rules(networks.tenant_spec().guard())))  # only PXE networks


def test_a_network_portal_machines_use_is_not_removed(monkeypatch, django_capture_on_commit_callbacks):
    from tests.factories import UserFactory

    removed = []
    monkeypatch.setattr("hypervisors.networks.network_delete_run", lambda pk, name: removed.append(name))
    hv = HypervisorFactory(name="lab", networks=[{"name": "pxe"}, {"name": "spare"}])
    machine = MachineFactory(name="m", owner=UserFactory(username="o"), hypervisor=hv, deploy_type="network")
    machine.nics.create(index=0, type="network", source="pxe", mac="52:54:00:00:00:42")
    with pytest.raises(ValidationError, match="Machines on lab still use network pxe"):
        networks.network_delete(hypervisor=hv, name="pxe")
    with django_capture_on_commit_callbacks(execute=True):
        networks.network_delete(hypervisor=hv, name="spare")  # (the machines app's check, registered at start-up)
    assert removed == ["spare"]
