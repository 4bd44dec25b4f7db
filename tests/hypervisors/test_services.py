import pytest
from django.core.exceptions import ValidationError

from hypervisors import services
from hypervisors.models import Hypervisor, HypervisorStatus

pytestmark = pytest.mark.django_db


def create(django_capture_on_commit_callbacks, **kwargs):
    with django_capture_on_commit_callbacks(execute=True):
        return services.hypervisor_create(**kwargs)


def test_create_checks_the_connection(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.ONLINE
    assert hv.last_seen is not None
    assert hv.arch == "i686" and hv.cpus == 16 and hv.memory_mib == 3072
    assert hv.detected_domain_type == "test" and hv.domain_type == "test"
    assert [p["name"] for p in hv.pools] == ["default-pool"]
    assert [n["name"] for n in hv.networks] == ["default"]
    (test,) = hv.unmanaged_domains
    assert {k: test[k] for k in ("name", "state", "vcpus", "memory_mib", "adoptable")} == {
        "name": "test",
        "state": "running",
        "vcpus": 2,
        "memory_mib": 8192,
        "adoptable": False,  # its disk /guest/diskimage1 is in no pool
    }
    assert test["problems"] == ["Disk vda (/guest/diskimage1) is outside any storage pool of this hypervisor."]


def test_an_unreachable_hypervisor_is_down_with_the_error(django_capture_on_commit_callbacks):
    hv = create(django_capture_on_commit_callbacks, name="gone", uri="qemu+tcp://127.0.0.1:1/system")
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.DOWN
    assert "Connection refused" in hv.status_error
    assert hv.last_seen is None and hv.last_checked is not None


def test_override_wins_over_detection(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default", domain_type_override="qemu")
    hv.refresh_from_db()
    assert hv.detected_domain_type == "test"
    assert hv.domain_type == "qemu"


def test_bad_input_saves_nothing(django_capture_on_commit_callbacks):
    with pytest.raises(ValidationError) as e:
        create(django_capture_on_commit_callbacks, name="Bad Name", uri="xen:///", console_address="0.0.0.0.0")
    assert set(e.value.message_dict) == {"name", "uri", "console_address"}
    assert not Hypervisor.objects.exists()


def test_duplicate_name_is_refused(django_capture_on_commit_callbacks, test_hv_state):
    create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    with pytest.raises(ValidationError, match="already exists"):
        create(django_capture_on_commit_callbacks, name="lab", uri="qemu:///system")
    assert Hypervisor.objects.count() == 1


def test_disabled_hypervisors_are_not_contacted(django_capture_on_commit_callbacks):
    hv = create(django_capture_on_commit_callbacks, name="off", uri="qemu+tcp://127.0.0.1:1/system", enabled=False)
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.DISABLED
    assert hv.status_error == ""


def test_changing_the_uri_checks_again(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    with django_capture_on_commit_callbacks(execute=True):
        services.hypervisor_update(hypervisor=hv, uri="qemu+tcp://127.0.0.1:1/system")
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.DOWN


def test_update_refuses_bad_values_and_keeps_the_row(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    with pytest.raises(ValidationError):
        services.hypervisor_update(hypervisor=hv, uri="ftp://x")
    assert Hypervisor.objects.get(pk=hv.pk).uri == "test:///default"


def test_update_refuses_read_only_fields(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    with pytest.raises(TypeError, match="not editable: status"):
        services.hypervisor_update(hypervisor=hv, status="online")


def test_sync_does_not_overwrite_a_concurrent_uri_change(test_hv_state):
    hv = Hypervisor.objects.create(name="lab", uri="test:///default")
    # The edit lands after the worker loaded the row: simulate by changing the URI
    # in the database only; the sync's conditional update must not apply.
    Hypervisor.objects.filter(pk=hv.pk).update(uri="qemu:///system")
    real_get = Hypervisor.objects.get
    hv_stale = real_get(pk=hv.pk)
    hv_stale.uri = "test:///default"
    from unittest import mock

    with mock.patch.object(Hypervisor.objects, "get", return_value=hv_stale):
        services.hypervisor_sync(hv.pk)
    assert Hypervisor.objects.get(pk=hv.pk).status == HypervisorStatus.PENDING


def test_delete_forgets_the_hypervisor(django_capture_on_commit_callbacks, test_hv_state):
    hv = create(django_capture_on_commit_callbacks, name="lab", uri="test:///default")
    services.hypervisor_delete(hypervisor=hv)
    assert not Hypervisor.objects.exists()


def test_sync_of_a_deleted_hypervisor_is_harmless():
    assert services.hypervisor_sync(999999) == "gone"


def test_periodic_task_schedules_syncs_across_the_minute(settings, test_hv_state):
    from unittest import mock

    from hypervisors import tasks

    settings.PORTAL_SYNC_INTERVAL = 20
    hv = Hypervisor.objects.create(name="lab", uri="test:///default")
    with mock.patch.object(tasks.hypervisor_sync_task, "schedule", autospec=True) as schedule:
        tasks.hypervisor_sync_all_task.call_local()
    assert [c.kwargs["delay"] for c in schedule.call_args_list] == [20, 40]
    assert Hypervisor.objects.get(pk=hv.pk).status == HypervisorStatus.ONLINE  # the immediate one ran


@pytest.mark.parametrize(
    "uri",
    ["qemu+ssh://root@hv2.example.org/system", "qemu+tls://192.0.2.20/system", "qemu+tcp://[2001:db8::20]/system"],
)
@pytest.mark.parametrize("console", ["127.0.0.1", "127.0.1.1", "::1"])
def test_a_remote_hypervisor_with_a_loopback_console_address_is_refused(
    django_capture_on_commit_callbacks, uri, console
):
    # The proxy runs here: dialling that loopback would reach this machine's consoles, not the remote host's.
    with pytest.raises(ValidationError) as e:
        create(django_capture_on_commit_callbacks, name="remote", uri=uri, console_address=console)
    assert "own loopback" in e.value.message_dict["console_address"][0]
    assert not Hypervisor.objects.exists()


def test_a_loopback_console_address_stays_fine_for_this_machine_and_an_edit_cannot_bring_it_back(
    django_capture_on_commit_callbacks,
):
    for i, uri in enumerate(
        [
            "qemu:///system",
            "qemu+tcp://127.0.0.1:1/system",
            "qemu+tcp://localhost:1/system",
            "qemu:///system?socket=/run/other/libvirt-sock",
        ]
    ):
        create(django_capture_on_commit_callbacks, name=f"here{i}", uri=uri, console_address="127.0.0.1", enabled=False)
    remote = create(
        django_capture_on_commit_callbacks,
        name="remote",
        uri="qemu+ssh://hv2/system",
        console_address="192.0.2.20",
        enabled=False,
    )
    with pytest.raises(ValidationError, match="own loopback"):
        services.hypervisor_update(hypervisor=remote, console_address="127.0.0.1")
    assert Hypervisor.objects.get(pk=remote.pk).console_address == "192.0.2.20"
    here = Hypervisor.objects.get(name="here0")
    with pytest.raises(ValidationError, match="own loopback"):
        services.hypervisor_update(hypervisor=here, uri="qemu+ssh://hv3/system")  # moving the URI away counts too


def test_the_proxy_never_dials_a_remote_hypervisors_loopback():
    from hypervisors.models import ConsoleAddressRefused

    remote = Hypervisor(name="remote", uri="qemu+ssh://hv2/system", console_address="192.0.2.20")
    assert remote.console_dial_host("192.0.2.20") == "192.0.2.20"
    assert remote.console_dial_host("0.0.0.0") == "192.0.2.20"  # noqa: S104 - listening everywhere: its console address
    for listen in ("127.0.0.1", "::1", "127.5.5.5"):  # e.g. a domain defined by hand, or before the rule
        with pytest.raises(ConsoleAddressRefused, match="own loopback"):
            remote.console_dial_host(listen)
    legacy = Hypervisor(
        name="legacy", uri="qemu+ssh://hv2/system", console_address="127.0.0.1"
    )  # saved before the rule
    with pytest.raises(ConsoleAddressRefused):
        legacy.console_dial_host("0.0.0.0")  # noqa: S104
    with pytest.raises(ConsoleAddressRefused):
        remote.console_dial_host("::ffff:127.0.0.1")  # loopback in IPv6 clothing
    everywhere = Hypervisor(name="wild", uri="qemu+ssh://hv2/system", console_address="0.0.0.0")  # noqa: S104
    assert everywhere.console_dial_host("0.0.0.0") == "hv2"  # noqa: S104 - never this machine's 0.0.0.0
    here = Hypervisor(name="here", uri="qemu:///system", console_address="127.0.0.1")
    assert here.console_dial_host("127.0.0.1") == "127.0.0.1"
