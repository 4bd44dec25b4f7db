import pytest
from django.core.exceptions import ValidationError

from hypervisors.models import Image, ImageStatus
from machines import capacity
from machines.models import Machine, Quota
from tests.factories import HypervisorFactory, UserFactory

pytestmark = pytest.mark.django_db

POOLS = [{"name": "default", "active": True, "capacity_bytes": 100 << 30, "allocation_bytes": 0, "available_bytes": 100 << 30}]


def hv(name, **kw):
    return HypervisorFactory(name=name, arch=kw.pop("arch", "x86_64"), cpus=kw.pop("cpus", 4), memory_mib=kw.pop("memory_mib", 8192),
                             pools=kw.pop("pools", POOLS), **kw)  # fmt: skip


def test_quota_defaults_and_overrides(settings):
    settings.PORTAL_QUOTA_MACHINES = 2
    user = UserFactory(username="q")
    assert capacity.quota_of(user).limits()["machines"] == 2
    Quota.objects.filter(user=user).update(machines=5)
    assert capacity.quota_of(user).limits()["machines"] == 5


def test_quota_refuses_with_a_clear_message(settings):
    settings.PORTAL_QUOTA_VCPUS = 4
    user = UserFactory(username="q")
    Machine.objects.create(name="a", owner=user, hypervisor=hv("h1"), deploy_type="network", vcpus=3)
    with pytest.raises(capacity.QuotaExceeded, match=r"5 vCPUs of 4 allowed \(using 3\)"):
        capacity.check_quota(user, machines=1, vcpus=2)
    capacity.check_quota(user, machines=1, vcpus=1)


def test_staff_have_no_quota(settings):
    settings.PORTAL_QUOTA_MACHINES = 0
    capacity.check_quota(UserFactory(username="s", is_staff=True), machines=1)


def test_usage_report_for_the_pages(settings):
    settings.PORTAL_QUOTA_MACHINES = 4
    user = UserFactory(username="q")
    Machine.objects.create(name="a", owner=user, hypervisor=hv("h1"), deploy_type="network", memory_mib=512)
    report = {r["key"]: r for r in capacity.usage_report(user)}
    assert report["machines"] == {"key": "machines", "label": "machines", "title": "Machines", "used": 1, "limit": 4,
                                  "percent": 25}  # fmt: skip
    assert report["memory_mib"]["used"] == 512


def test_placement_picks_the_roomiest_and_says_why():
    small, big = hv("small", memory_mib=2048), hv("big", memory_mib=16384)
    fit = capacity.place(vcpus=1, memory_mib=1024, disk_gib=10, pool="default", image=None)
    assert fit.hypervisor == big and "placed on big: 16384 MiB memory" in fit.reason()
    Machine.objects.create(name="x", owner=UserFactory(username="o"), hypervisor=big, deploy_type="network", memory_mib=15000)
    assert capacity.place(vcpus=1, memory_mib=1024, disk_gib=10, pool="default", image=None).hypervisor == small


def test_placement_respects_vcpu_overcommit_arch_pool_and_status():
    hv("cpu", cpus=1, cpu_allocation_ratio=2)
    hv("arm", arch="aarch64")
    hv("nopool", pools=[])
    hv("down", status="down")
    image = Image.objects.create(name="img", status=ImageStatus.READY, arch="x86_64")
    with pytest.raises(ValidationError) as e:
        capacity.place(vcpus=3, memory_mib=512, disk_gib=10, pool="default", image=image)
    message = e.value.message_dict["hypervisor"][0]
    assert "cpu: 2 vCPUs free, needs 3" in message
    assert "arm: aarch64 host that cannot emulate x86_64" in message
    assert "nopool: no active pool default" in message
    assert "down" not in message  # not a candidate at all
    assert capacity.place(vcpus=2, memory_mib=512, disk_gib=10, pool="default", image=image).hypervisor.name == "cpu"


def test_placement_with_no_online_hypervisor():
    with pytest.raises(ValidationError, match="no hypervisor is online"):
        capacity.place(vcpus=1, memory_mib=512, disk_gib=1, pool="default", image=None)


def test_placement_may_emulate_another_architecture():
    hv("x86", guest_arches=["i686", "x86_64", "aarch64"])
    image = Image.objects.create(name="arm", status=ImageStatus.READY, arch="aarch64")
    assert capacity.place(vcpus=1, memory_mib=512, disk_gib=1, pool="default", image=image).hypervisor.name == "x86"
