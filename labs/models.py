"""Labs, the templates they are made from, and AnsiStack inventory imports.

A lab is a named set of machines created and handled together, the shape of an AnsiStack inventory. Machines
know nothing of labs: membership is a row here (LabMachine), so `machines` never imports upward, and a machine
deleted by any path leaves its lab by the cascade.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from machines.models import Machine, Project, hostname_validator


class Lab(models.Model):
    """A named set of machines of one owner (and project, if any)."""

    name = models.CharField(max_length=63, validators=[hostname_validator])
    description = models.TextField(blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="labs")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.PROTECT, related_name="labs")
    # Where it came from: a template's name, or an imported inventory file's name ("inventory-vms.yaml").
    source = models.CharField(max_length=200, blank=True)
    # A lab's lease: its machines are shut down, then deleted, as a machine's lease does; empty: never.
    expires_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "name"], condition=models.Q(project__isnull=False), name="lab_name_unique_in_project"
            ),
            models.UniqueConstraint(
                fields=["owner", "name"], condition=models.Q(project__isnull=True), name="lab_name_unique_per_owner"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class LabMachine(models.Model):
    """A machine's place in a lab: the group it was made for (AnsiStack's `provisioned_vms`, `bootable_vms`,
    or a template's group name such as `controllers`)."""

    lab = models.ForeignKey(Lab, on_delete=models.CASCADE, related_name="members")
    machine = models.OneToOneField(Machine, on_delete=models.CASCADE, related_name="lab_membership")
    group = models.CharField(max_length=63, blank=True)

    class Meta:
        ordering = ["group", "machine__name"]

    def __str__(self) -> str:
        return f"{self.machine} in {self.lab}"


class LabTemplate(models.Model):
    """A lab's shape, written as YAML in AnsiStack's inventory shape; staff or a project's admins make them."""

    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="lab_templates")
    project = models.ForeignKey(
        Project,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="lab_templates",
        help_text="Empty: a template staff offer to everyone.",
    )
    spec = models.TextField(help_text="The lab's groups of machines, in AnsiStack's inventory shape (YAML).")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="lab_template_name_unique")]

    def __str__(self) -> str:
        return self.name


class InventoryImport(models.Model):
    """One AnsiStack inventory import: the files as uploaded, the plan made from them, and what applying it did.
    Planned first (nothing changed); applied as a job with progress."""

    class Status(models.TextChoices):
        PLANNED = "planned", "Planned"
        APPLYING = "applying", "Applying"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    # [{"name": "inventory-vms.yaml", "text": "..."}], and the optional vars file with vm_image_data.
    files = models.JSONField(default=list)
    vars_file = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    lab_name = models.CharField(max_length=63, blank=True)
    plan = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PLANNED)
    done_steps = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    report = models.JSONField(default=list, blank=True)  # what applying did, line by line
    finished = models.DateTimeField(null=True, blank=True)
    # The worker process applying it (machines.attempts ids): a worker that starts resumes the imports of
    # dead ones, which is safe because an apply plans again before each phase and skips what is there.
    attempt_id = models.CharField(max_length=120, blank=True, editable=False)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"import {self.pk} by {self.created_by}"


class ScheduledAction(models.Model):
    """An action run at set times on a machine or on every machine of a lab (Huey's periodic task looks each
    minute): power on or off, or a snapshot kept to a retention count. Each run is an event and an audit record."""

    class Action(models.TextChoices):
        POWER_ON = "power_on", "Power on"
        POWER_OFF = "power_off", "Shut down"
        SNAPSHOT = "snapshot", "Take a snapshot"

    machine = models.ForeignKey(Machine, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules")
    lab = models.ForeignKey(Lab, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules")
    action = models.CharField(max_length=9, choices=Action.choices)
    minute = models.PositiveSmallIntegerField(default=0)
    hour = models.PositiveSmallIntegerField(default=0)
    weekdays = models.JSONField(default=list, blank=True, help_text="0 = Monday … 6 = Sunday; empty: every day.")
    retention = models.PositiveSmallIntegerField(default=3, help_text="Snapshots: how many scheduled ones to keep.")
    enabled = models.BooleanField(default=True)
    last_run = models.DateTimeField(null=True, blank=True, editable=False)
    last_result = models.TextField(blank=True, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["hour", "minute"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(machine__isnull=False, lab__isnull=True)
                | models.Q(machine__isnull=True, lab__isnull=False),
                name="schedule_on_a_machine_or_a_lab",
            ),
            models.CheckConstraint(condition=models.Q(minute__lte=59, hour__lte=23), name="schedule_time_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.get_action_display()} at {self.hour:02d}:{self.minute:02d} on {self.machine or self.lab}"
