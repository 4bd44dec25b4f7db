"""Request-to-running time of image machines through the portal, next to plain libvirt-python.

For N machines created one after another and N at once, prints p50 and p95 of
the time from the create request to a running domain, the same for a plain
libvirt-python script doing the same steps (overlay, seed upload, define,
start) in the same run, their ratio, and the queue pickup time (request to the
worker's first step). Prints figures; asserts nothing.

Needs libvirtd (`make` targets start it). Run: `.venv/bin/python bench/provision.py [N]`.
Uses its own data directory and consumer, and removes every machine it made.
"""

import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = tempfile.mkdtemp(prefix="portal-bench-")
os.environ.update({"PORTAL_DATA_DIR": DATA, "DJANGO_SETTINGS_MODULE": "config.settings"})

import django  # noqa: E402

from bench.common import pct, run_main, wait  # noqa: E402
from portal.processes import stop_groups  # noqa: E402

django.setup()

from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: E402
from django.core.management import call_command  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5
URI = "qemu:///system"


def setup():
    from django.contrib.auth import get_user_model

    from hypervisors import images, services
    from hypervisors.models import Hypervisor, Image

    tiny = subprocess.run([str(ROOT / "scripts/build-test-images.sh")], capture_output=True, text=True, check=True)
    disk = dict(line.split("=", 1) for line in tiny.stdout.split())["tiny_disk"]
    user = get_user_model().objects.create_user("bench")
    hv = services.hypervisor_create(name="local", uri=URI)
    image = images.image_create_from_upload(
        name="tiny",
        kind="disk",
        fmt="qcow2",
        default_user="tiny",
        uploaded=SimpleUploadedFile("t.qcow2", Path(disk).read_bytes()),
    )
    wait(lambda: Hypervisor.objects.get(pk=hv.pk).status == "online")
    wait(lambda: Image.objects.get(pk=image.pk).status != "importing")
    assert Image.objects.get(pk=image.pk).status == "ready", Image.objects.get(pk=image.pk).status_message
    return user, Hypervisor.objects.get(pk=hv.pk), Image.objects.get(pk=image.pk)


def portal_create(user, hv, image, name: str) -> tuple[float, float]:
    """(request to running, queue pickup) in seconds."""
    from machines import services
    from machines.models import Machine

    start = time.monotonic()
    machine = services.machine_create(
        owner=user,
        hypervisor=hv,
        name=name,
        image=image,
        memory_mib=128,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    wait(lambda: Machine.objects.filter(pk=machine.pk, status__in=["active", "error"]).exists())
    total = time.monotonic() - start
    events = {e.step: e for e in machine.events.all()}
    first = events["image"]
    took = float(re.search(r"\(([\d.]+) s\)$", first.message).group(1))
    pickup = (first.created - events["create"].created).total_seconds() - took
    return total, pickup


def plain_create(image_path: str, name: str) -> float:
    """The same steps with libvirt-python alone: overlay, seed upload, define, start."""
    import libvirt

    from hypervisors.drivers.base import DiskSpec, DomainSpec, NicSpec
    from hypervisors.drivers.domxml import build_domain_xml, volume_xml
    from machines import cloudinit

    start = time.monotonic()
    conn = libvirt.open(URI)
    pool = conn.storagePoolLookupByName("default")
    disk = pool.createXML(
        volume_xml(
            name=f"{name}-disk.qcow2",
            capacity_bytes=1 << 30,
            fmt="qcow2",
            backing_path=image_path,
            backing_format="qcow2",
        ),
        0,
    )
    seed_bytes = cloudinit.build_seed_iso(
        cloudinit.SeedSpec(instance_id=f"i-{name}", hostname=name, default_user="tiny")
    )
    seed = pool.createXML(volume_xml(name=f"{name}-seed.iso", capacity_bytes=len(seed_bytes), fmt="raw"), 0)
    stream = conn.newStream(0)
    seed.upload(stream, 0, len(seed_bytes), 0)
    stream.sendAll(lambda _s, n, f: f.read(n), io.BytesIO(seed_bytes))
    stream.finish()
    spec = DomainSpec(
        uuid=str(uuid.uuid4()),
        name=name,
        domain_type="qemu",
        vcpus=1,
        memory_mib=128,
        disks=(
            DiskSpec(path=disk.path(), boot_order=1),
            DiskSpec(path=seed.path(), device="cdrom", format="raw", bus="ide"),
        ),
        nics=(
            NicSpec(
                type="user",
                source="",
                mac=f"52:54:00:{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:2]}",
            ),
        ),
    )
    conn.defineXML(build_domain_xml(spec)).create()
    elapsed = time.monotonic() - start
    conn.close()
    return elapsed


def plain_cleanup(names: list[str]) -> None:
    import libvirt

    conn = libvirt.open(URI)
    pool = conn.storagePoolLookupByName("default")
    for name in names:
        dom = conn.lookupByName(name)
        dom.destroy()
        dom.undefine()
        for vol in (f"{name}-disk.qcow2", f"{name}-seed.iso"):
            pool.storageVolLookupByName(vol).delete(0)
    conn.close()


def run_parallel(fn, names):
    results: dict = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, fn(n))) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[n] for n in names]


def main() -> None:
    from django.db import connection

    from hypervisors.models import ImageCopy
    from machines import services
    from machines.models import Machine

    call_command("migrate", verbosity=0)  # before the consumer starts, so it finds its tables
    worker_log = Path(DATA) / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "run_huey", "--workers", "4"],
        cwd=ROOT,
        stdout=worker_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        user, hv, image = setup()
        # Warm the image copy so both sides start from an image already in the pool.
        portal_create(user, hv, image, "warm")
        base = ImageCopy.objects.get(image=image).path

        def portal(name):
            r = portal_create(user, hv, image, name)
            connection.close()
            return r

        def delete_all():
            for machine in Machine.objects.all():
                services.machine_delete(machine=machine)
            wait(lambda: not Machine.objects.exists(), 120)

        delete_all()
        rows = []
        for mode in ("sequential", "parallel"):
            # Each side runs with no guests of the other booting, so both see the same load.
            names = [f"b{mode[0]}{i}" for i in range(N)]
            portal_results = [portal(n) for n in names] if mode == "sequential" else run_parallel(portal, names)
            delete_all()
            if mode == "sequential":
                plain = [plain_create(base, f"p{n}") for n in names]
            else:
                plain = run_parallel(lambda n: plain_create(base, f"p{n}"), names)
            plain_cleanup([f"p{n}" for n in names])
            totals = [r[0] for r in portal_results]
            pickups = [r[1] for r in portal_results]
            rows.append((mode, totals, plain, pickups))
        print(f"{N} image machines, tiny guest, {hv.domain_type} on {hv.hostname}; seconds")
        print(
            f"{'mode':<11}{'portal p50':>11}{'p95':>8}{'plain p50':>11}{'p95':>8}{'ratio p50':>11}{'pickup p50':>12}{'p95':>8}"
        )
        for mode, totals, plain, pickups in rows:
            print(
                f"{mode:<11}{statistics.median(totals):>11.3f}{pct(totals, 95):>8.3f}{statistics.median(plain):>11.3f}"
                f"{pct(plain, 95):>8.3f}{statistics.median(totals) / statistics.median(plain):>11.2f}"
                f"{statistics.median(pickups):>12.3f}{pct(pickups, 95):>8.3f}"
            )
    except BaseException:
        print(f"failed; the worker's log is {worker_log}", file=sys.stderr)
        raise
    finally:
        stop_groups([worker])


if __name__ == "__main__":
    run_main(main, DATA)
