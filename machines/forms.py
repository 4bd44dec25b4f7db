import re
import shlex
from typing import Any, cast

from django import forms
from django.db.models import QuerySet
from django.urls import reverse

from hypervisors import offers
from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageKind, ImageStatus
from hypervisors.offers import CPU_MODES, FIRMWARE_LABELS
from machines import macs, nic_policy
from machines.access import project_choices
from machines.models import Machine, MachineSnapshot, Project, hostname_validator
from machines.services import may_take_host_devices, taken_hostdevs
from machines.states import DeployType

NIC_MODELS = [(m, offers.NIC_MODEL_LABELS.get(m, m)) for m in offers.NIC_MODELS]
MACVTAP_MODES = [(m, m) for m in offers.MACVTAP_MODES]


class Offer(offers.Menu):
    """What the create form offers (hypervisors.offers.Menu) for one hypervisor, with its free devices, or
    for "any hypervisor" (None), over every online one."""

    @classmethod
    def of(cls, hypervisor: Hypervisor | None) -> "Offer":
        hvs = (
            [hypervisor]
            if hypervisor
            else list(Hypervisor.objects.filter(enabled=True, status=HypervisorStatus.ONLINE))
        )
        return cls.over(hvs, hypervisor=hypervisor, taken=taken_hostdevs(hypervisor) if hypervisor else set())


_NIC_NAMES = {"user:": "user-mode NAT", "": "no network"}


class HostChoiceField(forms.ChoiceField):
    """Shows what the user may pick, and accepts whatever the hypervisor has: the service, which is the
    authority, then refuses the rest naming the rule (not a bare "Select a valid choice")."""

    accepted: frozenset[str] = frozenset()

    def valid_value(self, value) -> bool:
        return str(value) in self.accepted or super().valid_value(value)


def _device_label(d: dict) -> str:
    ids = f"{d.get('vendor', '')[2:]}:{d.get('product', '')[2:]}".strip(":")
    return f"{d['name']} · {d.get('description') or d.get('type', '').upper()} ({ids})" if ids else d["name"]


class MachineForm(forms.ModelForm):
    """The create form: one NIC here (the API takes any number). Its choices are what the chosen
    hypervisor has (or, for "any", what every online one has): architectures, machine types, CPU modes
    and models, firmware, networks, bridges, interfaces, pools and free host devices."""

    hypervisor = forms.ModelChoiceField(
        queryset=Hypervisor.objects.none(),
        required=False,
        empty_label="Any hypervisor (the one with most room)",
        help_text="The choices below follow the hypervisor.",
    )
    deploy_type = forms.ChoiceField(
        label="Deployment", choices=DeployType.choices, initial=DeployType.IMAGE, widget=forms.RadioSelect
    )
    power_on = forms.BooleanField(
        label="Power on after create",
        required=False,
        initial=False,
        help_text="Network-boot machines only; others always start.",
    )
    image = forms.ModelChoiceField(
        queryset=Image.objects.none(),
        empty_label="(none: network boot)",
        required=False,
        help_text="A cloud image (its login user gets the SSH keys) or, for an ISO machine, "
        "the installer ISO; only architectures the hypervisor runs.",
    )
    extra_isos = forms.ModelMultipleChoiceField(
        queryset=Image.objects.none(),
        required=False,
        label="Extra ISOs",
        help_text="ISO machines only: more CD-ROMs, e.g. drivers (up to 3).",
    )
    pool = forms.ChoiceField(label="Storage pool", initial="default")
    nic = HostChoiceField(label="Network", required=False, widget=forms.Select(attrs={"class": "form-select"}))
    nic_model = forms.ChoiceField(label="NIC model", choices=NIC_MODELS, initial="virtio", required=False)
    nic_mode = HostChoiceField(
        label="macvtap mode",
        choices=MACVTAP_MODES,
        initial="bridge",
        required=False,
        help_text="Host interfaces only. In bridge mode guests reach each other, not the host.",
    )
    nic_vlan = forms.IntegerField(
        label="VLAN tag",
        required=False,
        min_value=1,
        max_value=4094,
        help_text="Host bridges (Open vSwitch) and interfaces only.",
    )
    nic_mac = forms.CharField(label="MAC address", required=False, help_text="Leave empty to generate one.")
    nic_address = forms.CharField(
        label="Static address",
        required=False,
        help_text="With prefix, e.g. 192.0.2.10/24 or 2001:db8::10/64; empty for DHCP.",
    )
    nic_gateway = forms.CharField(label="Gateway", required=False)
    nic_dns = forms.CharField(label="DNS servers", required=False, help_text="Separated by spaces or commas.")
    machine_type = forms.ChoiceField(label="Machine type", required=False)
    cpu_mode = forms.ChoiceField(label="CPU mode", required=False)
    cpu_model = forms.ChoiceField(label="CPU model", required=False, help_text="With CPU mode custom.")
    firmware = forms.ChoiceField(choices=[("bios", FIRMWARE_LABELS["bios"])], initial="bios")
    cpu_sockets = forms.IntegerField(label="Sockets", required=False, min_value=1, max_value=64)
    cpu_cores = forms.IntegerField(label="Cores", required=False, min_value=1, max_value=256)
    cpu_threads = forms.IntegerField(label="Threads", required=False, min_value=1, max_value=8)
    smbios_text = forms.CharField(
        label="SMBIOS strings",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "manufacturer=Acme\nserial=SN-0042"}),
        help_text="One key=value per line: manufacturer, product, version, serial, sku, family.",
    )
    extra_disks_text = forms.CharField(
        label="Extra disks (GiB)",
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "20 100"}),
        help_text="Sizes of blank extra disks, separated by spaces (up to four; disks "
        "from an image or with a boot order: through the API).",
    )
    hostdevs = forms.MultipleChoiceField(
        label="Host devices",
        required=False,
        widget=forms.SelectMultiple(attrs={"class": "form-select", "size": 3}),
        help_text="PCI and USB devices of this hypervisor that no machine has.",
    )
    hostdev_match = forms.CharField(
        label="Or the first free device matching",
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "8086:1533"}),
        help_text='A regular expression over "name vendor:product description".',
    )
    qemu_args_text = forms.CharField(
        label="Extra QEMU arguments",
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "-device pvpanic"}),
        help_text="Staff only: they bypass every check. Quoted like a shell.",
    )

    class Meta:
        model = Machine
        fields = [
            "deploy_type",
            "name",
            "hypervisor",
            "image",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "max_vcpus",
            "max_memory_mib",
            "description",
            "ssh_authorized_keys",
            "packages",
            "script",
            "user_data",
            "deletion_protection",
            "autostart",
            "watchdog",
            "rng",
            "disk_bus",
            "disk_cache",
            "secure_boot",
        ]
        labels = {"vcpus": "vCPUs"}  # Django would capitalise it to "VCPUs"
        widgets = {
            "ssh_authorized_keys": forms.Textarea(attrs={"rows": 3, "placeholder": "ssh-ed25519 AAAA… you@laptop"}),
            "packages": forms.Textarea(attrs={"rows": 2, "placeholder": "nginx htop"}),
            "script": forms.Textarea(attrs={"rows": 4, "placeholder": "#!/bin/sh\necho hello > /root/hello"}),
            "user_data": forms.Textarea(attrs={"rows": 4, "placeholder": "#cloud-config\ntimezone: Europe/Paris"}),
        }

    # The service's names for what this form calls otherwise, so its refusals land on the right field.
    SERVICE_FIELDS = {
        "nics": "nic",
        "cpu_topology": "cpu_sockets",
        "smbios": "smbios_text",
        "extra_disks": "extra_disks_text",
        "qemu_args": "qemu_args_text",
    }

    lease_days = forms.IntegerField(
        label="Lease (days)",
        required=False,
        min_value=0,
        max_value=3650,
        help_text="Empty: the project's default lease; 0: none. At most the project's longest lease (staff: any).",
    )

    tags = forms.CharField(
        required=False,
        max_length=700,
        help_text="Labels separated by spaces or commas (lower-case letters, digits, _ . -).",
    )

    override_capacity = forms.BooleanField(
        label="Create even if the hypervisor has no room",
        required=False,
        help_text="Staff only, with a named hypervisor: its memory, vCPUs or pool "
        "space may be overcommitted. Recorded in the audit trail.",
    )

    project = forms.ModelChoiceField(
        queryset=Project.objects.none(),
        required=False,
        empty_label="(none: just me)",
        help_text="Members of the project share the machine by their role.",
    )

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        online = Hypervisor.objects.filter(enabled=True, status=HypervisorStatus.ONLINE)
        self._model_choice("hypervisor").queryset = online
        # Picking another hypervisor brings back the form with its choices (machines:form-fields).
        redraw = {
            "hx-post": reverse("machines:form-fields"),
            "hx-trigger": "change",
            "hx-include": "#machine-form",
            "hx-target": "#form-body",
            "hx-swap": "outerHTML",
        }
        self.fields["hypervisor"].widget.attrs.update({"class": "form-select", **redraw})
        self.fields["project"].widget.attrs.update(redraw)  # networks published to a project follow it
        chosen = self._chosen(online)
        self.offer = offer = Offer.of(chosen)
        ready = Image.objects.filter(status=ImageStatus.READY)
        self._model_choice("image").queryset = ready.filter(arch__in=offer.arches) if offer.arches else ready
        # Per form, as the label depends on the hypervisor chosen; mypy forbids assigning to a method.
        default_arch = chosen.arch if chosen else "x86_64"

        def label(obj) -> str:
            kind = "ISO" if obj.kind == ImageKind.ISO else "disk image"
            return f"{obj.name} ({kind}, {obj.arch})" if obj.arch != default_arch else f"{obj.name} ({kind})"

        self._model_choice("image").label_from_instance = label  # type: ignore[method-assign]
        self._model_choice("extra_isos").queryset = ready.filter(kind=ImageKind.ISO)
        self._choice("pool").choices = [(p, p) for p in offer.pools] or [("default", "default")]
        if user is not None:
            self._model_choice("project").queryset = project_choices(user)
        self._network_choices(user, [chosen] if chosen else list(online), self._chosen_project())
        self._choice("machine_type").choices = [("", "Default (pc on x86, virt on Arm)")] + [
            (t, t) for t in offer.machine_types
        ]
        self._choice("cpu_mode").choices = [("", "Default (QEMU's)")] + [(m, CPU_MODES[m]) for m in offer.cpu_modes]
        self._choice("cpu_model").choices = [("", "–")] + [(m, m) for m in offer.cpu_models]
        self._choice("firmware").choices = [
            ("bios", FIRMWARE_LABELS["bios"]),
            *([("uefi", f"{FIRMWARE_LABELS['uefi']} (OVMF)")] if offer.uefi else []),
        ]
        self._choice("hostdevs").choices = [(d["name"], _device_label(d)) for d in offer.devices]
        if user is None or not user.is_staff:
            del self.fields["qemu_args_text"]
            del self.fields["override_capacity"]
        if user is None or not may_take_host_devices(user):
            del self.fields["hostdevs"], self.fields["hostdev_match"]
        self.dropped = self._drop_unoffered(chosen) if not self.is_bound else []

    # self.fields types every field as a plain Field; these say which kind a declared one is.
    def _choice(self, name: str) -> forms.ChoiceField:
        return cast(forms.ChoiceField, self.fields[name])

    def _model_choice(self, name: str) -> forms.ModelChoiceField:
        return cast(forms.ModelChoiceField, self.fields[name])

    def _host_choice(self, name: str) -> HostChoiceField:
        return cast(HostChoiceField, self.fields[name])

    def _queryset(self, name: str) -> QuerySet:
        queryset = self._model_choice(name).queryset
        assert queryset is not None  # every model choice field here is declared with one
        return queryset

    HOST_GROUPS = (
        ("Libvirt networks", "network", "networks"),
        ("Host bridges", "bridge", "bridges"),
        ("Host interfaces (macvtap)", "direct", "interfaces"),
    )

    def _network_choices(self, user, hvs: list[Hypervisor], project: Project | None) -> None:
        """The "Network" list. Staff: user-mode NAT and everything the hypervisor has. Others: the tenant
        network and what staff published to them (or to the project). The default: the tenant network
        where there is one, else user-mode (staff) or the first published network (others)."""
        offer, tenant = self.offer, nic_policy.tenant_network()
        host = [(label, kind, getattr(offer, attr)) for label, kind, attr in self.HOST_GROUPS]
        accepted = ["user:", ""] + [f"{kind}:{n}" for _, kind, names in host for n in names]
        self._host_choice("nic").accepted = frozenset(accepted)
        self._host_choice("nic_mode").accepted = frozenset(m for m, _ in MACVTAP_MODES)
        self.no_network = ""
        if user is None or user.is_staff:
            groups: list[tuple[str, Any]] = [
                ("user:", "User-mode NAT (QEMU; staff only: the guest reaches the hypervisor's loopback as 10.0.2.2)"),
                ("", "No network"),
            ]
            for label, kind, names in host:
                if names:
                    tenant_label = nic_policy.Choice("network", tenant, tenant=True).label
                    groups.append(
                        (
                            label,
                            [(f"{kind}:{n}", tenant_label if (kind, n) == ("network", tenant) else n) for n in names],
                        )
                    )
            tenant_here = any(map(nic_policy.has_tenant_network, hvs))
            self.fields["nic"].initial = f"network:{tenant}" if tenant_here else "user:"
            self.fields["nic"].help_text = (
                f"The tenant network {tenant} keeps guests away from the hypervisor; user-mode "
                "NAT maps its loopback into the guest."
            )
            self._choice("nic").choices = groups
            return
        mine = nic_policy.choices_for(user, hvs, project)
        groups = [("", "No network")]
        for label, kind, _ in host:
            items = [(c.value, c.label) for c in mine if c.kind == kind]
            if items:
                groups.append((label, items))
        default = nic_policy.default_choice(user, hvs, project)
        self.fields["nic"].initial = default.value if default else ""
        self.fields["nic"].help_text = (
            f"The tenant network {tenant} (isolated from the hypervisor) and the networks "
            "staff published to you or to the project."
        )
        if not mine:
            self.no_network = nic_policy.no_network_message(self.offer.hypervisor)
        modes = {m for c in mine if c.kind == "direct" for m in c.modes} or set(nic_policy.PUBLISHABLE_MODES)
        nic_modes = [(m, label) for m, label in MACVTAP_MODES if m in modes]
        self._choice("nic_mode").choices = nic_modes
        self.fields["nic_mode"].initial = nic_modes[0][0]
        # Fields nothing offered here needs stay out of sight (what is posted is still checked).
        if not any(c.kind == "direct" for c in mine):
            self.fields["nic_mode"].widget = forms.HiddenInput()
        if not any(c.vlans for c in mine):
            self.fields["nic_vlan"].widget = forms.HiddenInput()
        self._choice("nic").choices = groups

    def _chosen_project(self) -> Project | None:
        value = self.data.get("project") if self.is_bound else self.initial.get("project")
        if isinstance(value, Project):
            return value
        try:
            return self._queryset("project").filter(pk=int(value)).first() if value else None
        except (TypeError, ValueError):
            return None

    def _drop_unoffered(self, chosen: Hypervisor | None) -> list[str]:
        """After a redraw for another hypervisor: the choices made that it does not offer fall back to the
        defaults, and the form says which (rather than the browser quietly picking the first option)."""
        where = chosen.name if chosen else "every online hypervisor"
        dropped = []
        for name in ("nic", "pool", "machine_type", "cpu_mode", "cpu_model", "firmware", "image"):
            value = self.initial.get(name)
            if value in (None, ""):
                continue
            field = self._choice(name)
            digits = str(value).isdigit()
            if name == "image":
                ok = digits and self._queryset(name).filter(pk=value).exists()
            else:
                offered = [str(v) for v, _ in self._flat(field.choices)]
                ok = str(value) in offered
            if not ok:
                shown = (
                    Image.objects.filter(pk=value).values_list("name", flat=True).first()
                    if name == "image" and digits
                    else None
                )
                shown = (
                    shown or str(value).partition(":")[2] or _NIC_NAMES.get(str(value), str(value))
                )  # network:lan -> lan
                default = field.initial if name == "image" or str(field.initial or "") in offered else offered[0]
                back = (
                    _NIC_NAMES[default]
                    if name == "nic" and default in _NIC_NAMES
                    else "the default"
                    if not default
                    else str(default).partition(":")[2] or default
                )
                dropped.append(
                    f"{field.label or name.replace('_', ' ').capitalize()} {shown} is not offered on {where}; "
                    f"it is back to {back}."
                )
                self.initial[name] = default
        if "hostdevs" in self.fields and self.initial.get("hostdevs"):
            free = {str(v) for v, _ in self._flat(self._choice("hostdevs").choices)}
            gone = [d for d in self.initial["hostdevs"] if d not in free]
            if gone:
                dropped.append(f"Host devices {', '.join(gone)} are not free on {where}; they are left out.")
                self.initial["hostdevs"] = [d for d in self.initial["hostdevs"] if d in free]
        return dropped

    @staticmethod
    def _flat(choices):
        for value, label in choices:
            if isinstance(label, (list, tuple)):
                yield from label
            else:
                yield value, label

    def _chosen(self, online) -> Hypervisor | None:
        value = self.data.get("hypervisor") if self.is_bound else self.initial.get("hypervisor")
        if isinstance(value, Hypervisor):
            return value
        try:
            return online.filter(pk=int(value)).first() if value else None
        except (TypeError, ValueError):
            return None

    def clean_smbios_text(self) -> dict:
        entries = {}
        for line in self.cleaned_data["smbios_text"].splitlines():
            if not line.strip():
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise forms.ValidationError(f"Write key=value, not {line.strip()!r}.")
            entries[key.strip()] = value.strip()
        return entries

    def clean_extra_disks_text(self) -> list[int]:
        sizes = self.cleaned_data["extra_disks_text"].replace(",", " ").split()
        # ASCII digits, five at most: str.isdigit() takes "²" (which int() refuses) and any length (which
        # int() refuses past 4,300 digits).
        if not all(re.fullmatch(r"[0-9]{1,5}", s) and int(s) > 0 for s in sizes):
            raise forms.ValidationError("Give sizes in whole GiB, e.g. 20 100.")
        return [int(s) for s in sizes]

    def clean_nic_mac(self) -> str:
        """The one MAC rule (machines.macs); the service checks it is unused."""
        try:
            return macs.normalise_mac(self.cleaned_data["nic_mac"]) if self.cleaned_data["nic_mac"].strip() else ""
        except macs.InvalidMac as e:
            raise forms.ValidationError(f"MAC address {e}") from None

    def clean_qemu_args_text(self) -> list[str]:
        try:
            return shlex.split(self.cleaned_data["qemu_args_text"])
        except ValueError as e:
            raise forms.ValidationError(f"Unbalanced quotes: {e}.") from None

    def clean(self):
        super().clean()
        data = self.cleaned_data  # what Form.clean() returns, typed as never None
        topology = [data.get(k) for k in ("cpu_sockets", "cpu_cores", "cpu_threads")]
        if any(topology) and not all(topology):
            self.add_error("cpu_sockets", "Give sockets, cores and threads, or none of them.")
        kind = (data.get("nic") or ":").split(":", 1)[0]
        if data.get("nic_vlan") and kind not in ("bridge", "direct"):
            self.add_error("nic_vlan", "A VLAN tag goes with a host bridge or a host interface.")
        if data.get("deploy_type") == DeployType.NETWORK and not data.get("nic") and self.no_network:
            self.add_error("nic", f"A network-boot machine needs a NIC to boot from. {self.no_network}")
        return data

    def nic_inputs(self) -> list:
        from machines.services import NicInput

        data = self.cleaned_data
        if not data.get("nic"):
            return []
        kind, _, source = data["nic"].partition(":")
        address = data.get("nic_address", "").strip()
        gateway = data.get("nic_gateway", "").strip()
        v6 = ":" in address
        return [
            NicInput(
                type=kind,
                source=source,
                mac=data.get("nic_mac", "").strip(),
                dhcp4=not address or v6,
                addresses=[address] if address else [],
                gateway4="" if v6 else gateway,
                gateway6=gateway if v6 else "",
                nameservers=data.get("nic_dns", "").replace(",", " ").split(),
                model=data.get("nic_model") or "virtio",
                mode=data.get("nic_mode") or "bridge",
                vlan=data.get("nic_vlan"),
            )
        ]

    def service_kwargs(self) -> dict:
        data = {
            k: v
            for k, v in self.cleaned_data.items()
            if not k.startswith(("nic", "cpu_sockets", "cpu_cores", "cpu_threads")) and not k.endswith("_text")
        }
        data["extra_isos"] = list(data.get("extra_isos") or [])
        topology = [self.cleaned_data.get(k) for k in ("cpu_sockets", "cpu_cores", "cpu_threads")]
        if all(topology):
            data["cpu_topology"] = topology
        for key, source in (
            ("smbios", "smbios_text"),
            ("extra_disks", "extra_disks_text"),
            ("qemu_args", "qemu_args_text"),
        ):
            if self.cleaned_data.get(source):
                data[key] = self.cleaned_data[source]
        for key in ("machine_type", "cpu_mode", "cpu_model", "disk_cache", "hostdevs", "hostdev_match"):
            if not data.get(key):
                data.pop(key, None)
        if data.get("deploy_type") != DeployType.NETWORK:
            data.pop("power_on", None)
        return {**data, "nics": self.nic_inputs()}


class LeaseForm(forms.Form):
    """A lease's new end, in days from now; or none (staff, or where the project sets no maximum)."""

    days = forms.IntegerField(label="Lease ends in (days)", min_value=1, max_value=3650, required=False)
    clear = forms.BooleanField(label="No lease", required=False)

    def clean(self):
        data = super().clean() or {}
        if not data.get("clear") and not data.get("days"):
            raise forms.ValidationError("Give the days from now, or tick no lease.")
        return data

    def until(self):
        from datetime import timedelta

        from django.utils import timezone

        return None if self.cleaned_data.get("clear") else timezone.now() + timedelta(days=self.cleaned_data["days"])


class MachineEditForm(forms.Form):
    """A machine's page's Edit (machines/services/changes.py): only what was changed is sent to the service."""

    name = forms.CharField(max_length=63, help_text="A host name; the machine must be shut off (not for adopted ones).")
    vcpus = forms.IntegerField(label="vCPUs", min_value=1, max_value=64)
    memory_mib = forms.IntegerField(label="Memory (MiB)", min_value=128, max_value=1 << 20)
    max_vcpus = forms.IntegerField(
        label="Most vCPUs without a restart", required=False, min_value=1, max_value=64, help_text="Empty: none more."
    )
    max_memory_mib = forms.IntegerField(
        label="Most memory without a restart (MiB)",
        required=False,
        min_value=128,
        max_value=1 << 20,
        help_text="Empty: none more.",
    )
    description = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
    tags = forms.CharField(
        required=False,
        max_length=700,
        help_text="Separated by spaces or commas: lower-case letters, digits, _ . -; each a group tag_<tag> in the "
        "Ansible inventory.",
    )
    deletion_protection = forms.BooleanField(required=False)
    autostart = forms.BooleanField(required=False, help_text="Start with the hypervisor.")

    def __init__(self, *args, machine, **kwargs) -> None:
        initial = {
            k: getattr(machine, k)
            for k in ("name", "vcpus", "memory_mib", "max_vcpus", "max_memory_mib", "description")
        }
        initial |= {"tags": " ".join(machine.tags or []), "deletion_protection": machine.deletion_protection}
        initial["autostart"] = machine.autostart
        kwargs["initial"] = initial
        super().__init__(*args, **kwargs)
        self.machine = machine
        later = "while it runs; more at its next cold start."
        if machine.max_vcpus:
            self.fields["vcpus"].help_text = f"Up to {machine.max_vcpus} {later}"
        if machine.max_memory_mib:
            self.fields["memory_mib"].help_text = f"Up to {machine.max_memory_mib} MiB {later}"

    def changes(self) -> dict:
        """What differs from the machine (tags as a list; the service checks each)."""
        data = {k: self.cleaned_data[k] for k in self.changed_data}
        if "tags" in data:
            data["tags"] = [t for t in data["tags"].replace(",", " ").split() if t]
            if data["tags"] == list(self.machine.tags or []):
                del data["tags"]
        return data


class GrowDiskForm(forms.Form):
    disk_gib = forms.IntegerField(label="New size (GiB)", min_value=1, max_value=16384)


class AdoptForm(forms.Form):
    """Staff adopting a domain the portal does not manage: whose machine it becomes, and its name."""

    domain_uuid = forms.UUIDField(widget=forms.HiddenInput)
    owner: forms.ModelChoiceField = forms.ModelChoiceField(
        queryset=None, help_text="Its quota is charged."
    )  # set in __init__
    project = forms.ModelChoiceField(
        queryset=Project.objects.order_by("name"), required=False, help_text="Optional; the owner must be its admin."
    )
    name = forms.CharField(max_length=63, required=False, help_text="Empty: the domain's own name (a valid host name).")
    bmc = forms.BooleanField(label="Virtual BMC", required=False, help_text="IPMI power and boot device for it.")

    def __init__(self, *args, **kwargs) -> None:
        from django.contrib.auth import get_user_model

        super().__init__(*args, **kwargs)
        owner = cast(forms.ModelChoiceField, self.fields["owner"])
        owner.queryset = get_user_model().objects.filter(is_active=True).order_by("username")


class SnapshotForm(forms.Form):
    """Take a snapshot: its name (a host name, unique per machine), what it is for, and whether it holds the
    running machine's memory (BIOS machines; UEFI ones take disk-only snapshots)."""

    name = forms.CharField(max_length=63, validators=[hostname_validator])
    description = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
    memory = forms.BooleanField(required=False, initial=True, label="With memory (the machine comes back running)")


class CloneForm(forms.Form):
    """The clone page (machines/clone_views.py): one clone by name, or several by a pattern with {n}."""

    name = forms.CharField(max_length=63, required=False, help_text="The clone's host name (one clone).")
    count = forms.IntegerField(min_value=1, max_value=20, initial=1, help_text="How many clones (1 to 20).")
    name_pattern = forms.CharField(
        max_length=60, required=False, help_text="For several: {n} becomes 1, 2, ... (web-{n})."
    )
    linked = forms.BooleanField(
        required=False,
        initial=True,
        help_text="Linked: each disk's own layer over the same read-only image base (small, quick). "
        "Unticked: a full, flattened copy.",
    )

    def __init__(self, *args, machine: Machine | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: dict[str, MachineSnapshot] = {}
        if machine is None:
            return
        # The snapshots a clone can start from: every ready one (a disk-only one's disks as they were, a rebuild's
        # kept disk, an internal one's disks read out of the qcow2 files with the machine off).
        ready = machine.snapshots.filter(status=MachineSnapshot.Status.READY).order_by("-created")
        self.snapshots = {str(snap.pk): snap for snap in ready}
        if self.snapshots:
            choices = [("", "its disks as they are now")]
            choices += [(k, f"snapshot {s.name} ({s.created:%Y-%m-%d %H:%M})") for k, s in self.snapshots.items()]
            self.fields["snapshot"] = forms.ChoiceField(
                choices=choices,
                required=False,
                label="From",
                help_text="A snapshot's disks are copied whole (a full copy, whatever Linked says); an internal "
                "one's with the machine shut down.",
            )

    def clean_snapshot(self) -> MachineSnapshot | None:
        chosen = self.cleaned_data.get("snapshot") or ""
        return self.snapshots.get(chosen)


class SaveImageForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="The new catalogue image's name (unique).")
    os_name = forms.CharField(max_length=100, required=False, label="OS")
