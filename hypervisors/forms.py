from django import forms

from hypervisors.models import Hypervisor, ImageKind


class HypervisorForm(forms.ModelForm):
    class Meta:
        model = Hypervisor
        fields = [
            "name",
            "uri",
            "console_address",
            "domain_type_override",
            "cpu_allocation_ratio",
            "enabled",
            "ssh_host_keys",
        ]
        widgets = {
            "ssh_host_keys": forms.Textarea(attrs={"rows": 3, "placeholder": "ssh-ed25519 AAAA... (qemu+ssh only)"}),
            "name": forms.TextInput(attrs={"placeholder": "e.g. rack1-kvm03", "autofocus": True}),
            "uri": forms.TextInput(attrs={"placeholder": "qemu+ssh://root@kvm03.example.org/system"}),
        }
        help_texts = {"name": "Lower-case letters, digits and hyphens; shown everywhere the hypervisor is."}


class ImageForm(forms.Form):
    SOURCES = [
        ("upload", "Upload a file"),
        ("url", "Import from a URL"),
        ("volume", "A volume already on a hypervisor"),
    ]

    name = forms.CharField(max_length=100)
    kind = forms.ChoiceField(choices=ImageKind.choices)
    format = forms.ChoiceField(choices=[("qcow2", "qcow2"), ("raw", "raw")], help_text="Ignored for ISOs.")
    os_name = forms.CharField(label="OS", max_length=100, required=False)
    default_user = forms.CharField(max_length=32, required=False, initial="debian")
    arch = forms.ChoiceField(
        label="Architecture",
        initial="x86_64",
        choices=[(a, a) for a in ("x86_64", "aarch64", "ppc64le", "s390x", "riscv64", "i686")],
    )
    source = forms.ChoiceField(choices=SOURCES, widget=forms.RadioSelect, initial="upload")
    file = forms.FileField(required=False)
    source_url = forms.URLField(label="URL", required=False, assume_scheme="https")
    expected_sha256 = forms.CharField(label="Expected SHA-256", required=False, max_length=64)
    hypervisor = forms.ModelChoiceField(queryset=Hypervisor.objects.all(), required=False)
    pool = forms.CharField(required=False, initial="default")
    volume = forms.CharField(required=False)

    def clean(self):
        super().clean()
        data = self.cleaned_data  # what Form.clean() returns, typed as never None
        source = data.get("source")
        if source == "upload" and not data.get("file"):
            self.add_error("file", "Choose a file to upload.")
        if source == "url" and not data.get("source_url"):
            self.add_error("source_url", "Give the URL to import from.")
        if source == "volume" and not (data.get("hypervisor") and data.get("volume")):
            self.add_error("volume", "Choose the hypervisor and name the volume.")
        return data


class NetworkForm(forms.Form):
    name = forms.CharField(
        max_length=50, required=False, help_text="The tenant network's name is fixed (PORTAL_TENANT_NETWORK)."
    )
    mode = forms.ChoiceField(
        choices=[
            ("tenant", "Tenant network (for everyone; guests reach nothing of the host)"),
            ("isolated", "Isolated (host-only, DHCP)"),
            ("nat", "NAT (DHCP, outbound through the host)"),
            ("bridge", "Host bridge"),
            ("macvtap", "macvtap on a host interface"),
        ]
    )
    bridge = forms.CharField(
        required=False, max_length=15, help_text="Bridge to create (NAT/isolated) or to use (host bridge)."
    )
    interface = forms.CharField(required=False, max_length=15, help_text="Host interface, for macvtap.")
    cidr = forms.CharField(label="Router address", required=False, help_text="With prefix, e.g. 192.168.77.1/24.")
    dhcp_start = forms.GenericIPAddressField(label="DHCP from", required=False, protocol="IPv4")
    dhcp_end = forms.GenericIPAddressField(label="DHCP to", required=False, protocol="IPv4")
    tftp_root = forms.CharField(
        label="TFTP root", required=False, help_text="For network boot: a directory on the hypervisor."
    )
    boot_file = forms.CharField(required=False, help_text="Offered by DHCP, e.g. boot.ipxe.")
    ipv6_cidr = forms.CharField(label="IPv6 router address", required=False, help_text="Optional, e.g. fd77::1/64.")
