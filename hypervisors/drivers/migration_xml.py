"""A running domain's XML as the target of a live migration must have it: every file it names (disks, the serial
log) at the target's paths, and its VNC server on the target's console address. Standard library only."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypervisors.drivers import domxml  # noqa: F401 - registers the portal's XML namespaces, kept on output
from hypervisors.drivers.base import HypervisorFatalError


def _file_elements(root: ET.Element) -> list[tuple[ET.Element, str]]:
    """(element, attribute) of every file path the domain's devices name on their host."""
    found = [(el, "file") for el in root.findall("devices/disk/source") if el.get("file")]
    for kind in ("serial", "console", "parallel", "channel"):
        found += [(el, "file") for el in root.findall(f"devices/{kind}/log") if el.get("file")]
        found += [(el, "path") for el in root.findall(f"devices/{kind}[@type='file']/source") if el.get("path")]
    return found


def copied_disks(xml: str) -> list[str]:
    """The targets (vda, ...) of the disks a live migration copies: writable file disks with a source. Read-only
    ones (a seed ISO, CD-ROM media) and shareable ones are not copied: the target must hold them already."""
    root = ET.fromstring(xml)
    copied = []
    for disk in root.findall("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is None or not source.get("file") or target is None:
            continue
        if disk.get("device") == "cdrom" or disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        copied.append(target.get("dev", ""))
    return copied


def retarget(xml: str, *, paths: dict[str, str], vnc_listen: str) -> str:
    """The domain XML with each file path replaced by paths[path] and the VNC server listening on `vnc_listen`.
    A path with no place in `paths` is refused (HypervisorFatalError): the target would open a file of its own
    under the source's name, or fail to start the domain."""
    root = ET.fromstring(xml)
    missing = []
    for el, attr in _file_elements(root):
        path = el.get(attr, "")
        if path in paths:
            el.set(attr, paths[path])
        else:
            missing.append(path)
    if missing:
        raise HypervisorFatalError(
            "no path on the target for " + ", ".join(sorted(set(missing))) + ": every file the domain names needs one"
        )
    for graphics in root.findall("devices/graphics[@type='vnc']"):
        graphics.set("listen", vnc_listen)
        for listen in graphics.findall("listen"):
            if listen.get("type") == "address":
                listen.set("address", vnc_listen)
        if graphics.get("autoport") == "yes":
            graphics.attrib.pop("port", None)  # the target picks its own free port
            graphics.attrib.pop("websocket", None)
    return ET.tostring(root, encoding="unicode")
