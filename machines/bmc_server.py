"""The virtual BMCs of network-boot machines, driven from the database.

One child process per BMC (pyghmi's IPMI server loop is per process, as in
vbmcd). Every few seconds the manager compares the database with its children:
it starts the BMCs of new machines and stops those of deleted or changed ones,
and never touches the others. Passwords stay in memory: nothing is written to a
config directory.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess

from django.db import close_old_connections, connections
from django.utils import timezone
from virtualbmc.vbmc import VirtualBMC

from hypervisors.drivers import ssh
from machines import crypto
from machines.models import Machine
from machines.states import Status

log = logging.getLogger("portal.bmc")

BOOT_NAMES = {4: "network", 8: "hd", 0x14: "optical"}  # virtualbmc's get_boot_device codes -> set names
LIVE = (Status.ACTIVE, Status.RESIZING)  # statuses in which the machine's domain exists


class PortalVirtualBMC(VirtualBMC):
    """virtualbmc's BMC, honouring IPMI's "next boot only" flag, which virtualbmc ignores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._restore_after_boot: str | None = None

    def set_system_boot_options(self, request, session):
        data = request["data"]
        if data and data[0] == 5 and len(data) > 1:
            persistent = bool(data[1] & 0x40)
            self._restore_after_boot = None if persistent else BOOT_NAMES.get(self.get_boot_device())
        return super().set_system_boot_options(request, session)

    def power_on(self):
        result = super().power_on()
        if self._restore_after_boot:
            # The domain started with the one-time device; later cold starts use the old one again.
            restore, self._restore_after_boot = self._restore_after_boot, None
            self.set_boot_device(restore)
        return result


def _serve(spec: dict) -> None:
    """Child process: one BMC until SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bmc = PortalVirtualBMC(
        username=spec["username"],
        password=spec["password"],
        port=spec["port"],
        address=spec["address"],
        domain_name=spec["domain_name"],
        libvirt_uri=spec["uri"],
    )
    bmc.listen(timeout=60)


class BmcManager:
    def __init__(self) -> None:
        self.children: dict[int, tuple[tuple, BaseProcess, float]] = {}
        self.ctx = multiprocessing.get_context("fork")

    def desired(self) -> dict[int, tuple]:
        # Every two seconds: only what a BMC is made of (domain_name comes from the name and the UUID).
        rows = Machine.objects.filter(bmc_port__isnull=False, status__in=LIVE).select_related("hypervisor")
        rows = rows.only(
            "bmc_address",
            "bmc_port",
            "bmc_username",
            "bmc_password_encrypted",
            "name",
            "uuid",
            "own_domain_name",  # an adopted domain's own name (Machine.domain_name)
            "hypervisor__uri",
        )
        return {
            m.pk: (m.bmc_address, m.bmc_port, m.bmc_username, m.bmc_password_encrypted, m.domain_name, m.hypervisor.uri)
            for m in rows
        }

    def reconcile(self) -> None:
        want = self.desired()
        for pk in list(self.children):
            key, proc, _ = self.children[pk]
            if want.get(pk) != key or not proc.is_alive():
                self.stop(pk)
        for pk, key in want.items():
            if pk not in self.children:
                self.start(pk, key)
        self.report()

    def start(self, pk: int, key: tuple) -> None:
        address, port, username, encrypted, domain_name, uri = key
        try:
            password = crypto.decrypt(encrypted)
        except ValueError as e:
            log.error("BMC of machine %s: %s", pk, e)
            return
        spec = {
            "address": address,
            "port": port,
            "username": username,
            "password": password,
            "domain_name": domain_name,
            "uri": ssh.libvirt_uri(uri),  # qemu+ssh: the portal's ssh client, key and pinned host keys, as the worker
        }
        connections.close_all()  # the child must not share the parent's database connections
        proc = self.ctx.Process(target=_serve, args=(spec,), name=f"bmc-{pk}", daemon=True)
        proc.start()
        self.children[pk] = (key, proc, time.monotonic())
        log.info("BMC of machine %s listening on %s:%s (pid %s)", pk, address, port, proc.pid)

    def stop(self, pk: int) -> None:
        key, proc, _ = self.children.pop(pk)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        log.info("BMC of machine %s on %s:%s stopped", pk, key[0], key[1])

    def report(self) -> None:
        """Record in the database which BMCs are up, for the machine pages."""
        now = time.monotonic()
        up = {pk for pk, (_, proc, started) in self.children.items() if proc.is_alive() and now - started > 0.3}
        rows = Machine.objects.filter(bmc_port__isnull=False)
        rows.filter(pk__in=up, bmc_listening=False).update(bmc_listening=True, bmc_checked=timezone.now())
        rows.exclude(pk__in=up).filter(bmc_listening=True).update(bmc_listening=False, bmc_checked=timezone.now())

    def stop_all(self) -> None:
        for pk in list(self.children):
            self.stop(pk)
        Machine.objects.filter(bmc_listening=True).update(bmc_listening=False)

    def run(self, interval: float = 2.0) -> None:
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while not stopping:
                try:
                    self.reconcile()
                finally:
                    close_old_connections()
                deadline = time.monotonic() + interval
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            self.stop_all()
