import factory
from django.contrib.auth import get_user_model

from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageStatus
from machines.models import Machine, Project


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("correct-horse-battery")


class HypervisorFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Hypervisor

    name = factory.Sequence(lambda n: f"hv{n}")
    uri = "test:///default"
    status = HypervisorStatus.ONLINE
    # What a sync reports; an online hypervisor always has them, and a create checks them for room.
    cpus = 8
    memory_mib = 16384


def tenant_network_entry() -> dict:
    """The tenant network as a hypervisor's sync lists it (PORTAL_TENANT_NETWORK: the NIC every user may pick)."""
    from django.conf import settings

    return {"name": settings.PORTAL_TENANT_NETWORK, "active": True, "forward_mode": "none", "bridge": "virbr-tenants"}


def tenant_nic(**kw):
    """A NIC on the tenant network: what a test gives a machine of a user who is not staff when its point is
    not networking (user-mode networking is for staff only)."""
    from django.conf import settings

    from machines.services import NicInput

    return NicInput(type="network", source=settings.PORTAL_TENANT_NETWORK, **kw)


class PublishedNetworkFactory(factory.django.DjangoModelFactory):
    """A host network staff published (to everyone unless told)."""

    class Meta:
        model = "hypervisors.PublishedNetwork"

    kind = "bridge"
    source = "br0"
    everyone = True


class ImageFactory(factory.django.DjangoModelFactory):
    """A catalogue image; the model's defaults otherwise (a qcow2 disk image, still importing)."""

    class Meta:
        model = Image

    name = factory.Sequence(lambda n: f"image{n}")

    class Params:
        ready = factory.Trait(status=ImageStatus.READY)
        iso = factory.Trait(kind="iso", format="iso", status=ImageStatus.READY)


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    name = factory.Sequence(lambda n: f"project{n}")


class MachineFactory(factory.django.DjangoModelFactory):
    """A machine row as the database holds it (nothing on a hypervisor): the model's defaults, with an owner
    and a hypervisor of its own unless given. Machines a test wants made for real go through the services."""

    class Meta:
        model = Machine

    name = factory.Sequence(lambda n: f"machine{n}")
    owner = factory.SubFactory(UserFactory)
    hypervisor = factory.SubFactory(HypervisorFactory)
