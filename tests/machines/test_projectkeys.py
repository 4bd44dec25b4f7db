"""The project's SSH key pair: made once on first need, kept encrypted, on every image machine of the project."""

import threading

import pytest
from cryptography.hazmat.primitives import serialization
from django.db import connection
from django.urls import reverse

from machines import cloudinit, crypto, projectkeys, provisioning
from machines.models import Project
from portal import sshkeys
from tests.factories import ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_the_pair_is_made_on_first_need_and_kept():
    project = ProjectFactory(name="blue team")
    assert project.ssh_public_key == ""
    public, private = projectkeys.project_keypair(project)

    assert sshkeys.validate_ssh_key(public) == public
    assert public.startswith("ssh-ed25519 ") and public.endswith(" portal-project-blue-team")
    key = serialization.load_ssh_private_key(private.encode(), password=None)
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.split()[:2] == mine.decode().split()

    stored = Project.objects.get(pk=project.pk)
    assert stored.ssh_public_key == public
    assert "PRIVATE KEY" not in stored.ssh_private_key_encrypted  # encrypted at rest
    assert crypto.decrypt(stored.ssh_private_key_encrypted) == private
    assert projectkeys.project_keypair(Project.objects.get(pk=project.pk)) == (public, private)  # not made again
    assert projectkeys.project_public_key(Project.objects.get(pk=project.pk)) == public


def test_two_workers_making_it_at_once_keep_one_pair():
    """Both read the project before either wrote a pair: the conditional update keeps the first one only,
    and the second gets the pair that was kept, not its own."""
    project = ProjectFactory()
    first, second = Project.objects.get(pk=project.pk), Project.objects.get(pk=project.pk)
    one = projectkeys.project_keypair(first)
    two = projectkeys.project_keypair(second)
    assert one == two
    assert Project.objects.get(pk=project.pk).ssh_public_key == one[0]


@pytest.mark.django_db(transaction=True)
def test_threads_racing_for_the_first_pair_all_get_the_same_one():
    project = ProjectFactory()
    got: list[tuple[str, str]] = []
    barrier = threading.Barrier(4)

    def make() -> None:
        barrier.wait()
        try:
            got.append(projectkeys.project_keypair(Project.objects.get(pk=project.pk)))
        finally:
            connection.close()

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 1
    assert Project.objects.get(pk=project.pk).ssh_public_key == got[0][0]


def test_a_project_machine_carries_the_project_key_in_its_seed():
    project = ProjectFactory(name="p1")
    machine = MachineFactory(project=project, image=ImageFactory(default_user="debian"))
    spec = provisioning.seed_spec_from(machine, [])
    public = Project.objects.get(pk=project.pk).ssh_public_key
    assert public and public in spec.ssh_authorized_keys
    user_data = cloudinit.preview(spec)["user-data"]
    assert public in user_data and "portal-project-p1" in user_data


def test_a_machine_outside_projects_gets_no_portal_key():
    machine = MachineFactory(project=None, ssh_authorized_keys="")
    assert provisioning.seed_spec_from(machine, []).ssh_authorized_keys == ()
    assert not Project.objects.exclude(ssh_public_key="").exists()


def test_a_changed_secret_key_says_so(settings):
    project = ProjectFactory()
    projectkeys.project_keypair(project)
    settings.SECRET_KEY = "another-secret-key-for-this-test-only"
    with pytest.raises(ValueError, match="SECRET_KEY changed"):
        projectkeys.project_keypair(Project.objects.get(pk=project.pk))


def test_the_admin_and_the_machine_page_show_the_project_key(admin_client, client):
    project = ProjectFactory(name="shown")
    url = reverse("admin:machines_project_change", args=[project.pk])
    assert "None yet" in admin_client.get(url).content.decode()
    public = projectkeys.project_public_key(project)
    page = admin_client.get(url).content.decode()
    assert public in page and "every image machine created in the project" in page

    machine = MachineFactory(project=project, deploy_type="image")
    client.force_login(UserFactory(is_staff=True))
    page = client.get(reverse("machines:detail", args=[machine.pk])).content.decode()
    assert "Project key" in page and public[:30] in page
