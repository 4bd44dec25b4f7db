"""The second run of `make test` (scripts/engines.sh): the scale-out engines themselves. The tests marked
`engines` then run on PostgreSQL with Huey on Redis and two consumer processes; these check that it is so."""

import re

import pytest
from django.db import connection
from huey.contrib.djhuey import HUEY

from hypervisors import tasks
from tests.conftest import ARTIFACTS, WORKER_PROCESSES, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.engines_only]


def _executed(log: str, ids: set[str]) -> set[str]:
    text = (ARTIFACTS / log).read_text(errors="replace")
    return {i for i in ids if re.search(rf"Executing hypervisors\.tasks\.hypervisor_sync_task: {i}\b", text)}


def test_the_run_is_on_postgresql_and_redis_and_both_consumers_take_work(local):
    assert connection.vendor == "postgresql"
    assert HUEY.__class__.__name__ == "RedisHuey" and WORKER_PROCESSES == 2
    ids = {tasks.hypervisor_sync_task(local.pk).id for _ in range(40)}
    # Every task runs once, somewhere; each consumer runs some of them (they pop the one Redis queue).
    by = wait_for(
        lambda: (one := _executed("worker.log", ids)) | (two := _executed("worker2.log", ids)) == ids and (one, two),
        60,
        message="the queued syncs did not all run",
    )
    assert by[0] and by[1], f"one consumer took all the work: {len(by[0])} and {len(by[1])}"
    assert not by[0] & by[1], "a task ran in both consumers"
