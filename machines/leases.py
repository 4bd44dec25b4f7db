"""The rules of leases: what a new machine's lease is, and how far a user may set one.

A project's `lease_default_days` is a new machine's lease (none without it); `lease_max_days` is how far from
now its owner or a project admin may set a lease, at create or later (none: no limit). Staff have no limit.
Deletion protection wins over a lease (machines/services/leases.py): a protected machine is only warned.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from machines.models import Project
from portal.refusals import Refusal

MAX_DAYS = 3650  # ten years: past that a lease means nothing, and a date that far overflows nothing


class LeaseRefused(Refusal):
    """The lease asked for is not allowed; the message says the limit."""


class SystemActor:
    """Who acts when the portal itself shuts down or deletes a machine (a lease) or runs a schedule: it passes
    the role checks (machines.policy) and shows in the audit trail under its own name, never as a user."""

    is_authenticated = True
    is_active = True
    is_staff = True
    is_superuser = False
    pk = None
    id = None

    def __init__(self, name: str) -> None:
        self.name = name

    def get_username(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


def default_expiry(project: Project | None, now: datetime) -> datetime | None:
    """A new machine's lease end in this project (None: no lease)."""
    if project is None or not project.lease_default_days:
        return None
    return now + timedelta(days=project.lease_default_days)


def longest(project: Project | None, actor, now: datetime) -> datetime | None:
    """The latest lease end `actor` may set in `project` now (None: no limit)."""
    if getattr(actor, "is_staff", False) or project is None or project.lease_max_days is None:
        return None
    return now + timedelta(days=project.lease_max_days)


def check(until: datetime | None, *, project: Project | None, actor, now: datetime) -> None:
    """Refuse a lease end the actor may not set: in the past, too far (the project's maximum), or none at all
    where the project has a maximum."""
    limit = longest(project, actor, now)
    if until is None:
        if limit is not None:
            raise LeaseRefused(
                f"Project {project} leases machines for at most {project.lease_max_days} days; "  # type: ignore[union-attr]
                "only staff may remove a lease."
            )
        return
    if until <= now:
        raise LeaseRefused("A lease ends in the future; choose a later time.")
    if until > now + timedelta(days=MAX_DAYS):
        raise LeaseRefused(f"A lease is at most {MAX_DAYS} days.")
    if limit is not None and until > limit:
        raise LeaseRefused(
            f"Project {project} leases machines for at most {project.lease_max_days} days "  # type: ignore[union-attr]
            f"(until {limit:%Y-%m-%d %H:%M} UTC); ask staff for longer."
        )


def from_days(days: int | None, *, project: Project | None, now: datetime) -> datetime | None:
    """A create's lease from its `lease_days`: None, the project's default; 0, none; N, N days from now."""
    if days is None:
        return default_expiry(project, now)
    if days < 0 or days > MAX_DAYS:
        raise LeaseRefused(f"A lease is 0 (none) to {MAX_DAYS} days.")
    return now + timedelta(days=days) if days else None
