from django import forms

from hypervisors.models import Hypervisor


class HypervisorForm(forms.ModelForm):
    class Meta:
        model = Hypervisor
        fields = ["name", "uri", "console_address", "domain_type_override", "enabled"]
        widgets = {
            "name": forms.TextInput(attrs={"placeholder": "e.g. rack1-kvm03", "autofocus": True}),
            "uri": forms.TextInput(attrs={"placeholder": "qemu+ssh://root@kvm03.example.org/system"}),
        }
        help_texts = {"name": "Lower-case letters, digits and hyphens; shown everywhere the hypervisor is."}
