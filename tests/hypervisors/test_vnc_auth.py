"""Every domain's VNC server asks for a password that only the console proxy can answer: the XML the portal
writes, and the driver's protect/rotate calls against libvirt's test driver (the QEMU side is in
tests/integration/test_console_auth.py)."""

import xml.etree.ElementTree as ET

import pytest

from hypervisors.drivers.base import DomainSpec
from hypervisors.drivers.connections import drop_connection
from hypervisors.drivers.domxml import VNC_EXPIRED_AT, build_domain_xml, vnc_protected, with_vnc_password
from hypervisors.drivers.libvirt_driver import LibvirtDriver

UUID = "7e0d5b4a-3c2f-4e1d-9a8b-6c5d4e3f2a10"


def spec(**kw) -> DomainSpec:
    return DomainSpec(**{"uuid": UUID, "name": "vnc-auth", "domain_type": "test", "vcpus": 1, "memory_mib": 128, **kw})


def graphics(xml: str) -> ET.Element:
    return ET.fromstring(xml).find("devices/graphics[@type='vnc']")


def test_every_domain_gets_a_random_vnc_password_expired_from_the_start():
    first, second = graphics(build_domain_xml(spec())), graphics(build_domain_xml(spec()))
    assert len(first.get("passwd")) == 8 and first.get("passwd").isalnum()
    assert first.get("passwd") != second.get("passwd")
    assert first.get("passwdValidTo") == VNC_EXPIRED_AT == "2000-01-01T00:00:00"  # only the proxy's own ever works
    assert graphics(build_domain_xml(spec(vnc_password="chosen12"))).get("passwd") == "chosen12"


def test_vnc_protected_needs_a_password_in_the_secure_xml():
    assert vnc_protected("<domain><devices><graphics type='vnc' port='5900' passwd='x'/></devices></domain>")
    assert not vnc_protected("<domain><devices><graphics type='vnc' port='5900'/></devices></domain>")
    assert vnc_protected("<domain><devices/></domain>")  # no VNC at all: nothing to protect


def test_the_password_element_for_updates_and_redefines():
    xml = "<domain><name>a</name><devices><graphics type='vnc' port='5901' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics></devices></domain>"
    element = ET.fromstring(with_vnc_password(xml, "abcdefgh", "2026-12-01T20:00:05"))
    assert element.tag == "graphics" and element.get("port") == "5901" and element.find("listen") is not None
    assert (element.get("passwd"), element.get("passwdValidTo")) == ("abcdefgh", "2026-12-01T20:00:05")
    whole = ET.fromstring(with_vnc_password(xml, "abcdefgh", VNC_EXPIRED_AT, whole=True))
    assert (
        whole.tag == "domain"
        and whole.findtext("name") == "a"
        and whole.find("devices/graphics").get("passwd") == "abcdefgh"
    )
    assert with_vnc_password("<domain><devices/></domain>", "abcdefgh", VNC_EXPIRED_AT) is None


LEGACY = f"""<domain type='test'><name>legacy</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='i686'>hvm</type></os><devices><graphics type='vnc' port='-1' autoport='yes'/></devices></domain>"""


@pytest.fixture
def driver(tmp_path):
    """A test-driver host of this test's own (test://<file>): test:///default's state lives as long as any
    connection to it, anywhere in the process, and other suites' tests keep some."""
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>"
        "<memory>2097152</memory></node>"
    )
    d = LibvirtDriver(f"test://{node}")
    yield d
    drop_connection(d.uri)


def test_a_domain_defined_without_a_password_gets_one_at_its_next_cold_start(driver):
    driver.conn.defineXML(LEGACY)  # as the portal defined domains before
    assert not vnc_protected(driver.domain_xml(UUID, inactive=True, secure=True))
    driver.start(UUID)
    assert UUID not in driver.vnc_unprotected()  # it started with the password
    persistent = graphics(driver.domain_xml(UUID, inactive=True, secure=True))
    assert len(persistent.get("passwd")) == 8 and persistent.get("passwdValidTo") == VNC_EXPIRED_AT
    assert driver.vnc_protect(UUID) is False  # once is enough


def test_a_running_domain_without_a_password_is_reported(driver):
    driver.conn.createXML(LEGACY, 0)  # running, as it started before the portal set passwords
    assert driver.vnc_unprotected() == {UUID}


def test_vnc_protect_is_a_no_op_for_a_portal_domain(driver):
    driver.define_domain(spec())
    before = graphics(driver.domain_xml(UUID, inactive=True, secure=True)).get("passwd")
    assert driver.vnc_protect(UUID) is False
    assert graphics(driver.domain_xml(UUID, inactive=True, secure=True)).get("passwd") == before
    assert UUID not in driver.vnc_unprotected()
