import xml.etree.ElementTree as ET

import pytest
from django.core.exceptions import ValidationError

from hypervisors.networks import NetworkSpec, validate
from tests.factories import HypervisorFactory

pytestmark = pytest.mark.django_db


def parse(spec: NetworkSpec) -> ET.Element:
    return ET.fromstring(spec.xml())


def test_isolated_pxe_network():
    root = parse(NetworkSpec(name="pxe", mode="isolated", bridge="virbr-pxe", cidr="192.168.77.1/24",
                             dhcp_start="192.168.77.100", dhcp_end="192.168.77.200", tftp_root="/srv/tftp",
                             boot_file="boot.ipxe", ipv6_cidr="fd77::1/64"))  # fmt: skip
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
        (NetworkSpec(name="n", mode="nat", cidr="192.168.77.1/24", dhcp_start="192.168.78.2", dhcp_end="192.168.78.9"), "dhcp_end"),
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
