"""Reading the audit trail: the filters the Audit page, `GET /api/v1/audit/` and the exports share, and
the exports themselves (CSV and JSON), streamed row by row so a trail of any length never sits in memory."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from datetime import date, datetime, time, timedelta

from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django.utils import timezone

from portal.models import AuditEvent

FILTERS = ("user", "action", "object_type", "outcome", "since", "until")
COLUMNS = (
    "id",
    "created",
    "username",
    "address",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "outcome",
    "detail",
)
FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
CHUNK = 2000  # rows read from the database at a time


def audit_events(params: Mapping[str, str]) -> QuerySet[AuditEvent]:
    """The trail, newest first, filtered by `user` (the user name), `action` (a prefix: `machine` is every
    machine action), `object_type`, `outcome`, and `since` / `until` (dates, YYYY-MM-DD, both included).
    A date that is not one raises ValidationError with a message per field."""
    events = AuditEvent.objects.all()
    value = {k: (params.get(k) or "").strip() for k in FILTERS}
    if value["user"]:
        events = events.filter(username__iexact=value["user"])
    if value["action"]:
        events = events.filter(action__startswith=value["action"])
    if value["object_type"]:
        events = events.filter(object_type=value["object_type"])
    if value["outcome"]:
        events = events.filter(outcome=value["outcome"])
    errors = {}
    for key, lookup, shift in (("since", "created__gte", 0), ("until", "created__lt", 1)):
        if not value[key]:
            continue
        try:
            day = date.fromisoformat(value[key]) + timedelta(days=shift)
        except (ValueError, OverflowError):  # OverflowError: the day after 9999-12-31
            errors[key] = f"Give the date as YYYY-MM-DD, not {value[key][:40]!r}."
            continue
        # Midnight where the portal keeps its time, so a day means the same on the page and in an export.
        events = events.filter(**{lookup: timezone.make_aware(datetime.combine(day, time.min))})
    if errors:
        raise ValidationError(errors)
    return events


def export_response(events: QuerySet[AuditEvent], fmt: str) -> StreamingHttpResponse:
    """`events` as a download in `fmt` (csv or json), written as the rows are read."""
    rows = events.values_list(*COLUMNS).iterator(chunk_size=CHUNK)
    body = _csv(rows) if fmt == "csv" else _json(rows)
    response = StreamingHttpResponse(body, content_type=FORMATS[fmt])
    stamp = timezone.localtime().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response


class _Line:
    """csv.writer's file: hands back each line it is given."""

    def write(self, text: str) -> str:
        return text


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): user names, object
# names and details come from users, so such a cell gets a leading apostrophe, as OWASP advises.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


csv_cell = _cell  # for the other CSV downloads (metrics.usage): one rule for every cell a user's text reaches


def _csv(rows: Iterator[tuple]) -> Iterator[str]:
    writer = csv.writer(_Line())
    yield writer.writerow(COLUMNS)
    for row in rows:
        yield writer.writerow([_cell(v) for v in row])


def _json(rows: Iterator[tuple]) -> Iterator[str]:
    """A JSON array of objects, one per line."""
    yield "["
    first = True
    for row in rows:
        item = dict(zip(COLUMNS, row, strict=True))
        item["created"] = item["created"].isoformat()
        yield ("\n" if first else ",\n") + json.dumps(item, ensure_ascii=False)
        first = False
    yield "\n]\n"
