"""`manage.py lab_certs DIR --server-ip IP`: a small CA, a server and a client certificate for a lab
hypervisor reached over `qemu+tls://`, laid out as libvirt reads them:

    DIR/ca/cacert.pem  DIR/ca/cakey.pem                                  the CA (keep the key away)
    DIR/server/cacert.pem  DIR/server/servercert.pem  DIR/server/serverkey.pem   for the hypervisor
    DIR/client/cacert.pem  DIR/client/clientcert.pem  DIR/client/clientkey.pem   for the portal's worker

The server directory goes to the hypervisor (libvirtd.conf `ca_file`, `cert_file`, `key_file`, or the
default /etc/pki/CA/cacert.pem, /etc/pki/libvirt/servercert.pem, /etc/pki/libvirt/private/serverkey.pem);
the client directory is named in the portal's URI: `qemu+tls://IP/system?pkipath=DIR/client`.
Keys are written 0600; existing files are never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.management.base import BaseCommand, CommandError

KEY_BITS = 3072  # what certtool makes by default, as libvirt's own TLS guide does
MAX_DAYS = 3650
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_COMMON_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


@dataclass(frozen=True)
class LabCerts:
    ca_dir: Path
    server_dir: Path
    client_dir: Path


ORGANIZATION = "AnsiStack Portal lab"  # of every name the lab signs


def files_of(directory: Path) -> LabCerts:
    return LabCerts(ca_dir=directory / "ca", server_dir=directory / "server", client_dir=directory / "client")


def make_lab_certs(
    directory: Path, *, server_ip: str, server_name: str = "", client_name: str = "portal", days: int = 825
) -> LabCerts:
    """Write the CA, server and client files under `directory`. Raises ValueError on bad input or when
    a file would be overwritten; nothing is written then."""
    try:
        ip = ipaddress.ip_address(server_ip)
    except ValueError:
        raise ValueError(f"--server-ip {server_ip!r} is not an IP address") from None
    if server_name and not _DNS_NAME.match(server_name):
        raise ValueError(f"--server-name {server_name!r} is not a host name (letters, digits, hyphens and dots)")
    if not _COMMON_NAME.match(client_name):
        raise ValueError(f"--client-name {client_name!r} must be 1 to 64 letters, digits, spaces, or ._@-")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days must be between 1 and {MAX_DAYS}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    out = files_of(directory)
    targets = [
        out.ca_dir / "cacert.pem",
        out.ca_dir / "cakey.pem",
        out.server_dir / "cacert.pem",
        out.server_dir / "servercert.pem",
        out.server_dir / "serverkey.pem",
        out.client_dir / "cacert.pem",
        out.client_dir / "clientcert.pem",
        out.client_dir / "clientkey.pem",
    ]
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]
    if existing:
        raise ValueError(f"refusing to overwrite {', '.join(existing)}; choose an empty directory")

    now = datetime.datetime.now(datetime.UTC)
    not_before, ca_until, leaf_until = (
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=MAX_DAYS),
        now + datetime.timedelta(days=days),
    )
    ca_key = _key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "AnsiStack Portal lab CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(ca_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, purpose: x509.ObjectIdentifier, san: list[x509.GeneralName] | None):
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(min(leaf_until, ca_until))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    san: list[x509.GeneralName] = [x509.IPAddress(ip)]
    if server_name:
        san.insert(0, x509.DNSName(server_name))
    server_key, server_cert = leaf(server_name or str(ip), ExtendedKeyUsageOID.SERVER_AUTH, san)
    client_key, client_cert = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    for d in (out.ca_dir, out.server_dir, out.client_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    ca_pem = _pem(ca_cert)
    _write(out.ca_dir / "cacert.pem", ca_pem, 0o644)
    _write(out.ca_dir / "cakey.pem", _key_pem(ca_key), 0o600)
    _write(out.server_dir / "cacert.pem", ca_pem, 0o644)
    _write(out.server_dir / "servercert.pem", _pem(server_cert), 0o644)
    _write(out.server_dir / "serverkey.pem", _key_pem(server_key), 0o600)
    _write(out.client_dir / "cacert.pem", ca_pem, 0o644)
    _write(out.client_dir / "clientcert.pem", _pem(client_cert), 0o644)
    _write(out.client_dir / "clientkey.pem", _key_pem(client_key), 0o600)
    return out


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    # libvirt checks these bits: keyCertSign on the CA; digitalSignature and keyEncipherment on the others.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Created with its final mode (a key is never readable by others, not even for a moment); never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)


class Command(BaseCommand):
    help = (
        "Make a small CA, a server and a client certificate for a lab hypervisor reached over qemu+tls://, "
        "laid out as libvirt expects (DIR/ca, DIR/server, DIR/client)."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", metavar="DIR", help="an empty or new directory")
        parser.add_argument("--server-ip", required=True, help="the address the portal dials (in the URI)")
        parser.add_argument("--server-name", default="", help="the hypervisor's DNS name, if the URI uses one")
        parser.add_argument("--client-name", default="portal", help="the client certificate's common name")
        parser.add_argument("--days", type=int, default=825, help="validity of the server and client certificates")

    def handle(self, *args, directory: str, server_ip: str, server_name: str, client_name: str, days: int, **options):
        try:
            out = make_lab_certs(
                Path(directory), server_ip=server_ip, server_name=server_name, client_name=client_name, days=days
            )
        except ValueError as e:
            raise CommandError(str(e)) from None
        except OSError as e:
            raise CommandError(f"cannot write the certificates under {directory}: {e.strerror or e}") from None
        host = server_name or (f"[{server_ip}]" if ":" in server_ip else server_ip)
        self.stdout.write(
            f"CA:     {out.ca_dir} (keep cakey.pem off the hypervisors)\n"
            f"server: {out.server_dir} -> libvirtd.conf ca_file, cert_file, key_file; listen_tls = 1; libvirtd --listen\n"
            f'        and, so that only this client gets in: tls_allowed_dn_list = ["O={ORGANIZATION},CN={client_name}"]\n'
            f"client: {out.client_dir}\n"
            f"URI:    qemu+tls://{host}/system?pkipath={out.client_dir.resolve()}\n"
        )
