"""How long a hypervisor sync takes: connection reuse versus a fresh connection.

Prints figures; asserts nothing. Run with `make bench` (libvirtd must run: `make` targets start it).
"""

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from hypervisors.drivers.connections import drop_connection  # noqa: E402
from hypervisors.drivers.libvirt_driver import LibvirtDriver  # noqa: E402

RUNS = int(os.getenv("BENCH_RUNS", "50"))


def measure(uri: str, reuse: bool) -> list[float]:
    times = []
    for _ in range(RUNS):
        if not reuse:
            drop_connection(uri)
        start = time.perf_counter()
        LibvirtDriver(uri).host_info()
        times.append((time.perf_counter() - start) * 1000)
    return times


def report(label: str, times: list[float]) -> None:
    times.sort()
    p95 = times[int(len(times) * 0.95) - 1]
    print(f"{label:42s} median {statistics.median(times):7.2f} ms   p95 {p95:7.2f} ms   max {times[-1]:7.2f} ms")


if __name__ == "__main__":
    print(f"host_info() over {RUNS} runs each")
    for uri in ["qemu:///system", "test:///default"]:
        measure(uri, reuse=True)  # warm up: the first call after a cold libvirtd start probes QEMU
        report(f"{uri} reused connection", measure(uri, reuse=True))
        report(f"{uri} new connection each time", measure(uri, reuse=False))
