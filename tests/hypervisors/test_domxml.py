import xml.etree.ElementTree as ET

from hypervisors.drivers.base import PORTAL_METADATA_NS, DiskSpec, DomainSpec, NicSpec
from hypervisors.drivers.domxml import build_domain_xml, parse_vnc, portal_domain, volume_xml

NASTY = "x'\"<b>&amp; ]]> \u00e9"


def spec(**kw) -> DomainSpec:
    base = dict(
        uuid="0b8c1c86-6f34-4d3b-9d59-0c3c1b5d2f10",
        name="web1-0b8c1c86",
        domain_type="qemu",
        vcpus=2,
        memory_mib=512,
        title="web1",
        description=NASTY,
        vnc_listen="127.0.0.1",
        serial_log="/pool/m-serial.log",
        disks=(
            DiskSpec(path="/pool/disk.qcow2", boot_order=1),
            DiskSpec(path="/pool/seed.iso", device="cdrom", format="raw", bus="ide"),
        ),
        nics=(
            NicSpec(type="network", source="default", mac="52:54:00:aa:bb:01"),
            NicSpec(type="bridge", source="br0", mac="52:54:00:aa:bb:02"),
            NicSpec(type="user", source="", mac="52:54:00:aa:bb:03"),
        ),
        metadata={"id": 7, "owner": 3},
    )
    base.update(kw)
    return DomainSpec(**base)


def parse(s: DomainSpec) -> ET.Element:
    return ET.fromstring(build_domain_xml(s))


def test_identity_and_size():
    root = parse(spec())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "web1-0b8c1c86"
    assert root.findtext("uuid") == "0b8c1c86-6f34-4d3b-9d59-0c3c1b5d2f10"
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    assert root.find("os/type").get("machine") == "pc" and root.find("os/type").get("arch") == "x86_64"


def test_the_balloon_reports_the_guests_memory_every_10_seconds():
    balloon = parse(spec()).find("devices/memballoon")
    assert balloon.get("model") == "virtio" and balloon.find("stats").get("period") == "10"


def test_user_text_lands_escaped_and_comes_back_intact():
    root = parse(spec(description=NASTY, title=NASTY))
    assert root.findtext("description") == NASTY and root.findtext("title") == NASTY
    assert len(root.findall("devices/disk")) == 2  # nothing injected


def test_disks_get_targets_per_bus_and_boot_order():
    disks = parse(spec()).findall("devices/disk")
    assert [(d.get("device"), d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [
        ("disk", "vda", "virtio"),
        ("cdrom", "hda", "ide"),
    ]
    assert disks[0].find("boot").get("order") == "1"
    assert disks[0].find("driver").get("type") == "qcow2" and disks[1].find("driver").get("type") == "raw"
    assert disks[1].find("readonly") is not None


def test_nics_by_type():
    nics = parse(spec()).findall("devices/interface")
    assert [n.get("type") for n in nics] == ["network", "bridge", "user"]
    assert nics[0].find("source").get("network") == "default"
    assert nics[1].find("source").get("bridge") == "br0"
    assert nics[2].find("source") is None
    assert [n.find("mac").get("address") for n in nics] == [
        "52:54:00:aa:bb:01",
        "52:54:00:aa:bb:02",
        "52:54:00:aa:bb:03",
    ]
    assert all(n.find("model").get("type") == "virtio" for n in nics)


def test_console_serial_log_and_vnc_on_the_console_address():
    root = parse(spec(vnc_listen="10.0.0.5"))
    assert root.find("devices/serial/log").get("file") == "/pool/m-serial.log"
    graphics = root.find("devices/graphics")
    assert graphics.get("type") == "vnc" and graphics.get("listen") == "10.0.0.5"
    assert graphics.find("listen").get("address") == "10.0.0.5"
    assert root.find("devices/console/target").get("type") == "serial"


def test_portal_ids_in_metadata():
    el = parse(spec()).find(f"metadata/{{{PORTAL_METADATA_NS}}}machine")
    assert el.get("id") == "7" and el.get("owner") == "3"


def test_a_portal_domain_is_known_by_its_metadata_and_its_name():
    assert portal_domain(build_domain_xml(spec())) == ("web1-0b8c1c86", {"id": "7", "owner": "3"})
    # Someone else's domain that copies the naming, or a portal-looking metadata with another name, is not one.
    bare = parse(spec())
    bare.find("metadata").clear()
    assert portal_domain(ET.tostring(bare, encoding="unicode")) is None
    assert portal_domain(build_domain_xml(spec(name="web1-deadbeef"))) is None
    assert portal_domain(build_domain_xml(spec(name="0b8c1c86"))) is None
    assert portal_domain("<domain type='qemu'><name>x-0b8c1c86</name></domain>") is None


def test_parse_vnc_of_a_running_domain():
    xml = "<domain><devices><graphics type='vnc' port='5901' listen='127.0.0.1'/></devices></domain>"
    assert parse_vnc(xml) == ("127.0.0.1", 5901)
    assert parse_vnc("<domain><devices><graphics type='vnc' port='-1'/></devices></domain>") is None


def test_overlay_volume_xml():
    root = ET.fromstring(
        volume_xml(
            name="d.qcow2", capacity_bytes=10 << 30, fmt="qcow2", backing_path="/p/base.qcow2", backing_format="qcow2"
        )
    )
    assert root.findtext("capacity") == str(10 << 30)
    assert root.find("target/format").get("type") == "qcow2"
    assert root.findtext("backingStore/path") == "/p/base.qcow2"
    assert root.find("backingStore/format").get("type") == "qcow2"


def test_hardware_options_land_in_the_xml():
    root = parse(
        spec(
            cpu_mode="custom",
            cpu_model="Haswell-noTSX",
            topology=(1, 2, 1),
            watchdog=True,
            rng=True,
            smbios={"manufacturer": "ACME <&>", "serial": "SN-1"},
            machine="q35",
            qemu_args=("-device", "pvpanic"),
            disks=(DiskSpec(path="/p/d.qcow2", bus="sata", cache="none", boot_order=1),),
        )
    )
    cpu = root.find("cpu")
    assert cpu.get("mode") == "custom" and cpu.findtext("model") == "Haswell-noTSX"
    assert cpu.find("topology").attrib == {"sockets": "1", "dies": "1", "cores": "2", "threads": "1"}
    assert root.find("os/type").get("machine") == "q35" and root.find("os/smbios").get("mode") == "sysinfo"
    entries = {e.get("name"): e.text for e in root.findall("sysinfo/system/entry")}
    assert entries == {"manufacturer": "ACME <&>", "serial": "SN-1"}
    assert root.find("devices/watchdog").attrib == {"model": "i6300esb", "action": "reset"}
    assert root.findtext("devices/rng/backend") == "/dev/urandom"
    disk = root.find("devices/disk")
    assert disk.find("target").attrib == {"dev": "sda", "bus": "sata"} and disk.find("driver").get("cache") == "none"
    args = root.findall(
        "{http://libvirt.org/schemas/domain/qemu/1.0}commandline/{http://libvirt.org/schemas/domain/qemu/1.0}arg"
    )
    assert [a.get("value") for a in args] == ["-device", "pvpanic"]


def test_defaults_add_no_cpu_or_sysinfo():
    root = parse(spec())
    assert root.find("cpu") is None and root.find("sysinfo") is None and root.find("devices/watchdog") is None


def test_uefi_with_secure_boot():
    root = parse(spec(firmware="efi", secure_boot=True, machine="q35"))
    assert root.find("os").get("firmware") == "efi"
    features = {f.get("name"): f.get("enabled") for f in root.findall("os/firmware/feature")}
    assert features == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert root.find("features/smm").get("state") == "on"


def test_an_emulated_arm64_guest():
    root = parse(
        spec(arch="aarch64", machine="virt", cpu_mode="custom", cpu_model="cortex-a57", firmware="efi", video="virtio")
    )
    assert root.find("os/type").attrib == {"arch": "aarch64", "machine": "virt"}
    assert root.find("features/apic") is None  # an x86 feature
    assert root.find("devices/video/model").get("type") == "virtio"
    assert root.find("os/firmware/feature").attrib == {"enabled": "no", "name": "secure-boot"}


def test_macvtap_and_vlan_nics():
    root = parse(
        spec(
            nics=(
                NicSpec(type="direct", source="eno1", mac="52:54:00:aa:bb:04", mode="passthrough", vlan=42),
                NicSpec(type="bridge", source="ovsbr0", mac="52:54:00:aa:bb:05", model="e1000e"),
            )
        )
    )
    direct, bridged = root.findall("devices/interface")
    assert direct.get("type") == "direct" and direct.find("source").attrib == {"dev": "eno1", "mode": "passthrough"}
    assert direct.find("vlan/tag").get("id") == "42"
    assert bridged.find("model").get("type") == "e1000e" and bridged.find("vlan") is None


def test_a_guarded_nic_references_its_traffic_filter():
    root = parse(
        spec(
            nics=(
                NicSpec(
                    type="network",
                    source="portal-tenants",
                    mac="52:54:00:aa:bb:06",
                    guard="portal-guard-portal-tenants",
                ),
                NicSpec(type="network", source="default", mac="52:54:00:aa:bb:07"),
            )
        )
    )
    guarded, plain = root.findall("devices/interface")
    assert guarded.find("filterref").attrib == {"filter": "portal-guard-portal-tenants"}
    assert plain.find("filterref") is None


PCI_XML = """<device><name>pci_0000_03_00_0</name><driver><name>igb</name></driver><capability type='pci'>
<domain>0</domain><bus>3</bus><slot>0</slot><function>0</function><product id='0x1533'>I210</product>
<vendor id='0x8086'>Intel Corporation</vendor></capability></device>"""
USB_XML = """<device><name>usb_1_2</name><capability type='usb_device'><bus>1</bus><device>2</device>
<product id='0x5678'/><vendor id='0x1234'/></capability></device>"""


def test_node_devices_parse_and_pass_through():
    from hypervisors.drivers.domxml import parse_node_device

    pci, usb = parse_node_device(PCI_XML), parse_node_device(USB_XML)
    assert pci == {
        "name": "pci_0000_03_00_0",
        "type": "pci",
        "vendor": "0x8086",
        "product": "0x1533",
        "description": "Intel Corporation I210",
        "driver": "igb",
        "domain": 0,
        "bus": 3,
        "slot": 0,
        "function": 0,
    }
    assert parse_node_device("<device><name>computer</name><capability type='system'/></device>") is None
    root = parse(spec(hostdevs=(pci, usb)))
    first, second = root.findall("devices/hostdev")
    assert first.get("type") == "pci" and first.get("managed") == "yes"
    assert first.find("source/address").attrib == {"domain": "0x0000", "bus": "0x03", "slot": "0x00", "function": "0x0"}
    assert second.find("source/vendor").get("id") == "0x1234" and second.find("source/product").get("id") == "0x5678"


def test_guest_agent_channel_and_its_connected_state():
    from hypervisors.drivers.domxml import GUEST_AGENT_CHANNEL, agent_connected

    xml = build_domain_xml(spec())
    channel = parse(spec()).find("devices/channel")
    assert channel.get("type") == "unix" and channel.find("target").attrib == {
        "type": "virtio",
        "name": GUEST_AGENT_CHANNEL,
    }
    assert not agent_connected(xml)  # defined: no state yet
    live = xml.replace(f'name="{GUEST_AGENT_CHANNEL}"', f'name="{GUEST_AGENT_CHANNEL}" state="disconnected"')
    assert not agent_connected(live)
    assert agent_connected(live.replace("disconnected", "connected"))


def test_addresses_merge_from_leases_agent_and_arp():
    from hypervisors.drivers.domxml import merge_addresses

    V4, V6 = 0, 1  # libvirt's VIR_IP_ADDR_TYPE_*
    lease = {"vnet0": {"hwaddr": "52:54:00:AA:00:01", "addrs": [{"type": V4, "addr": "192.168.122.50", "prefix": 24}]}}
    agent = {
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": V4, "addr": "127.0.0.1", "prefix": 8}]},
        "eth0": {
            "hwaddr": "52:54:00:aa:00:01",
            "addrs": [
                {"type": V4, "addr": "192.168.122.50", "prefix": 24},
                {"type": V6, "addr": "fe80::5054:ff:feaa:1", "prefix": 64},
                {"type": V6, "addr": "2001:db8::50", "prefix": 64},
            ],
        },
        "eth1": {"hwaddr": "52:54:00:aa:00:02", "addrs": None},
    }
    arp = {
        "vnet1": {"hwaddr": "52:54:00:aa:00:03", "addrs": [{"type": V4, "addr": "10.0.0.7", "prefix": 0}]},
        "vnet0": {"hwaddr": "52:54:00:aa:00:01", "addrs": [{"type": V4, "addr": "192.168.122.50", "prefix": 0}]},
    }
    assert merge_addresses(lease, agent, arp) == {
        "52:54:00:aa:00:01": ["192.168.122.50/24", "2001:db8::50/64"],  # loopback, link-local and repeats left out
        "52:54:00:aa:00:03": ["10.0.0.7"],  # ARP knows no prefix
    }
    assert merge_addresses() == {} and merge_addresses({"x": {"hwaddr": "", "addrs": []}}) == {}


def test_maxima_give_a_current_vcpu_count_and_memory_above_the_balloon():
    from hypervisors.drivers.domxml import domain_size_of

    root = ET.fromstring(build_domain_xml(spec(vcpus=1, max_vcpus=4, memory_mib=256, max_memory_mib=1024)))
    assert (root.findtext("vcpu"), root.find("vcpu").get("current")) == ("4", "1")
    assert (root.findtext("memory"), root.findtext("currentMemory")) == ("1024", "256")
    assert domain_size_of(build_domain_xml(spec(vcpus=2, memory_mib=512))) == (2, 2, 512, 512)
    plain = ET.fromstring(build_domain_xml(spec(vcpus=2, memory_mib=512)))
    assert plain.find("vcpu").get("current") is None and plain.findtext("memory") == "512"
