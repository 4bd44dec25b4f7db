"""The only module that talks to BMCs: IPMI over LAN with ipmitool, as an outside tool would, behind the
BmcClient interface (get_client).

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
from abc import ABC, abstractmethod
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


class BmcClient(ABC):
    """What the portal asks of a machine's BMC. Contract for every method: a BMC that does not answer raises
    BmcError (retry later); refused credentials, an unknown action or device, or a missing tool raise
    BmcFatalError; no other exception leaves a client. Held for the ipmitool client and the test fake by
    tests/machines/test_bmc_contract.py."""

    @abstractmethod
    def power_state(self, target: BmcTarget) -> str:
        """ "on" or "off", as the BMC reports it."""

    @abstractmethod
    def power(self, target: BmcTarget, action: str, *, wait: float = 30) -> str:
        """Send a power action (on, off, soft, reset, cycle); for on and off wait until the state matches.
        Returns the power state after it."""

    @abstractmethod
    def set_boot_device(self, target: BmcTarget, device: str, *, persistent: bool) -> None:
        """pxe, disk or cdrom for the next cold start only, or for every start (persistent)."""

    @abstractmethod
    def boot_device(self, target: BmcTarget) -> str:
        """The device the next cold start boots from: pxe, disk or cdrom."""

    def answers(self, target: BmcTarget) -> bool:
        """Whether the BMC answers an authenticated request."""
        try:
            self.power_state(target)
        except BmcError:
            return False
        return True


# What `ipmitool chassis bootparam get 5` names each device.
_BOOT_SELECTORS = {"Force PXE": "pxe", "Force Boot from default Hard-Drive": "disk", "Force Boot from CD/DVD": "cdrom"}


class IpmitoolClient(BmcClient):
    """IPMI 2.0 over LAN (lanplus, cipher suite 3) with ipmitool, as an outside tool would."""

    def _run(self, target: BmcTarget, *command: str) -> str:
        # -v: a wrong password is told apart from a BMC that is not there ("RAKP 2 HMAC is invalid" on stderr);
        # without it both end in "Unable to establish IPMI v2 / RMCP+ session". stdout is the same either way.
        argv = [
            "ipmitool",
            "-I",
            "lanplus",
            "-C",
            "3",
            "-H",
            target.address,
            "-p",
            str(target.port),
            "-U",
            target.username,
            "-E",
            "-R",
            "2",
            "-N",
            "2",
            "-v",
            *command,
        ]
        env = {**os.environ, "IPMI_PASSWORD": target.password}
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=IPMITOOL_TIMEOUT, env=env)
        except FileNotFoundError:
            raise BmcFatalError("ipmitool is not installed (scripts/setup-host.sh installs it)") from None
        except subprocess.TimeoutExpired:
            raise BmcError(
                f"the BMC at {target.address}:{target.port} did not answer in {IPMITOOL_TIMEOUT} s"
            ) from None
        if r.returncode != 0:
            message = (r.stderr or r.stdout).strip().splitlines()
            text = message[-1] if message else f"ipmitool exited with {r.returncode}"
            if _AUTH_ERRORS.search(r.stderr or ""):
                raise BmcFatalError(f"the BMC refused the credentials: {text}")
            raise BmcError(f"the BMC at {target.address}:{target.port}: {text}")
        return r.stdout

    def power_state(self, target: BmcTarget) -> str:
        out = self._run(target, "power", "status")
        match = re.search(r"Chassis Power is (on|off)", out)
        if not match:
            raise BmcError(f"unexpected answer: {out.strip()[:100]}")
        return match.group(1)

    def power(self, target: BmcTarget, action: str, *, wait: float = 30) -> str:
        if action == "cycle":  # virtualbmc has no power cycle: off, then on
            self.power(target, "off", wait=wait)
            return self.power(target, "on", wait=wait)
        if action not in POWER_ACTIONS:
            raise BmcFatalError(f"unknown power action {action!r}")
        self._run(target, "power", POWER_ACTIONS[action])
        desired = {"on": "on", "off": "off"}.get(action)
        if desired is None:
            return self.power_state(target)
        deadline = time.monotonic() + wait
        while (state := self.power_state(target)) != desired:
            if time.monotonic() > deadline:
                raise BmcError(f"the machine is still {state} {wait:.0f} s after power {action}")
            time.sleep(0.5)
        return state

    def set_boot_device(self, target: BmcTarget, device: str, *, persistent: bool) -> None:
        if device not in BOOT_DEVICES:
            raise BmcFatalError(f"unknown boot device {device!r}; use {', '.join(BOOT_DEVICES)}")
        extra = ["options=persistent"] if persistent else []
        self._run(target, "chassis", "bootdev", BOOT_DEVICES[device], *extra)

    def boot_device(self, target: BmcTarget) -> str:
        out = self._run(target, "chassis", "bootparam", "get", "5")
        match = re.search(r"Boot Device Selector : (.+)", out)
        device = _BOOT_SELECTORS.get(match.group(1).strip()) if match else None
        if device is None:
            raise BmcError(f"unexpected answer: {out.strip()[-100:]}")
        return device


def get_client() -> BmcClient:
    """The client the portal talks to BMCs with (tests put a fake here)."""
    return IpmitoolClient()
