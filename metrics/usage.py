"""Usage reports: what each project and each user used in a month (vCPU-hours, memory GiB-hours, disk GiB-days),
added up from the hourly usage rows (UsageHour), which outlive the machines, so a month's report stays the same
after its machines are deleted.

Staff see every project and user; a project admin sees the usage of their projects' machines only (by project,
or by the users who own those machines); anyone else sees nothing. A month is the portal's (PORTAL_TIME_ZONE),
from its first midnight to the next month's."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

from machines.access import project_choices
from machines.models import Project
from metrics.models import UsageHour
from portal.audit_export import csv_cell

BY = ("project", "user")
FIGURES = ("vcpu_hours", "memory_gib_hours", "disk_gib_days")
CSV_COLUMNS = ("month", "by", "name", "machines", *FIGURES)
_MONTH = re.compile(r"(\d{4})-(\d{2})")
NO_PROJECT, NO_USER = "(no project)", "(deleted user)"


@dataclass(frozen=True)
class Month:
    start: datetime
    end: datetime

    @property
    def label(self) -> str:
        return f"{self.start:%Y-%m}"


def month_of(value: str | None) -> Month:
    """The month `value` names (YYYY-MM; empty: the current one), in the portal's time zone; ValidationError with
    a message otherwise."""
    value = (value or "").strip()
    if not value:
        now = timezone.localtime()
        year, month = now.year, now.month
    else:
        match = _MONTH.fullmatch(value)
        year, month = (int(match[1]), int(match[2])) if match else (0, 0)
        if not (1 <= month <= 12 and 1970 <= year <= 9998):
            raise ValidationError(f"Give the month as YYYY-MM (e.g. 2026-01), not {value[:40]!r}.", code="month")
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    return Month(
        start=timezone.make_aware(datetime(year, month, 1)),
        end=timezone.make_aware(datetime(*following, 1)),
    )


def visible_projects(user) -> QuerySet[Project] | None:
    """None: every project (staff); else the projects whose usage the user may see (those they administer).
    PermissionDenied for anyone who may see none."""
    if not user.is_authenticated or not user.is_active:
        raise PermissionDenied("Log in to see usage.")
    if user.is_staff:
        return None
    projects = project_choices(user)  # the projects they administer
    if not projects.exists():
        raise PermissionDenied("Usage reports are for staff and project admins.")
    return projects


def may_see_usage(user) -> bool:
    try:
        visible_projects(user)
    except PermissionDenied:
        return False
    return True


def report(user, month: Month, by: str) -> list[dict]:
    """One row per project (by="project") or per owner (by="user") with usage in the month, by name, each with
    `id` (None: deleted, or no project), `name`, `machines` (distinct machines) and the FIGURES; one query (two for
    a project admin). PermissionDenied for a user who may see none (visible_projects)."""
    projects = visible_projects(user)
    rows = UsageHour.objects.filter(at__gte=month.start, at__lt=month.end)
    if projects is not None:
        rows = rows.filter(project__in=projects)
    key, name, missing = (
        ("project_id", "project__name", NO_PROJECT) if by == "project" else ("owner_id", "owner__username", NO_USER)
    )
    sums = (
        rows.order_by()
        .values(key, name)
        .annotate(machines=Count("machine_uuid", distinct=True), **{f: Sum(f) for f in FIGURES})
    )
    out = [
        {"id": r[key], "name": r[name] if r[key] is not None else missing, "machines": r["machines"]}
        | {f: round(r[f] or 0.0, 3) for f in FIGURES}
        for r in sums
    ]
    return sorted(out, key=lambda r: (r["id"] is None, r["name"].lower()))


def total(rows: list[dict]) -> dict:
    """The rows' figures added up (machines are not: one machine may count in two users' rows)."""
    return {f: round(sum(r[f] for r in rows), 3) for f in FIGURES}


class _Line:
    """csv.writer's file: hands back each line it is given."""

    def write(self, text: str) -> str:
        return text


def csv_lines(rows: list[dict], month: Month, by: str) -> Iterator[str]:
    """The report as CSV lines; names (users', projects') are neutralised where a spreadsheet would run them as
    formulas (portal.audit_export.csv_cell)."""
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_COLUMNS)
    for r in rows:
        yield writer.writerow(
            [csv_cell(v) for v in (month.label, by, r["name"], r["machines"], *(r[f] for f in FIGURES))]
        )
