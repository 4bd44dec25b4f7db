"""The URI a BMC opens: the one the worker opens. For qemu+tls the client certificate comes from the URI's
pkipath, so the BMC server must hand it to virtualbmc whole (tested for real on a TLS host by
tests/integration/test_remote_consoles.py::test_ipmitool_drives_a_network_boot_machine_on_the_remote_host)."""

import pytest

from machines import crypto
from machines.bmc_server import BmcManager


class RecordingContext:
    """multiprocessing's context, recording the spec each BMC child would get instead of forking it."""

    def __init__(self) -> None:
        self.specs: list[dict] = []

    def Process(self, *, target, args, name, daemon):  # noqa: N802 - multiprocessing's name
        self.specs.append(args[0])
        return StartedProcess()


class StartedProcess:
    pid = 4242

    def start(self) -> None:
        pass


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tls://10.0.0.7/system?pkipath=/etc/ansistack-portal/tls/kvm07/client",
        "qemu+tls://kvm07.lab/system",
        "qemu+tcp://10.0.0.9/system",
        "qemu:///system?socket=/run/other/libvirt-sock",
    ],
)
def test_a_bmc_opens_the_hypervisors_uri_with_its_credentials_paths(uri):
    manager = BmcManager()
    ctx = manager.ctx = RecordingContext()  # type: ignore[assignment]
    manager.start(7, ("127.0.0.1", 6230, "bmc-abc123", crypto.encrypt("s3cret-pass-word-20c"), "m-1a2b3c4d", uri))
    (spec,) = ctx.specs
    assert spec["uri"] == uri  # pkipath (where the worker's client certificate is) kept as it is
    assert (spec["address"], spec["port"], spec["password"]) == ("127.0.0.1", 6230, "s3cret-pass-word-20c")
