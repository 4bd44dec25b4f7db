"""Placement across two real libvirtds: the host's and a private one in its own namespaces."""

import pytest

from hypervisors import services as hv_services
from hypervisors.drivers import connections
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import services
from machines.models import Machine
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import UserFactory
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.integration


@pytest.fixture
def second_host(tmp_path):
    """A private libvirtd with a dir pool named like the host's; requested before `worker` so it outlives it."""
    with PrivateLibvirtd.start(name="place", log_dir=ARTIFACTS) as lv:
        pool = lv.workdir / "pool"
        lv.define_xml("pool", f"<pool type='dir'><name>default</name><target><path>{pool}</path></target></pool>")
        try:
            yield lv
        finally:
            connections.drop_connection(lv.uri)


def test_any_hypervisor_fills_the_roomiest_first_then_refuses(second_host, worker, local, bmc_server):
    other = hv_services.hypervisor_create(name="second", uri=second_host.uri)
    other = wait_for(lambda: (h := Hypervisor.objects.get(pk=other.pk)).status == HypervisorStatus.ONLINE and h, 60)
    local.refresh_from_db()
    size = min(local.memory_mib, other.memory_mib) * 6 // 10  # two fit across the hosts, a third does not
    owner = UserFactory(username="placer", is_staff=True)  # no quota in the way

    def create(name: str) -> Machine:
        machine = services.machine_create(
            owner=owner,
            hypervisor=None,
            name=name,
            deploy_type="network",
            memory_mib=size,
            disk_gib=1,
            nics=[services.NicInput(type="user")],
        )
        return wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 60)

    first, second = create("p1"), create("p2")
    assert first.status == second.status == "active"
    assert {first.hypervisor.name, second.hypervisor.name} == {"local", "second"}  # the second went where room was
    reason = first.events.get(step="placement").message
    assert reason.startswith(f"placed on {first.hypervisor.name}:") and "MiB memory" in reason
    # The domains really are on the hypervisors the portal chose.
    assert str(second.uuid) in second_host.virsh("list", "--all", "--uuid") or str(first.uuid) in second_host.virsh(
        "list", "--all", "--uuid"
    )

    with pytest.raises(Exception) as refused:
        create("p3")
    message = " ".join(refused.value.messages)
    assert "No hypervisor has room" in message and "local:" in message and "second:" in message
    assert not Machine.objects.filter(name="p3").exists()
