"""Everything that changes hypervisors. Views, the API, the admin and tasks call these."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import ProtectedError
from django.utils import timezone

from hypervisors.drivers import get_driver, ssh
from hypervisors.drivers.base import DomainInfo, HostInfo, HypervisorError
from hypervisors.models import Hypervisor, HypervisorStatus
from hypervisors.offers import NIC_MODELS
from portal.audit import audited
from portal.refusals import Refusal

log = logging.getLogger(__name__)

EDITABLE_FIELDS = (
    "name",
    "uri",
    "console_address",
    "domain_type_override",
    "enabled",
    "cpu_allocation_ratio",
    "ssh_host_keys",
)


class HypervisorInUse(Refusal):
    """The hypervisor still carries machines."""


def _enqueue_sync(hypervisor_id: int, *, follow_up: bool = False) -> None:
    """Queue a sync after commit; with follow_up, also over the coming minute (new or changed hosts)."""
    from hypervisors.tasks import hypervisor_sync_over_the_minute, hypervisor_sync_task

    task = hypervisor_sync_over_the_minute if follow_up else hypervisor_sync_task
    transaction.on_commit(lambda: task(hypervisor_id))


@audited("hypervisor.create")
@transaction.atomic
def hypervisor_create(
    *,
    name: str,
    uri: str,
    console_address: str = "127.0.0.1",
    domain_type_override: str = "",
    enabled: bool = True,
    cpu_allocation_ratio: float | Decimal = 4,
    ssh_host_keys: str = "",
) -> Hypervisor:
    """Register a hypervisor and queue its first check. Raises ValidationError on bad input."""
    hv = Hypervisor(
        name=name,
        uri=uri,
        console_address=console_address,
        domain_type_override=domain_type_override,
        enabled=enabled,
        cpu_allocation_ratio=Decimal(str(cpu_allocation_ratio)),
        status=HypervisorStatus.PENDING if enabled else HypervisorStatus.DISABLED,
        ssh_host_keys=ssh_host_keys,
    )
    hv.full_clean()
    hv.ssh_host_keys = ssh.format_host_keys(hv.pinned_host_keys)
    hv.save()
    if hv.ssh_host_keys:
        transaction.on_commit(ssh_known_hosts_write)
    _enqueue_sync(hv.pk, follow_up=True)
    return hv


@audited("hypervisor.update", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_update(*, hypervisor: Hypervisor, **changes: Any) -> Hypervisor:
    """Change editable fields; a new URI or a re-enabled hypervisor is checked again."""
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise TypeError(f"not editable: {', '.join(sorted(unknown))}")
    before = Hypervisor.objects.select_for_update().get(pk=hypervisor.pk)
    for field, value in changes.items():
        setattr(hypervisor, field, value)
    if ssh.ssh_peer(hypervisor.uri) != ssh.ssh_peer(before.uri) and "ssh_host_keys" not in changes:
        # Keys pinned for one host:port say nothing about another: the new one is trusted afresh.
        hypervisor.ssh_host_keys = ""
    if ssh.ssh_peer(hypervisor.uri) != ssh.ssh_peer(before.uri):
        hypervisor.ssh_host_keys_offered = ""
    hypervisor.full_clean()
    hypervisor.ssh_host_keys = ssh.format_host_keys(hypervisor.pinned_host_keys)
    recheck = (
        hypervisor.uri != before.uri
        or hypervisor.enabled != before.enabled
        or hypervisor.ssh_host_keys != before.ssh_host_keys
    )
    if recheck:
        hypervisor.status = HypervisorStatus.PENDING if hypervisor.enabled else HypervisorStatus.DISABLED
        hypervisor.status_error = ""
    hypervisor.save()
    if hypervisor.ssh_host_keys != before.ssh_host_keys:
        transaction.on_commit(ssh_known_hosts_write)
    if recheck:
        _enqueue_sync(hypervisor.pk, follow_up=True)
    return hypervisor


@audited("hypervisor.delete", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_delete(*, hypervisor: Hypervisor) -> None:
    """Forget a hypervisor. Refused while machines live on it; nothing on the host is touched."""
    try:
        hypervisor.delete()
    except ProtectedError as e:
        count = len(e.protected_objects)
        raise HypervisorInUse(
            f"Hypervisor {hypervisor.name} still has {count} machine{'s' if count != 1 else ''}; delete or move them first."
        ) from None


@audited("hypervisor.sync", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_request_sync(*, hypervisor: Hypervisor) -> None:
    """Queue a check now (the "check now" button); pages show "Checking" until it answers."""
    if hypervisor.enabled:
        Hypervisor.objects.filter(pk=hypervisor.pk).update(status=HypervisorStatus.PENDING)
        hypervisor.status = HypervisorStatus.PENDING
    _enqueue_sync(hypervisor.pk)


class HostKeyNotOffered(Refusal):
    """Nothing to trust, or not the key staff were shown."""


@audited("hypervisor.trust_host_key", obj_kwarg="hypervisor")
@transaction.atomic
def hypervisor_trust_host_keys(*, hypervisor: Hypervisor, fingerprints: list[str]) -> Hypervisor:
    """Pin the host keys the host offered when it was refused, exactly those whose fingerprints staff were
    shown (`fingerprints`); the previous pins go. Then the known_hosts file is rewritten and a check queued."""
    hv = Hypervisor.objects.select_for_update().get(pk=hypervisor.pk)
    offered = hv.offered_host_keys
    if not offered:
        raise HostKeyNotOffered(f"{hv.name} has offered no new SSH host key; nothing to trust.")
    if sorted(k.fingerprint for k in offered) != sorted(fingerprints):
        raise HostKeyNotOffered(
            f"{hv.name}'s offered host key is not the one shown ({', '.join(k.label for k in offered)} now): "
            "reload the page and compare again."
        )
    hv.ssh_host_keys = ssh.format_host_keys(offered)
    hv.ssh_host_keys_offered = ""
    if hv.enabled:
        hv.status = HypervisorStatus.PENDING
    hv.save(update_fields=["ssh_host_keys", "ssh_host_keys_offered", "status", "updated"])
    transaction.on_commit(ssh_known_hosts_write)
    _enqueue_sync(hv.pk)
    return hv


def worker_ssh_public_key() -> str:
    """The worker's SSH public key, to install in ~/.ssh/authorized_keys on qemu+ssh hosts (made on first need)."""
    return ssh.ensure_identity()


def ssh_known_hosts_write() -> None:
    """The portal's known_hosts, from the keys pinned on every qemu+ssh hypervisor (and nothing else)."""
    entries = []
    for hv in Hypervisor.objects.exclude(ssh_host_keys="").only("uri", "ssh_host_keys"):
        peer = ssh.ssh_peer(hv.uri)
        if peer:
            entries += [(peer[0], peer[1], key) for key in hv.pinned_host_keys]
    ssh.write_known_hosts(entries)


def _host_key_refused(hv: Hypervisor, error: str) -> str:
    """After the worker's ssh refused the host's key: record what the host offers now, and say so."""
    peer = ssh.ssh_peer(hv.uri)
    assert peer is not None
    offered = ssh.scan_host_keys(*peer)
    Hypervisor.objects.filter(pk=hv.pk, uri=hv.uri).update(ssh_host_keys_offered=ssh.format_host_keys(offered))
    shown = ", ".join(k.label for k in offered) or "no key the worker could read"
    pinned = hv.pinned_host_keys
    if not pinned:
        return (
            f"The SSH host key of {peer[0]} is not trusted yet, so the worker did not log in. It offers {shown}. "
            "Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` run on the host, then trust it "
            "on this hypervisor's page (or paste the host's key under Edit)."
        )
    return (
        f"The SSH host key of {peer[0]} has CHANGED: it offers {shown}, not the trusted "
        f"{', '.join(k.label for k in pinned)}. The worker refuses to connect (another machine may be answering "
        "at that address). If the host was reinstalled, compare its new key and trust it on this page."
    )


ADOPTABLE_NICS = ("network", "bridge", "direct", "user")  # MachineNic's types


def adoption_problems(shape: dict) -> list[str]:
    """Why the portal cannot manage a domain of this shape (domain_shape), each reason a sentence; [] when it can.
    What only the portal's rows know (a UUID, a name or a MAC already the portal's, the hypervisor's maintenance)
    is the adoption service's to check."""
    problems = []
    if not shape.get("persistent", True):
        problems.append("It is a transient domain (not defined): define it first.")
    if shape.get("domain_type") not in ("qemu", "kvm", "test"):  # test: libvirt's test:/// driver's own
        problems.append(f"Its domain type is {shape.get('domain_type') or 'unknown'}: the portal runs qemu and kvm.")
    if shape.get("vcpus", 0) < 1 or shape.get("memory_mib", 0) < 1:
        problems.append("It has no vCPU or memory size the portal can read.")
    for disk in shape.get("disks", []):
        name = f"Disk {disk['target'] or '?'}"
        if disk["device"] not in ("disk", "cdrom"):
            problems.append(f"{name} is a {disk['device']}: the portal handles disks and CD-ROM drives.")
        elif disk["type"] not in ("file", "volume"):
            problems.append(
                f"{name} is a {disk['type']} disk{' (' + (disk['path'] or disk['source']) + ')' if disk['path'] or disk['source'] else ''}: "
                "the portal handles only files that are volumes of a storage pool."
            )
        elif (disk["path"] or disk["volume"]) and not disk["pool"]:
            problems.append(
                f"{name} ({disk['path'] or disk['volume']}) is outside any storage pool of this hypervisor."
            )
        elif disk["device"] == "disk" and disk["format"] not in ("qcow2", "raw"):
            problems.append(f"{name} is in {disk['format']} format: the portal handles qcow2 and raw.")
    for i, nic in enumerate(shape.get("nics", [])):
        if nic["type"] not in ADOPTABLE_NICS:
            problems.append(
                f"NIC {i + 1} is of type {nic['type'] or 'unknown'}: the portal handles {', '.join(ADOPTABLE_NICS)}."
            )
        elif nic["model"] and nic["model"] not in NIC_MODELS:
            problems.append(f"NIC {i + 1} is a {nic['model']}: the portal handles {', '.join(NIC_MODELS)}.")
    if other := sorted({g for g in shape.get("graphics", []) if g != "vnc"}):
        problems.append(f"Its graphical console is {', '.join(other)}: the portal's consoles are VNC.")
    if shape.get("hostdevs"):
        problems.append(f"It has {shape['hostdevs']} host device(s) passed through, which the portal cannot take over.")
    return problems


def _unmanaged(d: DomainInfo) -> dict:
    """What a sync records of a domain that is not the portal's: enough for staff to decide on an adoption."""
    entry: dict[str, Any] = {"uuid": d.uuid, "name": d.name, "state": str(d.state)}
    if d.shape is None:
        return entry
    keep = (
        "vcpus",
        "memory_mib",
        "arch",
        "machine_type",
        "firmware",
        "secure_boot",
        "boot",
        "graphics",
        "hostdevs",
        "autostart",
    )
    entry |= {k: d.shape.get(k) for k in keep}
    entry["disks"] = [
        {k: disk[k] for k in ("target", "device", "type", "path", "pool", "volume", "format", "capacity_bytes")}
        for disk in d.shape.get("disks", [])
    ]
    entry["nics"] = [{k: nic[k] for k in ("type", "source", "mac", "model")} for nic in d.shape.get("nics", [])]
    entry["problems"] = adoption_problems(d.shape)
    entry["adoptable"] = not entry["problems"]
    return entry


def _capability_fields(info: HostInfo) -> dict:
    # The portal marks its own domains with a metadata element (see domain XML).
    unmanaged = [_unmanaged(d) for d in info.domains if not d.managed]
    return {
        "hostname": info.hostname,
        "arch": info.arch,
        "cpu_model": info.cpu_model,
        "cpus": info.cpus,
        "memory_mib": info.memory_mib,
        "libvirt_version": info.libvirt_version,
        "hypervisor_version": info.hypervisor_version,
        "detected_domain_type": info.domain_type,
        "domain_types": info.domain_types,
        "guest_arches": info.guest_arches,
        "machine_types": info.machine_types,
        "cpu_modes": info.cpu_modes,
        "cpu_models": info.cpu_models,
        "firmwares": info.firmwares,
        "interfaces": info.interfaces,
        "devices": info.devices,
        "pools": [vars(p) for p in info.pools],
        "networks": [vars(n) for n in info.networks],
        "unmanaged_domains": unmanaged,
        "managed_domain_count": len(info.domains) - len(unmanaged),
    }


def hypervisor_sync(hypervisor_id: int) -> str:
    """Contact the hypervisor and record what it has; return the resulting status.

    Runs in the worker, never in a request. The update is conditional on the URI
    still being the one contacted, so an edit made meanwhile is not overwritten.
    """
    try:
        hv = Hypervisor.objects.get(pk=hypervisor_id)
    except Hypervisor.DoesNotExist:
        return "gone"
    now = timezone.now()
    rows = Hypervisor.objects.filter(pk=hv.pk, uri=hv.uri)
    if not hv.enabled:
        rows.update(status=HypervisorStatus.DISABLED, status_error="", last_checked=now)
        return HypervisorStatus.DISABLED
    try:
        if hv.uses_ssh:
            ssh_known_hosts_write()  # this worker's copy, as pinned now (the web may run elsewhere)
        driver = get_driver(hv.uri)
        info = driver.host_info()
    except HypervisorError as e:
        log.info("hypervisor %s is down: %s", hv.name, e)
        error = str(e) or type(e).__name__
        if hv.uses_ssh and ssh.host_key_refused(error):
            error = _host_key_refused(hv, error)
        rows.update(status=HypervisorStatus.DOWN, status_error=error, last_checked=now)
        return HypervisorStatus.DOWN
    rows.update(
        status=HypervisorStatus.ONLINE,
        status_error="",
        last_seen=now,
        last_checked=now,
        **_capability_fields(info),
    )
    return HypervisorStatus.ONLINE
