"""The sweeper: domains and volumes the portal made on a hypervisor that no machine row owns any more (a worker
that died between steps, a row removed behind the portal's back), reported on the hypervisor's page, where staff
may remove them.

What counts as the portal's: a domain with the portal's metadata element and a name `<host name>-<uuid8>`
(domxml.portal_domain), and a volume named from a machine's UUID as Machine.volumes names them (main and extra
disks, seed, serial log). Image copies (`portal-image-<sha256>`) are never reported: they belong to no machine, a
later create adopts one after hashing it, and a crash between steps never makes one without its row (the copy is
recorded as soon as its upload ends; a half-uploaded one is replaced by the next create that needs it).

Owned means: some machine row, on any hypervisor, has that UUID. So a machine being moved (its volumes on the
target, and on the source until its cleanup) is never an orphan, nor is anything of a machine on another
hypervisor row that names the same libvirtd. A row is committed before anything is made on a host, and each
sweep reads the host before the rows, so an in-flight create is always owned; an item is still only reported
once an earlier sweep saw it and it was first seen PORTAL_ORPHAN_GRACE seconds ago. The removal looks again at
run time: no row owns it, it is still the portal's by the same marks, and only then is it undefined or deleted,
each one audited.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from hypervisors.drivers import get_driver
from hypervisors.drivers.base import HypervisorDriver, HypervisorError, HypervisorFatalError
from hypervisors.drivers.domxml import portal_domain
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import tasks
from machines.models import Machine
from machines.services.common import MachineError, _enqueue
from portal import audit
from portal.audit import audited

log = logging.getLogger(__name__)

# The names Machine.volumes gives: m-<uuid>-disk.qcow2, -disk<n>.qcow2 (extra disks), -seed.iso, -serial.log; and
# MachineSnapshot.volume's: -disk-snap<id>.qcow2, -disk<n>-snap<id>.qcow2 (external overlays, a rebuild's kept disk).
VOLUME_NAME = re.compile(
    r"^m-(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-"
    r"(?:disk\d*(?:-snap\d+)?\.qcow2|seed\.iso|serial\.log)$"
)
_CHUNK = 500  # UUIDs per query


def hypervisors_sweep() -> list[int]:
    """Periodic: queue a sweep of every enabled hypervisor that is online (one task each, so a slow host
    holds up no other). Returns their ids."""
    ids = list(Hypervisor.objects.filter(enabled=True, status=HypervisorStatus.ONLINE).values_list("pk", flat=True))
    for pk in ids:
        _enqueue(tasks.hypervisor_sweep_task, pk)
    return ids


def _owned(uuids: set[str]) -> set[str]:
    """Those of `uuids` that some machine row (on any hypervisor, moving or not) has."""
    found: set[str] = set()
    ordered = sorted(uuids)
    for i in range(0, len(ordered), _CHUNK):
        rows = Machine.objects.filter(uuid__in=ordered[i : i + _CHUNK]).values_list("uuid", flat=True)
        found.update(str(u) for u in rows)
    return found


def _listed(hv: Hypervisor, driver: HypervisorDriver) -> tuple[set[str], list[tuple[str, str, str]]]:
    """What the host has that may be the portal's: domain UUIDs (one bulk read, less those the last sync found
    not to be the portal's) and volumes named like a machine's, as (pool, name, uuid), one call per pool."""
    others = {d["uuid"] for d in hv.unmanaged_domains}
    domains = set(driver.domains_observed().domains) - others
    volumes = []
    for pool in sorted(p["name"] for p in hv.pools if p.get("active")):
        try:
            driver.refresh_pool(pool)  # a serial log written by QEMU shows as a volume only after a refresh
            names = driver.volume_names(pool)
        except HypervisorFatalError as e:  # stopped or removed since the last sync: the other pools still count
            log.info("sweep of %s: pool %s: %s", hv.name, pool, e)
            continue
        for name in names:
            if m := VOLUME_NAME.match(name):
                volumes.append((pool, name, m["uuid"]))
    return domains, volumes


def _found(driver: HypervisorDriver, domains: set[str], volumes: list[tuple[str, str, str]]) -> list[dict]:
    """The unowned ones, looked at closely: a domain only if it carries the portal's marks, a volume with its
    size; what vanished meanwhile is left out."""
    found: list[dict] = []
    for uuid in sorted(domains):
        try:
            mine = portal_domain(driver.domain_xml(uuid))
        except HypervisorError:  # undefined meanwhile
            continue
        if mine is not None:
            found.append(
                {
                    "kind": "domain",
                    "key": f"domain:{uuid}",
                    "name": mine[0],
                    "uuid": uuid,
                    "pool": "",
                    "size_bytes": None,
                }
            )
    for pool, name, uuid in volumes:
        info = driver.volume_info(pool=pool, name=name)
        if info is not None:
            found.append(
                {
                    "kind": "volume",
                    "key": f"volume:{pool}/{name}",
                    "name": name,
                    "uuid": uuid,
                    "pool": pool,
                    "size_bytes": info.allocation_bytes,
                }
            )
    return found


def hypervisor_sweep_run(hypervisor_id: int) -> list[dict] | None:
    """Worker: record on the hypervisor what the portal made there that no row owns, each with when it was first
    seen and by how many sweeps; reported once past the grace period. None when the host was not read (down,
    disabled, an error: what was recorded stays)."""
    hv = Hypervisor.objects.filter(pk=hypervisor_id, enabled=True, status=HypervisorStatus.ONLINE).first()
    if hv is None:
        return None
    driver = get_driver(hv.uri)
    try:
        domains, volumes = _listed(hv, driver)  # the host first, then the rows: see the module's docstring
        owned = _owned(domains | {uuid for _, _, uuid in volumes})
        found = _found(driver, domains - owned, [v for v in volumes if v[2] not in owned])
    except HypervisorError as e:
        log.info("sweep of %s: %s", hv.name, e)
        return None
    now = timezone.now()
    grace = timedelta(seconds=settings.PORTAL_ORPHAN_GRACE)
    with transaction.atomic():
        row = Hypervisor.objects.select_for_update().get(pk=hv.pk)
        before = {o["key"]: o for o in row.orphans}
        orphans = []
        for item in found:
            was = before.get(item["key"], {})
            first = was.get("first_seen") or now.isoformat()
            sweeps = was.get("sweeps", 0) + 1
            reported = was.get("reported", False) or (sweeps >= 2 and now - datetime.fromisoformat(first) >= grace)
            orphans.append({**item, "first_seen": first, "sweeps": sweeps, "reported": reported})
        Hypervisor.objects.filter(pk=hv.pk).update(orphans=orphans, orphans_swept=now)
    if any(o["reported"] for o in orphans):
        log.warning("sweep of %s: %d left behind by the portal", hv.name, sum(o["reported"] for o in orphans))
    return orphans


@audited("hypervisor.orphans_remove", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_orphans_remove(*, hypervisor: Hypervisor, actor, keys: list[str] | None = None) -> list[str]:
    """Queue the removal of reported leftovers of the hypervisor (`keys`, None: all of them); the worker checks
    each again before it acts. Returns the keys queued."""
    if not getattr(actor, "is_staff", False):
        raise PermissionDenied("Only staff remove what the portal left on a hypervisor.")
    reported = [o["key"] for o in Hypervisor.objects.get(pk=hypervisor.pk).orphans_reported]
    if keys is None:
        chosen = reported
    else:
        chosen = [k for k in dict.fromkeys(keys) if k in reported]
        if unknown := [k for k in keys if k not in reported]:
            raise MachineError(
                f"Not reported on {hypervisor.name} (gone since, or not past the grace period): {', '.join(unknown)}"
            )
    if not chosen:
        raise MachineError(f"Nothing left behind on {hypervisor.name} to remove.")
    _enqueue(tasks.hypervisor_orphans_remove_task, hypervisor.pk, chosen, actor.pk)
    return chosen


def _remove(driver: HypervisorDriver, item: dict) -> str:
    """Undefine or delete one leftover if it is still the portal's: "removed", "gone" (nothing there) or why
    it was left."""
    uuid = item["uuid"]
    if item["kind"] == "domain":
        if driver.domain_state(uuid) is None:
            return "gone"
        if portal_domain(driver.domain_xml(uuid)) is None:
            return "left: the domain no longer carries the portal's marks"
        return "removed" if driver.undefine(uuid) else "gone"
    match = VOLUME_NAME.match(item["name"])
    if match is None or match["uuid"] != uuid:
        return "left: not a name the portal gives a machine's volume"
    return "removed" if driver.delete_volume(pool=item["pool"], name=item["name"]) else "gone"


def hypervisor_orphans_remove_run(hypervisor_id: int, keys: list[str], actor_id: int | None = None) -> dict[str, str]:
    """Worker: remove these reported leftovers (domains first: they use the volumes), each only if no machine
    row owns its UUID now and it still carries the portal's marks; each outcome audited. Returns key -> outcome."""
    hv = Hypervisor.objects.filter(pk=hypervisor_id).first()
    if hv is None:
        return {}
    actor = get_user_model().objects.filter(pk=actor_id).first() if actor_id else None
    wanted = set(keys)
    items = sorted((o for o in hv.orphans_reported if o["key"] in wanted), key=lambda o: o["kind"] != "domain")
    driver = get_driver(hv.uri)
    outcomes: dict[str, str] = {}
    for item in items:
        what = f"{item['kind']} {item['name']}" + (f" in pool {item['pool']}" if item["pool"] else "")
        if _owned({item["uuid"]}):  # a row has it now: it is a machine's, whatever the sweep saw
            outcome = "left: a machine owns it"
        else:
            try:
                outcome = _remove(driver, item)
            except HypervisorError as e:
                outcome = f"failed: {e}"
        outcomes[item["key"]] = outcome
        result = (
            "success" if outcome in ("removed", "gone") else "failed" if outcome.startswith("failed") else "refused"
        )
        audit.record("hypervisor.orphan_remove", hv, outcome=result, detail=f"{what}: {outcome}", user=actor)
    done = {k for k, v in outcomes.items() if v in ("removed", "gone") or v == "left: a machine owns it"}
    with transaction.atomic():
        row = Hypervisor.objects.select_for_update().get(pk=hv.pk)
        Hypervisor.objects.filter(pk=hv.pk).update(orphans=[o for o in row.orphans if o["key"] not in done])
    log.info("orphans removed on %s: %s", hv.name, ", ".join(f"{k} {v}" for k, v in outcomes.items()) or "none")
    return outcomes
