import pytest
from huey.contrib.djhuey import HUEY

from hypervisors.drivers import libvirt_driver
from tests.factories import UserFactory


@pytest.fixture(autouse=True, scope="session")
def huey_immediate():
    """Unit tests run tasks inline; integration tests switch to a real consumer (tests/integration)."""
    HUEY.immediate = True
    yield
    HUEY.immediate = False


@pytest.fixture(autouse=True)
def plain_static_storage(settings):
    # Unit tests render templates without running collectstatic first.
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}


@pytest.fixture
def test_hv_state():
    """Keep libvirt's test:///default state for one test, then reset it.

    The test driver's state lives while one connection stays open; the driver
    caches one per thread, and closing it here gives the next test a fresh host.
    """
    libvirt_driver.drop_connection("test:///default")
    yield
    libvirt_driver.drop_connection("test:///default")


@pytest.fixture
def user(db):
    return UserFactory(username="alice")


@pytest.fixture
def staff(db):
    return UserFactory(username="root-staff", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def user_client(client, user):
    client.force_login(user)
    return client
