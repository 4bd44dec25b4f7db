"""Every URL pattern and API endpoint, as anonymous, another user, the owner and staff.

A new route without an entry here fails the test: decide who may use it first.
"""

from unittest import mock

import pytest
from django.test import Client
from django.urls import URLResolver, get_resolver, reverse
from rest_framework.test import APIClient

from hypervisors.models import Image, ImageStatus
from machines import crypto
from machines.models import Machine
from machines.states import Status
from portal.models import ApiToken, SshKey
from tests.factories import HypervisorFactory, UserFactory
from tests.fakes import FakeDriver, FakeHost

pytestmark = pytest.mark.django_db

ROLES = ("anon", "other", "owner", "staff")
PAGE_LOGIN = {"anon": 302}
OWNED = {"anon": 302, "other": 404}  # someone else's machine does not exist for you
STAFF_ONLY = {"anon": 302, "other": 403, "owner": 403}
API_OWNED = {"anon": 401, "other": 404}
API_STAFF = {"anon": 401, "other": 403, "owner": 403}


def ok(code, **over):
    return {**{r: code for r in ROLES}, **over}


# route name: (method, object, data, expected status per role)
MATRIX = {
    "home": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "login": ("get", None, None, ok(302, anon=200)),  # logged-in users are sent on
    "logout": ("post", None, None, ok(302)),
    "healthz": ("get", None, None, ok(200)),
    "console-standalone": ("get", None, None, ok(200)),  # the credential is in the URL's fragment
    "audit": ("get", None, None, ok(200, **STAFF_ONLY)),
    "account": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "password_change": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "password_change_done": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "account-token-create": ("post", None, {"name": "t"}, ok(200, **PAGE_LOGIN)),
    "account-token-revoke": ("post", "token", None, ok(302, anon=302, other=404, staff=404)),
    "account-key-add": ("post", None, {"name": "k", "public_key": "x"}, ok(200, **PAGE_LOGIN)),
    "account-key-delete": ("post", "key", None, ok(302, anon=302, other=404, staff=404)),
    "hypervisors:list": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "hypervisors:detail": ("get", "hv", None, ok(200, **PAGE_LOGIN)),
    "hypervisors:create": ("get", None, None, ok(200, **STAFF_ONLY)),
    "hypervisors:edit": ("get", "hv", None, ok(200, **STAFF_ONLY)),
    "hypervisors:delete": ("get", "hv", None, ok(200, **STAFF_ONLY)),
    "hypervisors:sync": ("post", "hv", None, ok(302, **STAFF_ONLY)),
    "hypervisors:image-list": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "hypervisors:image-detail": ("get", "img", None, ok(200, **PAGE_LOGIN)),
    "hypervisors:image-create": ("get", None, None, ok(200, **STAFF_ONLY)),
    "hypervisors:image-delete": ("get", "img", None, ok(200, **STAFF_ONLY)),
    "machines:list": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "machines:create": ("get", None, None, ok(200, **PAGE_LOGIN)),
    "machines:preview": ("post", None, {"name": "x"}, ok(200, **PAGE_LOGIN)),
    "machines:bulk": ("post", None, {"action": "start", "ids": ["1"]}, ok(302)),  # acts only on machines you may use
    "machines:instackenv": ("post", None, None, ok(200, **PAGE_LOGIN)),  # each user's own machines only
    "machines:detail": ("get", "vm", None, ok(200, **OWNED)),
    "machines:console": ("get", "vm", None, ok(200, **OWNED)),
    "machines:console-token": ("post", "vm", None, ok(200, **OWNED)),
    "machines:screenshot": ("get", "vm", None, ok(404, anon=302)),  # no screenshot yet, for anyone
    "machines:power": ("post", "vm", {"action": "reboot"}, ok(302, **OWNED)),
    "machines:rebuild": ("post", "vm", None, ok(302, **OWNED)),
    "machines:grow-disk": ("post", "vm", {"disk_gib": 99}, ok(302, **OWNED)),
    "machines:protect": ("post", "vm", {"protected": "0"}, ok(302, **OWNED)),
    "machines:delete": ("get", "vm", None, ok(200, **OWNED)),
    "machines:media": ("post", "iso", {"slot": "0", "image": ""}, ok(302, **OWNED)),
    "machines:boot-cdrom": ("post", "iso", None, ok(302, **OWNED)),
    "machines:bmc-reveal": ("post", "metal", None, ok(200, **OWNED)),
    "machines:boot-device": ("post", "metal", {"device": "pxe"}, ok(302, **OWNED)),
    # The JSON API.
    "api-root": ("get", None, None, ok(200, anon=401)),
    "api-schema": ("get", None, None, ok(200)),  # the OpenAPI schema is public, like the README
    "audit-list": ("get", None, None, ok(200, **API_STAFF)),
    "audit-detail": ("get", "audit", None, ok(200, **API_STAFF)),
    "hypervisor-list": ("get", None, None, ok(200, anon=401)),
    "hypervisor-detail": ("get", "hv", None, ok(200, anon=401)),
    "hypervisor-sync": ("post", "hv", None, ok(202, **API_STAFF)),
    "image-list": ("get", None, None, ok(200, anon=401)),
    "image-detail": ("get", "img", None, ok(200, anon=401)),
    "machine-list": ("get", None, None, ok(200, anon=401)),
    "machine-instackenv": ("get", None, None, ok(200, anon=401)),
    "machine-detail": ("get", "vm", None, ok(200, **API_OWNED)),
    "machine-console": ("post", "vm", None, ok(200, **API_OWNED)),
    "machine-power": ("post", "vm", {"action": "reboot"}, ok(202, **API_OWNED)),
    "machine-rebuild": ("post", "vm", None, ok(409, **API_OWNED)),  # its image is gone: refused, nothing changes
    "machine-grow-disk": ("post", "vm", {"disk_gib": 99}, ok(202, **API_OWNED)),
    "machine-protection": ("post", "vm", {"deletion_protection": False}, ok(200, **API_OWNED)),
    "machine-media": ("post", "iso", {"slot": 0, "image": None}, ok(202, **API_OWNED)),
    "machine-boot-cdrom": ("post", "iso", None, ok(202, **API_OWNED)),
    "machine-bmc": ("get", "metal", None, ok(200, **API_OWNED)),
    "machine-boot-device": ("post", "metal", {"device": "pxe"}, ok(202, **API_OWNED)),
}


def all_route_names(patterns=None, prefix=""):
    for p in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(p, URLResolver):
            yield from all_route_names(p.url_patterns, prefix + (f"{p.namespace}:" if p.namespace else ""))
        elif p.name:
            yield prefix + p.name


def test_every_route_has_an_entry():
    routes = {n for n in all_route_names() if not n.startswith("admin:")}
    assert routes - set(MATRIX) == set(), "new routes need a permission entry"
    assert set(MATRIX) - routes == set(), "entries for routes that no longer exist"


def make_world():
    owner, other = UserFactory(username="owner"), UserFactory(username="other")
    staff = UserFactory(username="boss", is_staff=True, is_superuser=True)
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    iso = Image.objects.create(name="inst", kind="iso", format="iso", status=ImageStatus.READY)
    vm = Machine.objects.create(name="vm", owner=owner, hypervisor=hv, deploy_type="image", status=Status.ACTIVE)
    iso_machine = Machine.objects.create(name="inst", owner=owner, hypervisor=hv, deploy_type="iso", image=iso,
                                         status=Status.ACTIVE)  # fmt: skip
    iso_machine.cdroms.create(slot=0, image=iso)
    metal = Machine.objects.create(name="metal", owner=owner, hypervisor=hv, deploy_type="network", status=Status.ACTIVE,
                                   bmc_address="127.0.0.1", bmc_port=17999, bmc_username="bmc-x",
                                   bmc_password_encrypted=crypto.encrypt("p" * 20))  # fmt: skip
    token, _ = ApiToken.issue(user=owner)
    key = SshKey.objects.create(user=owner, name="k", public_key="ssh-ed25519 AAAA")
    from portal.models import AuditEvent

    event = AuditEvent.objects.create(action="test")
    objects = {"vm": vm, "iso": iso_machine, "metal": metal, "hv": hv, "img": iso, "token": token, "key": key,
               "audit": event}  # fmt: skip
    return {"owner": owner, "other": other, "staff": staff}, objects


def fresh(objects, kind):
    """Actions change state (operations, protection): reset it so every role starts alike."""
    if kind in ("vm", "iso", "metal"):
        Machine.objects.filter(pk=objects[kind].pk).update(operation="", status=Status.ACTIVE, deletion_protection=False,
                                                          disk_gib=10)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_route(name, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17900-17909"
    method, kind, data, expected = MATRIX[name]
    users, objects = make_world()
    host = FakeHost()
    actual = {}
    with mock.patch("machines.services.get_driver", lambda uri: FakeDriver(uri, host)), \
         mock.patch("machines.bmc._ipmitool", return_value="Chassis Power is off"):  # fmt: skip
        for role in ROLES:
            fresh(objects, kind)
            url = reverse(name, args=[objects[kind].pk] if kind else [])
            api = ":" not in name and name.startswith(("api-", "audit-", "hypervisor-", "image-", "machine-"))
            client = APIClient() if api else Client()
            if role != "anon":
                client.force_login(users[role])
            kwargs = {"format": "json"} if api and data is not None else {}
            r = getattr(client, method)(url, data, **kwargs) if data is not None else getattr(client, method)(url)
            actual[role] = r.status_code
    assert actual == expected, f"{name}: expected {expected}, got {actual}"
