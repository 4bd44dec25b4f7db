"""machines.policy.allowed_actions: one answer to "what may this user do to this machine now", held to what the
services accept, what the views and the API refuse, what the API reports and which buttons the machine page shows."""

import itertools
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from hypervisors.models import ImageStatus
from labs import schedules
from machines import access, consoles, crypto, policy, services
from machines.models import ConsoleToken, Machine, MachineSnapshot, Membership
from machines.states import TRANSITIONS, InvalidTransition, PowerAction, PowerState, Status
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}
ROLES = ("owner", "staff", "viewer", "operator", "padmin", "stranger")
KINDS = ("image", "iso", "network")
POWER = set(PowerAction.values)
CONSOLES = {"console", "console_input", "serial"}


@pytest.fixture
def world(db, host):
    """Users in every role on one project's machines, a hypervisor (behind the fake driver) and images."""
    owner = UserFactory(username="owner")
    project = ProjectFactory(name="team")
    users = {
        "owner": owner,
        "staff": UserFactory(username="boss", is_staff=True),
        "stranger": UserFactory(username="stranger"),
    }
    for role, name in (("viewer", "viewer"), ("operator", "operator"), ("padmin", "admin")):
        users[role] = UserFactory(username=role)
        Membership.objects.create(project=project, user=users[role], role=name)
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    # Where a move may go: room, the pool the machines use, no networks needed (the machines have no NICs).
    HypervisorFactory(name="lab2", uri="qemu+tcp://lab2/system", arch="x86_64", pools=[POOL])
    disk = ImageFactory(name="tiny", status=ImageStatus.READY)
    iso = ImageFactory(name="inst", kind="iso", format="iso", status=ImageStatus.READY)
    return {"users": users, "project": project, "hv": hv, "disk": disk, "iso": iso}


def make(
    world,
    kind="image",
    *,
    status=Status.ACTIVE,
    protected=False,
    operation="",
    power=PowerState.UNKNOWN,
    image_ready=True,
) -> Machine:
    image = {"image": world["disk"], "iso": world["iso"], "network": None}[kind]
    if image is not None and not image_ready:
        image = ImageFactory(name=f"gone-{Machine.objects.count()}", kind=image.kind, status=ImageStatus.ERROR)
    bmc = (
        {
            "bmc_address": "127.0.0.1",
            "bmc_port": 17800 + Machine.objects.count(),
            "bmc_username": "bmc-x",
            "bmc_password_encrypted": crypto.encrypt("p" * 20),
        }
        if kind == "network"
        else {}
    )
    machine = MachineFactory(
        name=f"m{Machine.objects.count()}",
        owner=world["users"]["owner"],
        project=world["project"],
        hypervisor=world["hv"],
        deploy_type=kind,
        image=image,
        status=status,
        deletion_protection=protected,
        operation=operation,
        power_state=power,
        **bmc,
    )
    if kind == "iso":
        machine.cdroms.create(slot=0, image=world["iso"])
    return machine


class _Undo(Exception):
    pass


def snapshot(machine: Machine) -> MachineSnapshot:
    """A ready snapshot of the machine to revert to or delete (made inside the call's rolled-back transaction)."""
    return MachineSnapshot.objects.create(machine=machine, name="s", status=MachineSnapshot.Status.READY)


def accepts(action: str, machine: Machine, user) -> bool:
    """Whether the service behind `action` accepts it for this machine now; whatever it did is rolled back."""
    m = Machine.objects.select_related("hypervisor", "image", "owner", "project").get(pk=machine.pk)
    calls = {
        "media": lambda: services.machine_change_media(machine=m, slot=0, image=None, actor=user),
        "boot_cdrom": lambda: services.machine_boot_cdrom_once(machine=m, actor=user),
        "boot_device": lambda: services.machine_set_boot_device(machine=m, device="pxe", persistent=False, actor=user),
        "rebuild": lambda: services.machine_rebuild(machine=m, actor=user),
        "grow_disk": lambda: services.machine_grow_disk(machine=m, disk_gib=m.disk_gib + 1, actor=user),
        "resize": lambda: services.machine_change(machine=m, vcpus=m.vcpus + 1, actor=user),
        "rename": lambda: services.machine_change(machine=m, name="renamed", actor=user),
        "label": lambda: services.machine_change(machine=m, tags=["labelled"], actor=user),
        "devices": lambda: services.machine_attach_disk(machine=m, size_gib=1, actor=user),
        "delete": lambda: services.machine_delete(machine=m, actor=user),
        "protect": lambda: services.machine_set_protection(machine=m, protected=not m.deletion_protection, actor=user),
        "autostart": lambda: services.machine_set_autostart(machine=m, enabled=not m.autostart, actor=user),
        "migrate": lambda: services.machine_migrate(machine=m, actor=user),
        "reveal_bmc": lambda: services.machine_bmc_reveal(machine=m, actor=user),
        "console": lambda: consoles.console_token_issue(machine=m, user=user, kind="vnc"),
        "serial": lambda: consoles.console_token_issue(machine=m, user=user, kind="serial"),
        "snapshot": lambda: services.snapshot_create(machine=m, name="s", memory=True, actor=user),
        "snapshot_revert": lambda: services.snapshot_revert(machine=m, snapshot=snapshot(m), actor=user),
        "snapshot_delete": lambda: services.snapshot_delete(machine=m, snapshot=snapshot(m), actor=user),
        "clone": lambda: services.machine_clone(machine=m, name="the-clone", actor=user),
        "save_image": lambda: services.image_from_machine(machine=m, name="the-image", actor=user),
        "lease": lambda: services.machine_extend_lease(machine=m, actor=user, until=timezone.now() + timedelta(days=1)),
        "schedule": lambda: schedules.schedule_create(actor=user, machine=m, action="power_on", hour=1, minute=0),
    }

    def console_input():
        consoles.console_token_issue(machine=m, user=user, kind="vnc")
        if ConsoleToken.objects.get(machine=m, user=user).view_only:
            raise consoles.ConsoleDenied("view-only")

    calls["console_input"] = console_input
    for power in POWER:
        calls[power] = lambda power=power: services.machine_power(machine=m, action=power, actor=user)
    assert set(calls) == policy.ACTIONS, "every action of the policy has its service here"
    try:
        with transaction.atomic():
            calls[action]()
            raise _Undo
    except _Undo:
        return True
    except (services.MachineError, consoles.ConsoleDenied, InvalidTransition, PermissionDenied):
        return False


STATES = list(itertools.product(KINDS, Status.values, (False, True), ("", "reboot")))


@pytest.mark.parametrize(("kind", "status", "protected", "operation"), STATES)
def test_the_services_accept_exactly_what_allowed_actions_allows(world, kind, status, protected, operation):
    """The owner (every role): whatever allowed_actions denies on the machine's state, its service refuses, and
    whatever it allows, the service accepts."""
    machine = make(world, kind, status=status, protected=protected, operation=operation)
    owner = world["users"]["owner"]
    allowed = policy.allowed_actions(owner, machine)
    accepted = {action for action in policy.ACTIONS if accepts(action, machine, owner)}
    assert accepted == allowed


def test_a_rebuild_needs_the_image_still_there(world):
    machine = make(world, image_ready=False)
    assert "rebuild" not in policy.allowed_actions(world["users"]["owner"], machine)
    assert not accepts("rebuild", machine, world["users"]["owner"])


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", KINDS)
def test_roles_cut_the_owners_actions_by_the_level_each_needs(world, role, kind):
    """A role gets what the owner may do now, less what needs more than its level; consoles agree with it."""
    user = world["users"][role]
    machine = make(world, kind)
    have = access.level(user, machine)
    owners = policy.allowed_actions(world["users"]["owner"], machine)
    allowed = policy.allowed_actions(user, machine)
    # Moves are staff's (PORTAL_MIGRATION_FOR=staff): beyond the role, the rule's `who`.
    assert allowed - {"migrate"} == {a for a in owners if access.allows(have, policy.need(a))}
    assert ("migrate" in allowed) == (role == "staff")
    for action in policy.ACTIONS:  # every service decides by the actor's role, as the consoles always did
        assert accepts(action, machine, user) == (action in allowed), action


# Who may do what to an active machine of each kind, written out (the power state is not known yet).
OPERATE_IMAGE = POWER | {"console", "console_input", "serial", "snapshot", "schedule", "label"}
ADMIN_IMAGE = OPERATE_IMAGE | {
    "resize",  # not "rename": the machine is not seen shut off
    "lease",
    "rebuild",
    "grow_disk",
    "delete",
    "protect",
    "autostart",
    "snapshot_revert",
    "snapshot_delete",
    "devices",
}
TABLE = {
    ("image", "viewer"): {"console"},
    ("image", "operator"): OPERATE_IMAGE,
    ("image", "padmin"): ADMIN_IMAGE,
    ("image", "owner"): ADMIN_IMAGE,
    ("image", "staff"): ADMIN_IMAGE | {"migrate"},
    ("image", "stranger"): set(),
    ("iso", "operator"): OPERATE_IMAGE | {"media", "boot_cdrom"},
    ("iso", "padmin"): ADMIN_IMAGE | {"media", "boot_cdrom"},
    ("network", "viewer"): {"console"},
    ("network", "operator"): OPERATE_IMAGE | {"boot_device"},
    ("network", "owner"): (ADMIN_IMAGE - {"rebuild"}) | {"boot_device", "reveal_bmc"},  # no image to rebuild from
}


@pytest.mark.parametrize(("kind", "role"), sorted(TABLE))
def test_the_table(world, kind, role):
    assert policy.allowed_actions(world["users"][role], make(world, kind)) == TABLE[kind, role]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        # A delete stops a provision (fenced: machines.attempts); nothing else runs beside one.
        (
            {"status": Status.PROVISIONING},
            {"delete", "protect", "autostart", "console", "console_input", "serial", "label"},
        ),
        (
            {"status": Status.ERROR},
            {"rebuild", "delete", "protect", "autostart", "console", "console_input", "serial", "label"},
        ),
        (
            {"status": Status.ERROR, "protected": True},
            {"protect", "autostart", "console", "console_input", "serial", "label"},
        ),
        # One operation at a time, of every kind: a reboot in progress holds off rebuild, grow and delete too.
        ({"operation": "reboot"}, {"protect", "autostart", "console", "console_input", "serial", "label"}),
        # Protection holds off a revert (it throws the disks' state away, as a rebuild does), not a snapshot.
        (
            {"protected": True},
            POWER
            | {
                "grow_disk",
                "resize",
                "devices",
                "label",
                "protect",
                "autostart",
                "console",
                "console_input",
                "serial",
                "snapshot",
                "snapshot_delete",
            },
        ),
    ],
)
def test_the_table_by_state(world, state, expected):
    expected = expected | {"lease", "schedule"}  # a lease and the schedules are set in every state
    assert policy.allowed_actions(world["users"]["owner"], make(world, **state)) == expected


def test_the_state_rules_follow_the_lifecycle():
    """An action that moves the machine to a status is allowed exactly where the lifecycle allows that move."""
    for action, target in (("rebuild", Status.REBUILDING), ("grow_disk", Status.RESIZING), ("delete", Status.DELETING)):
        assert policy.RULES[action].statuses == {s for s, moves in TRANSITIONS.items() if target in moves}, action


def test_the_refusals_messages_are_unchanged(world):
    machine = make(world, status=Status.PROVISIONING)
    with pytest.raises(services.MachineError, match=r"^m0 is provisioning; this needs it active\.$"):
        services.machine_power(machine=machine, action="start", actor=machine.owner)
    with pytest.raises(services.MachineError, match="growing the disk needs it active"):
        services.machine_grow_disk(machine=machine, disk_gib=99, actor=machine.owner)


# --- the API ---------------------------------------------------------------------------------------------

API_CALLS = {  # action: (method, url suffix, body)
    "start": ("post", "power/", {"action": "start"}),
    "reboot": ("post", "power/", {"action": "reboot"}),
    "media": ("post", "media/", {"slot": 0, "image": None}),
    "boot_cdrom": ("post", "boot-cdrom/", None),
    "boot_device": ("post", "boot-device/", {"device": "pxe"}),
    "rebuild": ("post", "rebuild/", None),
    "grow_disk": ("post", "grow-disk/", {"disk_gib": 99}),
    "devices": ("post", "disks/", {"size_gib": 1}),
    "snapshot": ("post", "snapshots/", {"name": "s1", "memory": True}),
    "protect": ("post", "protection/", {"deletion_protection": True}),
    "autostart": ("post", "autostart/", {"autostart": True}),
    "reveal_bmc": ("get", "bmc/", None),
    "console": ("post", "console/", None),
    "migrate": ("post", "migrate/", {}),
    "delete": ("delete", "", None),
}
KIND_OF = {"media": "iso", "boot_cdrom": "iso", "boot_device": "network", "reveal_bmc": "network"}


def api(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def call(client, machine, action):
    method, suffix, body = API_CALLS[action]
    url = f"/api/v1/machines/{machine.pk}/{suffix}"
    return getattr(client, method)(url, body, format="json") if body is not None else getattr(client, method)(url)


@pytest.mark.parametrize("role", ROLES)
def test_the_api_reports_allowed_actions_for_the_requesting_user(world, role):
    machine = make(world, "network")
    user = world["users"][role]
    r = api(user).get(f"/api/v1/machines/{machine.pk}/")
    if role == "stranger":
        assert r.status_code == 404
        return
    assert r.json()["allowed_actions"] == sorted(policy.allowed_actions(user, machine))
    listed = {m["id"]: m for m in api(user).get("/api/v1/machines/").json()["results"]}
    assert listed[machine.pk]["allowed_actions"] == sorted(policy.allowed_actions(user, machine))


def test_an_actions_answer_carries_what_is_allowed_after_it(world):
    machine = make(world)
    r = call(api(world["users"]["owner"]), machine, "reboot")
    assert r.status_code == 202 and r.json()["operation"] == "reboot"
    assert not POWER & set(r.json()["allowed_actions"])  # the reboot holds the machine's one operation


@pytest.mark.parametrize("role", ["viewer", "operator", "padmin", "owner"])
@pytest.mark.parametrize("action", sorted(API_CALLS))
def test_the_api_refuses_a_role_with_403_and_a_state_with_409(world, role, action):
    user = world["users"][role]
    kind = KIND_OF.get(action, "image")
    active, busy = make(world, kind), make(world, kind, status=Status.PROVISIONING)
    by_role = policy.refusal(user, active, action) == policy.ROLE
    r = call(api(user), active, action)
    assert (r.status_code == 403) == by_role, r.content
    if not by_role:
        assert r.status_code in (200, 202), r.content
    r = call(api(user), busy, action)
    if by_role:
        assert r.status_code == 403
    elif action in policy.allowed_actions(user, busy):
        assert r.status_code in (200, 202), r.content
    else:
        assert r.status_code == 409, r.content


# --- the machine page -------------------------------------------------------------------------------------

CONTROL_IDS = {
    "btn-console": "console",
    "btn-serial": "serial",
    "btn-delete": "delete",
    "btn-edit": "label",
    "btn-clone": "clone",
    "btn-save-image": "save_image",
    "btn-devices": "devices",
}
FORM_ACTIONS = {
    "rebuild": "rebuild",
    "grow-disk": "grow_disk",
    "protection": "protect",
    "autostart": "autostart",
    "media": "media",
    "boot-cdrom": "boot_cdrom",
    "boot-device": "boot_device",
    "migrate": "migrate",
    "snapshots": "snapshot",
    "lease": "lease",
}
# Revert and delete are buttons of each snapshot: the machines here have none (tests/machines/test_snapshots.py).
PER_SNAPSHOT = {"snapshot_revert", "snapshot_delete"}
# The Schedules card is loaded from labs (htmx; labs/schedule_views.py): tests/labs/test_schedules.py holds it.
PER_SNAPSHOT |= {"schedule"}
# The Edit link (its least action, label) leads to the form that also resizes and renames: tests/machines/test_changes.py.
PER_SNAPSHOT |= {"resize", "rename"}


class Controls(HTMLParser):
    """The machine page's action controls: which are there, and which of them may be clicked."""

    def __init__(self):
        super().__init__()
        self.present: set[str] = set()
        self.enabled: set[str] = set()
        self.form = ""

    def _found(self, action: str, attrs: dict) -> None:
        self.present.add(action)
        if "disabled" not in attrs and "disabled" not in (attrs.get("class") or "").split():
            self.enabled.add(action)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.form = (a.get("action") or "").rstrip("/").rsplit("/", 1)[-1]
        elif tag == "a" and a.get("id") in CONTROL_IDS:
            self._found(CONTROL_IDS[a["id"]], a)
        elif tag == "button" and a.get("hx-post", "").endswith("/bmc/reveal/"):
            self._found("reveal_bmc", a)
        elif tag == "button" and self.form == "power" and a.get("name") == "action":
            self._found(a["value"], a)
        elif tag == "button" and self.form in FORM_ACTIONS:
            self._found(FORM_ACTIONS[self.form], a)

    def handle_endtag(self, tag):
        if tag == "form":
            self.form = ""


def controls(user, machine, **headers) -> Controls:
    client = Client()
    client.force_login(user)
    r = client.get(reverse("machines:detail", args=[machine.pk]), headers=headers)
    assert r.status_code == 200
    parsed = Controls()
    parsed.feed(r.content.decode())
    return parsed


PAGE_STATES = [
    {"power": PowerState.RUNNING},
    {"power": PowerState.OFF},
    {"power": PowerState.RUNNING, "operation": "reboot"},
    {"power": PowerState.OFF, "protected": True},
    {"status": Status.ERROR},
    {"status": Status.PROVISIONING},
]


@pytest.mark.parametrize("role", ["viewer", "operator", "padmin", "staff"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state", range(len(PAGE_STATES)))
def test_the_page_offers_exactly_the_allowed_buttons(world, role, kind, state):
    """Enabled: what allowed_actions allows, less what the power state observed makes pointless (a start of a
    running machine). Shown disabled: what waits for an operation to end or for protection to be turned off."""
    user, machine = world["users"][role], make(world, kind, **PAGE_STATES[state])
    context = policy.page_context(user, machine)
    assert context["allowed"] == policy.allowed_actions(user, machine)
    # The full page, and the refresh htmx asks for.
    for page in (controls(user, machine), controls(user, machine, **{"HX-Request": "true"})):
        assert page.enabled == context["allowed"] - context["idle"] - {"console_input"} - PER_SNAPSHOT
        assert page.present == context["shown"] - {"console_input"} - PER_SNAPSHOT


def test_the_page_disables_what_the_power_state_makes_pointless(world):
    owner = world["users"]["owner"]
    running = controls(owner, make(world, power=PowerState.RUNNING)).enabled
    off = controls(owner, make(world, power=PowerState.OFF)).enabled
    assert "start" not in running and {"shutdown", "reboot", "console", "serial"} <= running
    assert "start" in off and not {"shutdown", "reboot", "console", "serial"} & off
    assert {"reset", "poweroff"} <= running & off


def test_viewers_no_longer_see_buttons_their_role_refuses(world):
    """The page showed every role the power, delete, protection, serial and BMC buttons; they answered 403."""
    page = controls(world["users"]["viewer"], make(world, "network", power=PowerState.RUNNING))
    assert page.present == {"console"} and page.enabled == {"console"}


def test_the_delete_page_says_a_busy_machine_waits(world):
    client = Client()
    client.force_login(world["users"]["owner"])
    machine = make(world, operation="reboot")
    body = client.get(reverse("machines:delete", args=[machine.pk])).content.decode()
    assert 'id="delete-wait"' in body and "is busy with another operation" in body and "btn-danger" not in body
    deleting = make(world, status=Status.DELETING)
    body = client.get(reverse("machines:delete", args=[deleting.pk])).content.decode()
    assert 'id="delete-wait"' in body and "is deleting" in body and "btn-danger" not in body
