import pytest
from rest_framework.test import APIClient

from portal.models import ApiToken
from tests.factories import HypervisorFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("action", "field"), [("maintenance", "maintenance"), ("evacuate", "restart"), ("orphans/remove", "keys")]
)
def test_options_on_a_maintenance_action_describes_its_input(staff, action, field):
    # Found by the API fuzzer: the viewset had no serializer, and DRF's OPTIONS answer failed with a 500.
    _, raw = ApiToken.issue(user=staff)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    r = client.options(f"/api/v1/hypervisors/{HypervisorFactory().pk}/{action}/")
    assert r.status_code == 200, r.content
    assert field in r.json()["actions"]["POST"]
