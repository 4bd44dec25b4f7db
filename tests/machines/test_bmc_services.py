import socket

import pytest
from django.core.exceptions import ValidationError

from hypervisors.drivers.base import PowerState
from machines import crypto, services
from machines.models import Machine
from tests.factories import HypervisorFactory, UserFactory, tenant_network_entry, tenant_nic
from tests.fakes import FakeBmc

pytestmark = pytest.mark.django_db


@pytest.fixture
def hv(db):
    return HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        arch="x86_64",
        networks=[tenant_network_entry()],  # the NIC a plain owner may use (not user-mode)
        pools=[
            {
                "name": "default",
                "active": True,
                "capacity_bytes": 1 << 40,
                "allocation_bytes": 0,
                "available_bytes": 1 << 40,
            }
        ],
    )


def create(django_capture_on_commit_callbacks, hv, name="metal", **kw) -> Machine:
    with django_capture_on_commit_callbacks(execute=True):
        machine = services.machine_create(
            owner=UserFactory(username=f"o-{name}"),
            hypervisor=hv,
            name=name,
            deploy_type="network",
            nics=[tenant_nic()],
            **kw,
        )
    machine.refresh_from_db()
    return machine


def test_a_network_machine_is_defined_off_with_its_own_bmc(django_capture_on_commit_callbacks, host, hv, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17230-17239"
    machine = create(django_capture_on_commit_callbacks, hv)
    assert machine.status == "active" and machine.power_state == "off"
    spec = host.domains[str(machine.uuid)]["spec"]
    assert spec.boot_devices == ("network", "hd") and spec.bios_serial
    assert machine.bmc_address == "127.0.0.1" and 17230 <= machine.bmc_port <= 17239
    password = crypto.decrypt(machine.bmc_password_encrypted)
    assert len(password) == 20 and password not in machine.bmc_password_encrypted
    assert machine.bmc_username.startswith("bmc-") and machine.bmc_username != "admin"


def test_ports_are_unique_and_skip_ports_in_use(django_capture_on_commit_callbacks, host, hv, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17240-17242"
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 17240))
    try:
        a = create(django_capture_on_commit_callbacks, hv, "m1")
        b = create(django_capture_on_commit_callbacks, hv, "m2")
        assert (a.bmc_port, b.bmc_port) == (17241, 17242)
        with pytest.raises(ValidationError, match="No free BMC port"):
            create(django_capture_on_commit_callbacks, hv, "m3")
    finally:
        busy.close()


def test_network_machines_take_no_image_and_need_a_nic(host, hv, db):
    owner = UserFactory(username="n")
    with pytest.raises(ValidationError, match="at least one NIC"):
        # nics=[]: no NIC at all (left out, the machine would get the default NIC, the tenant network here)
        services.machine_create(owner=owner, hypervisor=hv, name="x", deploy_type="network", nics=[])
    with pytest.raises(ValidationError, match="gets its OS from the network"):
        services.machine_create(
            owner=owner, hypervisor=hv, name="x", deploy_type="network", script="echo", nics=[tenant_nic()]
        )


def test_power_on_after_create_when_asked(django_capture_on_commit_callbacks, host, hv, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17250-17259"
    machine = create(django_capture_on_commit_callbacks, hv, power_on=True)
    assert machine.power_state == "running"


def test_power_and_the_boot_device_go_through_the_machines_own_bmc(
    django_capture_on_commit_callbacks, host, hv, settings
):
    """As an outside tool would: IPMI to the machine's BMC (FakeBmc here, on the same domains; the real client is
    held to the same by tests/machines/test_bmc_contract.py)."""
    settings.PORTAL_BMC_PORT_RANGE = "17240-17249"
    machine = create(django_capture_on_commit_callbacks, hv)
    bmc = FakeBmc(host)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_set_boot_device(machine=machine, device="disk", persistent=True, actor=machine.owner)
    assert bmc.boot_device(services.bmc_target(machine)) == "disk"
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="start", actor=machine.owner)
    machine.refresh_from_db()
    assert host.domains[str(machine.uuid)]["state"] == PowerState.RUNNING
    assert machine.power_state == "running" and machine.operation == ""
    assert machine.events.filter(message__contains="through the BMC done; power is on").exists()


def test_reveal_is_recorded_and_instackenv_lists_the_nodes(django_capture_on_commit_callbacks, host, hv, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17260-17269"
    machine = create(django_capture_on_commit_callbacks, hv)
    creds = services.machine_bmc_reveal(machine=machine, actor=machine.owner)
    assert creds["port"] == machine.bmc_port and machine.events.filter(message__contains="revealed to o-metal").exists()
    node = services.instackenv([machine], user=machine.owner)["nodes"][0]
    assert node == {
        "name": "metal",
        "pm_type": "ipmi",
        "pm_addr": "127.0.0.1",
        "pm_port": str(machine.bmc_port),
        "pm_user": machine.bmc_username,
        "pm_password": creds["password"],
        "mac": [machine.nics.get().mac],
        "cpu": "1",
        "memory": "1024",
        "disk": "10",
        "arch": "x86_64",
    }


def test_secrets_do_not_survive_a_new_secret_key(settings):
    token = crypto.encrypt("s3cret")
    assert crypto.decrypt(token) == "s3cret"
    settings.SECRET_KEY = "another"
    with pytest.raises(ValueError, match="SECRET_KEY changed"):
        crypto.decrypt(token)
