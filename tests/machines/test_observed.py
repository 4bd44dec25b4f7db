"""What the portal observes of a machine lives in MachineObserved, off the machine's row: the lists and the
BMC server's poll do not carry the serial log, the row is made by the first observation, readers cope
without it, and the migration carries existing values over and back."""

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from hypervisors.drivers.base import PowerState
from machines import services
from machines.bmc_server import BmcManager
from machines.models import Machine, MachineObserved
from machines.services.observation import _observe
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory

SERIAL_LOG_COLUMN = '."serial_log"'  # as a selected column, not serial_log_fetched


@pytest.fixture
def machine(user):
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    return MachineFactory(name="web1", owner=user, hypervisor=hv, deploy_type="network", status=Status.ACTIVE)


def _sql(queries: CaptureQueriesContext) -> str:
    return "\n".join(q["sql"] for q in queries.captured_queries)


@pytest.mark.django_db
def test_the_list_page_and_the_api_list_do_not_load_the_serial_log(user_client, machine):
    nic = machine.nics.create(index=0, type="network", source="default", mac="52:54:00:12:34:56")
    MachineObserved.objects.create(machine=machine, serial_log="x" * 1000, guest_addresses={nic.mac: ["192.0.2.9/24"]})
    with CaptureQueriesContext(connection) as page:
        html = user_client.get(reverse("machines:list")).content.decode()
    assert "<code>192.0.2.9</code>" in html  # the addresses come along, in the same query
    with CaptureQueriesContext(connection) as api:
        data = user_client.get("/api/v1/machines/").json()
    assert data["results"][0]["guest_addresses"] == {nic.mac: ["192.0.2.9/24"]}
    for queries in (page, api):
        assert "machines_machineobserved" in _sql(queries) and SERIAL_LOG_COLUMN not in _sql(queries)
        assert not [q for q in queries.captured_queries if 'FROM "machines_machineobserved"' in q["sql"]]  # no N+1


@pytest.mark.django_db
def test_the_bmc_servers_poll_does_not_load_the_serial_log(machine):
    Machine.objects.filter(pk=machine.pk).update(bmc_address="127.0.0.1", bmc_port=6230, bmc_username="bmc-1")
    MachineObserved.objects.create(machine=machine, serial_log="x" * 1000)
    manager = BmcManager()
    with CaptureQueriesContext(connection) as queries:
        want = manager.desired()
        manager.report()
    assert want[machine.pk][:3] == ("127.0.0.1", 6230, "bmc-1") and want[machine.pk][4] == machine.domain_name
    assert "serial_log" not in _sql(queries) and "machines_machineobserved" not in _sql(queries)


@pytest.mark.django_db
def test_pages_and_the_api_show_a_machine_never_observed(user_client, machine):
    assert not MachineObserved.objects.exists()
    assert machine.last_observed.serial_log == "" and machine.last_observed.guest_addresses == {}
    detail = user_client.get(reverse("machines:detail", args=[machine.pk]))
    assert detail.status_code == 200 and 'id="console-unprotected"' not in detail.content.decode()
    assert user_client.get(f"/api/v1/machines/{machine.pk}/").json()["guest_addresses"] == {}
    assert "–" in user_client.get(reverse("machines:list")).content.decode()
    assert not MachineObserved.objects.exists()  # reading makes no row


@pytest.mark.django_db
def test_the_first_observation_makes_the_row_and_later_ones_update_it(machine, host):
    services.machine_serial_log_request(machine=machine)  # marks the fetch, queues it (run inline here)
    observed = MachineObserved.objects.get(machine=machine)
    assert observed.serial_log_fetched is not None
    _observe(machine.pk, guest_addresses={"52:54:00:00:00:01": ["192.0.2.1/24"]})
    observed.refresh_from_db()
    assert observed.guest_addresses == {"52:54:00:00:00:01": ["192.0.2.1/24"]} and observed.serial_log_fetched
    assert MachineObserved.objects.count() == 1
    Machine.objects.filter(pk=machine.pk).delete()  # its observations go with it; a late one changes nothing
    _observe(machine.pk, serial_log="late")
    assert not MachineObserved.objects.exists()


@pytest.mark.django_db
def test_the_reconcile_writes_observations_of_machines_without_a_row(host, machine):
    addresses = {"52:54:00:00:00:02": ["192.0.2.2/24"]}
    host.domains[str(machine.uuid)] = {"state": PowerState.RUNNING, "addresses": addresses, "vnc_protected": False}
    services.hypervisor_reconcile_run(machine.hypervisor_id)
    observed = MachineObserved.objects.get(machine=machine)
    assert observed.guest_addresses == addresses and observed.console_unprotected
    host.domains[str(machine.uuid)].update(state=PowerState.OFF)
    services.hypervisor_reconcile_run(machine.hypervisor_id)
    observed.refresh_from_db()
    assert observed.guest_addresses == {} and not observed.console_unprotected


OBSERVED_VALUES = {
    "guest_addresses": {"52:54:00:aa:bb:cc": ["192.0.2.5/24"]},
    "console_unprotected": True,
    "serial_log": "TINY-GUEST ready\n" * 100,
}


def made(targets):
    """The migration targets that leave their app's tables in place (project_state takes only those)."""
    return [target for target in targets if target[1] is not None]


@pytest.mark.django_db(transaction=True)
def test_the_migration_moves_observed_values_off_the_machine_row_and_back(user):
    executor = MigrationExecutor(connection)
    # Every other app as it is now, but those built on later machines migrations (labs, workflows) unmade.
    graph = executor.loader.graph
    others = [
        (app, None) if any(a == "machines" and n > "0013" for a, n in graph.forwards_plan((app, name))) else (app, name)
        for app, name in graph.leaf_nodes()
        if app != "machines"
    ]
    before, after = (
        [("machines", "0013_console_unprotected"), *others],
        [("machines", "0014_machine_observed"), *others],
    )
    executor.migrate(before)
    try:
        apps = executor.loader.project_state(made(before)).apps
        hv = apps.get_model("hypervisors", "Hypervisor").objects.create(name="old", uri="qemu:///system")
        OldMachine = apps.get_model("machines", "Machine")
        when = timezone.now() - timedelta(minutes=3)
        seen = OldMachine.objects.create(
            name="seen",
            owner_id=user.pk,
            hypervisor_id=hv.pk,
            serial_log_fetched=when,
            screenshot_requested=when,
            screenshot_taken=when,
            **OBSERVED_VALUES,
        )
        blank = OldMachine.objects.create(name="blank", owner_id=user.pk, hypervisor_id=hv.pk)

        executor = MigrationExecutor(connection)
        executor.migrate(after)
        apps = executor.loader.project_state(made(after)).apps
        Observed = apps.get_model("machines", "MachineObserved")
        row = Observed.objects.get(machine_id=seen.pk)
        for name, value in OBSERVED_VALUES.items():
            assert getattr(row, name) == value, name
        assert row.serial_log_fetched == row.screenshot_requested == row.screenshot_taken == when
        empty = Observed.objects.get(machine_id=blank.pk)
        assert (empty.serial_log, empty.guest_addresses, empty.serial_log_fetched) == ("", {}, None)
        columns = {
            c.name for c in connection.introspection.get_table_description(connection.cursor(), "machines_machine")
        }
        assert not columns & {"serial_log", "guest_addresses", "screenshot_taken", "console_unprotected"}

        executor = MigrationExecutor(connection)
        executor.migrate(before)
        back = executor.loader.project_state(made(before)).apps.get_model("machines", "Machine").objects.get(pk=seen.pk)
        for name, value in OBSERVED_VALUES.items():
            assert getattr(back, name) == value, name
        assert back.serial_log_fetched == back.screenshot_requested == back.screenshot_taken == when
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
