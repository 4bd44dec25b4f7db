"""Helpers shared by the benchmarks."""

import shutil
import time


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def wait(predicate, timeout: float = 120.0, interval: float = 0.02):
    """Poll predicate() until it is truthy and return its value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting")
        time.sleep(interval)
    return value


def run_main(main, data_dir: str) -> None:
    """Run a benchmark's main(); remove its data directory after a clean run, keep it (with the logs the
    benchmark put there) after a failure."""
    main()
    shutil.rmtree(data_dir, ignore_errors=True)
