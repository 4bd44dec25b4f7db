from hypervisors.drivers.capabilities import parse_capabilities, usable_domain_type

# Shaped like `virsh capabilities` on a PVM cloud host: libvirt offers kvm, but
# the CPU has no vmx/svm, so guests could not run under it.
PVM_HOST = """<capabilities><host><cpu><arch>x86_64</arch><model>Broadwell</model>
<feature name='hypervisor'/><feature name='avx512f'/></cpu></host>
<guest><os_type>hvm</os_type><arch name='i686'><emulator>/usr/bin/qemu-system-i386</emulator>
<domain type='qemu'/><domain type='kvm'/></arch></guest>
<guest><os_type>hvm</os_type><arch name='x86_64'><emulator>/usr/bin/qemu-system-x86_64</emulator>
<domain type='qemu'/><domain type='kvm'/></arch></guest>
<guest><os_type>hvm</os_type><arch name='aarch64'><emulator>/usr/bin/qemu-system-aarch64</emulator>
<domain type='qemu'/></arch></guest></capabilities>"""


def test_pvm_host_falls_back_to_qemu():
    caps = parse_capabilities(PVM_HOST)
    assert caps["arch"] == "x86_64"
    assert caps["cpu_model"] == "Broadwell"
    assert caps["domain_types"] == ["qemu", "kvm"]
    assert caps["guest_arches"] == ["aarch64", "i686", "x86_64"]
    assert caps["domain_type"] == "qemu"


def test_host_with_vmx_uses_kvm():
    xml = PVM_HOST.replace("<feature name='hypervisor'/>", "<feature name='vmx'/>")
    assert parse_capabilities(xml)["domain_type"] == "kvm"


def test_amd_svm_counts_too():
    assert usable_domain_type("x86_64", ["qemu", "kvm"], {"svm"}) == "kvm"


def test_non_x86_kvm_needs_no_cpu_flag():
    assert usable_domain_type("aarch64", ["qemu", "kvm"], set()) == "kvm"


def test_no_kvm_offered_means_qemu():
    assert usable_domain_type("x86_64", ["qemu"], {"vmx"}) == "qemu"


def test_other_drivers_keep_their_own_type():
    assert usable_domain_type("i686", ["test"], set()) == "test"
    assert usable_domain_type("x86_64", [], set()) == ""
