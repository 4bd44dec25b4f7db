"""What the portal learns from hypervisors: the serial log, screenshots, the reconcile of power and
addresses, console authentication on domains defined before it."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import (
    DomainInspected,
    DomainSize,
    HostObserved,
    HypervisorError,
    HypervisorFatalError,
    HypervisorUnavailable,
)
from hypervisors.drivers.base import PowerState as DomainState  # what the driver reports, not the model's field
from hypervisors.drivers.domxml import host_guard_name
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import hostkeys, provisioning, screenshots, tasks
from machines.models import Machine, MachineEvent, MachineNic, MachineObserved
from machines.services.changes import pending_seen_running
from machines.services.common import _enqueue
from machines.states import BUSY, DeployType, InvalidTransition, PowerState, Status

log = logging.getLogger(__name__)


def _observe(machine_id: int, **fields) -> None:
    """Record what was learned of a machine in its MachineObserved row, which the first observation makes;
    nothing when the machine is gone."""
    if MachineObserved.objects.filter(machine_id=machine_id).update(**fields):
        return
    if not Machine.objects.filter(pk=machine_id).exists():
        return
    try:
        with transaction.atomic():
            MachineObserved.objects.create(machine_id=machine_id, **fields)
    except IntegrityError:  # another writer made it meanwhile
        MachineObserved.objects.filter(machine_id=machine_id).update(**fields)


def machine_serial_log_request(*, machine: Machine, max_age: float = 3.0) -> None:
    """Queue a fetch of the serial log unless a recent one is on file (pages poll this)."""
    fetched = machine.last_observed.serial_log_fetched
    if fetched is None or (timezone.now() - fetched).total_seconds() > max_age:
        _observe(machine.pk, serial_log_fetched=timezone.now())
        from machines.tasks import machine_serial_log_task

        machine_serial_log_task(machine.pk)


def machine_serial_log_run(machine_id: int) -> None:
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        text = provisioning.fetch_serial_log(machine, driver)
    except HypervisorError as e:
        log.info("serial log of machine %s: %s", machine_id, e)
        return
    _observe(machine.pk, serial_log=text, serial_log_fetched=timezone.now())
    _keep_host_keys(machine, text)


# What ends the window in which a serial log is the instance's first boot: the log is truncated at every
# start of the domain (<log append='off'>), and cloud-init prints the host keys once per instance.
_BOOT_STEPS = ("create", "rebuild", "start", "power", "migrate", "adopt")


def _in_first_boot(machine: Machine) -> bool:
    """Whether the domain still runs the boot the portal started after the machine's create or latest rebuild
    (exactly one start since, no power action, move or adoption): its serial log then holds that first boot."""
    steps = list(machine.events.filter(step__in=_BOOT_STEPS).order_by("created", "pk").values_list("step", flat=True))
    began = max((n for n, step in enumerate(steps) if step in ("create", "rebuild")), default=None)
    if began is None:
        return False
    since = steps[began + 1 :]
    return since == ["start"]


def _keep_host_keys(machine: Machine, text: str) -> None:
    """Record the SSH host keys the guest printed at its first boot, from the first block of a serial log read
    whole during that boot; never over keys already recorded (a guest can print a block of its own later;
    a rebuild clears them)."""
    if machine.deploy_type != DeployType.IMAGE or len(text.encode()) >= provisioning.SERIAL_LOG_LIMIT:
        return  # a log cut to its tail may have lost the first block: what is left could be anyone's
    if MachineObserved.objects.filter(machine_id=machine.pk).exclude(ssh_host_keys="").exists():
        return
    keys = hostkeys.first_host_keys_block(text)
    if keys is None or not _in_first_boot(machine):
        return
    if MachineObserved.objects.filter(machine_id=machine.pk, ssh_host_keys="").update(ssh_host_keys="\n".join(keys)):
        machine.log("host-keys", f"{len(keys)} SSH host keys from the first boot's serial console recorded")


def machine_host_keys(*, machine: Machine) -> str:
    """The guest's SSH host keys (`type base64` lines; "" while none are known). In the worker: when none are
    recorded yet, the serial log is read now, so a run right after the first boot finds them."""
    if not (
        keys := MachineObserved.objects.filter(machine_id=machine.pk).values_list("ssh_host_keys", flat=True).first()
    ):
        machine_serial_log_run(machine.pk)
        keys = MachineObserved.objects.filter(machine_id=machine.pk).values_list("ssh_host_keys", flat=True).first()
    return keys or ""


def machines_reconcile() -> None:
    """Periodic: fail machines stuck busy past the deadline; make power states true to the hypervisors (all of
    them at once, RECONCILE_THREADS at a time, each within its deadline)."""
    from machines.services.recovery import machines_resume_dead_attempts

    machines_resume_dead_attempts()  # a worker of this host that died: its attempts resume now, not at the deadline
    now = timezone.now()
    deadline = now - timedelta(seconds=settings.PORTAL_PROVISION_TIMEOUT)
    for machine in Machine.objects.filter(status__in=BUSY, status_changed__lt=deadline):
        try:
            machine.transition(
                Status.ERROR,
                f"timed out after {settings.PORTAL_PROVISION_TIMEOUT} s "
                f"({machine.get_status_display().lower()}); the worker may have stopped",
            )
        except InvalidTransition:
            continue  # it moved on meanwhile: nothing to fail
        # Fence the attempt still running, if any: it stops at its next step and removes what it made.
        Machine.objects.filter(pk=machine.pk).update(attempt_id="")
    Machine.objects.filter(operation_started__lt=now - timedelta(minutes=5)).update(
        operation="", operation_started=None
    )
    hypervisors = Hypervisor.objects.filter(enabled=True, status="online", machines__isnull=False).distinct()
    _reconcile_many(list(hypervisors))
    # Keep the screens on machine pages current even when nobody has the page open: a batch a minute,
    # the stalest first, so a large installation takes its screenshots in turn instead of all at once.
    # (By when they were last asked for: one that fails is not asked again and again ahead of the rest.)
    stalest = Machine.objects.filter(
        power_state=PowerState.RUNNING, hypervisor__enabled=True, hypervisor__status="online"
    ).order_by(F("observed__screenshot_requested").asc(nulls_first=True), "pk")
    stalest = stalest.select_related("observed").defer("observed__serial_log")
    for machine in stalest[: settings.PORTAL_SCREENSHOTS_PER_MINUTE]:
        machine_screenshot_request(machine=machine, max_age=50)
    _watch_first_boots(now)


FIRST_BOOT_WATCH = timedelta(hours=1)  # how long after becoming active a machine's serial log is read for host keys


def _watch_first_boots(now: datetime) -> None:
    """Read the serial log of image machines that became active lately and have no host keys yet, so the keys
    of their first boot are recorded even when nobody opens the machine page while it boots."""
    booting = Machine.objects.filter(
        deploy_type=DeployType.IMAGE,
        status=Status.ACTIVE,
        power_state=PowerState.RUNNING,
        status_changed__gt=now - FIRST_BOOT_WATCH,
        hypervisor__enabled=True,
        hypervisor__status="online",
    ).filter(Q(observed__isnull=True) | Q(observed__ssh_host_keys=""))
    for machine in booting.select_related("observed").defer("observed__serial_log").order_by("pk")[:20]:
        machine_serial_log_request(machine=machine, max_age=50)


def machines_sync(*, machines) -> None:
    """Refresh the power state of these machines from their hypervisors now (queued)."""
    for hv_id in {m.hypervisor_id for m in machines}:
        _enqueue(tasks.hypervisor_reconcile_task, hv_id)


def hypervisor_reconcile_run(hypervisor_id: int) -> None:
    hv = Hypervisor.objects.filter(pk=hypervisor_id).first()
    if hv is not None:
        _reconcile_power(hv)


# --- the reconcile ---------------------------------------------------------------------------------------
#
# Per hypervisor, one bulk read (driver.domains_observed: every domain's state and run, and the networks' DHCP
# leases, in a constant number of calls), then a closer look (driver.domain_inspect) only at the domains that
# changed: a run not seen before by this process (started, restarted, or first seen), a power state that
# differs from the database's, a console still recorded as unprotected; plus a few running ones a cycle, those
# with a NIC without a known address first, then the longest not looked at, so addresses the guest agent or
# the ARP table give stay fresh in turn. The hypervisors are read in parallel by a bounded pool of threads
# that touch no database; the main thread writes, and only the rows that changed.

RECONCILE_THREADS = 16  # hypervisors read at once
ADDRESS_REFRESH_PER_CYCLE = 5  # running domains per hypervisor looked at again a cycle, beyond those that changed
POWER_CHECKED_EVERY = timedelta(minutes=10)  # power_checked of an unchanged machine is refreshed this often

_runs: dict[str, int] = {}  # domain UUID -> the run this process last looked at closely
_looked: dict[str, float] = {}  # domain UUID -> monotonic time of that look
_guarded: set[str] = set()  # domain UUIDs whose host guards this process made sure of
_sized: dict[str, tuple[int, int]] = {}  # domain UUID with pending changes -> (run, how often its size was read)
PENDING_CHECKS_PER_RUN = 10  # cycles a run of a machine with pending changes has its size read
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

# Sent once per hypervisor read, after its changes are written (send_robust: a listener that fails is logged, the
# reconcile goes on): hypervisor_id, observed (the HostObserved, with the domains' and the host's counters),
# read_at (wall-clock epoch seconds at the middle of the bulk read), read_seconds (how long it took). The metrics
# app listens; machines imports nothing above it.
host_observed = Signal()


def _reconcile_deadline() -> float:
    """Seconds a hypervisor's reads may take once begun: its connect timeout (the reachability check and the
    open are bounded by it) and as much again for the reads."""
    return 2.0 * settings.PORTAL_CONNECT_TIMEOUT


@dataclass(frozen=True)
class _Row:
    """A machine as the reconcile reads it: the columns it compares, not the model (10,000 models cost seconds)."""

    pk: int
    uuid: str
    power_state: str
    power_checked: datetime | None
    observed: bool  # it has a MachineObserved row


@dataclass
class _Plan:
    """What the reads of one hypervisor need, as plain data (the reading thread touches no model)."""

    hv: Hypervisor
    machines: list[_Row]
    known: dict[str, tuple[str, bool, dict]]  # uuid -> (power_state, console_unprotected, guest_addresses)
    macs: dict[str, list[str]]  # uuid -> its NICs' MACs
    guards: dict[str, dict[str, str]]  # uuid -> host bridge -> guard, for machines that want them
    started: float = 0.0
    pending: dict[str, tuple[int, dict]] = field(default_factory=dict)  # uuid -> (pk, Machine.pending), if any


@dataclass
class _Looked:
    host: HostObserved
    read_at: float = 0.0  # epoch seconds, the middle of the bulk read
    read_seconds: float = 0.0  # how long it took
    inspected: dict[str, DomainInspected | None] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # inspected with a fatal error: what was known stays
    guarded: list[str] = field(default_factory=list)  # host guard added now
    bridges: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, DomainSize] = field(default_factory=dict)  # machines with pending changes seen in a new run


def _plan(hv: Hypervisor) -> _Plan:
    rows = hv.machines.exclude(status__in=[Status.NEW, Status.PROVISIONING, Status.DELETING]).values_list(
        "pk",
        "uuid",
        "power_state",
        "power_checked",
        "observed__machine_id",
        "observed__console_unprotected",
        "observed__guest_addresses",
    )
    machines, known, by_pk = [], {}, {}
    for pk, uuid, power, checked, observed, unprotected, addresses in rows:
        row = _Row(pk=pk, uuid=str(uuid), power_state=power, power_checked=checked, observed=observed is not None)
        machines.append(row)
        by_pk[pk] = row.uuid
        known[row.uuid] = (power, bool(unprotected), addresses or {})
    macs: dict[str, list[str]] = {u: [] for u in known}
    bridges: dict[int, set[str]] = {}
    nics = MachineNic.objects.filter(machine__hypervisor=hv).values_list("machine_id", "mac", "type", "source")
    for machine_id, mac, kind, source in nics:
        if machine_id not in by_pk:
            continue
        if mac:
            macs[by_pk[machine_id]].append(mac.lower())
        if kind == "bridge" and by_pk[machine_id] not in _guarded:
            bridges.setdefault(machine_id, set()).add(source)
    guards = {}
    if bridges:  # those not made sure of yet: whether they follow the rules (their owner's, their project's)
        for m in Machine.objects.select_related("owner", "project").filter(pk__in=bridges):
            if provisioning.wants_host_guard(m):
                guards[str(m.uuid)] = {b: host_guard_name(b) for b in sorted(bridges[m.pk])}
    # Machines with changes waiting for a cold start (few): a new run of theirs may be one from outside the portal.
    pending = {str(u): (pk, p) for pk, u, p in hv.machines.exclude(pending={}).values_list("pk", "uuid", "pending")}
    return _Plan(hv=hv, machines=machines, known=known, macs=macs, guards=guards, pending=pending)


def _log(machine_id: int, message: str, level: str = "info") -> None:
    MachineEvent.objects.create(machine_id=machine_id, step="reconcile", message=message, level=level)


def _to_inspect(plan: _Plan, host: HostObserved) -> list[str]:
    """The domains to look at closely this cycle (see above)."""
    changed, wanted, others = [], [], []
    for uuid, (power, unprotected, addresses) in plan.known.items():
        seen = host.domains.get(uuid)
        if seen is None or seen.state != DomainState.RUNNING:
            continue
        if _runs.get(uuid) != seen.run or power != PowerState.RUNNING or unprotected:
            changed.append(uuid)
        elif any(not (addresses.get(mac) or host.leases.get(mac)) for mac in plan.macs[uuid]):
            wanted.append(uuid)
        else:
            others.append(uuid)
    others.sort(key=lambda u: _looked.get(u, 0.0))
    return changed + (wanted + others)[:ADDRESS_REFRESH_PER_CYCLE]


def _read(plan: _Plan) -> _Looked:
    """Reading thread: the hypervisor's side of the reconcile, driver calls only."""
    plan.started = time.monotonic()
    driver = get_driver(plan.hv.uri)
    began = time.time()
    looked = _Looked(host=driver.domains_observed())
    looked.read_seconds = time.time() - began
    looked.read_at = began + looked.read_seconds / 2
    for uuid in _to_inspect(plan, looked.host):
        try:
            looked.inspected[uuid] = found = driver.domain_inspect(uuid, leases=looked.host.leases)
        except HypervisorFatalError as e:  # e.g. undefined meanwhile: the others still count
            log.info("addresses of %s: %s", uuid, e)
            looked.failed.add(uuid)
            continue
        if found is not None and found.console_unprotected:
            # Its config gets a password now, so the next start asks for one whoever starts it
            # (the portal, the machine's BMC, libvirt's autostart); a no-op once it has one.
            try:
                driver.vnc_protect(uuid)
            except HypervisorFatalError as e:
                log.info("VNC password of %s: %s", uuid, e)
    for uuid in plan.pending:
        # A machine with pending changes in a run not seen before (started by virsh, its BMC or the host's
        # autostart, it booted its config), and in the next few cycles of that run (a guest's balloon driver
        # takes seconds to give back memory): its size tells whether it runs the pending values (_apply).
        seen = looked.host.domains.get(uuid)
        if seen is None or seen.state != DomainState.RUNNING:
            continue
        run, checks = _sized.get(uuid, (None, 0))
        if run == seen.run and checks >= PENDING_CHECKS_PER_RUN:
            continue
        _sized[uuid] = (seen.run, checks + 1 if run == seen.run else 1)
        try:
            looked.sizes[uuid] = driver.domain_size(uuid)
        except HypervisorFatalError as e:
            log.info("size of %s: %s", uuid, e)
    for uuid, filters in plan.guards.items():
        # A domain defined before its NICs on host bridges named the host guard gets it in its config, so its
        # next start carries it whoever starts it (the portal, its BMC, libvirt's autostart).
        if uuid not in looked.host.domains:
            continue
        try:
            if driver.filter_bridge_nics(uuid, filters):
                looked.guarded.append(uuid)
                looked.bridges[uuid] = sorted(filters)
        except HypervisorFatalError as e:  # no domain (vanished, or a failed machine)
            log.info("host guard of %s: %s", uuid, e)
    return looked


def _reconcile_power(hv: Hypervisor) -> None:
    """Power states of the hypervisor's machines, the addresses of those that run, and which run a VNC
    server that asks no password (defined before the portal set them): those get one in their config,
    which takes effect at their next cold start, however they are started. In the calling thread."""
    plan = _plan(hv)
    try:
        looked = _read(plan)
    except HypervisorError as e:
        _unreachable(plan, e)
        return
    _apply(plan, looked)
    _announce(plan, looked)


def _reconcile_many(hypervisors: list[Hypervisor]) -> None:
    """Read the hypervisors in parallel (RECONCILE_THREADS at a time), write each one's changes as its reads
    come back. A hypervisor whose reads pass their deadline is given up (and marked down): its thread ends
    on its own, every libvirt wait being bounded (connects and opens by the connect timeout, calls on an
    open connection by libvirt's keepalive)."""
    if len(hypervisors) <= 1:  # nobody to wait for: in this thread
        for hv in hypervisors:
            _reconcile_power(hv)
        return
    pool = _reconcile_pool()
    pending = {}
    for hv in hypervisors:  # each one's reads begin while the next one's machines are loaded
        plan = _plan(hv)
        pending[pool.submit(_read, plan)] = plan
    limit = _reconcile_deadline()
    while pending:
        done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        for future in done:
            plan = pending.pop(future)
            try:
                looked = future.result()
            except HypervisorError as e:
                _unreachable(plan, e)
                continue
            except Exception:
                log.exception("reconcile %s", plan.hv.name)
                continue
            _apply(plan, looked)
            _announce(plan, looked)
        now = time.monotonic()
        for future, plan in list(pending.items()):
            if plan.started and now - plan.started > limit:
                pending.pop(future)
                _unreachable(plan, HypervisorUnavailable(f"no answer within {limit:g} s"))


def _reconcile_pool() -> ThreadPoolExecutor:
    """The reading threads, kept for the life of the process (with their connections, one per hypervisor)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=RECONCILE_THREADS, thread_name_prefix="reconcile")
        return _pool


def _unreachable(plan: _Plan, e: HypervisorError) -> None:
    """A hypervisor that did not answer is marked down (the next sync brings it back); a fatal error is logged."""
    log.info("reconcile %s: %s", plan.hv.name, e)
    if isinstance(e, HypervisorUnavailable):
        Hypervisor.objects.filter(pk=plan.hv.pk, uri=plan.hv.uri, status=HypervisorStatus.ONLINE).update(
            status=HypervisorStatus.DOWN, status_error=str(e) or type(e).__name__, last_checked=timezone.now()
        )


def _announce(plan: _Plan, looked: _Looked) -> None:
    """Tell host_observed's listeners what the read saw (once its changes are written)."""
    for receiver, result in host_observed.send_robust(
        sender=Hypervisor,
        hypervisor_id=plan.hv.pk,
        observed=looked.host,
        read_at=looked.read_at,
        read_seconds=looked.read_seconds,
    ):
        if isinstance(result, Exception):
            log.error("reconcile %s: %s failed", plan.hv.name, receiver, exc_info=result)


def _apply(plan: _Plan, looked: _Looked) -> None:
    """Write what changed: power states (each over the state read, so a power action that ended meanwhile
    keeps its newer one), observations that differ from what was known, events; power_checked of the others
    at most every POWER_CHECKED_EVERY, in one statement."""
    now = timezone.now()
    clock = time.monotonic()
    states, leases = looked.host.domains, looked.host.leases
    changed_observed: list[MachineObserved] = []
    stale: list[int] = []  # unchanged, with a power_checked older than POWER_CHECKED_EVERY
    running = without = 0
    for machine in plan.machines:
        uuid = machine.uuid
        seen = states.get(uuid)
        new = PowerState.MISSING if seen is None else str(seen.state)
        if new != machine.power_state:
            mine = Machine.objects.filter(pk=machine.pk)
            # Only over the state read above: a power action that ended meanwhile wrote a newer one.
            if mine.filter(power_state=machine.power_state).update(power_state=new, power_checked=now):
                if new == PowerState.MISSING:
                    _log(machine.pk, "the domain vanished from the hypervisor", level="warning")
            else:
                mine.update(power_checked=now)
        elif machine.power_checked is None or machine.power_checked < now - POWER_CHECKED_EVERY:
            stale.append(machine.pk)
        _, was_open, was_addresses = plan.known[uuid]
        is_running = seen is not None and seen.state == DomainState.RUNNING
        inspected = looked.inspected.get(uuid)
        if inspected is not None:
            addresses, open_console = inspected.addresses, inspected.console_unprotected
            if seen is not None:
                _runs[uuid], _looked[uuid] = seen.run, clock
        elif uuid in looked.failed:
            addresses, open_console = was_addresses, was_open  # what was known stays until the next try
        elif is_running and uuid not in looked.inspected:
            # Not looked at closely this cycle: the leases are fresh, the rest stays as last seen.
            addresses = {**was_addresses, **{m: leases[m] for m in plan.macs[uuid] if m in leases}}
            open_console = was_open
        else:
            addresses, open_console = {}, False  # off, vanished, or gone while looked at
        running += is_running
        without += open_console
        if open_console and not was_open:
            _log(
                machine.pk,
                "its VNC server asks no password (the machine was started before the portal "
                "set them); it gets one at its next cold start",
                level="warning",
            )
        if uuid in looked.guarded:
            _log(
                machine.pk,
                f"host guard added to the NICs on {', '.join(looked.bridges[uuid])} (defined before they had it)",
            )
        if uuid in states:
            _guarded.add(uuid)
        if addresses == was_addresses and open_console == was_open and machine.observed:
            continue
        if machine.observed:
            changed_observed.append(
                MachineObserved(machine_id=machine.pk, guest_addresses=addresses, console_unprotected=open_console)
            )
        else:
            _observe(machine.pk, guest_addresses=addresses, console_unprotected=open_console)
    for uuid, size in looked.sizes.items():
        pending_seen_running(*plan.pending[uuid], size)
    if changed_observed:
        MachineObserved.objects.bulk_update(
            changed_observed, ["guest_addresses", "console_unprotected"], batch_size=500
        )
    for i in range(0, len(stale), 500):
        Machine.objects.filter(pk__in=stale[i : i + 500]).update(power_checked=now)
    (log.warning if without else log.info)(
        "reconcile %s: %d machines, %d running, %d with a console that asks no password",
        plan.hv.name,
        len(plan.machines),
        running,
        without,
    )


def console_auth_upgrade() -> list[Hypervisor]:
    """Queue, for every machine, a VNC password in its domain's persistent config (machines defined before
    the portal set them). Running ones keep what they started with until their next cold start."""
    hypervisors = list(Hypervisor.objects.filter(machines__isnull=False).distinct())
    for hv in hypervisors:
        _enqueue(tasks.console_auth_upgrade_task, hv.pk)
    return hypervisors


def console_auth_upgrade_run(hypervisor_id: int) -> dict[str, int]:
    """Worker: give every machine of the hypervisor a VNC password for its next start, then reconcile
    (which records those still running without one). Returns counts: added, had one, missing, running
    without one until their next cold start."""
    hv = Hypervisor.objects.get(pk=hypervisor_id)
    counts = {"added": 0, "had": 0, "missing": 0, "running_unprotected": 0}
    machines = list(hv.machines.exclude(status__in=[Status.NEW, Status.PROVISIONING, Status.DELETING]))
    driver = get_driver(hv.uri)
    unprotected = driver.vnc_unprotected()
    for machine in machines:
        try:
            added = driver.vnc_protect(str(machine.uuid))
        except HypervisorFatalError:  # no domain (vanished, or a failed machine)
            counts["missing"] += 1
            continue
        counts["added" if added else "had"] += 1
        if added:
            machine.log("console", "VNC password added to the domain's config; it takes effect at the next cold start")
        if str(machine.uuid) in unprotected:
            counts["running_unprotected"] += 1
    log.info("console auth upgrade on %s: %s", hv.name, ", ".join(f"{k} {v}" for k, v in counts.items()))
    _reconcile_power(hv)
    return counts


def screenshot_path(machine: Machine) -> Path:
    return Path(settings.DATA_DIR) / "screenshots" / f"{machine.uuid}.png"


def machine_screenshot_request(*, machine: Machine, max_age: float = 5.0) -> None:
    """Queue a new screenshot unless one was asked for moments ago (pages poll this)."""
    asked = machine.last_observed.screenshot_requested
    if asked is None or (timezone.now() - asked).total_seconds() > max_age:
        _observe(machine.pk, screenshot_requested=timezone.now())
        from machines.tasks import machine_screenshot_task

        machine_screenshot_task(machine.pk)


def machine_screenshot_run(machine_id: int) -> None:
    """Worker: take the screen through libvirt and keep it as a small PNG."""
    machine = Machine.objects.select_related("hypervisor").filter(pk=machine_id).first()
    if machine is None:
        return
    try:
        driver = get_driver(machine.hypervisor.uri)
        data = driver.screenshot(str(machine.uuid))
        if data is None:
            return
        png = screenshots.to_png(data)
    except (HypervisorError, screenshots.BadImage) as e:
        log.info("screenshot of machine %s: %s", machine_id, e)
        return
    path = screenshot_path(machine)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    _observe(machine.pk, screenshot_taken=timezone.now())
