import re

import pytest
from django.core.exceptions import ValidationError

from hypervisors.validators import validate_libvirt_uri, validate_listen_address

GOOD = [
    "qemu:///system",
    "qemu:///session",
    "qemu:///system?socket=/run/private/libvirt-sock",
    "qemu+ssh://root@kvm03.example.org/system",
    "qemu+ssh://root@kvm03.example.org:2222/system?keyfile=/root/.ssh/id_ed25519",
    "qemu+tls://10.0.0.5/system",
    "qemu+tcp://[2001:db8::5]:16509/system",
]


@pytest.mark.parametrize("uri", GOOD)
def test_it_accepts(uri):
    validate_libvirt_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "without spaces"),
        ("qemu:///sys tem", "without spaces"),
        ("kvm03.example.org", "not a libvirt URI"),
        ("xen:///system", "Scheme 'xen' is not supported"),
        ("lxc:///", "Scheme 'lxc' is not supported"),
        ("qemu+ssh:///system", "needs a host"),
        ("qemu+ssh://bad_host!/system", "not a valid host"),
        ("qemu+tcp://host:99999/system", "port"),
        ("qemu+tls://host/", "ends in /system"),
        ("qemu://host/system", "A plain qemu URI is local"),
    ],
)
def test_it_refuses_with_a_clear_message(uri, message):
    with pytest.raises(ValidationError, match=message):
        validate_libvirt_uri(uri)


def test_test_uris_only_where_allowed(settings):
    settings.PORTAL_ALLOW_TEST_URIS = True
    validate_libvirt_uri("test:///default")
    settings.PORTAL_ALLOW_TEST_URIS = False
    with pytest.raises(ValidationError, match="Scheme 'test' is not supported"):
        validate_libvirt_uri("test:///default")


@pytest.mark.parametrize("value", ["127.0.0.1", "10.1.2.3", "::1"])
def test_listen_address_accepts_ips(value):
    validate_listen_address(value)


@pytest.mark.parametrize("value", ["localhost", "10.1.2", "", "0.0.0.0/0"])
def test_listen_address_refuses_the_rest(value):
    with pytest.raises(ValidationError):
        validate_listen_address(value)


@pytest.mark.parametrize(
    ("uri", "host"),
    [
        ("qemu:///system", ""),
        ("qemu+ssh://localhost/system", ""),
        ("qemu+tcp://127.0.0.1/system", ""),
        ("qemu+tls://[::1]/system", ""),
        ("qemu+tcp://[::ffff:127.0.0.1]/system", ""),
        ("qemu:///system?socket=/run/other/libvirt-sock", ""),
        ("qemu+ssh://root@hv1.lab/system", "hv1.lab"),
        ("qemu+tls://10.0.0.5/system", "10.0.0.5"),
    ],
)
def test_one_answer_to_whether_a_uri_is_this_machine(uri, host):
    from hypervisors.drivers.base import remote_host
    from hypervisors.drivers.libvirt_driver import local_addresses

    assert remote_host(uri) == host
    if host or "socket=" in uri:  # another machine's addresses, or maybe another namespace's: not read here
        assert local_addresses(uri) == {}
    else:
        assert "lo" in local_addresses(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tls://10.0.0.7/system?pkipath=/etc/ansistack-portal/tls/kvm07/client",
        "qemu+ssh://root@kvm03/system?keyfile=/var/lib/portal/.ssh/id_ed25519&known_hosts=/var/lib/portal/known_hosts",
        "qemu+ssh://root@kvm03/system?sshauth=privkey&mode=direct",
        "qemu+tcp://10.0.0.8/system?socket=/run/libvirt/libvirt-sock",
    ],
)
def test_the_uri_parameters_for_credentials_and_sockets_pass(uri):
    validate_libvirt_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "qemu+tls://10.0.0.7/system?no_verify=1",
            "'no_verify' is not allowed; a qemu+tls URI may carry mode, pkipath",
        ),
        ("qemu+ssh://root@h/system?known_hosts_verify=ignore", "'known_hosts_verify' is not allowed"),
        ("qemu+ssh://root@h/system?command=/tmp/evil", "'command' is not allowed"),
        ("qemu+ssh://root@h/system?netcat=/tmp/evil", "'netcat' is not allowed"),
        ("qemu+ssh://root@h/system?proxy=native", "'proxy' is not allowed"),
        ("qemu+ssh://root@h/system?pkipath=/etc/pki", "'pkipath' is not allowed; a qemu+ssh URI"),
        ("qemu+tcp://h/system?keyfile=/root/.ssh/id_rsa", "'keyfile' is not allowed"),
        ("qemu:///system?mode=direct", "'mode' is not allowed"),
        ("qemu+tls://h/system?pkipath=/a&pkipath=/b", "given twice"),
        ("qemu+tls://h/system?pkipath=relative/dir", "absolute path"),
        ("qemu+tls://h/system?pkipath=/etc/../root", "absolute path"),
        ("qemu+tls://h/system?pkipath=/etc/pki;rm", "absolute path"),
        ("qemu+ssh://root@h/system?sshauth=none", "sshauth is one of"),
        ("qemu+tls://h/system?pkipath", "name=value pairs"),
        ("qemu+tls://h/system#frag", "no #fragment"),
    ],
)
def test_uri_parameters_that_weaken_checks_or_run_programs_are_refused(uri, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        validate_libvirt_uri(uri)
