"""The target's XML of a live migration (hypervisors/drivers/migration_xml.py): every file at its new path, VNC on
the target's console address, nothing left pointing at the source."""

import pytest

from hypervisors.drivers.base import DiskSpec, DomainSpec, HypervisorFatalError
from hypervisors.drivers.domxml import build_domain_xml
from hypervisors.drivers.migration_xml import copied_disks, retarget

SPEC = DomainSpec(
    uuid="8a9d3c39-1e8e-4a7e-9d55-1d5b2a1c0f00",
    name="m1",
    domain_type="qemu",
    vcpus=1,
    memory_mib=128,
    disks=(
        DiskSpec(path="/src/m1-disk.qcow2", boot_order=1),
        DiskSpec(path="/src/m1-data.raw", format="raw"),
        DiskSpec(path="/src/m1-seed.iso", device="cdrom", format="raw", bus="ide"),
        DiskSpec(path="", device="cdrom", format="raw", bus="ide"),
    ),
    serial_log="/src/m1-serial.log",
    vnc_listen="127.0.0.1",
    metadata={"machine": "7"},
)
PATHS = {
    "/src/m1-disk.qcow2": "/dst/m1-disk.qcow2",
    "/src/m1-data.raw": "/dst/m1-data.raw",
    "/src/m1-seed.iso": "/dst/m1-seed.iso",
    "/src/m1-serial.log": "/dst/m1-serial.log",
}


def test_every_file_moves_to_its_target_path_and_vnc_to_the_console_address():
    xml = retarget(build_domain_xml(SPEC), paths=PATHS, vnc_listen="10.0.0.2")
    assert "/src/" not in xml and all(p in xml for p in PATHS.values())
    assert 'listen="10.0.0.2"' in xml and "127.0.0.1" not in xml
    assert "<portal:machine" in xml and 'machine="7"' in xml  # the portal's metadata keeps its namespace


def test_a_file_without_a_target_path_is_refused_by_name():
    with pytest.raises(HypervisorFatalError, match="no path on the target for /src/m1-serial.log"):
        retarget(build_domain_xml(SPEC), paths={k: v for k, v in PATHS.items() if "serial" not in k}, vnc_listen="x")


def test_only_writable_disks_are_copied():
    assert copied_disks(build_domain_xml(SPEC)) == ["vda", "vdb"]
