"""The only module that talks to BMCs: IPMI over LAN with ipmitool, as an outside tool would.

Plain data in and out; the portal's power buttons for network-boot machines come
through here, so the portal sees what Ironic sees. (pyghmi's own client asks for
SHA-256 sessions, which virtualbmc's pyghmi server does not speak; ipmitool with
cipher suite 3 talks to any IPMI 2.0 BMC.) The password goes through the
environment (ipmitool -E), never the command line that `ps` shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass

IPMITOOL_TIMEOUT = 30  # seconds


class BmcError(Exception):
    """Retryable: the BMC did not answer."""


class BmcFatalError(BmcError):
    """Bad credentials, a missing tool or an unsupported request."""


@dataclass(frozen=True)
class BmcTarget:
    address: str
    port: int
    username: str
    password: str  # never logged

    def __repr__(self) -> str:
        return f"BmcTarget({self.address}:{self.port}, user={self.username})"


BOOT_DEVICES = {"pxe": "pxe", "disk": "disk", "cdrom": "cdrom"}
POWER_ACTIONS = {"on": "on", "off": "off", "soft": "soft", "reset": "reset"}
_AUTH_ERRORS = re.compile(r"RAKP|unauthori[sz]ed|password|Invalid user", re.IGNORECASE)


def _ipmitool(target: BmcTarget, *command: str) -> str:
    argv = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", target.address, "-p", str(target.port),
            "-U", target.username, "-E", "-R", "2", "-N", "2", *command]  # fmt: skip
    env = {**os.environ, "IPMI_PASSWORD": target.password}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=IPMITOOL_TIMEOUT, env=env)
    except FileNotFoundError:
        raise BmcFatalError("ipmitool is not installed (scripts/setup-host.sh installs it)") from None
    except subprocess.TimeoutExpired:
        raise BmcError(f"the BMC at {target.address}:{target.port} did not answer in {IPMITOOL_TIMEOUT} s") from None
    if r.returncode != 0:
        message = (r.stderr or r.stdout).strip().splitlines()
        text = message[-1] if message else f"ipmitool exited with {r.returncode}"
        if _AUTH_ERRORS.search(r.stderr or ""):
            raise BmcFatalError(f"the BMC refused the credentials: {text}")
        raise BmcError(f"the BMC at {target.address}:{target.port}: {text}")
    return r.stdout


def power_state(target: BmcTarget) -> str:
    """ "on" or "off", as the BMC reports it."""
    out = _ipmitool(target, "power", "status")
    match = re.search(r"Chassis Power is (on|off)", out)
    if not match:
        raise BmcError(f"unexpected answer: {out.strip()[:100]}")
    return match.group(1)


def power(target: BmcTarget, action: str, *, wait: float = 30) -> str:
    """Send a power action (on, off, soft, reset, cycle) and, for on/off, wait until the state matches."""
    if action == "cycle":  # virtualbmc has no power cycle: off, then on
        power(target, "off", wait=wait)
        return power(target, "on", wait=wait)
    if action not in POWER_ACTIONS:
        raise BmcFatalError(f"unknown power action {action!r}")
    _ipmitool(target, "power", POWER_ACTIONS[action])
    desired = {"on": "on", "off": "off"}.get(action)
    if desired is None:
        return power_state(target)
    deadline = time.monotonic() + wait
    while (state := power_state(target)) != desired:
        if time.monotonic() > deadline:
            raise BmcError(f"the machine is still {state} {wait:.0f} s after power {action}")
        time.sleep(0.5)
    return state


def set_boot_device(target: BmcTarget, device: str, *, persistent: bool) -> None:
    """PXE, disk or CD-ROM for the next cold start (once) or every start (persistent)."""
    if device not in BOOT_DEVICES:
        raise BmcFatalError(f"unknown boot device {device!r}; use {', '.join(BOOT_DEVICES)}")
    extra = ["options=persistent"] if persistent else []
    _ipmitool(target, "chassis", "bootdev", BOOT_DEVICES[device], *extra)


def answers(target: BmcTarget) -> bool:
    """Whether the BMC answers an authenticated request."""
    try:
        power_state(target)
    except BmcError:
        return False
    return True
