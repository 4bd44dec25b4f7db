"""The work queue as people see it: is the worker running, and what waits for it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.utils import timezone
from huey.contrib.djhuey import HUEY

from portal.models import Heartbeat

WORKER = "worker"


def beat(name: str = WORKER) -> None:
    """Record that this process runs now (the worker does when it starts, then every PORTAL_WORKER_HEARTBEAT s)."""
    Heartbeat.objects.update_or_create(
        name=name, defaults={"seen": timezone.now(), "detail": f"{socket.gethostname()} pid {os.getpid()}"}
    )


@dataclass
class QueueReport:
    worker_seen: datetime | None
    worker_detail: str
    waiting: int | None  # None: the queue could not be read (see error)
    tasks: list[dict] = field(default_factory=list)  # the first few: name, machine id if any
    error: str = ""

    @property
    def worker_ok(self) -> bool:
        if settings.HUEY.get("immediate"):
            return True  # PORTAL_HUEY_IMMEDIATE: tasks run in the web process, there is no worker to wait for
        return self.worker_seen is not None and self.worker_age < settings.PORTAL_WORKER_STALE_AFTER

    @property
    def worker_age(self) -> float:
        return (timezone.now() - self.worker_seen).total_seconds() if self.worker_seen else float("inf")


def queue_report(limit: int = 0) -> QueueReport:
    """The worker's last beat, how many tasks wait, and (limit > 0) the first few of them. A queue that
    cannot be read (Redis away, a task from an older version) is reported, never raised."""
    hb = Heartbeat.objects.filter(name=WORKER).first()
    tasks, waiting, error = [], None, ""
    try:
        waiting = HUEY.pending_count()
        for task in HUEY.pending(limit=limit) if limit else []:  # (limit 0 would read them all)
            name = task.name.rsplit(".", 1)[-1].removesuffix("_task").replace("_", " ")
            machine_id = (
                task.args[0] if task.args and name.startswith("machine ") and isinstance(task.args[0], int) else None
            )
            tasks.append({"name": name, "machine_id": machine_id})
    except Exception as e:  # noqa: BLE001 - whatever the queue's backend raises
        error = f"the queue cannot be read: {e}"
    return QueueReport(
        worker_seen=hb.seen if hb else None,
        worker_detail=hb.detail if hb else "",
        waiting=waiting,
        tasks=tasks,
        error=error,
    )
