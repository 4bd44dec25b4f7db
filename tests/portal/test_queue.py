"""The worker's heartbeat and the work queue as the dashboard, the machine page and /healthz show them."""

import threading
from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone
from huey.api import Task

from machines.states import Status
from portal.models import Heartbeat
from portal.queue import beat, queue_report
from portal.tasks import _beat_forever, worker_started
from tests.factories import HypervisorFactory, MachineFactory

pytestmark = pytest.mark.django_db


def test_the_worker_beats_when_it_starts_then_from_a_thread(settings):
    assert not queue_report().worker_ok
    with mock.patch("portal.tasks.start_heartbeat") as start, mock.patch("portal.tasks._started", threading.Lock()):
        worker_started()
        worker_started()  # every worker thread beats; only the first starts the beat
    assert start.call_count == 1
    assert queue_report().worker_ok and "pid" in queue_report().worker_detail
    Heartbeat.objects.update(seen=timezone.now() - timedelta(minutes=10))
    settings.PORTAL_WORKER_HEARTBEAT = 0
    with (
        mock.patch("portal.tasks.close_old_connections"),
        mock.patch("portal.tasks.time.sleep", side_effect=[None, SystemExit]),
    ):
        with pytest.raises(SystemExit):
            _beat_forever()  # one beat, then the (mocked) sleep ends it
    assert queue_report().worker_age < 5


def test_an_unreadable_queue_is_reported_not_raised(client, staff_client):
    beat()
    with mock.patch("portal.queue.HUEY.pending_count", side_effect=ConnectionError("redis is away")):
        body = client.get("/healthz").json()
        html = staff_client.get("/").content.decode()
    assert body["status"] == "degraded" and body["worker_ok"] is True and "redis is away" in body["queue_error"]
    assert "the queue cannot be read: redis is away" in html and '<strong id="queue-waiting">?</strong>' in html


def test_dashboard_says_when_the_worker_stopped(user_client, user, settings):
    r = user_client.get("/")
    assert b"worker never seen" in r.content and b'id="worker-down"' in r.content
    beat()
    r = user_client.get("/")
    assert b"worker running" in r.content and b'id="worker-down"' not in r.content
    Heartbeat.objects.update(seen=timezone.now() - timedelta(seconds=settings.PORTAL_WORKER_STALE_AFTER + 60))
    assert b"worker stopped" in user_client.get("/").content


def test_a_busy_machine_says_it_waits_for_the_worker(user_client, user):
    machine = MachineFactory(
        name="waiting", owner=user, hypervisor=HypervisorFactory(), deploy_type="network", status=Status.PROVISIONING
    )
    assert b'id="worker-down"' in user_client.get(machine.get_absolute_url()).content
    r = user_client.get("/")
    assert b"waiting</a> \xc2\xb7 provisioning for" in r.content  # in progress, on the dashboard
    beat()
    assert b'id="worker-down"' not in user_client.get(machine.get_absolute_url()).content


def test_staff_see_what_waits_in_the_queue(staff_client):
    waiting = [Task(args=(7,)), Task(args=())]
    waiting[0].name, waiting[1].name = "machines.tasks.machine_provision_task", "hypervisors.tasks.hypervisor_sync_task"
    with (
        mock.patch("portal.queue.HUEY.pending", return_value=waiting),
        mock.patch("portal.queue.HUEY.pending_count", return_value=2),
    ):
        r = staff_client.get("/")
    html = r.content.decode()
    assert '<strong id="queue-waiting">2</strong> tasks waiting' in html
    assert "machine provision #7</span>" in html and "hypervisor sync</span>" in html


def test_healthz_reports_the_worker_and_the_queue(client):
    body = client.get("/healthz").json()
    assert body["status"] == "degraded" and body["worker_ok"] is False and body["worker_seen"] is None
    beat()
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["worker_ok"] is True and body["queue_waiting"] == 0
