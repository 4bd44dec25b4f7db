"""The audit trail: who did what, to what, from where, and how it ended.

Services call record(); the request's user and address come from a context
variable that AuditMiddleware sets, so actions from pages, the API and the
admin are all recorded the same way.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.dispatch import receiver

from portal.refusals import Refusal

# The request being served: its user is resolved when a record is made, after DRF's
# authentication (which sets the user on the underlying Django request) has run.
_request: contextvars.ContextVar = contextvars.ContextVar("audit_request", default=None)


def client_address(request) -> str | None:
    # Behind the documented reverse proxy, gunicorn's --forwarded-allow-ips makes REMOTE_ADDR the client's.
    return request.META.get("REMOTE_ADDR") if request is not None else None


class AuditMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = _request.set(request)
        try:
            return self.get_response(request)
        finally:
            _request.reset(token)


def _actor(request, user) -> tuple[int | None, str, str | None]:
    request = request if request is not None else _request.get()
    if user is None and request is not None:
        user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return user.pk, user.get_username(), client_address(request)
    return None, "", client_address(request)


def record(
    action: str,
    obj=None,
    *,
    outcome: str = "success",
    detail: str = "",
    request=None,
    user=None,
    username: str = "",
    address: str | None = None,
) -> None:
    """Append an audit event. `obj` is any model instance (or None). A process that serves no Django request
    (the console proxy) names the `user` and the client's `address` itself."""
    from portal.models import AuditEvent

    user_id, name, seen_from = _actor(request, user)
    AuditEvent.objects.create(
        user_id=user_id,
        username=username or name,
        address=address or seen_from,
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None and obj.pk is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        outcome=outcome,
        detail=detail[:2000],
    )


@receiver(user_logged_in)
def _logged_in(sender, request, user, **kwargs) -> None:
    record("login", user, request=request, user=user)


@receiver(user_logged_out)
def _logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        record("logout", user, request=request, user=user)


@receiver(user_login_failed)
def _login_failed(sender, credentials, request=None, **kwargs) -> None:
    lock = getattr(request, "login_lock", None)  # set by portal.throttle when a lock refused it unchecked
    record(
        "login",
        outcome="refused",
        detail=f"locked out: {lock.reason}" if lock is not None else "wrong user name or password",
        request=request,
        username=str(credentials.get("username", ""))[:150],
    )


@receiver(post_delete, sender="portal.ApiToken")
def _token_deleted(sender, instance, **kwargs) -> None:
    """Every token deletion: revoked on the account page or in the admin, or with a new password."""
    record("api_token.revoke", instance)


# Every audited service: (action, obj_kwarg, the undecorated function), for the test that checks each is
# a public service that names its object by keyword.
AUDITED: list[tuple[str, str | None, Callable]] = []


def audited(action: str, *, obj_kwarg: str | None = None):
    """Record a service call: success (with the object it acted on or returned), or refused with the reason."""

    def wrap(fn):
        AUDITED.append((action, obj_kwarg, fn))

        def inner(*args, **kwargs):
            obj = kwargs.get(obj_kwarg) if obj_kwarg else None
            actor = kwargs.get("actor")  # the services that decide for a user are told who (else: the request's)
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                messages = getattr(e, "messages", None) or [str(e)]
                outcome = "refused" if _is_refusal(e) else "failed"
                record(action, obj, outcome=outcome, detail="; ".join(messages), user=actor)
                raise
            detail = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k in _DETAIL_KEYS)
            done = obj if obj is not None else (result if hasattr(result, "_meta") else None)
            record(action, done, detail=detail, user=actor)
            return result

        functools.update_wrapper(inner, fn, assigned=("__name__", "__doc__"), updated=())  # and __wrapped__
        return inner

    return wrap


# Arguments worth keeping in an audit record (never secrets).
_DETAIL_KEYS = {
    "action",
    "disk_gib",
    "slot",
    "device",
    "persistent",
    "protected",
    "name",
    "domain_uuid",
    "keep_disks",
    "bmc",
    "uri",
    "enabled",
    "deploy_type",
    "vcpus",
    "memory_mib",
}


def _is_refusal(e: Exception) -> bool:
    return isinstance(e, Refusal | ValidationError | PermissionDenied)


# Changes to rows that no service makes (users, staff flags, projects and their members, token deletions: the
# admin's forms, the inlines, bulk deletes, any later caller): recorded from the model signals, so every path
# that saves through the ORM is recorded, with the acting request's user and address where there is one.
_BEFORE = "_audit_before"


def track(model, *, prefix: str, fields: Sequence[str], flags: Sequence[str] = (), secret: Sequence[str] = ()) -> None:
    """Record creates (`<prefix>.create`), changes of `fields` (`<prefix>.update`; a change of a `flags` field
    is `<prefix>.flags`, so privilege changes can be found on their own) and deletes (`<prefix>.delete`).
    A `secret` field is recorded as changed, never with its value."""
    watched = [*fields, *flags, *secret]

    def before(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
        if raw or instance.pk is None or (update_fields is not None and not set(update_fields) & set(watched)):
            setattr(instance, _BEFORE, None)
            return
        setattr(instance, _BEFORE, sender._base_manager.filter(pk=instance.pk).values(*watched).first())

    def after(sender, instance, created, raw=False, **kwargs) -> None:
        if raw:
            return
        if created:
            shown = [f"{f}={getattr(instance, f)}" for f in flags if getattr(instance, f)]
            record(f"{prefix}.create", instance, detail=", ".join(shown))
            return
        old = getattr(instance, _BEFORE, None)
        if not old:
            return
        changed = [f for f in watched if old[f] != _value(instance, f)]
        if not changed:
            return
        said = [f"{f} changed" if f in secret else f"{f}: {old[f]} -> {_value(instance, f)}" for f in changed]
        action = "flags" if set(changed) & set(flags) else "update"
        record(f"{prefix}.{action}", instance, detail="; ".join(said))

    def deleted(sender, instance, **kwargs) -> None:
        record(f"{prefix}.delete", instance)

    # weak=False: the receivers are closures, kept alive by the signal itself.
    pre_save.connect(before, sender=model, weak=False, dispatch_uid=f"audit-before-{prefix}")
    post_save.connect(after, sender=model, weak=False, dispatch_uid=f"audit-after-{prefix}")
    post_delete.connect(deleted, sender=model, weak=False, dispatch_uid=f"audit-delete-{prefix}")


def track_m2m(model, field: str, *, prefix: str) -> None:
    """Record additions to and removals from a many-to-many field (a user's groups and permissions: privileges
    too, so `<prefix>.flags`), from the model's side."""
    through = getattr(model, field).through

    def changed(sender, instance, action, reverse, pk_set, **kwargs) -> None:
        if reverse or action not in ("post_add", "post_remove", "pre_clear"):
            return
        if action == "pre_clear":  # what is about to go, named before it goes
            names = [str(o) for o in getattr(instance, field).all()]
        else:  # kwargs["model"]: the related model (Group, Permission)
            names = [str(o) for o in kwargs["model"]._base_manager.filter(pk__in=pk_set or ())]
        if names:
            verb = "added" if action == "post_add" else "removed"
            record(f"{prefix}.flags", instance, detail=f"{field} {verb}: {', '.join(sorted(names))}")

    m2m_changed.connect(changed, sender=through, weak=False, dispatch_uid=f"audit-m2m-{prefix}-{field}")


def _value(instance, field: str):
    """A field as values() reads it: a foreign key by its id."""
    f = instance._meta.get_field(field)
    return getattr(instance, f.attname)
