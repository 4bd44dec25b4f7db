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
    """Record that this process runs now (the worker calls it when it starts and every minute)."""
    Heartbeat.objects.update_or_create(name=name, defaults={"seen": timezone.now(),
                                                            "detail": f"{socket.gethostname()} pid {os.getpid()}"})  # fmt: skip


@dataclass
class QueueReport:
    worker_seen: datetime | None
    worker_detail: str
    waiting: int
    tasks: list[dict] = field(default_factory=list)  # the first few: name, machine id if any

    @property
    def worker_ok(self) -> bool:
        return self.worker_seen is not None and self.worker_age < settings.PORTAL_WORKER_STALE_AFTER

    @property
    def worker_age(self) -> float:
        return (timezone.now() - self.worker_seen).total_seconds() if self.worker_seen else float("inf")


def queue_report(limit: int = 10) -> QueueReport:
    hb = Heartbeat.objects.filter(name=WORKER).first()
    tasks = []
    for task in HUEY.pending(limit=limit) if limit else []:  # (limit 0 would read them all)
        name = task.name.rsplit(".", 1)[-1].removesuffix("_task").replace("_", " ")
        machine_id = task.args[0] if task.args and name.startswith("machine ") and isinstance(task.args[0], int) else None
        tasks.append({"name": name, "machine_id": machine_id})
    return QueueReport(worker_seen=hb.seen if hb else None, worker_detail=hb.detail if hb else "",
                       waiting=HUEY.pending_count(), tasks=tasks)  # fmt: skip
