"""The machine lifecycle. Power is observed separately (Machine.power_state)."""

from django.db import models


class Status(models.TextChoices):
    NEW = "new", "New"
    PROVISIONING = "provisioning", "Provisioning"
    ACTIVE = "active", "Active"
    REBUILDING = "rebuilding", "Rebuilding"
    RESIZING = "resizing", "Growing disk"
    DELETING = "deleting", "Deleting"
    ERROR = "error", "Error"


TRANSITIONS: dict[str, set[str]] = {
    Status.NEW: {Status.PROVISIONING},
    Status.PROVISIONING: {Status.ACTIVE, Status.ERROR, Status.DELETING},
    Status.ACTIVE: {Status.REBUILDING, Status.RESIZING, Status.DELETING},
    Status.REBUILDING: {Status.ACTIVE, Status.ERROR, Status.DELETING},
    Status.RESIZING: {Status.ACTIVE, Status.ERROR, Status.DELETING},
    Status.ERROR: {Status.PROVISIONING, Status.REBUILDING, Status.DELETING},
    Status.DELETING: {Status.ERROR},  # success deletes the row
}
BUSY = {Status.PROVISIONING, Status.REBUILDING, Status.RESIZING, Status.DELETING}


class InvalidTransition(Exception):
    pass


class DeployType(models.TextChoices):
    IMAGE = "image", "Cloud image (cloud-init)"
    ISO = "iso", "Installer ISO (console)"
    NETWORK = "network", "Network boot (virtual BMC)"


class PowerState(models.TextChoices):
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    OFF = "off", "Off"
    CRASHED = "crashed", "Crashed"
    MISSING = "missing", "Domain missing"
    UNKNOWN = "unknown", "Unknown"


class PowerAction(models.TextChoices):
    START = "start", "Start"
    SHUTDOWN = "shutdown", "Shut down"
    POWEROFF = "poweroff", "Power off"
    REBOOT = "reboot", "Reboot"
    RESET = "reset", "Reset"
