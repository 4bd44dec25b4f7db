"""The reconcile at fleet size (issue 13): libvirt calls, SQL writes and time of one cycle, the old per-domain
way next to the bulk one, and with hypervisors that accept TCP and never answer.

HOSTS `test:///` hypervisors (libvirt's test driver, each loading a file of DOMAINS domains, 70 % running),
HOSTS x DOMAINS machines with a NIC each, in a throwaway SQLite database. Every libvirt call that would cross
the network is counted (the connection is wrapped) and delayed by RTT (2 ms) to stand for one; SQL writes are
counted with connection.execute_wrapper. The hung hosts are qemu+tcp://127.0.0.1:PORT/system URIs of a local
listener that accepts and never answers. Prints figures; asserts nothing. Needs no daemon.

Run: `.venv/bin/python bench/fleet.py [HOSTS] [DOMAINS]` (default 100 100; the old way's cycle takes about
100 s at that size, its hung-hosts cycle runs on 10 healthy and the 10 hung hosts only).
"""

import os
import socket
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DATA = tempfile.mkdtemp(prefix="portal-bench-fleet-")
os.environ.update(
    {
        "PORTAL_DATA_DIR": DATA,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PORTAL_ALLOW_TEST_URIS": "true",
        "PORTAL_SCREENSHOTS_PER_MINUTE": "0",  # the screenshot batch is not the reconcile's (30 writes a minute)
    }
)

import logging  # noqa: E402

import django  # noqa: E402

from bench.common import run_main  # noqa: E402

django.setup()
logging.getLogger("machines").setLevel(logging.WARNING)
logging.getLogger("hypervisors").setLevel(logging.WARNING)

import libvirt  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from hypervisors.drivers import connections, libvirt_driver  # noqa: E402

HOSTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
DOMAINS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
HUNG = 10
RTT = 0.002
LOCAL = {"UUIDString", "UUID", "name", "ID", "isAlive", "connect", "getName"}  # answered without a round trip

# --- counting libvirt calls ----------------------------------------------------------------------------

calls: Counter = Counter()  # uri -> calls
kinds: Counter = Counter()  # method name -> calls
_count_lock = threading.Lock()


class Wrapped:
    """A libvirt object whose calls are counted and cost RTT; what they return is wrapped too."""

    def __init__(self, obj, uri: str) -> None:
        self._obj, self._uri = obj, uri

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if name not in LOCAL:
                with _count_lock:
                    calls[self._uri] += 1
                    kinds[name] += 1
                time.sleep(RTT)
            return wrap(attr(*args, **kwargs), self._uri)

        return call


def wrap(value, uri):
    if isinstance(value, (libvirt.virDomain, libvirt.virNetwork, libvirt.virConnect)):
        return Wrapped(value, uri)
    if isinstance(value, list):
        return [wrap(v, uri) for v in value]
    if isinstance(value, tuple) and value and isinstance(value[0], libvirt.virDomain):
        return (Wrapped(value[0], uri), *value[1:])
    return value


_real_connect = libvirt_driver.connect


def counted_connect(uri, timeout=connections.CONNECT_TIMEOUT):
    return Wrapped(_real_connect(uri, timeout), uri)


libvirt_driver.connect = counted_connect

# --- counting SQL writes --------------------------------------------------------------------------------

writes = Counter()


def count_writes(execute, sql, params, many, context):
    result = execute(sql, params, many, context)
    verb = sql.lstrip().split(" ", 1)[0].upper()
    if verb in ("INSERT", "UPDATE", "DELETE"):
        writes["statements"] += 1
        writes["rows"] += max(context["cursor"].rowcount, 0)
    return result


# --- the fleet -----------------------------------------------------------------------------------------


def host_file(i: int, uuids: list[str], macs: list[str]) -> str:
    doms = []
    for n, (u, mac) in enumerate(zip(uuids, macs, strict=True)):
        off = "<test:runstate>5</test:runstate>" if n % 10 >= 7 else ""
        doms.append(
            f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>h{i}d{n}</name><uuid>{u}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>
  <devices><interface type='user'><mac address='{mac}'/></interface>
  <graphics type='vnc' port='-1' passwd='x'/></devices>{off}
</domain>"""
        )
    path = Path(DATA) / f"host{i}.xml"
    path.write_text(f"<node>{''.join(doms)}</node>")
    return f"test://{path}"


def build():
    from django.contrib.auth import get_user_model

    from hypervisors.models import Hypervisor
    from machines.models import Machine, MachineNic, MachineObserved

    owner = get_user_model().objects.create_user("owner")
    machines, nics = [], []
    for i in range(HOSTS):
        uuids = [str(uuidlib.uuid4()) for _ in range(DOMAINS)]
        macs = [f"52:54:00:{i // 256:02x}:{i % 256:02x}:{n:02x}" for n in range(DOMAINS)]
        hv = Hypervisor.objects.create(name=f"hv{i}", uri=host_file(i, uuids, macs), status="online")
        for n, (u, mac) in enumerate(zip(uuids, macs, strict=True)):
            machines.append(
                Machine(
                    name=f"h{i}d{n}",
                    uuid=u,
                    owner=owner,
                    hypervisor=hv,
                    deploy_type="network",
                    status="active",
                    power_state="unknown",
                )
            )
            nics.append((len(machines) - 1, mac))
    made = Machine.objects.bulk_create(machines, batch_size=500)
    MachineNic.objects.bulk_create(
        [MachineNic(machine=made[m], index=0, type="network", source="default", mac=mac) for m, mac in nics],
        batch_size=500,
    )
    MachineObserved.objects.bulk_create([MachineObserved(machine=m) for m in made], batch_size=500)
    return owner


def hung_hosts(owner):
    """HUNG hypervisors at a listener that accepts and never answers, one machine each."""
    from hypervisors.models import Hypervisor
    from machines.models import Machine

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    port = listener.getsockname()[1]
    held = []

    def accept():
        while True:
            held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True, name="bench-listener").start()
    hung = []
    for i in range(HUNG):
        # One port, distinct URIs (a path or a query differs): ten hosts as the portal sees them.
        hv = Hypervisor.objects.create(
            name=f"hung{i}", uri=f"qemu+tcp://127.0.0.1:{port}/system?h={i}", status="online"
        )
        Machine.objects.create(name=f"hung{i}m", owner=owner, hypervisor=hv, deploy_type="network", status="active")
        hung.append(hv)
    return port, hung


# --- the old way: the reconcile as it was, one hypervisor after another ------------------------------------


def old_reconcile_power(hv, finished):
    from django.utils import timezone

    from hypervisors.drivers import get_driver
    from hypervisors.drivers.base import HypervisorError, HypervisorFatalError
    from hypervisors.drivers.base import PowerState as DomainState
    from machines import provisioning
    from machines.models import Machine
    from machines.services.observation import _observe
    from machines.states import PowerState, Status

    machines = list(
        hv.machines.exclude(status__in=[Status.NEW, Status.PROVISIONING, Status.DELETING])
        .select_related("observed")
        .defer("observed__serial_log")
    )
    addresses = {}
    try:
        driver = get_driver(hv.uri)
        states = driver.domain_states()
        unprotected = driver.vnc_unprotected()
        for machine in machines:
            if str(machine.uuid) in unprotected:
                try:
                    driver.vnc_protect(str(machine.uuid))
                except HypervisorFatalError:
                    pass
            try:
                provisioning.name_host_guards(machine, driver, step="reconcile")
            except HypervisorFatalError:
                pass
            if states.get(str(machine.uuid)) != DomainState.RUNNING:
                continue
            try:
                addresses[machine.pk] = driver.domain_addresses(str(machine.uuid))
            except HypervisorFatalError:
                addresses[machine.pk] = machine.last_observed.guest_addresses
    except HypervisorError:
        finished[hv.name] = time.monotonic()
        return
    now = timezone.now()
    for machine in machines:
        state = states.get(str(machine.uuid))
        new = PowerState.MISSING if state is None else str(state)
        mine = Machine.objects.filter(pk=machine.pk)
        if new != machine.power_state:
            if mine.filter(power_state=machine.power_state).update(power_state=new) and new == PowerState.MISSING:
                machine.log("reconcile", "the domain vanished from the hypervisor", level="warning")
        open_console = str(machine.uuid) in unprotected
        mine.update(power_checked=now)
        _observe(machine.pk, guest_addresses=addresses.get(machine.pk, {}), console_unprotected=open_console)
    finished[hv.name] = time.monotonic()


def old_cycle(hypervisors, finished):
    """With the connections as they were too: a TCP connect as the only check before libvirt's open, and an
    open abandoned at its timeout left waiting."""
    real_answers, real_cut = connections._answers, connections._cut
    connections._answers = lambda sock, host, transport: None
    connections._cut = lambda fds: None
    try:
        for hv in hypervisors:
            old_reconcile_power(hv, finished)
    finally:
        connections._answers, connections._cut = real_answers, real_cut


# --- measuring -----------------------------------------------------------------------------------------


def new_cycle(hypervisors, finished):
    from machines.services import observation

    real_apply, real_unreachable = observation._apply, observation._unreachable

    def apply(plan, looked):
        real_apply(plan, looked)
        finished[plan.hv.name] = time.monotonic()

    def unreachable(plan, e):
        real_unreachable(plan, e)
        finished[plan.hv.name] = time.monotonic()

    observation._apply, observation._unreachable = apply, unreachable
    try:
        observation._reconcile_many(hypervisors)
    finally:
        observation._apply, observation._unreachable = real_apply, real_unreachable


def measure(label, cycle, hypervisors):
    calls.clear()
    kinds.clear()
    writes.clear()
    finished: dict[str, float] = {}
    start = time.monotonic()
    with connection.execute_wrapper(count_writes):
        cycle(hypervisors, finished)
    took = time.monotonic() - start
    healthy = [hv.name for hv in hypervisors if hv.name.startswith("hv")]
    per_hv = [calls[hv.uri] for hv in hypervisors if hv.name.startswith("hv")]
    last_healthy = max((finished[n] for n in healthy if n in finished), default=start) - start
    print(
        f"  {label:44s} {took:7.2f} s  healthy done at {last_healthy:6.2f} s  "
        f"libvirt calls/hv {min(per_hv, default=0)}-{max(per_hv, default=0)} (mean {sum(per_hv) / max(len(per_hv), 1):.1f})  "
        f"SQL writes {writes['statements']} statements, {writes['rows']} rows"
    )
    return took


def leftovers(port):
    names = Counter(t.name.split("_")[0].rstrip("-0123456789") for t in threading.enumerate())
    stuck = sum(n for name, n in names.items() if name == "libvirt-open")
    sockets = len(connections._sockets_to("127.0.0.1", port))
    return stuck, sockets


def main():
    from hypervisors.models import Hypervisor
    from machines.models import Machine
    from machines.services import observation

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    owner = build()
    print(
        f"fleet: {HOSTS} test:/// hypervisors x {DOMAINS} domains ({Machine.objects.count()} machines), "
        f"{RTT * 1000:.0f} ms per libvirt call, {observation.RECONCILE_THREADS} threads; "
        f"built in {time.monotonic() - started:.1f} s"
    )
    fleet = list(Hypervisor.objects.order_by("pk"))

    print("old per-domain way (baseline), one hypervisor after another:")
    measure("first cycle (states unknown in the database)", old_cycle, fleet)
    print("    calls by kind:", dict(kinds.most_common(8)))
    measure("cycle, nothing changed", old_cycle, fleet)

    print("bulk reads, in parallel, writing what changed:")
    Machine.objects.update(power_state="unknown")
    measure("first cycle of the process (all seen anew)", new_cycle, fleet)
    for n in range(2):
        measure(f"cycle, nothing changed ({n + 1})", new_cycle, fleet)
    print("    calls by kind:", dict(kinds.most_common(8)))
    # One machine in ten changed behind the portal's back (the database says it is off: 1 in 7 running ones).
    ids = list(Machine.objects.filter(power_state="running").order_by("pk").values_list("pk", flat=True))[::7]
    Machine.objects.filter(pk__in=ids).update(power_state="off")
    measure(f"cycle, {len(ids)} machines changed", new_cycle, fleet)
    print("    calls by kind:", dict(kinds.most_common(8)))
    measure("cycle after it, nothing changed", new_cycle, fleet)

    port, hung = hung_hosts(owner)
    print(f"with {HUNG} hung hypervisors (qemu+tcp://127.0.0.1:{port}, accepts and never answers):")
    measure(f"bulk, parallel: {HOSTS} healthy + {HUNG} hung", new_cycle, fleet + hung)
    time.sleep(1.5)
    stuck, sockets = leftovers(port)
    down = Hypervisor.objects.filter(name__startswith="hung", status="down").count()
    print(f"    after it: {stuck} threads opening connections, {sockets} sockets to the hung port, {down} marked down")
    Hypervisor.objects.filter(name__startswith="hung").update(status="online")
    some = fleet[:HUNG]
    measure(f"bulk, parallel: {HUNG} healthy + {HUNG} hung", new_cycle, hung + some)
    Hypervisor.objects.filter(name__startswith="hung").update(status="online")
    measure(f"old way: {HUNG} healthy + {HUNG} hung", old_cycle, hung + some)
    time.sleep(1.5)
    stuck, sockets = leftovers(port)
    print(f"    after it: {stuck} threads opening connections, {sockets} sockets to the hung port")


if __name__ == "__main__":
    run_main(main, DATA)
