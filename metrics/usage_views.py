"""The usage report pages: `/usage/` (a month's usage by project and by user, as a table) and `/usage/usage.csv`
(one of them as a download). Staff and project admins (metrics.usage); anyone else gets 403."""

from __future__ import annotations

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.http import require_GET

from metrics import usage


class UsageForm(forms.Form):
    month = forms.CharField(required=False, max_length=7, help_text="YYYY-MM; empty: this month.")
    by = forms.ChoiceField(required=False, choices=[(b, b) for b in usage.BY])

    def clean_month(self) -> usage.Month:
        return usage.month_of(self.cleaned_data.get("month"))

    def clean_by(self) -> str:
        return self.cleaned_data.get("by") or "project"


@login_required
@require_GET
def usage_report(request: HttpRequest) -> HttpResponse:
    projects = usage.visible_projects(request.user)  # PermissionDenied (403) for who may see none
    form = UsageForm(request.GET)
    tables: dict[str, list[dict]] = {}
    month = None
    if form.is_valid():
        month = form.cleaned_data["month"]
        tables = {by: usage.report(request.user, month, by) for by in usage.BY}
    return render(
        request,
        "metrics/usage.html",
        {
            "form": form,
            "month": month,
            "tables": [(by, rows, usage.total(rows)) for by, rows in tables.items()],
            "scope": "every project" if projects is None else ", ".join(p.name for p in projects),
        },
    )


@login_required
@require_GET
def usage_csv(request: HttpRequest) -> HttpResponseBase:
    usage.visible_projects(request.user)
    form = UsageForm(request.GET)
    if not form.is_valid():
        text = "; ".join(str(m) for errors in form.errors.values() for m in errors)
        return HttpResponse(text + "\n", status=400, content_type="text/plain; charset=utf-8")
    month, by = form.cleaned_data["month"], form.cleaned_data["by"]
    rows = usage.report(request.user, month, by)
    response = StreamingHttpResponse(usage.csv_lines(rows, month, by), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{month.label}-by-{by}.csv"'
    response["Cache-Control"] = "no-store"
    return response
