"""Leases and scheduled actions for real: one tiny guest on the host's libvirtd, driven by the real Huey worker's
periodic tasks (tests/conftest.py's _stack_env: leases checked every 5 s, a guest ignoring the shut-down powered
off after 5 s, the delete 18 s after the lease's end). A schedule starts the stopped machine at its minute; then
a lease a few seconds ahead shuts it down and the worker deletes it, leaving no domain and no volume."""

from __future__ import annotations

import subprocess
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from labs import schedules
from labs.models import ScheduledAction
from machines import services
from machines.models import Machine
from portal.models import AuditEvent
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def virsh(*args: str) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else f"error: {r.stderr.strip()}"


def test_a_schedule_starts_a_machine_and_a_lease_shuts_it_down_then_deletes_it(worker, local, tiny_image):
    owner = UserFactory(username="leaseholder")
    machine = services.machine_create(
        owner=owner, hypervisor=local, name="lease1", image=tiny_image, memory_mib=128, disk_gib=1
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    domain = machine.domain_name
    volumes = [v for v in virsh("vol-list", "default").split() if str(machine.uuid) in v]
    assert volumes, "the machine's volumes are in the pool"

    # Stopped, then a schedule for the next minute (one that starts at least 10 s ahead) powers it on.
    services.machine_power(machine=machine, action="poweroff", actor=owner)
    wait_for(lambda: virsh("domstate", domain) == "shut off", 30, message="the power-off")
    wait_for(lambda: Machine.objects.get(pk=machine.pk).operation == "", 30)
    local_now = timezone.localtime()
    due = (local_now + timedelta(seconds=70)).replace(second=0, microsecond=0)
    schedule = schedules.schedule_create(
        actor=owner, machine=machine, action=ScheduledAction.Action.POWER_ON, hour=due.hour, minute=due.minute
    )
    wait_for(lambda: virsh("domstate", domain) == "running", 150, interval=0.5, message="the scheduled start")
    started = timezone.localtime()
    schedule.refresh_from_db()
    assert schedule.last_run is not None and "start queued" in schedule.last_result, schedule.last_result
    assert due <= started < due + timedelta(seconds=15), (due, started)  # at its minute, not Huey's next look
    print(f"scheduled start due {due:%H:%M:%S}, running at {started:%H:%M:%S.%f}")
    assert AuditEvent.objects.filter(action="machine.power", username__startswith=f"schedule {schedule.pk} ").exists()
    time.sleep(2)  # the next periodic checks in the same minute run nothing
    assert ScheduledAction.objects.get(pk=schedule.pk).last_run == schedule.last_run
    wait_for(lambda: Machine.objects.get(pk=machine.pk).operation == "", 30)

    # A lease 5 s ahead: warned, shut down (powered off if the guest ignores ACPI), then deleted.
    assert Machine.objects.get(pk=machine.pk).power_state == "running"
    end = timezone.now() + timedelta(seconds=5)
    services.machine_extend_lease(machine=machine, actor=owner, until=end)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).expired_off is not None, 30, message="the lease's end")
    marked = time.monotonic()
    wait_for(lambda: virsh("domstate", domain) == "shut off", 40, interval=0.5, message="the lease's shut-down")
    off = time.monotonic()
    assert Machine.objects.filter(pk=machine.pk).exists(), "shut down first, deleted later"
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 90, interval=0.5, message="the delete")
    gone = time.monotonic()
    print(f"lease: marked, shut off after {off - marked:.1f} s, deleted {gone - marked:.1f} s after the mark")
    assert virsh("domstate", domain).startswith("error"), "the domain is gone"
    assert not [v for v in virsh("vol-list", "default").split() if str(machine.uuid) in v]
    actions = set(AuditEvent.objects.filter(username="portal (lease)").values_list("action", flat=True))
    assert {"machine.lease_warn", "machine.power", "machine.delete"} <= actions, actions
