"""`manage.py lab_certs`: a CA, server and client certificates that libvirt's TLS accepts (the real
handshake is in tests/integration/test_remote_tls.py); here the chain, names, usages, modes and refusals."""

import ipaddress
import stat
from io import StringIO

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from django.core.management import call_command
from django.core.management.base import CommandError

from hypervisors.management.commands.lab_certs import make_lab_certs


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs") / "lab"
    out = StringIO()
    call_command(
        "lab_certs",
        str(directory),
        "--server-ip",
        "10.231.7.2",
        "--server-name",
        "kvm07.lab.example",
        "--client-name",
        "portal-worker",
        stdout=out,
    )
    return directory, out.getvalue()


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_are_laid_out_as_libvirt_reads_them(lab):
    directory, output = lab
    assert sorted(p.name for p in (directory / "server").iterdir()) == ["cacert.pem", "servercert.pem", "serverkey.pem"]
    assert sorted(p.name for p in (directory / "client").iterdir()) == ["cacert.pem", "clientcert.pem", "clientkey.pem"]
    assert f"qemu+tls://kvm07.lab.example/system?pkipath={directory.resolve() / 'client'}" in output
    ca = (directory / "ca" / "cacert.pem").read_bytes()
    assert (
        (directory / "server" / "cacert.pem").read_bytes() == ca == (directory / "client" / "cacert.pem").read_bytes()
    )


def test_keys_are_private_and_certificates_public(lab):
    directory, _ = lab
    for key in ("ca/cakey.pem", "server/serverkey.pem", "client/clientkey.pem"):
        assert stat.S_IMODE((directory / key).stat().st_mode) == 0o600, key
    for cert in ("ca/cacert.pem", "server/servercert.pem", "client/clientcert.pem"):
        assert stat.S_IMODE((directory / cert).stat().st_mode) == 0o644, cert


def test_both_certificates_chain_to_the_ca(lab):
    directory, _ = lab
    ca = load(directory / "ca" / "cacert.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for leaf in ("server/servercert.pem", "client/clientcert.pem"):
        cert = load(directory / leaf)
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)  # signature, issuer name and validity against the CA
        ca.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_encipherment  # what libvirt checks on a peer's certificate
    other = make_lab_certs(directory.parent / "other", server_ip="10.231.7.2")
    with pytest.raises(InvalidSignature):  # another lab's CA (same name, other key) did not sign these
        load(directory / "server" / "servercert.pem").verify_directly_issued_by(load(other.ca_dir / "cacert.pem"))


def test_the_server_names_its_ip_and_name_and_the_client_its_name(lab):
    directory, _ = lab
    server = load(directory / "server" / "servercert.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.231.7.2")]
    assert san.get_values_for_type(x509.DNSName) == ["kvm07.lab.example"]
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    client = load(directory / "client" / "clientcert.pem")
    assert client.subject.rfc4514_string() == "CN=portal-worker,O=AnsiStack Portal lab"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_an_ipv6_server_without_a_name(tmp_path):
    out = StringIO()
    call_command("lab_certs", str(tmp_path / "v6"), "--server-ip", "fd00::2", stdout=out)
    san = load(tmp_path / "v6" / "server" / "servercert.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("fd00::2")]
    assert "qemu+tls://[fd00::2]/system?pkipath=" in out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server-ip", "10.231.7"], "is not an IP address"),
        (["--server-ip", "kvm07.lab.example"], "is not an IP address"),
        (["--server-ip", "10.0.0.2", "--server-name", "bad_name!"], "is not a host name"),
        (["--server-ip", "10.0.0.2", "--client-name", ""], "--client-name"),
        (["--server-ip", "10.0.0.2", "--client-name", "a/b=c"], "--client-name"),
        (["--server-ip", "10.0.0.2", "--days", "0"], "--days must be between"),
    ],
)
def test_bad_input_is_refused_with_a_message_and_writes_nothing(tmp_path, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("lab_certs", str(tmp_path / "lab"), *args)
    assert not (tmp_path / "lab").exists()


def test_the_server_ip_is_required(tmp_path):
    with pytest.raises(CommandError, match="--server-ip"):
        call_command("lab_certs", str(tmp_path / "lab"))


def test_it_never_overwrites(tmp_path):
    call_command("lab_certs", str(tmp_path / "lab"), "--server-ip", "10.0.0.2", stdout=StringIO())
    key = (tmp_path / "lab" / "client" / "clientkey.pem").read_bytes()
    with pytest.raises(CommandError, match="refusing to overwrite .*clientkey.pem"):
        call_command("lab_certs", str(tmp_path / "lab"), "--server-ip", "10.0.0.2")
    assert (tmp_path / "lab" / "client" / "clientkey.pem").read_bytes() == key


def test_a_file_in_the_way_or_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CommandError, match="is not a directory"):
        call_command("lab_certs", str(tmp_path / "file"), "--server-ip", "10.0.0.2")
    with pytest.raises(CommandError, match="cannot write the certificates"):
        call_command("lab_certs", str(tmp_path / "file" / "below"), "--server-ip", "10.0.0.2")
