"""Workflows (registered playbooks), their runs, and what a run reported as it went.

A run's secrets never reach a log, a page or the audit: they are stored encrypted apart from the other
variables and handed to ansible-runner only in its private data directory, which is removed after the run.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from labs.models import Lab
from machines.models import Machine, Project


class Workflow(models.Model):
    """A playbook staff registered, from a directory on the portal host or a git repository."""

    class Source(models.TextChoices):
        DIRECTORY = "directory", "A directory on the portal host"
        GIT = "git", "A git repository (checked out by the worker)"

    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    project = models.ForeignKey(
        Project,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="workflows",
        help_text="Empty: offered to everyone.",
    )
    source = models.CharField(max_length=9, choices=Source.choices, default=Source.DIRECTORY)
    directory = models.CharField(max_length=500, blank=True, help_text="For a directory: its absolute path.")
    git_url = models.CharField("git URL", max_length=500, blank=True)
    git_ref = models.CharField("git ref", max_length=200, blank=True, help_text="A branch, tag or commit.")
    playbook = models.CharField(max_length=200, default="playbook.yml", help_text="Relative to the directory.")
    # [{"name", "type" (string|integer|boolean|choice), "default", "required", "secret", "choices", "help"}]
    variables = models.JSONField(default=list, blank=True)
    # Inventory groups the playbook's plays target (for the page; the run's inventory holds only its targets).
    groups = models.JSONField(default=list, blank=True)
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="workflow_name_unique")]

    def __str__(self) -> str:
        return self.name


class WorkflowRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCESSFUL = "successful", "Successful"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        ERROR = "error", "Error"

    workflow = models.ForeignKey(Workflow, on_delete=models.PROTECT, related_name="runs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workflow_runs")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    lab = models.ForeignKey(Lab, null=True, blank=True, on_delete=models.SET_NULL, related_name="workflow_runs")
    machines = models.ManyToManyField(Machine, related_name="workflow_runs", blank=True)
    variables = models.JSONField(default=dict, blank=True)  # without the secret ones
    secrets_encrypted = models.TextField(blank=True, editable=False)  # JSON of the secret ones, encrypted
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    status_message = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    rc = models.IntegerField(null=True, blank=True)
    # ansible-runner's per-host stats at the end: {"host": {"ok": n, "changed": n, "failures": n, ...}}.
    summary = models.JSONField(default=dict, blank=True)
    stdout = models.TextField(blank=True, editable=False)  # the whole log, secrets masked
    attempt_id = models.CharField(max_length=120, blank=True, editable=False)

    # Every field but the key is in one or the other (a test holds it), so a new one is shown nowhere until it
    # is put here: the admin shows SHOWN_FIELDS, the API a part of them; HIDDEN_FIELDS stay with the worker.
    SHOWN_FIELDS = (
        "workflow",
        "created_by",
        "project",
        "lab",
        "machines",
        "variables",
        "status",
        "status_message",
        "cancel_requested",
        "created",
        "started",
        "finished",
        "rc",
        "summary",
        "stdout",
        "attempt_id",
    )
    HIDDEN_FIELDS = ("secrets_encrypted",)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.workflow} run {self.pk}"


class WorkflowEvent(models.Model):
    """One ansible-runner event of a run, as it came (what the run page streams)."""

    run = models.ForeignKey(WorkflowRun, on_delete=models.CASCADE, related_name="events")
    counter = models.PositiveIntegerField()
    created = models.DateTimeField(auto_now_add=True)
    event = models.CharField(max_length=50)  # runner_on_ok, runner_on_failed, playbook_on_task_start, ...
    host = models.CharField(max_length=255, blank=True)
    task = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=12, blank=True)  # ok, changed, failed, unreachable, skipped
    stdout = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)  # the event's res, trimmed and masked

    class Meta:
        ordering = ["run", "counter"]
        constraints = [models.UniqueConstraint(fields=["run", "counter"], name="workflow_event_once")]

    def __str__(self) -> str:
        return f"{self.run} #{self.counter} {self.event}"
