"""What a hypervisor offers, read from libvirt's capabilities XML and domain capabilities XML: plain
parsing with ElementTree, next to the XML the portal builds (domxml.py), no libvirt import."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def parse_capabilities(xml: str) -> dict:
    """Host arch, CPU model, the domain types offered per guest arch, and the usable one."""
    root = ET.fromstring(xml)
    host_arch = root.findtext("host/cpu/arch", default="")
    features = {f.get("name") for f in root.findall("host/cpu/feature")}
    types_by_arch: dict[str, list[str]] = {}
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is None:
            continue
        types = types_by_arch.setdefault(arch.get("name", ""), [])
        for dom in arch.findall("domain"):
            if dom.get("type") not in types:
                types.append(dom.get("type", ""))
    host_types = types_by_arch.get(host_arch, [])
    machines: list[str] = []
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is not None and arch.get("name") == host_arch:
            for m in arch.findall("machine"):
                for name in (m.text, m.get("canonical")):
                    if name and name not in machines:
                        machines.append(name)
    return {
        "machine_types": sorted(machines),
        "arch": host_arch,
        "cpu_model": root.findtext("host/cpu/model", default=""),
        "domain_types": host_types,
        "guest_arches": sorted(a for a in types_by_arch if a),
        "domain_type": usable_domain_type(host_arch, host_types, features),
    }


def usable_domain_type(arch: str, types: list[str], cpu_features: set) -> str:
    """`kvm` only where it can run guests, else `qemu` (software emulation).

    /dev/kvm alone is not proof: a paravirtual (PVM) host offers it to libvirt but
    its guests die with "KVM internal error". On x86 real KVM needs the vmx or svm
    CPU feature, which the host CPU description lists.
    """
    x86 = arch in ("x86_64", "i686")
    if "kvm" in types and (not x86 or cpu_features & {"vmx", "svm"}):
        return "kvm"
    if "qemu" in types:
        return "qemu"
    return types[0] if types else ""


def parse_domain_capabilities(xml: str) -> dict:
    """The CPU modes a domain type supports and its usable named CPU models."""
    root = ET.fromstring(xml)
    modes = [m.get("name", "") for m in root.findall("cpu/mode") if m.get("supported") == "yes"]
    models = sorted(
        {m.text for m in root.findall("cpu/mode[@name='custom']/model") if m.get("usable") == "yes" and m.text}
    )
    firmwares = [v.text for v in root.findall("os[@supported='yes']/enum[@name='firmware']/value") if v.text]
    return {"cpu_modes": modes, "cpu_models": models, "firmwares": ["bios", *[f for f in firmwares if f != "bios"]]}
