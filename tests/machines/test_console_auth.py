"""Machines defined before the portal set VNC passwords: the reconcile reports them, the machine page warns,
a cold start or `manage.py console_auth_upgrade` fixes them (with the fake driver; the libvirt side is in
tests/hypervisors/test_vnc_auth.py and tests/integration/test_console_auth.py)."""

import logging
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from hypervisors.drivers.base import PowerState
from machines import services
from machines.models import Machine
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def hv(db):
    return HypervisorFactory(name="lab", uri="qemu:///system")


def machine_with_domain(host, hv, name, *, running: bool, legacy: bool) -> Machine:
    machine = MachineFactory(
        name=name, owner=UserFactory(username=f"o-{name}"), hypervisor=hv, deploy_type="network", status=Status.ACTIVE
    )
    host.domains[str(machine.uuid)] = {
        "state": PowerState.RUNNING if running else PowerState.OFF,
        "vnc_config_protected": not legacy,
        "vnc_protected": running and not legacy,
    }
    return machine


def test_the_reconcile_records_and_counts_machines_whose_console_asks_no_password(host, hv, caplog):
    old = machine_with_domain(host, hv, "old", running=True, legacy=True)
    new = machine_with_domain(host, hv, "new", running=True, legacy=False)
    off = machine_with_domain(host, hv, "off", running=False, legacy=True)
    with caplog.at_level(logging.INFO, logger="machines.services"):
        services.hypervisor_reconcile_run(hv.pk)
    assert list(Machine.objects.filter(observed__console_unprotected=True)) == [old]
    assert "reconcile lab: 3 machines, 2 running, 1 with a console that asks no password" in caplog.text
    # Its config got a password, so its next start asks for one whoever starts it (its BMC, autostart).
    assert host.domains[str(old.uuid)]["vnc_config_protected"] and not host.domains[str(old.uuid)]["vnc_protected"]
    assert old.events.filter(step="reconcile", level="warning", message__contains="asks no password").count() == 1
    services.hypervisor_reconcile_run(hv.pk)
    assert old.events.filter(step="reconcile", message__contains="asks no password").count() == 1  # said once
    assert not new.events.filter(message__contains="password").exists() and not off.events.exists()

    # The machine page says so, to its owner.
    client = Client()
    client.force_login(old.owner)
    page = client.get(f"/machines/{old.pk}/").content.decode()
    assert 'id="console-unprotected"' in page and "next cold start" in page
    client.force_login(new.owner)
    assert 'id="console-unprotected"' not in client.get(f"/machines/{new.pk}/").content.decode()


def test_a_cold_start_gives_the_console_a_password(host, hv):
    old = machine_with_domain(host, hv, "old", running=False, legacy=True)
    services.machine_power_run(old.pk, "start")
    services.hypervisor_reconcile_run(hv.pk)
    dom = host.domains[str(old.uuid)]
    assert dom["vnc_config_protected"] and dom["vnc_protected"]
    assert not Machine.objects.get(pk=old.pk).last_observed.console_unprotected


def test_console_auth_upgrade_fixes_the_config_and_says_running_ones_wait(host, hv, django_capture_on_commit_callbacks):
    running = machine_with_domain(host, hv, "running", running=True, legacy=True)
    stopped = machine_with_domain(host, hv, "stopped", running=False, legacy=True)
    fine = machine_with_domain(host, hv, "fine", running=True, legacy=False)
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=True):  # unit tests run the queued task inline
        call_command("console_auth_upgrade", stdout=out)
    assert "Queued for the machines of 1 hypervisor(s): lab." in out.getvalue()
    assert "next cold start" in out.getvalue()
    for machine in (running, stopped, fine):
        assert host.domains[str(machine.uuid)]["vnc_config_protected"]
    assert host.domains[str(running.uuid)]["vnc_protected"] is False  # QEMU cannot add a password live
    assert Machine.objects.get(pk=running.pk).last_observed.console_unprotected
    assert running.events.filter(step="console", message__contains="next cold start").exists()
    assert not fine.events.filter(step="console").exists()

    out = StringIO()
    call_command("console_auth_upgrade", "--now", stdout=out)
    assert "lab: password added to 0, already there on 3, 0 without a domain." in out.getvalue()
    assert ": 1 as last seen by the reconcile." in out.getvalue()
