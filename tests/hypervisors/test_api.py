import pytest
from rest_framework.test import APIClient

from hypervisors.models import Hypervisor, HypervisorStatus
from portal.models import ApiToken
from tests.factories import HypervisorFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_api(staff):
    _, raw = ApiToken.issue(user=staff)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


@pytest.fixture
def user_api(user):
    _, raw = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


def test_anonymous_gets_401():
    assert APIClient().get("/api/v1/hypervisors/").status_code == 401


def test_a_wrong_token_gets_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    r = client.get("/api/v1/hypervisors/")
    assert r.status_code == 401 and r.json()["detail"] == "Invalid token."


def test_tokens_are_stored_hashed(staff):
    token, raw = ApiToken.issue(user=staff)
    assert raw not in (token.key_hash, token.prefix) and len(token.key_hash) == 64


def test_list_and_detail(user_api):
    hv = HypervisorFactory(name="lab", arch="x86_64")
    r = user_api.get("/api/v1/hypervisors/")
    assert r.status_code == 200
    assert [h["name"] for h in r.json()["results"]] == ["lab"]
    d = user_api.get(f"/api/v1/hypervisors/{hv.pk}/").json()
    assert {d["id"], d["name"], d["uri"], d["status"], d["arch"]} == {
        hv.pk,
        "lab",
        "test:///default",
        "online",
        "x86_64",
    }


def test_staff_creates_and_the_sync_runs(staff_api, test_hv_state, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_api.post("/api/v1/hypervisors/", {"name": "lab", "uri": "test:///default"}, format="json")
    assert r.status_code == 201, r.content
    assert r.json()["status"] == "pending"
    assert staff_api.get(f"/api/v1/hypervisors/{r.json()['id']}/").json()["status"] == "online"


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"name": "lab", "uri": "nonsense"}, "uri", "not a libvirt URI"),
        ({"name": "lab", "uri": "esx://host/"}, "uri", "Scheme 'esx' is not supported"),
        ({"name": "-lab", "uri": "qemu:///system"}, "name", "lower-case letters"),
        ({"name": "lab", "uri": "qemu:///system", "console_address": "any"}, "console_address", "not an IP address"),
        # the default console address (127.0.0.1) for a remote host: the proxy would dial its own loopback
        ({"name": "lab", "uri": "qemu+ssh://root@hv2/system"}, "console_address", "is hv2's own loopback"),
        (
            {"name": "lab", "uri": "qemu:///system", "domain_type_override": "xen"},
            "domain_type_override",
            "not a valid",
        ),
    ],
)
def test_bad_input_is_400_with_the_field(staff_api, payload, field, message):
    r = staff_api.post("/api/v1/hypervisors/", payload, format="json")
    assert r.status_code == 400
    assert message in " ".join(r.json()[field])
    assert not Hypervisor.objects.exists()


def test_duplicate_name_is_400(staff_api):
    HypervisorFactory(name="lab")
    r = staff_api.post("/api/v1/hypervisors/", {"name": "lab", "uri": "qemu:///system"}, format="json")
    assert r.status_code == 400 and "already exists" in r.json()["name"][0]


def test_patch_changes_editable_fields_only(staff_api, django_capture_on_commit_callbacks):
    hv = HypervisorFactory(name="lab")
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_api.patch(f"/api/v1/hypervisors/{hv.pk}/", {"enabled": False, "status": "online"}, format="json")
    assert r.status_code == 200
    hv.refresh_from_db()
    assert hv.enabled is False and hv.status == HypervisorStatus.DISABLED


def test_sync_is_202(staff_api, test_hv_state, django_capture_on_commit_callbacks):
    hv = HypervisorFactory(name="lab", status=HypervisorStatus.DOWN)
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_api.post(f"/api/v1/hypervisors/{hv.pk}/sync/")
    assert r.status_code == 202
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.ONLINE


def test_delete_is_204(staff_api):
    hv = HypervisorFactory(name="lab")
    assert staff_api.delete(f"/api/v1/hypervisors/{hv.pk}/").status_code == 204
    assert not Hypervisor.objects.exists()


def test_users_cannot_change_hypervisors(user_api):
    hv = HypervisorFactory(name="lab")
    assert (
        user_api.post("/api/v1/hypervisors/", {"name": "x", "uri": "qemu:///system"}, format="json").status_code == 403
    )
    assert user_api.patch(f"/api/v1/hypervisors/{hv.pk}/", {"enabled": False}, format="json").status_code == 403
    assert user_api.delete(f"/api/v1/hypervisors/{hv.pk}/").status_code == 403
    assert user_api.post(f"/api/v1/hypervisors/{hv.pk}/sync/").status_code == 403


def test_session_auth_works_too(client, staff):
    client.force_login(staff)
    assert client.get("/api/v1/hypervisors/").status_code == 200


def test_openapi_schema_is_served(user_api):
    r = user_api.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert r.status_code == 200
    assert "/api/v1/hypervisors/{id}/sync/" in r.json()["paths"]
