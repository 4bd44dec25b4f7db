"""Quota under concurrency, for real: parallel API creates through gunicorn and the worker on one database."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from machines.models import Machine, Quota
from portal.models import ApiToken
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration

N, LIMIT = 6, 3


def test_concurrent_creates_never_overshoot_the_quota(web_server, local, bmc_server):
    user = UserFactory(username="racer")
    Quota.objects.create(user=user, machines=LIMIT)
    _, raw = ApiToken.issue(user=user)
    results: list[tuple[int, dict]] = []
    barrier = threading.Barrier(N)

    def create(i: int) -> None:
        body = json.dumps({"name": f"race{i}", "deploy_type": "network", "hypervisor": "local", "memory_mib": 128,
                           "disk_gib": 1, "nics": [{"type": "user"}]}).encode()  # fmt: skip
        request = urllib.request.Request(f"{web_server}/api/v1/machines/", data=body, method="POST",
                                         headers={"Authorization": f"Token {raw}", "Content-Type": "application/json"})  # fmt: skip
        barrier.wait()
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                results.append((r.status, json.load(r)))
        except urllib.error.HTTPError as e:
            results.append((e.code, json.load(e)))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    created = [b for status, b in results if status == 201]
    refused = [b for status, b in results if status == 400]
    assert len(created) == LIMIT and len(refused) == N - LIMIT, results
    assert all("exceed your quota" in " ".join(sum(b.values(), [])) for b in refused)
    assert Machine.objects.filter(owner=user).count() == LIMIT
    wait_for(lambda: Machine.objects.filter(owner=user, status="active").count() == LIMIT, 60)
