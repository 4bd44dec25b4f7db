import subprocess

import pycdlib
import pytest

from hypervisors.drivers.qemu_img import ImageRejected, detect_format, inspect

LIMIT = 64 << 30


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def qcow2(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "64M")
    return path


def test_a_plain_qcow2_passes(qcow2):
    facts = inspect(str(qcow2), "qcow2", max_virtual_bytes=LIMIT)
    assert facts.virtual_size_bytes == 64 << 20 and facts.format == "qcow2"


def test_the_declared_format_must_match(qcow2):
    with pytest.raises(ImageRejected, match="the file is qcow2, not raw"):
        inspect(str(qcow2), "raw", max_virtual_bytes=LIMIT)


def test_a_backing_file_is_refused(tmp_path):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(evil), "1M")
    with pytest.raises(ImageRejected, match="backing file"):
        inspect(str(evil), "qcow2", max_virtual_bytes=LIMIT)


def test_an_external_data_file_is_refused(tmp_path):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(evil), "1M")
    with pytest.raises(ImageRejected, match="external data file"):
        inspect(str(evil), "qcow2", max_virtual_bytes=LIMIT)


def test_the_virtual_size_is_capped(tmp_path):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(big), "100G")
    with pytest.raises(ImageRejected, match="over the limit of 64 GiB"):
        inspect(str(big), "qcow2", max_virtual_bytes=LIMIT)


def test_raw_and_iso(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    assert inspect(str(raw), "raw", max_virtual_bytes=LIMIT).virtual_size_bytes == 4096
    iso_path = tmp_path / "x.iso"
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="TEST")
    iso.write(str(iso_path))
    iso.close()
    assert detect_format(str(iso_path)) == "iso"
    assert inspect(str(iso_path), "iso", max_virtual_bytes=LIMIT).virtual_size_bytes == iso_path.stat().st_size
    with pytest.raises(ImageRejected, match="the file is raw, not iso"):
        inspect(str(raw), "iso", max_virtual_bytes=LIMIT)


def test_other_formats_are_named(tmp_path):
    vmdk = tmp_path / "x.vmdk"
    qemu_img("create", "-f", "vmdk", str(vmdk), "1M")
    assert detect_format(str(vmdk)) == "vmdk"
    with pytest.raises(ImageRejected, match="the file is vmdk"):
        inspect(str(vmdk), "qcow2", max_virtual_bytes=LIMIT)


def test_qemu_img_runs_under_the_limits(qcow2):
    # An address-space limit too small for qemu-img to even load: refused, so the limits reach it.
    with pytest.raises(ImageRejected, match="qemu-img cannot read it"):
        inspect(str(qcow2), "qcow2", max_virtual_bytes=LIMIT, memory_mib=4)
    assert inspect(str(qcow2), "qcow2", max_virtual_bytes=LIMIT).format == "qcow2"


def test_an_overlay_is_re_pointed_at_another_copy_of_its_base_without_touching_its_data(tmp_path, qcow2):
    """A cold move's rebase: the header names the target's copy of the image (which need not exist here: it is
    on the other host), and the guest's data stays where it was."""
    from hypervisors.drivers.qemu_img import qemu_img_info, rebase_header

    overlay = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2", str(overlay))
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(overlay)], check=True, capture_output=True)
    data = overlay.read_bytes()
    rebase_header(str(overlay), backing_path="/var/lib/elsewhere/base.qcow2", backing_format="qcow2")
    info = qemu_img_info(str(overlay), "qcow2")
    assert info["backing-filename"] == "/var/lib/elsewhere/base.qcow2" and info["backing-filename-format"] == "qcow2"
    assert overlay.stat().st_size == len(data)
    with pytest.raises(ImageRejected, match="cannot rebase the overlay"):
        rebase_header(str(tmp_path / "missing.qcow2"), backing_path="/x.qcow2", backing_format="qcow2")
