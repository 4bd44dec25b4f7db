"""A project's SSH key pair, made by the portal on first need: its public key goes on every image machine
created in the project (machines.provisioning.seed_spec_from), so the project's workflows reach them; the
private key is kept encrypted (machines/crypto.py) and handed only to a workflow run's private data directory.
Machines without a project get no portal key."""

from __future__ import annotations

import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from machines import crypto
from machines.models import Project


def key_comment(project: Project) -> str:
    """The comment the public key carries, so whoever reads a guest's authorized_keys knows why it is there."""
    return "portal-project-" + re.sub(r"[^A-Za-z0-9._-]+", "-", project.name)


def _generate(comment: str) -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return f"{public.decode('ascii')} {comment}", private.decode("ascii")


def _ensure(project: Project) -> None:
    """Make the pair if the project has none. Race-safe without a lock: the pair is written only over an
    empty public key, so of two workers making one at once exactly one pair is kept, and both read it."""
    if project.ssh_public_key:
        return
    public, private = _generate(key_comment(project))
    Project.objects.filter(pk=project.pk, ssh_public_key="").update(
        ssh_public_key=public, ssh_private_key_encrypted=crypto.encrypt(private)
    )
    project.ssh_public_key, project.ssh_private_key_encrypted = Project.objects.filter(pk=project.pk).values_list(
        "ssh_public_key", "ssh_private_key_encrypted"
    )[0]


def project_public_key(project: Project) -> str:
    """The project's public key as one OpenSSH line (`ssh-ed25519 AAAA… portal-project-<name>`), made on first
    need; nothing is decrypted."""
    _ensure(project)
    return project.ssh_public_key


def project_keypair(project: Project) -> tuple[str, str]:
    """(public OpenSSH line, private key in OpenSSH PEM), made on first need. ValueError when the private key
    cannot be decrypted (SECRET_KEY changed since it was made)."""
    _ensure(project)
    return project.ssh_public_key, crypto.decrypt(project.ssh_private_key_encrypted)
