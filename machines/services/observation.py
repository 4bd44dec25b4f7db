"""What the portal learns from hypervisors: the serial log, screenshots, the reconcile of power and
addresses, console authentication on domains defined before it."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError, HypervisorFatalError
from hypervisors.drivers.base import PowerState as DomainState  # what the driver reports, not the model's field
from hypervisors.models import Hypervisor
from machines import provisioning, screenshots, tasks
from machines.models import Machine, MachineObserved
from machines.services.common import _enqueue
from machines.states import BUSY, InvalidTransition, PowerState, Status

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


def machines_reconcile() -> None:
    """Periodic: fail machines stuck busy past the deadline; make power states true to the hypervisors."""
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
    Machine.objects.filter(operation_started__lt=now - timedelta(minutes=5)).update(
        operation="", operation_started=None
    )
    for hv in Hypervisor.objects.filter(enabled=True, status="online", machines__isnull=False).distinct():
        _reconcile_power(hv)
    # Keep the screens on machine pages current even when nobody has the page open: a batch a minute,
    # the stalest first, so a large installation takes its screenshots in turn instead of all at once.
    # (By when they were last asked for: one that fails is not asked again and again ahead of the rest.)
    stalest = Machine.objects.filter(
        power_state=PowerState.RUNNING, hypervisor__enabled=True, hypervisor__status="online"
    ).order_by(F("observed__screenshot_requested").asc(nulls_first=True), "pk")
    stalest = stalest.select_related("observed").defer("observed__serial_log")
    for machine in stalest[: settings.PORTAL_SCREENSHOTS_PER_MINUTE]:
        machine_screenshot_request(machine=machine, max_age=50)


def machines_sync(*, machines) -> None:
    """Refresh the power state of these machines from their hypervisors now (queued)."""
    for hv_id in {m.hypervisor_id for m in machines}:
        _enqueue(tasks.hypervisor_reconcile_task, hv_id)


def hypervisor_reconcile_run(hypervisor_id: int) -> None:
    hv = Hypervisor.objects.filter(pk=hypervisor_id).first()
    if hv is not None:
        _reconcile_power(hv)


def _guard_bridge_nics(machine: Machine, driver) -> None:
    """A domain defined before its NICs on host bridges named the host guard gets it in its config, so its
    next start carries it whoever starts it (the portal, its BMC, libvirt's autostart)."""
    try:
        provisioning.name_host_guards(machine, driver, step="reconcile")
    except HypervisorFatalError as e:  # no domain (vanished, or a failed machine)
        log.info("host guard of %s: %s", machine.name, e)


def _reconcile_power(hv: Hypervisor) -> None:
    """Power states of the hypervisor's machines, the addresses of those that run, and which run a VNC
    server that asks no password (defined before the portal set them): those get one in their config,
    which takes effect at their next cold start, however they are started."""
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
                # Its config gets a password now, so the next start asks for one whoever starts it
                # (the portal, the machine's BMC, libvirt's autostart); a no-op once it has one.
                try:
                    driver.vnc_protect(str(machine.uuid))
                except HypervisorFatalError as e:
                    log.info("VNC password of %s: %s", machine.name, e)
            _guard_bridge_nics(machine, driver)
            if states.get(str(machine.uuid)) != DomainState.RUNNING:
                continue
            try:
                addresses[machine.pk] = driver.domain_addresses(str(machine.uuid))
            except HypervisorFatalError as e:  # e.g. undefined meanwhile: the others still count
                log.info("addresses of %s: %s", machine.name, e)
                addresses[machine.pk] = machine.last_observed.guest_addresses  # what was known stays until the next try
    except HypervisorError as e:
        log.info("reconcile %s: %s", hv.name, e)
        return
    now = timezone.now()
    for machine in machines:
        state = states.get(str(machine.uuid))
        new = PowerState.MISSING if state is None else str(state)
        mine = Machine.objects.filter(pk=machine.pk)
        if new != machine.power_state:
            # Only over the state read above: a power action that ended meanwhile wrote a newer one.
            if mine.filter(power_state=machine.power_state).update(power_state=new) and new == PowerState.MISSING:
                machine.log("reconcile", "the domain vanished from the hypervisor", level="warning")
        open_console = str(machine.uuid) in unprotected
        if open_console and not machine.last_observed.console_unprotected:
            machine.log(
                "reconcile",
                "its VNC server asks no password (the machine was started before the portal "
                "set them); it gets one at its next cold start",
                level="warning",
            )
        mine.update(power_checked=now)
        _observe(machine.pk, guest_addresses=addresses.get(machine.pk, {}), console_unprotected=open_console)
    running = sum(states.get(str(m.uuid)) == DomainState.RUNNING for m in machines)
    without = sum(str(m.uuid) in unprotected for m in machines)
    (log.warning if without else log.info)(
        "reconcile %s: %d machines, %d running, %d with a console that asks no password",
        hv.name,
        len(machines),
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
