import factory
from django.contrib.auth import get_user_model

from hypervisors.models import Hypervisor, HypervisorStatus


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
