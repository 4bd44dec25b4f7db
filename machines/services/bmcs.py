"""The virtual BMCs of network-boot machines: a free port, credentials, power and boot devices through
IPMI as an outside tool would, and the instackenv export."""

from __future__ import annotations

import secrets
import socket

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorError
from machines import bmc, crypto, policy, provisioning, tasks
from machines.models import Machine
from machines.services.common import MachineError, _claim_operation, _enqueue, _release_operation
from machines.states import PowerAction, PowerState
from portal import audit
from portal.audit import audited

IPMI_ACTIONS = {
    PowerAction.START: "on",
    PowerAction.SHUTDOWN: "soft",
    PowerAction.POWEROFF: "off",
    PowerAction.REBOOT: "cycle",
    PowerAction.RESET: "reset",
}


def _port_range() -> range:
    low, _, high = settings.PORTAL_BMC_PORT_RANGE.partition("-")
    return range(int(low), int(high or low) + 1)


def _udp_port_free(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def bmc_assign(machine: Machine) -> None:
    """A free port in the range on the BMC address, and random credentials (stored encrypted)."""
    address = settings.PORTAL_BMC_ADDRESS
    used = set(Machine.objects.filter(bmc_address=address, bmc_port__isnull=False).values_list("bmc_port", flat=True))
    for port in _port_range():
        if port in used or not _udp_port_free(address, port):
            continue
        try:
            with transaction.atomic():
                Machine.objects.filter(pk=machine.pk).update(
                    bmc_address=address,
                    bmc_port=port,
                    bmc_username=f"bmc-{secrets.token_hex(3)}",
                    # IPMI 2.0 passwords are at most 20 bytes: 20 random URL-safe characters.
                    bmc_password_encrypted=crypto.encrypt(secrets.token_urlsafe(15)),
                )
        except IntegrityError:
            continue  # taken by a concurrent create
        machine.refresh_from_db()
        machine.log("bmc", f"virtual BMC on {address}:{port}")
        return
    raise ValidationError({"deploy_type": f"No free BMC port left in {settings.PORTAL_BMC_PORT_RANGE} on {address}."})


def bmc_target(machine: Machine) -> bmc.BmcTarget:
    assert machine.bmc_address is not None and machine.bmc_port is not None  # only machines with a BMC get here
    return bmc.BmcTarget(
        address=machine.bmc_address,
        port=machine.bmc_port,
        username=machine.bmc_username,
        password=crypto.decrypt(machine.bmc_password_encrypted),
    )


@audited("machine.bmc_reveal", obj_kwarg="machine")
def machine_bmc_reveal(*, machine: Machine, actor) -> dict:
    """The BMC credentials, for the owner (or staff); every reveal is recorded."""
    policy.require(actor, machine, "reveal_bmc")
    if not machine.has_bmc:
        raise MachineError(f"{machine.name} has no virtual BMC.")
    target = bmc_target(machine)
    machine.log("bmc", f"credentials revealed to {actor.get_username()}")
    return {"address": target.address, "port": target.port, "username": target.username, "password": target.password}


def _power_through_bmc(machine: Machine, action: str) -> None:
    """Power a network-boot machine exactly as an outside tool would: IPMI to its own BMC (after a current
    host guard, for a start)."""
    try:
        cold = False
        if action == PowerAction.START:
            driver = get_driver(machine.hypervisor.uri)
            provisioning.ensure_host_guards(machine, driver, defined=True)
            cold = bool(machine.pending) and driver.domain_state(str(machine.uuid)) != "running"
        state = bmc.get_client().power(bmc_target(machine), IPMI_ACTIONS[PowerAction(action)])
        machine.log("power", f"{PowerAction(action).label} through the BMC done; power is {state}")
        if cold and state == "on":  # a cold start boots the changes waiting for one (machines.services.changes)
            from machines.services.changes import pending_applied

            pending_applied(machine, driver)
        Machine.objects.filter(pk=machine.pk).update(
            power_state=PowerState.RUNNING if state == "on" else PowerState.OFF, power_checked=timezone.now()
        )
    except (bmc.BmcError, HypervisorError) as e:
        machine.log("power", f"{PowerAction(action).label} through the BMC failed: {e}", level="error")
    finally:
        _release_operation(machine)


@audited("machine.boot_device", obj_kwarg="machine")
@transaction.atomic
def machine_set_boot_device(*, machine: Machine, device: str, persistent: bool, actor) -> None:
    """PXE, disk or CD-ROM through the BMC; it takes effect at the next cold start (off, then on)."""
    policy.require(actor, machine, "boot_device")
    if not machine.has_bmc:
        raise MachineError("Boot devices are set through the BMC of network-boot machines.")
    if device not in bmc.BOOT_DEVICES:
        raise MachineError(f"Unknown boot device {device!r}; use {', '.join(bmc.BOOT_DEVICES)}.")
    _claim_operation(machine, "boot-device", action="boot_device")
    _enqueue(tasks.machine_boot_device_task, machine.pk, device, persistent)


def machine_set_boot_device_run(machine_id: int, device: str, persistent: bool) -> None:
    machine = Machine.objects.get(pk=machine_id)
    try:
        bmc.get_client().set_boot_device(bmc_target(machine), device, persistent=persistent)
        machine.log(
            "bmc",
            f"boot device {device} ({'persistent' if persistent else 'next boot only'}); "
            "takes effect at the next cold start",
        )
    except bmc.BmcError as e:
        machine.log("bmc", f"setting the boot device failed: {e}", level="error")
    finally:
        _release_operation(machine)


def instackenv(machines, *, user) -> dict:
    """Ironic / TripleO instackenv.json for network-boot machines with a BMC. It holds their BMC
    passwords, so each export is recorded on the machine and in the audit trail."""
    nodes = []
    for machine in machines:
        if not machine.has_bmc:
            continue
        target = bmc_target(machine)
        machine.log("bmc", f"credentials exported to instackenv by {user.get_username()}")
        audit.record("machine.bmc_export", machine, user=user)
        nodes.append(
            {
                "name": machine.name,
                "pm_type": "ipmi",
                "pm_addr": target.address,
                "pm_port": str(target.port),
                "pm_user": target.username,
                "pm_password": target.password,
                "mac": [n.mac for n in machine.nics.all()],
                "cpu": str(machine.vcpus),
                "memory": str(machine.memory_mib),
                "disk": str(machine.disk_gib),
                "arch": machine.hypervisor.arch or "x86_64",
            }
        )
    return {"nodes": nodes}
