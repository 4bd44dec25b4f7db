"""Network-boot machines driven over IPMI, for real: bmc_server (virtualbmc), ipmitool, libvirtd."""

import socket
import subprocess

import pytest
from rest_framework.test import APIClient

from machines import services
from machines.models import Machine
from portal.models import ApiToken
from tests.conftest import serial_log, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def ipmi(creds: dict, *command: str, password: str | None = None) -> subprocess.CompletedProcess:
    """ipmitool as an operator runs it. The BMC answers "power on" once libvirt has started the domain, which
    on a loaded two-core machine (guards instantiated, QEMU launched) took longer than a 3 s timeout: ipmitool
    then reported a failure for a start that happened. 10 s, as BMC clients such as Ironic allow."""
    argv = [
        "ipmitool",
        "-I",
        "lanplus",
        "-C",
        "3",
        "-H",
        creds["address"],
        "-p",
        str(creds["port"]),
        "-U",
        creds["username"],
        "-P",
        password or creds["password"],
        "-R",
        "1",
        "-N",
        "10",
        *command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def domstate(machine: Machine) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "domstate", str(machine.uuid)], capture_output=True, text=True
    ).stdout.strip()


def udp_port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


@pytest.fixture
def owner_api(worker):
    owner = UserFactory(username="metal", is_staff=True)  # staff: the user-mode NIC (the point is IPMI)
    _, raw = ApiToken.issue(user=owner)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    api.owner = owner
    return api


def create_network_machine(api, name: str) -> Machine:
    r = api.post(
        "/api/v1/machines/",
        {
            "name": name,
            "deploy_type": "network",
            "hypervisor": "local",
            "vcpus": 1,
            "memory_mib": 256,
            "disk_gib": 1,
            "nics": [{"type": "user"}],
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    machine = wait_for(lambda: (m := Machine.objects.get(pk=r.json()["id"])).status in ("active", "error") and m, 60)
    assert machine.status == "active", machine.status_message
    return machine


@pytest.mark.engines
def test_ipmitool_drives_a_network_boot_machine(owner_api, local, bmc_server):
    api = owner_api
    machine = create_network_machine(api, "metal1")
    assert machine.power_state == "off" and domstate(machine) == "shut off"  # defined and left off
    creds = api.get(f"/api/v1/machines/{machine.pk}/bmc/").json()
    assert creds["address"] == "127.0.0.1" and len(creds["password"]) >= 16 and creds["username"] != "admin"
    assert machine.events.filter(message__contains="credentials revealed").exists()
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")

    assert "Chassis Power is off" in ipmi(creds, "power", "status").stdout
    assert ipmi(creds, "power", "status", password="wrong-password-123").returncode != 0

    assert ipmi(creds, "power", "on").returncode == 0
    wait_for(lambda: domstate(machine) == "running", 15)
    assert "Chassis Power is on" in ipmi(creds, "power", "status").stdout

    # PXE first, then a cold start: the next boot is iPXE's.
    assert ipmi(creds, "chassis", "bootdev", "pxe").returncode == 0
    assert ipmi(creds, "power", "off").returncode == 0
    wait_for(lambda: domstate(machine) == "shut off", 15)
    assert ipmi(creds, "power", "on").returncode == 0
    serial_log(machine.pk, "iPXE", timeout=60)
    assert ipmi(creds, "power", "off").returncode == 0
    wait_for(lambda: domstate(machine) == "shut off", 15)

    # The portal's own buttons go through the same BMC and change the real domain.
    services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="start", actor=machine.owner)
    wait_for(lambda: domstate(machine) == "running" and Machine.objects.get(pk=machine.pk).power_state == "running", 30)
    services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=machine.owner)
    wait_for(lambda: domstate(machine) == "shut off" and not Machine.objects.get(pk=machine.pk).operation, 30)
    assert Machine.objects.get(pk=machine.pk).power_state == "off"

    # Two machines never share a port; both are exported for Ironic.
    other = create_network_machine(api, "metal2")
    assert (other.bmc_address, other.bmc_port) != (machine.bmc_address, machine.bmc_port)
    nodes = api.get("/api/v1/machines/instackenv/").json()["nodes"]
    assert {n["name"] for n in nodes} == {"metal1", "metal2"}
    node = next(n for n in nodes if n["name"] == "metal1")
    assert (
        node["pm_type"] == "ipmi"
        and node["pm_port"] == str(machine.bmc_port)
        and node["pm_password"] == creds["password"]
    )
    assert node["mac"] == [machine.nics.get().mac] and node["arch"] == "x86_64"

    # Protection keeps the BMC; deleting the machine closes its port.
    api.post(f"/api/v1/machines/{machine.pk}/protection/", {"deletion_protection": True}, format="json")
    assert api.delete(f"/api/v1/machines/{machine.pk}/").status_code == 409
    assert "Chassis Power" in ipmi(creds, "power", "status").stdout
    api.post(f"/api/v1/machines/{machine.pk}/protection/", {"deletion_protection": False}, format="json")
    assert api.delete(f"/api/v1/machines/{machine.pk}/").status_code == 202
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    wait_for(lambda: udp_port_free(creds["address"], creds["port"]), 15, message="the BMC port stayed open")
    assert ipmi(creds, "power", "status").returncode != 0
    # The other machine's BMC was not disturbed.
    other_creds = api.get(f"/api/v1/machines/{other.pk}/bmc/").json()
    assert "Chassis Power is off" in ipmi(other_creds, "power", "status").stdout


def test_a_host_device_lands_in_the_defined_domain(owner_api, local, bmc_server):
    """Passthrough is defined, never started here (no real device may be taken from this host)."""
    # The owner is staff (for its user-mode NIC); PORTAL_HOST_DEVICES_FOR=everyone for other users is
    # tests/machines/test_hardware.py::test_host_devices_are_for_staff_unless_everyone_may.
    device = next(d for d in local.devices if d["type"] == "pci")
    machine = services.machine_create(
        owner=owner_api.owner,
        hypervisor=local,
        name="passthru",
        deploy_type="network",
        nics=[services.NicInput(type="user")],
        hostdevs=[device["name"]],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 60)
    assert machine.status == "active" and domstate(machine) == "shut off"
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", str(machine.uuid)], capture_output=True, text=True
    ).stdout
    assert "<hostdev mode='subsystem' type='pci' managed='yes'>" in xml
    assert f"bus='0x{device['bus']:02x}' slot='0x{device['slot']:02x}'" in xml
    with pytest.raises(Exception, match="already given to another machine"):
        services.machine_create(
            owner=owner_api.owner,
            hypervisor=local,
            name="passthru2",
            deploy_type="network",
            nics=[services.NicInput(type="user")],
            hostdevs=[device["name"]],
        )


def boot_order(machine: Machine) -> list[str]:
    """The <os><boot dev> list of the domain's persistent config, as libvirt has it."""
    import xml.etree.ElementTree as ET

    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", str(machine.uuid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [b.get("dev", "") for b in ET.fromstring(xml).findall("os/boot")]


def test_the_boot_device_action_reaches_the_domain_through_its_bmc(owner_api, local, bmc_server):
    """The portal's boot-device action (tested on the fake in the unit layer) goes through the machine's own
    BMC, as an outside tool's would, and changes the real domain's boot order."""
    api = owner_api
    machine = create_network_machine(api, "metal3")
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")
    assert boot_order(machine) == ["network", "hd"]
    for device, expected in (("disk", "hd"), ("pxe", "network")):
        r = api.post(
            f"/api/v1/machines/{machine.pk}/boot-device/", {"device": device, "persistent": True}, format="json"
        )
        assert r.status_code == 202, r.content
        wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30, message="the action never finished")
        assert machine.events.filter(step="bmc", message__startswith=f"boot device {device} (persistent)").exists()
        assert boot_order(machine)[0] == expected
    assert domstate(machine) == "shut off"  # it takes effect at the next cold start; nothing was started
