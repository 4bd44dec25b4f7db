from datetime import datetime
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.urls import reverse

from hypervisors.drivers.base import is_loopback, remote_host
from hypervisors.drivers.ssh import HostKey, HostKeyError, parse_host_keys, ssh_peer
from hypervisors.offers import PUBLISHABLE_MODES
from hypervisors.validators import validate_libvirt_uri, validate_listen_address

name_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    "Use 1 to 63 lower-case letters, digits and hyphens, not starting or ending with a hyphen.",
)


class ConsoleAddressRefused(Exception):
    """A console the proxy will not dial: a loopback address of a remote hypervisor."""


def remote_loopback_message(hv: "Hypervisor", address: str = "") -> str:
    address = address or hv.console_address
    return (
        f"{address} is {hv.remote_host}'s own loopback: the console proxy runs on the portal's machine, where that "
        f"address is the portal's own loopback, so it would reach another machine's console, never {hv.name}'s. "
        f"Give an address of {hv.remote_host} that the portal's machine reaches (its management address; consoles "
        f"listen there and ask for the proxy's password)."
    )


class HypervisorStatus(models.TextChoices):
    PENDING = "pending", "Checking"
    ONLINE = "online", "Online"
    DOWN = "down", "Down"
    DISABLED = "disabled", "Disabled"


class DomainType(models.TextChoices):
    AUTO = "", "Automatic (from capabilities)"
    KVM = "kvm", "kvm (hardware virtualisation)"
    QEMU = "qemu", "qemu (software emulation)"


class Hypervisor(models.Model):
    """A libvirt host. The database mirrors what the last sync saw; pages never ask the host."""

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    uri = models.CharField(
        "libvirt URI",
        max_length=500,
        validators=[validate_libvirt_uri],
        help_text="qemu:///system for this machine; qemu+ssh://root@host/system, qemu+tls://host/system "
        "or qemu+tcp://host/system for another.",
    )
    console_address = models.CharField(
        max_length=45,
        default="127.0.0.1",
        validators=[validate_listen_address],
        help_text="Address on the hypervisor where machine consoles (VNC) listen. Never 0.0.0.0 unless "
        "the network is trusted.",
    )
    domain_type_override = models.CharField(
        "domain type",
        max_length=8,
        blank=True,
        choices=DomainType.choices,
        default=DomainType.AUTO,
        help_text="Leave automatic: kvm where it runs guests, else qemu.",
    )
    enabled = models.BooleanField(
        default=True, help_text="Disabled hypervisors are not contacted and get no new machines."
    )
    maintenance = models.BooleanField(
        "in maintenance",
        default=False,
        help_text="Drained: no machine is created or moved here; the machines it has run on and are still watched.",
    )
    cpu_allocation_ratio = models.DecimalField(
        "vCPU overcommit",
        max_digits=4,
        decimal_places=1,
        default=4,
        help_text="vCPUs placed per host CPU when the portal picks a hypervisor.",
    )

    status = models.CharField(max_length=10, choices=HypervisorStatus.choices, default=HypervisorStatus.PENDING)
    status_error = models.TextField(blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    last_checked = models.DateTimeField(null=True, blank=True)

    # Capabilities from the last successful sync.
    hostname = models.CharField(max_length=255, blank=True)
    arch = models.CharField(max_length=32, blank=True)
    cpu_model = models.CharField(max_length=64, blank=True)
    cpus = models.PositiveIntegerField(null=True, blank=True)
    memory_mib = models.PositiveBigIntegerField(null=True, blank=True)
    libvirt_version = models.CharField(max_length=32, blank=True)
    hypervisor_version = models.CharField("QEMU version", max_length=32, blank=True)
    detected_domain_type = models.CharField(max_length=16, blank=True)
    domain_types = models.JSONField(default=list, blank=True)
    guest_arches = models.JSONField(default=list, blank=True)
    machine_types = models.JSONField(default=list, blank=True)
    cpu_modes = models.JSONField(default=list, blank=True)
    cpu_models = models.JSONField(default=list, blank=True)
    firmwares = models.JSONField(default=list, blank=True)
    interfaces = models.JSONField(default=list, blank=True)
    devices = models.JSONField(default=list, blank=True)
    pools = models.JSONField(default=list, blank=True)
    networks = models.JSONField(default=list, blank=True)
    unmanaged_domains = models.JSONField(default=list, blank=True)
    managed_domain_count = models.PositiveIntegerField(default=0)
    # What the portal made here that no machine row owns (machines/services/sweeper.py): a domain or volume left
    # by a worker that died between steps. Each: kind, key, name, uuid, pool, size_bytes, first_seen, sweeps and
    # whether it is reported (past the grace period) and so may be removed.
    orphans = models.JSONField(default=list, blank=True, editable=False)
    orphans_swept = models.DateTimeField(null=True, blank=True, editable=False)

    # qemu+ssh: the host keys staff trusted (the only ones the worker's ssh accepts, via the portal's
    # known_hosts), and the ones the host offered when a connection was refused for its key.
    ssh_host_keys = models.TextField(
        "SSH host keys",
        blank=True,
        help_text="The host's public keys (lines of /etc/ssh/ssh_host_*_key.pub), pinned: no other key is accepted.",
    )
    ssh_host_keys_offered = models.TextField(blank=True, editable=False)

    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("hypervisors:detail", args=[self.pk])

    def clean(self) -> None:
        if self.remote_host and is_loopback(self.console_address):
            raise ValidationError({"console_address": remote_loopback_message(self)})
        if self.ssh_host_keys:
            try:
                parse_host_keys(self.ssh_host_keys)
            except HostKeyError as e:
                raise ValidationError({"ssh_host_keys": str(e)}) from None

    @property
    def uses_ssh(self) -> bool:
        return ssh_peer(self.uri) is not None

    @property
    def ssh_login(self) -> str:
        """The user the worker logs in as on a qemu+ssh host ("" when the URI names none: the worker's own)."""
        return urlsplit(self.uri).username or ""

    @property
    def pinned_host_keys(self) -> list[HostKey]:
        try:
            return parse_host_keys(self.ssh_host_keys)
        except HostKeyError:
            return []

    @property
    def offered_host_keys(self) -> list[HostKey]:
        """What the host offered last time its key was refused, when that is not what is pinned."""
        try:
            offered = parse_host_keys(self.ssh_host_keys_offered)
        except HostKeyError:
            return []
        return offered if set(offered) - set(self.pinned_host_keys) else []

    @property
    def remote_host(self) -> str:
        """The host of the URI when it is another machine than the portal's; "" for this one (no host,
        localhost, a loopback address: qemu:///system, a local socket)."""
        return remote_host(self.uri)

    def console_dial_host(self, listen: str) -> str:
        """Where the console proxy (on the portal's machine) reaches a VNC server listening on `listen` on this
        hypervisor: the listen address itself, or the console address when it listens everywhere. A loopback
        address of a remote hypervisor means that host itself and nothing here (dialled, it would reach the
        portal's own loopback, another machine's console): ConsoleAddressRefused."""
        host = self.console_address if listen in ("0.0.0.0", "::", "") else listen  # noqa: S104 - everywhere
        if self.remote_host and host in ("0.0.0.0", "::", ""):  # noqa: S104 - everywhere there: at its URI's host
            return self.remote_host
        if self.remote_host and is_loopback(host):
            raise ConsoleAddressRefused(remote_loopback_message(self, host))
        return host

    @property
    def domain_type(self) -> str:
        """The domain type machines get here: the override, else what the sync found."""
        return self.domain_type_override or self.detected_domain_type

    @property
    def is_online(self) -> bool:
        return self.status == HypervisorStatus.ONLINE

    @property
    def orphans_reported(self) -> list[dict]:
        """Leftovers seen long enough to be sure no create or move in flight owns them: these may be removed."""
        return [
            {**o, "first_seen_at": datetime.fromisoformat(o["first_seen"])} for o in self.orphans if o.get("reported")
        ]

    @property
    def orphans_pending(self) -> int:
        """Leftovers seen, still within the grace period."""
        return sum(1 for o in self.orphans if not o.get("reported"))

    @property
    def pool_capacity_bytes(self) -> int:
        return sum(p["capacity_bytes"] for p in self.pools if p.get("active"))

    @property
    def pool_available_bytes(self) -> int:
        return sum(p["available_bytes"] for p in self.pools if p.get("active"))

    @property
    def pool_used_percent(self) -> int:
        cap = self.pool_capacity_bytes
        return round(100 * (cap - self.pool_available_bytes) / cap) if cap else 0


class ImageKind(models.TextChoices):
    DISK = "disk", "Disk image"
    ISO = "iso", "Installer ISO"


class ImageFormat(models.TextChoices):
    QCOW2 = "qcow2", "qcow2"
    RAW = "raw", "raw"
    ISO = "iso", "ISO 9660"


class ImageStatus(models.TextChoices):
    IMPORTING = "importing", "Importing"
    READY = "ready", "Ready"
    ERROR = "error", "Error"


class Image(models.Model):
    """A disk image or installer ISO in the portal's catalogue.

    The portal keeps each ready image as a file it named itself (in the data
    dir) and copies it into a hypervisor's pool the first time a machine there
    needs it (ImageCopy).
    """

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=4, choices=ImageKind.choices, default=ImageKind.DISK)
    format = models.CharField(max_length=5, choices=ImageFormat.choices, default=ImageFormat.QCOW2)
    os_name = models.CharField("OS", max_length=100, blank=True, help_text="e.g. Debian 12")
    default_user = models.CharField(
        max_length=32, blank=True, default="debian", help_text="The image's login user; SSH keys are given to it."
    )
    arch = models.CharField(max_length=16, default="x86_64")
    status = models.CharField(max_length=10, choices=ImageStatus.choices, default=ImageStatus.IMPORTING)
    status_message = models.TextField(blank=True)
    source_url = models.URLField(max_length=1000, blank=True)
    expected_sha256 = models.CharField(max_length=64, blank=True)
    # Registered from a volume already in a hypervisor's pool.
    source_hypervisor = models.ForeignKey(
        Hypervisor, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source_pool = models.CharField(max_length=100, blank=True)
    source_volume = models.CharField(max_length=255, blank=True)

    file_name = models.CharField(max_length=100, blank=True, editable=False)  # inside settings.PORTAL_IMAGE_DIR
    file_size_bytes = models.PositiveBigIntegerField(default=0)
    virtual_size_bytes = models.PositiveBigIntegerField(default=0)
    progress_bytes = models.PositiveBigIntegerField(default=0)
    total_bytes = models.PositiveBigIntegerField(default=0)  # 0 when the source does not say
    sha256 = models.CharField(max_length=64, blank=True)
    owner = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("hypervisors:image-detail", args=[self.pk])

    @property
    def is_ready(self) -> bool:
        return self.status == ImageStatus.READY

    @property
    def progress_percent(self) -> int | None:
        return round(100 * self.progress_bytes / self.total_bytes) if self.total_bytes else None

    @property
    def volume_name(self) -> str:
        """Name of its copy in a hypervisor pool: content-addressed, so a copy is reused only if identical."""
        ext = "iso" if self.kind == ImageKind.ISO else self.format
        return f"portal-image-{self.sha256[:16]}.{ext}"


class ImageCopy(models.Model):
    """An image's copy in a hypervisor's storage pool, verified by checksum."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="copies")
    hypervisor = models.ForeignKey(Hypervisor, on_delete=models.CASCADE, related_name="image_copies")
    pool = models.CharField(max_length=100)
    volume = models.CharField(max_length=255)
    path = models.CharField(max_length=1000)
    sha256 = models.CharField(max_length=64)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "hypervisor", "pool"], name="one_copy_per_pool")]

    def __str__(self) -> str:
        return f"{self.image} on {self.hypervisor}/{self.pool}"


class NicKind(models.TextChoices):
    """The kinds of host network a NIC can be put on (user-mode is not one: it is never published)."""

    NETWORK = "network", "libvirt network"
    BRIDGE = "bridge", "host bridge"
    DIRECT = "direct", "host interface (macvtap)"


SOURCE_NAME = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$", "A network or interface name: letters, digits, '_', '.', ':' and '-'."
)


class PublishedNetwork(models.Model):
    """A host network that staff open to users who are not staff.

    Libvirt networks, host bridges, host interfaces (macvtap) and VLAN tags are the hypervisor's own:
    only staff put machines on them, unless a row here publishes one, to everyone or to projects (the
    machines created in those projects), with the macvtap modes and VLAN tags allowed. The tenant
    network (PORTAL_TENANT_NETWORK) needs no row: it is for everyone on every hypervisor that has it.
    """

    hypervisor = models.ForeignKey(
        Hypervisor,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="published_networks",
        help_text="Empty: every hypervisor that has a network or interface of this name.",
    )
    kind = models.CharField(max_length=8, choices=NicKind.choices)
    source = models.CharField(
        max_length=100,
        validators=[SOURCE_NAME],
        help_text="The libvirt network, host bridge or host interface, as the hypervisor names it.",
    )
    modes = models.JSONField(
        "macvtap modes",
        default=list,
        blank=True,
        help_text="Host interfaces only: bridge, vepa, private. passthrough is never published.",
    )
    vlans = models.JSONField(
        "VLAN tags",
        default=list,
        blank=True,
        help_text="Tags users may set (host bridges and interfaces only); empty: none.",
    )
    untagged = models.BooleanField(
        "also untagged", default=True, help_text="Users may also attach without a VLAN tag (the native network)."
    )
    everyone = models.BooleanField("to everyone", default=False, help_text="Every user's machines may use it.")
    projects = models.ManyToManyField(
        "machines.Project",
        blank=True,
        related_name="published_networks",
        help_text="Or only machines created in these projects.",
    )
    note = models.CharField(max_length=200, blank=True, help_text="What it is, for staff (e.g. the lab VLAN).")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "source", "pk"]
        verbose_name = "published network"

    def __str__(self) -> str:
        where = self.hypervisor.name if self.hypervisor is not None else "any hypervisor"
        return f"{self.get_kind_display()} {self.source} on {where}"

    def clean(self) -> None:
        from django.conf import settings
        from django.core.exceptions import ValidationError

        errors = {}
        modes = self.modes if isinstance(self.modes, list) else None
        if modes is None or not all(isinstance(m, str) for m in modes):
            errors["modes"] = 'A list of macvtap modes, e.g. ["bridge"].'
        elif "passthrough" in modes:
            errors["modes"] = (
                "passthrough hands the host's interface over to one guest; it stays staff-only and cannot be published."
            )
        elif set(modes) - set(PUBLISHABLE_MODES):
            errors["modes"] = f"macvtap modes are {', '.join(PUBLISHABLE_MODES)}."
        elif self.kind == NicKind.DIRECT and not modes:
            errors["modes"] = "Allow at least one macvtap mode (bridge keeps guests off the host itself)."
        elif self.kind != NicKind.DIRECT and modes:
            errors["modes"] = "macvtap modes go with a host interface."
        vlans = self.vlans if isinstance(self.vlans, list) else None
        if vlans is None or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4094 for v in vlans):
            errors["vlans"] = "VLAN tags are whole numbers from 1 to 4094."
        elif vlans and self.kind == NicKind.NETWORK:
            errors["vlans"] = "VLAN tags go with a host bridge or a host interface; a libvirt network sets its own."
        elif not vlans and not self.untagged:
            errors["untagged"] = "Allow untagged use or give VLAN tags; otherwise nothing is published."
        if self.kind == NicKind.NETWORK and self.source == settings.PORTAL_TENANT_NETWORK:
            errors["source"] = f"The tenant network {self.source} is already for everyone; it needs no publishing."
        if errors:
            raise ValidationError(errors)
        assert modes is not None and vlans is not None  # else errors had them
        self.modes = [m for m in PUBLISHABLE_MODES if m in modes]
        self.vlans = sorted(set(vlans))
