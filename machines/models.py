import re
import uuid as uuidlib

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

from hypervisors.models import Hypervisor, Image
from hypervisors.offers import DISK_BUSES, DISK_CACHES, FIRMWARE_LABELS, FIRMWARES, MACVTAP_MODES, NIC_MODELS
from machines import macs
from machines.states import BUSY, TRANSITIONS, DeployType, InvalidTransition, PowerState, Status

hostname_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    "A host name: 1 to 63 lower-case letters, digits and hyphens, not starting or ending with a hyphen (RFC 1123).",
)
mac_validator = RegexValidator(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", "A MAC address looks like 52:54:00:12:34:56.")


# CSI sequences (ESC [ ... final), OSC strings (ESC ] ... BEL or ST), two-byte escapes, and the control
# characters a terminal acts on but a page cannot (not tab or newline).
_TERMINAL_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]"
)


class Machine(models.Model):
    uuid = models.UUIDField(
        "UUID", default=uuidlib.uuid4, unique=True, editable=False, help_text="Also the libvirt domain's UUID."
    )
    name = models.CharField(max_length=63, validators=[hostname_validator], help_text="The guest's host name.")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="machines")
    project = models.ForeignKey(
        "Project",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="machines",
        help_text="Members of the project share the machine by their role.",
    )
    hypervisor = models.ForeignKey(Hypervisor, on_delete=models.PROTECT, related_name="machines")
    pool = models.CharField("storage pool", max_length=100, default="default")
    deploy_type = models.CharField(max_length=8, choices=DeployType.choices, default=DeployType.IMAGE)
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.PROTECT, related_name="machines")
    vcpus = models.PositiveSmallIntegerField(
        "vCPUs", default=1, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    memory_mib = models.PositiveIntegerField(
        "memory (MiB)", default=1024, validators=[MinValueValidator(128), MaxValueValidator(1 << 20)]
    )
    disk_gib = models.PositiveIntegerField(
        "disk (GiB)", default=10, validators=[MinValueValidator(1), MaxValueValidator(16384)]
    )
    ssh_authorized_keys = models.TextField("SSH public keys", blank=True, help_text="One OpenSSH public key per line.")
    packages = models.TextField(
        blank=True, help_text="Packages to install at first boot, separated by spaces or lines."
    )
    script = models.TextField(
        "first-boot script", blank=True, help_text="Runs once, as root, at the end of first boot."
    )
    user_data = models.TextField(
        "extra #cloud-config", blank=True, help_text="Merged with what the portal generates; at most 64 KiB."
    )
    deletion_protection = models.BooleanField(default=False, help_text="Refuse deletion and rebuild until cleared.")
    autostart = models.BooleanField(default=True, help_text="Start with the hypervisor.")
    power_on_after_create = models.BooleanField(default=True, help_text="Network-boot machines stay off unless asked.")
    tags = models.JSONField(
        default=list, blank=True, help_text="Short labels; each becomes a group in the Ansible inventory."
    )
    # A domain that existed on its hypervisor before the portal knew it, recorded by an adoption: its disks
    # were not made by the portal, so a delete keeps them unless asked otherwise.
    adopted = models.BooleanField(default=False, editable=False)
    own_domain_name = models.CharField(
        max_length=200, blank=True, editable=False, help_text="An adopted domain's own name (empty: the portal's)."
    )
    description = models.TextField(blank=True)
    # Day two. Live resizing goes up to the maxima chosen at create (empty: the create's own values, so none);
    # a change the running machine cannot take is kept in `pending` ({"vcpus": 4, "memory_mib": 4096}) and
    # applied at its next cold start.
    max_vcpus = models.PositiveSmallIntegerField("maximum vCPUs", null=True, blank=True)
    max_memory_mib = models.PositiveIntegerField("maximum memory (MiB)", null=True, blank=True)
    pending = models.JSONField(default=dict, blank=True, editable=False)
    # A lease: when the machine is shut down (then deleted, PORTAL_LEASE_DELETE_AFTER later); empty: never.
    # Deletion protection wins over it.
    expires_at = models.DateTimeField(null=True, blank=True)
    expiry_warned = models.DateTimeField(null=True, blank=True, editable=False)
    expired_off = models.DateTimeField(null=True, blank=True, editable=False)
    cloned_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones", editable=False
    )
    # Hardware (defaults suit common guests; each is checked against what the hypervisor reports).
    machine_type = models.CharField(
        max_length=40, blank=True, help_text="Empty: pc (i440fx), which installers and the test guests see best."
    )
    cpu_mode = models.CharField(
        "CPU mode",
        max_length=20,
        blank=True,
        help_text="host-passthrough, host-model or custom; empty: the hypervisor's default.",
    )
    cpu_model = models.CharField(
        "CPU model", max_length=40, blank=True, help_text="With CPU mode custom, e.g. Haswell-noTSX."
    )
    cpu_topology = models.JSONField(
        "CPU topology", default=list, blank=True, help_text="[sockets, cores, threads]; their product is the vCPUs."
    )
    smbios = models.JSONField(
        "SMBIOS",
        default=dict,
        blank=True,
        help_text="System entries: manufacturer, product, version, serial, sku, family.",
    )
    watchdog = models.BooleanField(default=False, help_text="An i6300esb watchdog that resets a hung guest.")
    rng = models.BooleanField("RNG", default=False, help_text="A virtio RNG fed from the hypervisor's /dev/urandom.")
    disk_bus = models.CharField(max_length=8, default="virtio", choices=[(b, b) for b in DISK_BUSES])
    disk_cache = models.CharField(
        max_length=12,
        blank=True,
        choices=[("", "default")] + [(c, c) for c in DISK_CACHES],
    )
    extra_disks = models.JSONField(
        default=list,
        blank=True,
        help_text="Extra disks: a size in GiB (blank), or {size_gib, image, boot_order, n} (n: its volume's number).",
    )
    hostdevs = models.JSONField(
        "host devices",
        default=list,
        blank=True,
        help_text="Node device names (e.g. pci_0000_03_00_0) passed through to the guest.",
    )
    firmware = models.CharField(max_length=4, default="bios", choices=[(f, FIRMWARE_LABELS[f]) for f in FIRMWARES])
    secure_boot = models.BooleanField(default=False, help_text="UEFI with Secure Boot (needs machine type q35 on x86).")
    qemu_args = models.JSONField(
        "extra QEMU arguments", default=list, blank=True, help_text="Staff only: they bypass every check."
    )

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.NEW)
    status_message = models.TextField(blank=True)
    status_changed = models.DateTimeField(default=timezone.now)
    power_state = models.CharField(max_length=8, choices=PowerState.choices, default=PowerState.UNKNOWN)
    power_checked = models.DateTimeField(null=True, blank=True)
    operation = models.CharField(max_length=16, blank=True, help_text="The power action in progress, if any.")
    operation_started = models.DateTimeField(null=True, blank=True)
    # While a move runs: the hypervisor it goes to, whose room it already holds (machines.capacity counts it there).
    moving_to = models.ForeignKey(
        "hypervisors.Hypervisor",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="incoming",
        editable=False,
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    # The worker run that owns the machine now (machines.attempts): "" when none does.
    attempt_id = models.CharField(max_length=120, blank=True, editable=False)
    instance_id = models.CharField(max_length=64, blank=True)
    # The virtual BMC of a network-boot machine.
    bmc_address = models.GenericIPAddressField("BMC address", null=True, blank=True)
    bmc_port = models.PositiveIntegerField("BMC port", null=True, blank=True)
    bmc_username = models.CharField("BMC user", max_length=32, blank=True)
    bmc_password_encrypted = models.TextField(blank=True, editable=False)
    bmc_listening = models.BooleanField(default=False)
    bmc_checked = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="machine_name_unique_per_owner"),
            models.UniqueConstraint(fields=["bmc_address", "bmc_port"], name="bmc_port_unique_per_address"),
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("machines:detail", args=[self.pk])

    def clean(self) -> None:
        if self.deploy_type in (DeployType.IMAGE, DeployType.ISO) and self.image_id is None:
            raise ValidationError({"image": "Choose an image."})
        if self.image_id is not None:
            image = self.image
            assert image is not None  # image_id is set
            wanted = "iso" if self.deploy_type == DeployType.ISO else "disk"
            if image.kind != wanted:
                raise ValidationError({"image": f"A {self.get_deploy_type_display()} machine needs a {wanted} image."})
            if not image.is_ready:
                raise ValidationError({"image": f"Image {image.name} is not ready ({image.get_status_display()})."})
            if wanted == "disk" and image.virtual_size_bytes > self.disk_gib << 30:
                need = -(-image.virtual_size_bytes // (1 << 30))
                raise ValidationError({"disk_gib": f"The image needs at least {need} GiB."})

    @property
    def last_observed(self) -> "MachineObserved":
        """What the portal last learned from the hypervisor: a blank, unsaved record before the first time."""
        try:
            return self.observed
        except MachineObserved.DoesNotExist:
            return MachineObserved(machine_id=self.pk)

    # Names of what the machine owns on its hypervisor, all derived from the UUID.
    @property
    def domain_name(self) -> str:
        if self.own_domain_name:
            return self.own_domain_name  # an adopted domain keeps its own name (machines.services.adoption)
        return f"{self.name}-{self.uuid.hex[:8]}"

    @property
    def disk_volume(self) -> str:
        return f"m-{self.uuid}-disk.qcow2"

    @property
    def seed_volume(self) -> str:
        return f"m-{self.uuid}-seed.iso"

    @property
    def serial_volume(self) -> str:
        return f"m-{self.uuid}-serial.log"

    def extra_disk_volume(self, index: int) -> str:
        """The volume of extra disk `index` (0: the first): named by its number, `n` in its entry (a disk attached
        after create, machines.services.devices, keeps its number when one before it is detached), else index + 1."""
        entries = self.extra_disks or []
        entry = entries[index] if index < len(entries) else None
        n = entry.get("n") if isinstance(entry, dict) else None
        return f"m-{self.uuid}-disk{n or index + 1}.qcow2"

    @property
    def volumes(self) -> list[str]:
        extra = [self.extra_disk_volume(i) for i in range(len(self.extra_disks or []))]
        return [self.disk_volume, *extra, self.seed_volume, self.serial_volume]

    @property
    def has_bmc(self) -> bool:
        return self.bmc_port is not None

    @property
    def is_busy(self) -> bool:
        return self.status in BUSY or bool(self.operation)

    @property
    def package_list(self) -> list[str]:
        return self.packages.split()

    @property
    def key_list(self) -> list[str]:
        return [line.strip() for line in self.ssh_authorized_keys.splitlines() if line.strip()]

    def transition(self, new: str, message: str = "") -> None:
        """Move to `new` if the table allows it; a concurrent change makes exactly one caller win."""
        if new not in TRANSITIONS.get(self.status, set()):
            raise InvalidTransition(f"{self.get_status_display()} machines cannot become {Status(new).label}")
        now = timezone.now()
        n = Machine.objects.filter(pk=self.pk, status=self.status).update(
            status=new, status_message=message, status_changed=now
        )
        if n != 1:
            raise InvalidTransition(f"machine {self.pk} changed status concurrently")
        self.status, self.status_message, self.status_changed = new, message, now
        self.log(
            "status",
            f"{Status(new).label}{': ' + message if message else ''}",
            level=MachineEvent.Level.ERROR if new == Status.ERROR else MachineEvent.Level.INFO,
        )

    def log(self, step: str, message: str, level: str = "info") -> "MachineEvent":
        return MachineEvent.objects.create(machine=self, step=step, message=message, level=level)


class MachineObserved(models.Model):
    """What the portal last learned from the hypervisor about a machine: written by the reconcile and the
    serial log and screenshot fetches (machines.services.observation), made by the first of them. Kept off
    the machine's row, which every list and the BMC server's poll read: the serial log alone may be 256 KiB."""

    machine = models.OneToOneField(Machine, on_delete=models.CASCADE, primary_key=True, related_name="observed")
    guest_addresses = models.JSONField(
        default=dict, blank=True, editable=False, help_text="MAC -> the addresses the running guest was last seen with."
    )
    # The SSH host keys the guest printed on its serial console at first boot (cloud-init's
    # "BEGIN SSH HOST KEY KEYS" block), as known_hosts key lines: what a workflow run checks the guest against.
    ssh_host_keys = models.TextField(blank=True, editable=False)
    console_unprotected = models.BooleanField(
        default=False,
        editable=False,
        help_text="Its running VNC server asks no password (defined before the "
        "portal set them): fixed at its next cold start.",
    )
    serial_log = models.TextField(blank=True, editable=False)
    serial_log_fetched = models.DateTimeField(null=True, blank=True, editable=False)
    screenshot_requested = models.DateTimeField(null=True, blank=True, editable=False)
    screenshot_taken = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "observed state"

    def __str__(self) -> str:
        return f"observed state of machine {self.machine_id}"

    @property
    def serial_log_text(self) -> str:
        """The serial log as a page shows it: without terminal control sequences (colours, cursor moves,
        the shell's cursor-position queries), which a <pre> would print as litter."""
        return _TERMINAL_CONTROL.sub("", self.serial_log or "")

    @property
    def host_key_fingerprints(self) -> list:
        """The recorded SSH host keys as `ssh-keygen -l` lists them (machines.hostkeys), for the machine page."""
        from machines.hostkeys import fingerprints

        return fingerprints(self.ssh_host_keys or "")

    @property
    def address_list(self) -> list[str]:
        """Every address the running guest was last seen with, without prefixes, for lists."""
        return [a.split("/")[0] for addrs in (self.guest_addresses or {}).values() for a in addrs]


class MachineSnapshot(models.Model):
    """A snapshot of a machine's disks (and memory, for a running machine where its firmware allows), made
    by the method that works for the machine: internal qcow2 snapshots for BIOS machines, external disk-only
    overlays where libvirt refuses internal ones (UEFI). Its space is counted in the owner's disk quota."""

    class Kind(models.TextChoices):
        INTERNAL = "internal", "Internal (inside the qcow2 disks)"
        EXTERNAL = "external", "External (disk-only overlays)"

    class Status(models.TextChoices):
        CREATING = "creating", "Being taken"
        READY = "ready", "Ready"
        REVERTING = "reverting", "Being reverted to"
        DELETING = "deleting", "Being deleted"
        ERROR = "error", "Error"

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=63, validators=[hostname_validator])
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.INTERNAL)
    memory = models.BooleanField(default=False, help_text="Taken with the running machine's memory.")
    quiesced = models.BooleanField(default=False, help_text="File systems frozen by the guest agent first.")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    automatic = models.BooleanField(default=False, help_text="Taken by the portal (before a rebuild, on a schedule).")
    status = models.CharField(max_length=9, choices=Status.choices, default=Status.CREATING)
    status_message = models.TextField(blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["machine", "created"]
        constraints = [models.UniqueConstraint(fields=["machine", "name"], name="snapshot_name_unique_per_machine")]

    def __str__(self) -> str:
        return f"{self.machine} @ {self.name}"

    @property
    def kept_disk(self) -> bool:
        """Taken by a rebuild: the old disk kept whole as a volume of its own (the rebuild replaces the qcow2 file
        that internal snapshots and external overlays live in), not a libvirt snapshot."""
        return self.automatic and self.name.startswith(KEPT_DISK_PREFIX)

    def volume(self, index: int) -> str:
        """The pool volume this snapshot makes for the machine's disk `index` (0: the main disk): an external
        snapshot's overlay, or a rebuild's kept disk. Named from the machine's UUID, so the sweeper and a delete
        know it as the machine's (machines.services.sweeper.VOLUME_NAME)."""
        disk = "disk" if index == 0 else f"disk{index}"
        return f"m-{self.machine.uuid}-{disk}-snap{self.pk}.qcow2"

    @property
    def volumes(self) -> list[str]:
        """The volumes it holds: an external one an overlay per disk, a kept disk one; an internal one none."""
        if self.kept_disk:
            return [self.volume(0)]
        if self.kind != self.Kind.EXTERNAL:
            return []
        return [self.volume(i) for i in range(1 + len(self.machine.extra_disks or []))]


KEPT_DISK_PREFIX = "before-rebuild-"


class MachineNic(models.Model):
    class Type(models.TextChoices):
        NETWORK = "network", "libvirt network"
        BRIDGE = "bridge", "host bridge"
        DIRECT = "direct", "macvtap on a host interface"
        USER = "user", "user-mode (NAT inside QEMU)"

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="nics")
    index = models.PositiveSmallIntegerField()
    type = models.CharField(max_length=8, choices=Type.choices, default=Type.NETWORK)
    source = models.CharField(max_length=100, blank=True, help_text="Network or bridge name.")
    mac = models.CharField("MAC", max_length=17, unique=True, validators=[mac_validator])
    model = models.CharField(max_length=8, default="virtio", choices=[(m, m) for m in NIC_MODELS])
    mode = models.CharField("macvtap mode", max_length=12, default="bridge", choices=[(m, m) for m in MACVTAP_MODES])
    vlan = models.PositiveSmallIntegerField("VLAN", null=True, blank=True)
    dhcp4 = models.BooleanField(default=True)
    dhcp6 = models.BooleanField(default=False)
    addresses = models.JSONField(
        default=list, blank=True, help_text="Static addresses with prefix, e.g. 192.0.2.10/24."
    )
    gateway4 = models.CharField(max_length=45, blank=True)
    gateway6 = models.CharField(max_length=45, blank=True)
    nameservers = models.JSONField(default=list, blank=True)
    search = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["machine", "index"]
        constraints = [models.UniqueConstraint(fields=["machine", "index"], name="nic_index_unique")]

    def __str__(self) -> str:
        return f"{self.machine} nic{self.index} {self.mac}"

    def clean(self) -> None:
        """The MAC rule (machines.macs) for anything that checks a NIC (full_clean, the admin's forms)."""
        if self.mac:
            try:
                self.mac = macs.normalise_mac(self.mac)
            except macs.InvalidMac as e:
                raise ValidationError({"mac": f"MAC address {e}"}) from None

    @property
    def seen_addresses(self) -> list[str]:
        """What the running guest has on this NIC, as the last reconcile saw it."""
        return self.machine.last_observed.guest_addresses.get(self.mac.lower(), [])


class MachineEvent(models.Model):
    """Append-only: what happened to a machine, step by step."""

    class Level(models.TextChoices):
        INFO = "info", "Info"
        WARNING = "warning", "Warning"
        ERROR = "error", "Error"

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="events")
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    step = models.CharField(max_length=32)
    message = models.TextField()
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self) -> str:
        return f"{self.created:%H:%M:%S} {self.step}: {self.message}"


class MachineCdrom(models.Model):
    """A CD-ROM drive of an ISO machine and what is in it (None: ejected). Slot 0 holds the installer."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="cdroms")
    slot = models.PositiveSmallIntegerField()
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        ordering = ["machine", "slot"]
        constraints = [models.UniqueConstraint(fields=["machine", "slot"], name="cdrom_slot_unique")]

    def __str__(self) -> str:
        return f"{self.machine} cdrom{self.slot}: {self.image or 'empty'}"


class ConsoleToken(models.Model):
    """A single-use console credential. Only its hash is stored."""

    key_hash = models.CharField(max_length=64, unique=True)
    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="console_tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="console_tokens")
    session_key = models.CharField(max_length=40, blank=True)  # the portal session it was issued to, if any
    created = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.GenericIPAddressField(null=True, blank=True)
    view_only = models.BooleanField(default=False)  # the proxy drops keyboard and mouse input
    kind = models.CharField(max_length=6, choices=[("vnc", "graphical (VNC)"), ("serial", "serial")], default="vnc")

    def __str__(self) -> str:
        return f"{self.kind} console token for {self.machine} ({self.user})"


class ConsoleSession(models.Model):
    """An open console connection through the proxy (ended is set when it closes)."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="console_sessions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="console_sessions")
    token = models.ForeignKey(ConsoleToken, null=True, on_delete=models.SET_NULL, related_name="sessions")
    client = models.GenericIPAddressField(null=True, blank=True)
    proxy_pid = models.PositiveIntegerField(default=0)
    started = models.DateTimeField(auto_now_add=True)
    ended = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)
    # What the session does now: its console kind, and view-only (set at open, or later when the user's role is
    # lowered; never cleared: a raised role takes effect on the next connection). Caps count viewers apart.
    kind = models.CharField(max_length=6, choices=[("vnc", "graphical (VNC)"), ("serial", "serial")], default="vnc")
    view_only = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"console of {self.machine} by {self.user} from {self.client}"


class Quota(models.Model):
    """Limits of one user's machines. Empty: the PORTAL_QUOTA_* default. Staff have none."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota")
    machines = models.PositiveIntegerField(null=True, blank=True)
    vcpus = models.PositiveIntegerField("vCPUs", null=True, blank=True)
    memory_mib = models.PositiveIntegerField("memory (MiB)", null=True, blank=True)
    disk_gib = models.PositiveIntegerField("disk (GiB)", null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"quota of {self.user}"

    def limits(self) -> dict[str, int]:
        return {
            "machines": self.machines if self.machines is not None else settings.PORTAL_QUOTA_MACHINES,
            "vcpus": self.vcpus if self.vcpus is not None else settings.PORTAL_QUOTA_VCPUS,
            "memory_mib": self.memory_mib if self.memory_mib is not None else settings.PORTAL_QUOTA_MEMORY_MIB,
            "disk_gib": self.disk_gib if self.disk_gib is not None else settings.PORTAL_QUOTA_DISK_GIB,
        }


class Project(models.Model):
    """A group of users sharing machines, with roles and its own quota (empty: no limit)."""

    name = models.CharField(max_length=63, unique=True)
    description = models.TextField(blank=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="projects")
    machines_quota = models.PositiveIntegerField("machines", null=True, blank=True)
    vcpus_quota = models.PositiveIntegerField("vCPUs", null=True, blank=True)
    memory_mib_quota = models.PositiveIntegerField("memory (MiB)", null=True, blank=True)
    disk_gib_quota = models.PositiveIntegerField("disk (GiB)", null=True, blank=True)
    lease_default_days = models.PositiveIntegerField(
        "default lease (days)", null=True, blank=True, help_text="A new machine's lease; empty: none."
    )
    lease_max_days = models.PositiveIntegerField(
        "longest lease (days)", null=True, blank=True, help_text="How far an owner may extend a lease; empty: no limit."
    )
    # The project's SSH key pair (ed25519), made by the portal: its public key goes on every image machine
    # the project's members create, so the project's workflows reach them; the private key is kept encrypted
    # (machines/crypto.py) and handed only to a workflow run's private data directory.
    ssh_public_key = models.TextField("SSH public key", blank=True, editable=False)
    ssh_private_key_encrypted = models.TextField(blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def limits(self) -> dict[str, int | None]:
        return {
            "machines": self.machines_quota,
            "vcpus": self.vcpus_quota,
            "memory_mib": self.memory_mib_quota,
            "disk_gib": self.disk_gib_quota,
        }


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer (sees machines, events and consoles, view-only)"
    OPERATOR = "operator", "Operator (also power, boot device, console input, ISO changes)"
    ADMIN = "admin", "Admin (also create, rebuild, delete, BMC credentials)"


class Membership(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="one_membership_per_project")]

    def __str__(self) -> str:
        return f"{self.user} {self.role} of {self.project}"
