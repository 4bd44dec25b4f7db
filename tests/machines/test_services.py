import subprocess
from datetime import timedelta
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from huey.exceptions import RetryTask

from hypervisors.drivers.base import HypervisorFatalError, HypervisorUnavailable, PowerState
from hypervisors.models import Image, ImageStatus
from machines import services
from machines.models import Machine, MachineObserved
from machines.states import Status
from tests.factories import (
    HypervisorFactory,
    ImageFactory,
    MachineFactory,
    UserFactory,
    tenant_network_entry,
    tenant_nic,
)
from tests.fakes import FakeDriver

pytestmark = pytest.mark.django_db

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD tester@portal"


@pytest.fixture
def hv(db):
    # The tenant network: the NIC the (non-staff) owner's machines get; user-mode networking is staff-only.
    return HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        networks=[{"name": "default", "active": True}, tenant_network_entry()],
        pools=[
            {
                "name": "default",
                "active": True,
                "capacity_bytes": 1 << 40,
                "allocation_bytes": 0,
                "available_bytes": 1 << 40,
            }
        ],
    )


@pytest.fixture
def image(settings, tmp_path):
    settings.PORTAL_IMAGE_DIR = tmp_path
    path = tmp_path / "1.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "64M"], check=True, capture_output=True)
    return ImageFactory(
        name="tiny",
        status=ImageStatus.READY,
        file_name=path.name,
        sha256="ab" * 32,
        file_size_bytes=path.stat().st_size,
        virtual_size_bytes=64 << 20,
        default_user="tiny",
    )


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


def create(django_capture_on_commit_callbacks, **kw) -> Machine:
    with django_capture_on_commit_callbacks(execute=True):
        machine = services.machine_create(**kw)
    machine.refresh_from_db()
    return machine


def base_kwargs(owner, hv, image, **kw):
    return {
        "owner": owner,
        "hypervisor": hv,
        "name": "web1",
        "image": image,
        "memory_mib": 256,
        "disk_gib": 1,
        "nics": [tenant_nic()],
        "ssh_authorized_keys": KEY,
        **kw,
    }


def test_create_runs_the_pipeline_to_active(django_capture_on_commit_callbacks, host, owner, hv, image):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    assert machine.status == Status.ACTIVE and machine.power_state == PowerState.RUNNING
    assert [e.step for e in machine.events.all()] == [
        "create",
        "status",
        "image",
        "disk",
        "seed",
        "define",
        "start",
        "status",
    ]
    pool = host.pools["default"]
    assert pool[image.volume_name]["data"].startswith(b"QFI\xfb")  # the image, uploaded once
    assert pool[machine.disk_volume]["backing"] == f"/fake/default/{image.volume_name}"  # an overlay, not a copy
    assert pool[machine.disk_volume]["capacity"] == 1 << 30
    assert pool[machine.seed_volume]["data"][0x8001:0x8006] == b"CD001"
    dom = host.domains[str(machine.uuid)]
    assert dom["state"] == PowerState.RUNNING and dom["autostart"] is True
    assert dom["spec"].name == machine.domain_name and dom["spec"].nics[0].mac == machine.nics.get().mac


def test_running_the_pipeline_again_changes_nothing(django_capture_on_commit_callbacks, host, owner, hv, image):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    before = {k: dict(v) for k, v in host.pools["default"].items()}
    Machine.objects.filter(pk=machine.pk).update(status=Status.PROVISIONING)
    services.machine_provision_run(machine.pk)
    assert set(host.pools["default"]) == set(before)
    assert host.calls.count("upload_volume") == 3  # image once, seed twice (it is rebuilt each run)
    assert host.calls.count("define_domain") == 2 and len(host.domains) == 1


def test_a_fatal_error_fails_the_machine_and_cleans_up(django_capture_on_commit_callbacks, host, owner, hv, image):
    host.fail["define_domain"] = HypervisorFatalError("XML error: bad thing")
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    assert machine.status == Status.ERROR and "bad thing" in machine.status_message
    assert set(host.pools["default"]) == {image.volume_name}  # the shared image copy stays; the rest went
    assert host.domains == {}
    assert "cleanup" in [e.step for e in machine.events.all()]


def test_a_transient_error_retries_then_gives_up_cleanly(
    django_capture_on_commit_callbacks, settings, host, owner, hv, image
):
    settings.PORTAL_PROVISION_RETRIES = 2
    host.fail["start"] = HypervisorUnavailable("connection reset")
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    assert machine.status == Status.PROVISIONING and machine.attempts == 1  # RetryTask was raised
    host.fail["start"] = HypervisorUnavailable("connection reset")
    with pytest.raises(RetryTask):
        services.machine_provision_run(machine.pk)
    host.fail["start"] = HypervisorUnavailable("still down")
    services.machine_provision_run(machine.pk)
    machine.refresh_from_db()
    assert machine.status == Status.ERROR and "still down" in machine.status_message
    assert host.domains == {} and set(host.pools["default"]) == {image.volume_name}


def test_a_retry_that_succeeds_leaves_one_of_everything(django_capture_on_commit_callbacks, host, owner, hv, image):
    host.fail["start"] = HypervisorUnavailable("connection reset")
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    services.machine_provision_run(machine.pk)
    machine.refresh_from_db()
    assert machine.status == Status.ACTIVE
    assert len(host.domains) == 1 and len(host.pools["default"]) == 3


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"name": "Web_1"}, "name", "RFC 1123"),
        ({"name": "a" * 64}, "name", "at most 63"),
        ({"disk_gib": 0}, "disk_gib", "greater than or equal to 1"),
        ({"memory_mib": 64}, "memory_mib", "greater than or equal to 128"),
        ({"pool": "nope"}, "pool", "not active"),
        # Not staff: the policy answers before the host is asked (no list of its networks for a stranger).
        (
            {"nics": [services.NicInput(type="network", source="lan9")]},
            "nics",
            "libvirt network lan9 is not published to you",
        ),
        ({"deploy_type": "network"}, "image", "has no image"),
        ({"deploy_type": "warp"}, "deploy_type", "Choose one of"),
        ({"deploy_type": "iso"}, "deploy_type", "installed through its console"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_saved(host, owner, hv, image, changes, field, message):
    with pytest.raises(ValidationError) as e:
        services.machine_create(**base_kwargs(owner, hv, image, **changes))
    assert message in " ".join(e.value.message_dict[field])
    assert not Machine.objects.exists() and host.calls == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ssh_authorized_keys": "ssh-rsa not-base64!"}, "SSH"),
        ({"user_data": "hostname: x"}, "#cloud-config"),
        ({"user_data": "#cloud-config\n" + "a: b\n" * 20000}, "64 KiB"),
        (
            {"nics": [tenant_nic(dhcp4=False, addresses=["192.0.2.10/24"], gateway4="10.0.0.1")]},
            "gateway 10.0.0.1 is not in 192.0.2.0/24",
        ),
    ],
)
def test_bad_cloud_init_input_is_refused(host, owner, hv, image, changes, message):
    with pytest.raises(ValidationError, match=message):
        services.machine_create(**base_kwargs(owner, hv, image, **changes))
    assert not Machine.objects.exists()


def test_an_image_that_is_not_ready_is_refused(host, owner, hv, image):
    Image.objects.filter(pk=image.pk).update(status=ImageStatus.IMPORTING)
    image.refresh_from_db()
    with pytest.raises(ValidationError, match="not ready"):
        services.machine_create(**base_kwargs(owner, hv, image))


def test_the_disk_must_hold_the_image(host, owner, hv, image):
    Image.objects.filter(pk=image.pk).update(virtual_size_bytes=5 << 30)
    image.refresh_from_db()
    with pytest.raises(ValidationError, match="needs at least 5 GiB"):
        services.machine_create(**base_kwargs(owner, hv, image, disk_gib=4))


def test_an_offline_hypervisor_is_refused(host, owner, hv, image):
    hv.status = "down"
    with pytest.raises(ValidationError, match="down"):
        services.machine_create(**base_kwargs(owner, hv, image))


def test_a_mac_is_unique_across_the_portal(django_capture_on_commit_callbacks, host, owner, hv, image):
    create(
        django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, nics=[tenant_nic(mac="52:54:00:00:00:01")])
    )
    with pytest.raises(ValidationError, match="already used"):
        services.machine_create(
            **base_kwargs(owner, hv, image, name="web2", nics=[tenant_nic(mac="52:54:00:00:00:01")])
        )


def test_generated_macs_use_the_prefix(settings, db):
    settings.PORTAL_MAC_PREFIX = "52:54:01"
    mac = services.generate_mac()
    assert mac.startswith("52:54:01:") and len(mac) == 17


def test_delete_removes_everything_but_protection_touches_nothing(
    django_capture_on_commit_callbacks, host, owner, hv, image
):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, deletion_protection=True))
    with pytest.raises(services.MachineError, match="protected"):
        services.machine_delete(machine=machine, actor=machine.owner)
    assert len(host.domains) == 1 and Machine.objects.get(pk=machine.pk).status == Status.ACTIVE
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=False)
    machine.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_delete(machine=machine, actor=machine.owner)
    assert not Machine.objects.filter(pk=machine.pk).exists()
    assert host.domains == {} and set(host.pools["default"]) == {image.volume_name}


def test_one_power_operation_at_a_time(host, owner, hv, image, django_capture_on_commit_callbacks):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    services.machine_power(
        machine=machine, action="poweroff", actor=machine.owner
    )  # not executed: no on_commit capture
    with pytest.raises(services.MachineError, match="busy with another operation"):
        services.machine_power(machine=machine, action="start", actor=machine.owner)
    with pytest.raises(services.MachineError, match="Unknown action"):
        services.machine_power(machine=machine, action="explode", actor=machine.owner)


def test_power_action_updates_the_observed_state(host, owner, hv, image, django_capture_on_commit_callbacks):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_power(machine=machine, action="poweroff", actor=machine.owner)
    machine.refresh_from_db()
    assert machine.power_state == PowerState.OFF and machine.operation == ""


def test_grow_disk_only_grows(host, owner, hv, image, django_capture_on_commit_callbacks):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    with pytest.raises(ValidationError, match="only grow"):
        services.machine_grow_disk(machine=machine, disk_gib=1, actor=machine.owner)
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_grow_disk(machine=machine, disk_gib=3, actor=machine.owner)
    machine.refresh_from_db()
    assert machine.status == Status.ACTIVE and host.pools["default"][machine.disk_volume]["capacity"] == 3 << 30


def test_rebuild_gives_a_fresh_instance_id(host, owner, hv, image, django_capture_on_commit_callbacks):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    first = machine.instance_id
    with django_capture_on_commit_callbacks(execute=True):
        services.machine_rebuild(machine=machine, actor=machine.owner)
    machine.refresh_from_db()
    assert machine.status == Status.ACTIVE and machine.instance_id != first
    assert len(host.domains) == 1


def test_reconcile_fails_stuck_machines_and_notices_vanished_domains(
    host, owner, hv, image, django_capture_on_commit_callbacks, settings
):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    stuck = MachineFactory(
        name="stuck",
        owner=owner,
        hypervisor=hv,
        image=image,
        status=Status.PROVISIONING,
        status_changed=timezone.now() - timedelta(seconds=settings.PORTAL_PROVISION_TIMEOUT + 5),
    )
    host.domains.clear()
    services.machines_reconcile()
    stuck.refresh_from_db()
    machine.refresh_from_db()
    assert stuck.status == Status.ERROR and "timed out" in stuck.status_message
    assert machine.power_state == "missing"
    assert machine.events.filter(step="reconcile").exists()


def test_reconcile_records_the_addresses_of_running_guests(host, owner, hv, image, django_capture_on_commit_callbacks):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    mac = machine.nics.get().mac
    dom = host.domains[str(machine.uuid)]
    dom["state"] = PowerState.RUNNING
    dom["addresses"] = {mac: ["192.0.2.10/24"]}
    services.machines_reconcile()
    machine.refresh_from_db()
    assert machine.last_observed.guest_addresses == {mac: ["192.0.2.10/24"]}
    assert machine.nics.get().seen_addresses == ["192.0.2.10/24"]
    dom["state"] = PowerState.OFF  # an address it had while running is not shown once it is off
    services.machines_reconcile()
    machine.refresh_from_db()
    assert machine.last_observed.guest_addresses == {} and machine.nics.get().seen_addresses == []


def test_reconcile_takes_screenshots_in_batches_in_turn(host, owner, hv, settings):
    settings.PORTAL_SCREENSHOTS_PER_MINUTE = 2
    now = timezone.now()
    asked_at = {
        "never": None,
        "old": now - timedelta(hours=1),
        "recent": now - timedelta(minutes=2),
        "fresh": now - timedelta(seconds=55),
    }
    for name, when in asked_at.items():
        m = MachineFactory(
            name=name, owner=owner, hypervisor=hv, deploy_type="network", status=Status.ACTIVE, power_state="running"
        )
        MachineObserved.objects.create(machine=m, screenshot_requested=when)
        host.domains[str(m.uuid)] = {"state": PowerState.RUNNING}
    MachineFactory(
        name="off", owner=owner, hypervisor=hv, deploy_type="network", status=Status.ACTIVE, power_state="off"
    )
    # A machine whose hypervisor is down keeps its last state; it must not take a place in every batch.
    down = HypervisorFactory(name="gone", uri="qemu+tcp://gone/system", status="down")
    MachineFactory(
        name="stranded",
        owner=owner,
        hypervisor=down,
        deploy_type="network",
        status=Status.ACTIVE,
        power_state="running",
    )

    def batch():
        with mock.patch("machines.tasks.machine_screenshot_task") as task:
            services.machines_reconcile()
        return {Machine.objects.get(pk=c.args[0]).name for c in task.call_args_list}

    assert batch() == {"never", "old"}
    assert batch() == {"recent", "fresh"}  # the next minute, the others: asking counts, not succeeding


def test_one_machines_address_error_does_not_stop_the_reconcile(
    host, owner, hv, image, django_capture_on_commit_callbacks
):
    first = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, name="a1"))
    second = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image, name="a2"))
    host.domains[str(first.uuid)].update(state=PowerState.RUNNING, addresses=HypervisorFatalError("domain not found"))
    host.domains[str(second.uuid)].update(state=PowerState.RUNNING, addresses={second.nics.get().mac: ["192.0.2.7/24"]})
    services.machines_reconcile()
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.power_state == second.power_state == "running"
    assert first.last_observed.guest_addresses == {}
    assert second.last_observed.guest_addresses == {second.nics.get().mac: ["192.0.2.7/24"]}


def test_reconcile_does_not_undo_a_power_change_made_meanwhile(
    host, owner, hv, image, django_capture_on_commit_callbacks
):
    machine = create(django_capture_on_commit_callbacks, **base_kwargs(owner, hv, image))
    Machine.objects.filter(pk=machine.pk).update(power_state="off")
    host.domains[str(machine.uuid)]["state"] = PowerState.RUNNING
    real = FakeDriver.domain_states

    def states_then_a_stop(self):
        states = real(self)
        Machine.objects.filter(pk=machine.pk).update(power_state="crashed")  # a power action's own result lands
        return states

    with mock.patch.object(FakeDriver, "domain_states", states_then_a_stop):
        services.machines_reconcile()
    machine.refresh_from_db()
    assert machine.power_state == "crashed" and machine.power_checked is not None
