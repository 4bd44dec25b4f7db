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
