"""The audit trail is complete and cannot be rewritten (issue 14): admin edits of users, staff flags,
projects, memberships and roles, token deletions and failed token log-ins are recorded; no row can be
changed or deleted by the admin, the API or code; staff export it, filtered, as CSV and JSON."""

import csv
import io
import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.http import StreamingHttpResponse
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from machines.models import Membership, Project
from portal.models import ApiToken, AuditEvent, AuditRowImmutable
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def api_as(user, address: str = "127.0.0.1") -> APIClient:
    api = APIClient(REMOTE_ADDR=address)
    _, raw = ApiToken.issue(user=user)
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return api


def actions(prefix: str) -> list[tuple[str, str, str]]:
    rows = AuditEvent.objects.filter(action__startswith=prefix).order_by("pk")
    return list(rows.values_list("action", "username", "detail"))


# --- nothing rewrites the trail ---------------------------------------------------------------


def test_code_cannot_change_or_delete_a_row():
    event = AuditEvent.objects.create(action="machine.power", username="alice")
    event.detail = "nothing happened"
    with pytest.raises(AuditRowImmutable):
        event.save()
    with pytest.raises(AuditRowImmutable):
        event.delete()
    with pytest.raises(AuditRowImmutable):
        AuditEvent.objects.filter(pk=event.pk).update(detail="rewritten")
    with pytest.raises(AuditRowImmutable):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get(pk=event.pk).detail == ""


def test_deleting_a_user_keeps_their_rows_under_their_name():
    gone = UserFactory(username="leaver")
    AuditEvent.objects.create(action="machine.power", user=gone, username="leaver")
    gone.delete()
    kept = AuditEvent.objects.get(action="machine.power")
    assert (kept.user_id, kept.username) == (None, "leaver")


def test_the_admin_shows_the_trail_and_refuses_every_change_even_to_a_superuser(staff_client, staff):
    assert staff.is_superuser
    event = AuditEvent.objects.create(action="machine.power", username="alice", detail="as it was")
    assert staff_client.get("/admin/portal/auditevent/").status_code == 200
    assert staff_client.get(f"/admin/portal/auditevent/{event.pk}/change/").status_code == 200  # a view
    assert staff_client.get("/admin/portal/auditevent/add/").status_code == 403
    r = staff_client.post(f"/admin/portal/auditevent/{event.pk}/change/", {"detail": "rewritten"})
    assert r.status_code == 403
    assert staff_client.post(f"/admin/portal/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    r = staff_client.post(
        "/admin/portal/auditevent/", {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"}
    )
    assert AuditEvent.objects.filter(pk=event.pk, detail="as it was").exists()
    changelist = staff_client.get("/admin/portal/auditevent/").content.decode()
    assert "delete_selected" not in changelist


def test_the_api_is_read_only_for_staff_too(staff):
    event = AuditEvent.objects.create(action="machine.power", username="alice")
    api = api_as(staff)
    assert api.get(f"/api/v1/audit/{event.pk}/").status_code == 200
    assert api.post("/api/v1/audit/", {"action": "x"}, format="json").status_code == 405
    assert api.put(f"/api/v1/audit/{event.pk}/", {"action": "x"}, format="json").status_code == 405
    assert api.patch(f"/api/v1/audit/{event.pk}/", {"action": "x"}, format="json").status_code == 405
    assert api.delete(f"/api/v1/audit/{event.pk}/").status_code == 405
    assert AuditEvent.objects.get(pk=event.pk).action == "machine.power"


# --- what is recorded ------------------------------------------------------------------------


def test_a_failed_token_log_in_is_recorded_with_the_address_and_a_prefix_never_the_secret(user):
    api = APIClient(REMOTE_ADDR="203.0.113.5")
    guess = "A" * 43  # a token's shape
    api.credentials(HTTP_AUTHORIZATION=f"Token {guess}")
    assert api.get("/api/v1/machines/").status_code == 401
    api.credentials(HTTP_AUTHORIZATION="Token hunter2-my-password")  # a password pasted by mistake
    assert api.get("/api/v1/machines/").status_code == 401
    token, raw = ApiToken.issue(user=user)
    user.is_active = False
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)  # (a save would revoke the token)
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert api.get("/api/v1/machines/").status_code == 401
    rows = AuditEvent.objects.filter(action="login.token").order_by("pk")
    assert [(e.outcome, e.address, e.username, e.detail) for e in rows] == [
        ("refused", "203.0.113.5", "", "unknown token AAAAAAAA…"),
        ("refused", "203.0.113.5", "", "not a portal token (19 characters)"),
        ("refused", "203.0.113.5", "alice", "user inactive"),
    ]
    assert rows[2].object_id == str(token.pk)
    assert not AuditEvent.objects.filter(detail__contains=guess).exists()
    assert not AuditEvent.objects.filter(detail__contains="hunter2").exists()
    assert not AuditEvent.objects.filter(detail__contains=raw).exists()


def test_admin_edits_of_users_are_recorded_with_the_staff_flags_called_out(staff):
    admin = Client(REMOTE_ADDR="192.0.2.44")
    admin.force_login(staff)
    r = admin.post(
        "/admin/auth/user/add/",
        {"username": "newbie", "password1": "A-long-enough-pass-42", "password2": "A-long-enough-pass-42"},
    )
    assert r.status_code == 302, r.content.decode()[:2000]
    newbie = get_user_model().objects.get(username="newbie")
    form = {
        "username": "newbie",
        "email": "newbie@example.org",
        "is_active": "on",
        "is_staff": "on",
        "groups": [Group.objects.create(name="ops").pk],
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
    }
    assert admin.post(f"/admin/auth/user/{newbie.pk}/change/", form).status_code == 302
    r = admin.post(
        f"/admin/auth/user/{newbie.pk}/password/",
        {"password1": "Another-long-pass-43", "password2": "Another-long-pass-43", "usable_password": "true"},
    )
    assert r.status_code == 302
    assert admin.post(f"/admin/auth/user/{newbie.pk}/delete/", {"post": "yes"}).status_code == 302
    rows = AuditEvent.objects.filter(action__startswith="user.", object_id=str(newbie.pk)).order_by("pk")
    assert [(e.action, e.username, e.address) for e in rows] == [
        ("user.create", staff.username, "192.0.2.44"),
        ("user.flags", staff.username, "192.0.2.44"),
        ("user.flags", staff.username, "192.0.2.44"),
        ("user.update", staff.username, "192.0.2.44"),
        ("user.delete", staff.username, "192.0.2.44"),
    ]
    flags = rows[1].detail
    assert "is_staff: False -> True" in flags and "email:  -> newbie@example.org" in flags
    assert rows[2].detail == "groups added: ops"
    assert rows[3].detail == "password changed"  # never the hash
    assert not AuditEvent.objects.filter(detail__contains="pbkdf2").exists()


def test_a_superuser_flag_and_a_deactivation_from_anywhere_are_recorded_as_flags():
    """Not only the admin: a save from any code path (here the ORM, as a command would) is recorded."""
    someone = UserFactory(username="someone")
    someone.is_superuser = True
    someone.save()
    someone.is_active = False
    someone.save()
    last_login_only = timezone.now()
    someone.last_login = last_login_only
    someone.save(update_fields=["last_login"])  # what a log-in writes: not a change worth a row
    assert [(a, d) for a, _, d in actions("user.")] == [
        ("user.create", "is_active=True"),
        ("user.flags", "is_superuser: False -> True"),
        ("user.flags", "is_active: True -> False"),
    ]


def test_projects_memberships_and_roles_edited_in_the_admin_are_recorded(staff_client, staff):
    member = UserFactory(username="member")
    inline = {
        "memberships-TOTAL_FORMS": "1",
        "memberships-INITIAL_FORMS": "0",
        "memberships-0-user": str(member.pk),
        "memberships-0-role": "viewer",
    }
    r = staff_client.post("/admin/machines/project/add/", {"name": "lab", "machines_quota": "3", **inline})
    assert r.status_code == 302, r.content.decode()[:3000]
    project = Project.objects.get(name="lab")
    membership = Membership.objects.get(project=project)
    change = {
        "name": "lab",
        "machines_quota": "5",
        "memberships-TOTAL_FORMS": "1",
        "memberships-INITIAL_FORMS": "1",
        "memberships-0-id": str(membership.pk),
        "memberships-0-project": str(project.pk),
        "memberships-0-user": str(member.pk),
        "memberships-0-role": "admin",
    }
    assert staff_client.post(f"/admin/machines/project/{project.pk}/change/", change).status_code == 302
    change["memberships-0-DELETE"] = "on"
    assert staff_client.post(f"/admin/machines/project/{project.pk}/change/", change).status_code == 302
    assert staff_client.post(f"/admin/machines/project/{project.pk}/delete/", {"post": "yes"}).status_code == 302
    got = [(a, u, d) for a, u, d in actions("project.") + actions("membership.")]
    assert got == [
        ("project.create", staff.username, ""),
        ("project.update", staff.username, "machines_quota: 3 -> 5"),
        ("project.delete", staff.username, ""),
        ("membership.create", staff.username, ""),
        ("membership.update", staff.username, "role: viewer -> admin"),
        ("membership.delete", staff.username, ""),
    ]
    assert AuditEvent.objects.get(action="membership.update").object_repr == "member admin of lab"


def test_token_deletions_are_recorded_from_the_account_page_and_the_admin(user_client, user, staff_client, staff):
    mine, _ = ApiToken.issue(user=user, name="laptop")
    theirs, _ = ApiToken.issue(user=user, name="ci")
    assert user_client.post(f"/account/tokens/{mine.pk}/revoke/").status_code == 302
    assert staff_client.post(f"/admin/portal/apitoken/{theirs.pk}/delete/", {"post": "yes"}).status_code == 302
    assert [(a, u) for a, u, _ in actions("api_token.revoke")] == [
        ("api_token.revoke", "alice"),
        ("api_token.revoke", staff.username),
    ]
    assert not ApiToken.objects.filter(user=user).exists()


# --- the export ------------------------------------------------------------------------------


@pytest.fixture
def trail(db):
    old = AuditEvent.objects.create(action="machine.power", username="alice", outcome="success", detail="old")
    AuditEvent._base_manager.filter(pk=old.pk).update(created=timezone.now() - timedelta(days=10))  # backdated
    AuditEvent.objects.create(
        action="machine.delete", username="alice", outcome="refused", object_type="machines.machine", detail="new"
    )
    AuditEvent.objects.create(action="login", username="bob", outcome="refused", detail="=HYPERLINK(evil)")
    return old


def test_staff_export_csv_and_json_from_the_page_with_its_filters(staff_client, trail):
    page = staff_client.get("/audit/?user=alice&action=machine").content.decode()
    assert 'href="/audit/export.csv?user=alice&amp;action=machine"' in page
    assert 'href="/audit/export.json?user=alice&amp;action=machine"' in page
    r = staff_client.get("/audit/export.csv?user=alice&action=machine")
    assert isinstance(r, StreamingHttpResponse) and r["Content-Type"].startswith("text/csv")
    assert r["Content-Disposition"].startswith('attachment; filename="audit-')
    rows = list(csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert [(row["action"], row["detail"]) for row in rows] == [("machine.delete", "new"), ("machine.power", "old")]
    r = staff_client.get("/audit/export.json?outcome=refused")
    assert isinstance(r, StreamingHttpResponse) and r["Content-Type"] == "application/json"
    data = json.loads(b"".join(r.streaming_content))
    assert [(e["action"], e["username"]) for e in data] == [("login", "bob"), ("machine.delete", "alice")]
    assert data[0]["detail"] == "=HYPERLINK(evil)"  # JSON as it is; CSV defused below
    csv_text = b"".join(staff_client.get("/audit/export.csv?user=bob").streaming_content).decode()
    assert "'=HYPERLINK(evil)" in csv_text
    exports = AuditEvent.objects.filter(action="audit.export").order_by("pk")
    assert [e.detail for e in exports] == ["csv: user=alice, action=machine", "json: outcome=refused", "csv: user=bob"]


def test_the_date_range_filters_the_page_the_api_and_the_exports_alike(staff_client, staff, trail):
    today = timezone.localdate()
    since = (today - timedelta(days=3)).isoformat()
    until = (today - timedelta(days=5)).isoformat()
    api = api_as(staff)
    recent = {e["detail"] for e in api.get(f"/api/v1/audit/?since={since}&action=machine").json()["results"]}
    older = {e["detail"] for e in api.get(f"/api/v1/audit/?until={until}&action=machine").json()["results"]}
    assert (recent, older) == ({"new"}, {"old"})
    assert b"old" not in staff_client.get(f"/audit/?since={since}&action=machine").content.split(b"<tbody>")[1]
    r = api.get(f"/api/v1/audit/export/json/?until={until}", HTTP_ACCEPT="application/json")
    assert [e["detail"] for e in json.loads(b"".join(r.streaming_content))] == ["old"]
    r = api.get(f"/api/v1/audit/export/csv/?since={since}&user=ALICE", HTTP_ACCEPT="text/csv")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/csv")
    assert [row["detail"] for row in csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode()))] == ["new"]


def test_a_bad_date_is_a_400_with_a_message_everywhere(staff_client, staff, trail):
    api = api_as(staff)
    r = api.get("/api/v1/audit/?since=yesterday")
    assert r.status_code == 400 and "YYYY-MM-DD" in r.json()["since"][0]
    r = api.get("/api/v1/audit/export/csv/?until=9999-12-31", HTTP_ACCEPT="text/csv")
    assert r.status_code == 400 and "YYYY-MM-DD" in json.loads(r.content)["until"][0]
    r = staff_client.get("/audit/export.json?since=2026-02-30")
    assert r.status_code == 400 and b"YYYY-MM-DD" in r.content
    r = staff_client.get("/audit/?since=nope")
    assert r.status_code == 200 and b"Give the date as YYYY-MM-DD" in r.content


def test_the_export_streams_in_chunks_without_loading_the_trail(staff_client, trail, monkeypatch):
    from portal import audit_export

    AuditEvent.objects.bulk_create(AuditEvent(action="bulk", username=f"u{i}") for i in range(25))
    monkeypatch.setattr(audit_export, "CHUNK", 10)
    r = staff_client.get("/audit/export.json?action=bulk")
    pieces = list(r.streaming_content)
    assert len(pieces) == 27  # the opening, one per row, the closing
    assert len(json.loads(b"".join(pieces))) == 25


def test_users_get_no_export(user_client, user):
    assert user_client.get("/audit/export.csv").status_code == 403
    assert api_as(user).get("/api/v1/audit/export/json/").status_code == 403
    assert not AuditEvent.objects.filter(action="audit.export").exists()
