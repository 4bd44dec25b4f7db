from django import forms

from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageKind, ImageStatus
from machines.access import project_choices
from machines.models import Machine, MachineNic, Project
from machines.states import DeployType


class MachineForm(forms.ModelForm):
    """The create form: one NIC here (the API takes any number)."""

    hypervisor = forms.ModelChoiceField(queryset=Hypervisor.objects.none(), required=False,
                                        empty_label="Any hypervisor (the one with most room)")  # fmt: skip
    deploy_type = forms.ChoiceField(label="Deployment", choices=DeployType.choices, initial=DeployType.IMAGE,
                                    widget=forms.RadioSelect)  # fmt: skip
    power_on = forms.BooleanField(label="Power on after create", required=False, initial=False,
                                  help_text="Network-boot machines only; others always start.")  # fmt: skip
    image = forms.ModelChoiceField(queryset=Image.objects.none(), empty_label="(none: network boot)", required=False,
                                   help_text="A cloud image (its login user gets the SSH keys) or, for an ISO machine, "
                                             "the installer ISO.")  # fmt: skip
    extra_isos = forms.ModelMultipleChoiceField(queryset=Image.objects.none(), required=False, label="Extra ISOs",
                                                help_text="ISO machines only: more CD-ROMs, e.g. drivers (up to 3).")  # fmt: skip
    nic_type = forms.ChoiceField(label="Network", initial="user", required=False,
                                 choices=[("", "No network"), *MachineNic.Type.choices],
                                 help_text="User-mode needs no set-up on the hypervisor (the guest gets 10.0.2.15 behind NAT).")  # fmt: skip
    nic_source = forms.CharField(label="Network or bridge name", required=False,
                                 widget=forms.TextInput(attrs={"list": "hv-networks", "placeholder": "default"}))  # fmt: skip
    nic_mac = forms.CharField(label="MAC address", required=False, help_text="Leave empty to generate one.")
    nic_address = forms.CharField(label="Static address", required=False,
                                  help_text="With prefix, e.g. 192.0.2.10/24 or 2001:db8::10/64; empty for DHCP.")  # fmt: skip
    nic_gateway = forms.CharField(label="Gateway", required=False)
    nic_dns = forms.CharField(label="DNS servers", required=False, help_text="Separated by spaces or commas.")

    class Meta:
        model = Machine
        fields = ["deploy_type", "name", "hypervisor", "image", "vcpus", "memory_mib", "disk_gib", "pool", "ssh_authorized_keys",
                  "packages", "script", "user_data", "deletion_protection", "autostart", "machine_type", "cpu_mode",
                  "cpu_model", "watchdog", "rng", "disk_bus", "disk_cache", "firmware", "secure_boot"]  # fmt: skip
        labels = {"vcpus": "vCPUs"}  # Django would capitalise it to "VCPUs"
        widgets = {
            "ssh_authorized_keys": forms.Textarea(attrs={"rows": 3, "placeholder": "ssh-ed25519 AAAA… you@laptop"}),
            "packages": forms.Textarea(attrs={"rows": 2, "placeholder": "nginx htop"}),
            "script": forms.Textarea(attrs={"rows": 4, "placeholder": "#!/bin/sh\necho hello > /root/hello"}),
            "user_data": forms.Textarea(attrs={"rows": 4, "placeholder": "#cloud-config\ntimezone: Europe/Paris"}),
            "pool": forms.TextInput(attrs={"list": "hv-pools"}),
        }

    project = forms.ModelChoiceField(queryset=Project.objects.none(), required=False, empty_label="(none: just me)",
                                     help_text="Members of the project share the machine by their role.")  # fmt: skip

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["hypervisor"].queryset = Hypervisor.objects.filter(enabled=True, status=HypervisorStatus.ONLINE)
        ready = Image.objects.filter(status=ImageStatus.READY)
        self.fields["image"].queryset = ready
        self.fields["image"].label_from_instance = lambda i: f"{i.name} ({'ISO' if i.kind == ImageKind.ISO else 'disk image'})"
        self.fields["extra_isos"].queryset = ready.filter(kind=ImageKind.ISO)
        if user is not None:
            self.fields["project"].queryset = project_choices(user)

    def nic_inputs(self) -> list:
        from machines.services import NicInput

        data = self.cleaned_data
        if not data.get("nic_type"):
            return []
        address = data.get("nic_address", "").strip()
        gateway = data.get("nic_gateway", "").strip()
        v6 = ":" in address
        return [NicInput(type=data["nic_type"], source=data.get("nic_source", "").strip(), mac=data.get("nic_mac", "").strip(),
                         dhcp4=not address or v6, addresses=[address] if address else [],
                         gateway4="" if v6 else gateway, gateway6=gateway if v6 else "",
                         nameservers=data.get("nic_dns", "").replace(",", " ").split())]  # fmt: skip

    def service_kwargs(self) -> dict:
        data = {k: v for k, v in self.cleaned_data.items() if not k.startswith("nic_")}
        data["extra_isos"] = list(data.get("extra_isos") or [])
        for key in ("machine_type", "cpu_mode", "cpu_model", "disk_cache"):
            if not data.get(key):
                data.pop(key, None)
        if data.get("deploy_type") != DeployType.NETWORK:
            data.pop("power_on", None)
        return {**data, "nics": self.nic_inputs()}


class GrowDiskForm(forms.Form):
    disk_gib = forms.IntegerField(label="New size (GiB)", min_value=1, max_value=16384)
