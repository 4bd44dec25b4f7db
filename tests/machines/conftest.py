from unittest import mock

import pytest

from tests.fakes import FakeDriver, FakeHost


@pytest.fixture
def host():
    """An in-memory hypervisor behind machines.services' get_driver (tests/fakes.py)."""
    host = FakeHost()
    with mock.patch("machines.services.get_driver", lambda uri: FakeDriver(uri, host)):
        yield host
