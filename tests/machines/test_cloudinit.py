import base64
import io

import pycdlib
import pytest
import yaml

from machines import cloudinit
from machines.cloudinit import (
    SCRIPT_PATH,
    CloudInitError,
    NicConfig,
    SeedSpec,
    build_meta_data,
    build_network_config,
    build_seed_iso,
    build_user_data,
    preview,
    validate_fqdn,
    validate_hostname,
    validate_ssh_key,
    validate_user_data,
)

# Made by ssh-keygen -t ed25519; the other keys below are built field by field.
REAL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFeTO+Es65ZCdEVCmOmjPHnpZqv+Eun2KdtTth2B/UDB root@vm"
SPECIAL = "<>&'\" a: b # c\u00e9\u65e5\u672c\U0001f600"


def _raw(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _blob(*fields: bytes) -> str:
    return base64.b64encode(_raw(*fields)).decode()


def _fields(ktype: str) -> tuple[bytes, ...]:
    t = ktype.encode()
    return {
        "ssh-ed25519": (t, b"\x01" * 32),
        "ssh-rsa": (t, b"\x01\x00\x01", b"\x00" + b"\xc3" * 256),
        "ecdsa-sha2-nistp256": (t, b"nistp256", b"\x04" + b"\x02" * 64),
        "ecdsa-sha2-nistp384": (t, b"nistp384", b"\x04" + b"\x02" * 96),
        "ecdsa-sha2-nistp521": (t, b"nistp521", b"\x04" + b"\x02" * 132),
        "sk-ssh-ed25519@openssh.com": (t, b"\x01" * 32, b"ssh:"),
        "sk-ecdsa-sha2-nistp256@openssh.com": (t, b"nistp256", b"\x04" + b"\x02" * 64, b"ssh:"),
    }[ktype]


def _key(ktype: str = "ssh-ed25519", comment: str = "me@laptop", seed: int = 1) -> str:
    fields = _fields(ktype)
    if ktype == "ssh-ed25519":  # distinct keys for the de-duplication tests
        fields = (fields[0], bytes([seed]) * 32)
    return f"{ktype} {_blob(*fields)} {comment}".strip()


def _spec(**kw) -> SeedSpec:
    return SeedSpec(**{"instance_id": "i-0123abcd", "hostname": "web1", **kw})


def _user_data(**kw) -> dict:
    return yaml.safe_load(build_user_data(_spec(**kw)))


def _merged(user_data: str, **kw) -> dict:
    return _user_data(user_data="#cloud-config\n" + user_data, **kw)


STATIC = NicConfig(
    mac="52:54:00:12:34:56",
    dhcp4=False,
    addresses=("192.0.2.10/24", "2001:db8::5/64"),
    gateway4="192.0.2.1",
    gateway6="2001:db8::1",
    nameservers=("192.0.2.53", "2001:db8::53"),
    search=("example.org",),
)


# --- seed ISO ---------------------------------------------------------------------------------


def _read_iso(image: bytes) -> tuple[pycdlib.PyCdlib, dict[str, bytes], dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    joliet, rock_ridge = {}, {}
    for name in ("user-data", "meta-data", "network-config"):
        for found, kwargs in ((joliet, {"joliet_path": f"/{name}"}), (rock_ridge, {"rr_path": f"/{name}"})):
            out = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(out, **kwargs)
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            found[name] = out.getvalue()
    return iso, joliet, rock_ridge


def test_seed_iso_is_labelled_cidata_with_joliet_and_rock_ridge():
    iso, _, _ = _read_iso(build_seed_iso(_spec()))
    assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    assert iso.joliet_vd.volume_identifier.decode("utf-16-be").strip() == "cidata"
    assert iso.has_joliet() and iso.has_rock_ridge()
    iso.close()


def test_seed_iso_files_are_the_preview_byte_for_byte():
    spec = _spec(script=SPECIAL, ssh_authorized_keys=(_key(comment=SPECIAL),), nics=(STATIC,))
    image = build_seed_iso(spec)
    iso, joliet, rock_ridge = _read_iso(image)
    expected = {name: text.encode() for name, text in preview(spec).items()}
    assert set(expected) == {"user-data", "meta-data", "network-config"}
    assert joliet == expected and rock_ridge == expected
    assert len(image) < 1024 * 1024
    iso.close()


def test_seed_iso_leaves_out_network_config_without_nics():
    iso, joliet, rock_ridge = _read_iso(build_seed_iso(_spec()))
    assert set(joliet) == set(rock_ridge) == {"user-data", "meta-data"}
    assert set(preview(_spec())) == {"user-data", "meta-data"}
    iso.close()


def test_seed_iso_refuses_more_than_1_mib(monkeypatch):
    monkeypatch.setattr(cloudinit, "SEED_ISO_MAX_BYTES", 100_000)  # a real 1 MiB seed takes seconds to build
    build_seed_iso(_spec(script="x" * 20_000))
    with pytest.raises(CloudInitError, match="limit is 1 MiB"):
        build_seed_iso(_spec(script="x" * 40_000))


def test_a_script_over_1_mib_is_refused_up_front():
    with pytest.raises(CloudInitError, match="script is over 1 MiB"):
        build_user_data(_spec(script="x" * 1024 * 1024))


def test_preview_matches_the_builders():
    spec = _spec(nics=(STATIC,))
    assert preview(spec) == {
        "user-data": build_user_data(spec),
        "meta-data": build_meta_data(spec),
        "network-config": build_network_config(spec),
    }


# --- generated user-data ----------------------------------------------------------------------


def test_user_data_has_the_expected_structure():
    key = _key()
    text = build_user_data(
        _spec(fqdn="web1.example.org", ssh_authorized_keys=(key,), packages=("nginx", "git"), script="#!/bin/bash\nx\n")
    )
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text) == {
        "hostname": "web1",
        "fqdn": "web1.example.org",
        "preserve_hostname": False,
        "users": [
            {
                "name": "cloud",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [key],
            }
        ],
        "ssh_pwauth": False,
        "disable_root": True,
        "package_update": True,
        "packages": ["nginx", "git"],
        "growpart": {"mode": "auto", "devices": ["/"]},
        "resize_rootfs": True,
        "write_files": [{"path": SCRIPT_PATH, "permissions": "0755", "content": "#!/bin/bash\nx\n"}],
        "runcmd": [[SCRIPT_PATH]],
    }


def test_user_data_leaves_out_what_was_not_asked_for():
    data = _user_data(grow_root=False, default_user="ubuntu")
    assert data["users"][0]["name"] == "ubuntu"
    for key in ("fqdn", "packages", "package_update", "growpart", "resize_rootfs", "write_files", "runcmd"):
        assert key not in data


def test_it_never_generates_a_password():
    text = build_user_data(_spec(ssh_authorized_keys=(_key(),), packages=("nginx",), script="x", nics=(STATIC,)))
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            keys.update(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(text))
    assert not keys & {"password", "passwd", "chpasswd", "hashed_passwd", "plain_text_passwd"}


@pytest.mark.parametrize(
    "script",
    [
        '#!/bin/bash\nset -eu\necho "hello: world" # <>&\'\n\nsystemctl enable --now nginx\n',
        "#!/usr/bin/env python3\nprint('\u00e9\u65e5\u672c\U0001f600')\n\n\n",
        "#!/bin/sh\r\necho crlf\r\n",
        "#!/bin/sh\n\techo tab  \n  trailing spaces  ",
        "#!/bin/sh\necho '\x85 nel \u2028 ls \u2029 ps'\n",
        "#!/bin/sh\n- not: a list\n---\n...\n&anchor *alias !tag\n",
        "#!/bin/sh\nprintf '\\x00\\n'\x07\n",
    ],
)
def test_script_round_trips_byte_for_byte(script):
    data = _user_data(script=script)
    assert data["write_files"] == [{"path": SCRIPT_PATH, "permissions": "0755", "content": script}]
    assert data["runcmd"] == [[SCRIPT_PATH]]


def test_script_without_shebang_gets_bin_sh():
    assert _user_data(script="echo hi\n")["write_files"][0]["content"] == "#!/bin/sh\necho hi\n"


def test_script_reads_as_a_literal_block():
    assert "  content: |\n    #!/bin/bash\n    echo hi\n" in build_user_data(_spec(script="#!/bin/bash\necho hi\n"))


def test_special_characters_in_keys_survive():
    key = _key(comment=SPECIAL)
    assert _user_data(ssh_authorized_keys=(key,))["users"][0]["ssh_authorized_keys"] == [key]


def test_it_writes_no_yaml_anchors():
    text = build_user_data(_spec(ssh_authorized_keys=(_key(),), user_data="#cloud-config\nbootcmd: [[a, b]]\n"))
    assert "&id" not in text and "*id" not in text


def test_it_refuses_a_bad_key_in_the_spec():
    with pytest.raises(CloudInitError, match="not supported"):
        build_user_data(_spec(ssh_authorized_keys=("ssh-dss AAAA x",)))


# --- validate_user_data -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "  \n", "#cloud-config\n", "#cloud-config\n# only a comment\n"])
def test_empty_user_data_is_an_empty_dict(text):
    assert validate_user_data(text) == {}


def test_user_data_accepts_crlf():
    assert validate_user_data("#cloud-config\r\ntimezone: UTC\r\n") == {"timezone": "UTC"}


@pytest.mark.parametrize(
    "text", ["timezone: UTC\n", "#!/bin/bash\necho hi\n", "#cloud-configx\n", "\n#cloud-config\n", "#include x\n"]
)
def test_user_data_needs_the_cloud_config_header(text):
    with pytest.raises(CloudInitError, match="first line must be #cloud-config"):
        validate_user_data(text)


def _sized(size: int) -> str:
    head = "#cloud-config\n# \u00e9\n"  # a two-byte character: the limit counts bytes, not characters
    return head + "#" * (size - len(head.encode()) - 1) + "\n"


def test_user_data_may_be_64_kib():
    assert len(_sized(65536).encode()) == 65536
    assert validate_user_data(_sized(65536)) == {}


def test_user_data_over_64_kib_is_refused():
    with pytest.raises(CloudInitError, match="65,537 bytes; the limit is 64 KiB"):
        validate_user_data(_sized(65537))


@pytest.mark.parametrize(("body", "kind"), [("- a\n- b\n", "list"), ("just text\n", "string"), ("42\n", "int")])
def test_user_data_must_be_a_mapping(body, kind):
    with pytest.raises(CloudInitError, match=f"must be a mapping of cloud-config keys, not a {kind}"):
        validate_user_data("#cloud-config\n" + body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a: b: c\n", r"not valid YAML \(line 2, column 5\): mapping values are not allowed here\.$"),
        ("packages: [1, 2\n", r"not valid YAML \(line 3, column 1\): expected ',' or '\]'"),
        ("a: 1\n---\nb: 2\n", "expected a single document in the stream but found another document"),
        ("k: !!python/object:os.system x\n", "could not determine a constructor"),
    ],
)
def test_yaml_errors_are_readable(body, message):
    with pytest.raises(CloudInitError, match=message) as e:
        validate_user_data("#cloud-config\n" + body)
    assert "\n" not in str(e.value)


def test_yaml_aliases_are_refused():
    with pytest.raises(CloudInitError, match="alias"):
        validate_user_data("#cloud-config\na: &x [1, 2]\nb: [*x, *x]\n")


@pytest.mark.parametrize("key", ["hostname", "fqdn"])
def test_user_data_may_not_set_the_name(key):
    with pytest.raises(CloudInitError, match=f"may not set {key}"):
        validate_user_data(f"#cloud-config\n{key}: other\n")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("packages: nginx\n", "packages must be a list, not a string"),
        ("runcmd: {a: b}\n", "runcmd must be a list, not a mapping"),
        ("users: cloud\n", "users must be a list"),
        ("ssh_pwauth: yes please\n", "ssh_pwauth must be true or false"),
        ("users: [{groups: adm}]\n", "users entry 1 must be a mapping with a name"),
        ("users: [{name: bob, ssh_authorized_keys: x}]\n", "ssh_authorized_keys of user bob must be a list"),
        ("ssh_authorized_keys: [ssh-dss AAAA]\n", "not supported"),
        ("ssh_authorized_keys: [42]\n", "must be a string"),
    ],
)
def test_user_data_with_wrong_types_is_refused(body, message):
    with pytest.raises(CloudInitError, match=message):
        validate_user_data("#cloud-config\n" + body)


# --- merge rules (module docstring) -----------------------------------------------------------


def test_rule_1_the_portal_owns_the_name():
    with pytest.raises(CloudInitError, match="may not set hostname"):
        build_user_data(_spec(user_data="#cloud-config\nhostname: evil\n"))


@pytest.mark.parametrize(
    ("key", "ours", "theirs"),
    [
        ("runcmd", [[SCRIPT_PATH]], [["echo", "1"], "echo 2"]),
        (
            "write_files",
            [{"path": SCRIPT_PATH, "permissions": "0755", "content": "#!/bin/sh\nx"}],
            [{"path": "/etc/x"}],
        ),
        ("bootcmd", [], [["echo", "boot"]]),
    ],
)
def test_rule_2_lists_are_concatenated_generated_first(key, ours, theirs):
    data = _merged(yaml.safe_dump({key: theirs}), script="x")
    assert data[key] == ours + theirs


def test_rule_2_packages_are_concatenated_without_duplicates():
    data = _merged("packages: [git, nginx, [libc6, '2.36'], [libc6, '2.36'], htop]\n", packages=("nginx", "curl"))
    assert data["packages"] == ["nginx", "curl", "git", ["libc6", "2.36"], "htop"]


def test_rule_3_users_default_user_first_and_default_entry_dropped():
    data = _merged("users: [default, {name: bob, shell: /bin/zsh}, alice, cloud]\n")
    assert [u if isinstance(u, str) else u["name"] for u in data["users"]] == ["cloud", "bob", "alice"]
    assert data["users"][1] == {"name": "bob", "shell": "/bin/zsh"}


def test_rule_3_an_entry_for_the_default_user_is_merged_into_it():
    ours, theirs, both = _key(seed=1), _key(seed=2), _key(seed=3)
    user_data = yaml.safe_dump(
        {"users": [{"name": "cloud", "groups": ["adm"], "shell": "/bin/zsh", "ssh_authorized_keys": [theirs, both]}]}
    )
    data = _merged(user_data, ssh_authorized_keys=(ours, both))
    assert data["users"] == [
        {
            "name": "cloud",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/zsh",
            "lock_passwd": True,
            "ssh_authorized_keys": [ours, both, theirs],
            "groups": ["adm"],
        }
    ]


def test_rule_4_top_level_keys_go_to_the_default_user():
    ours, theirs = _key(seed=1), _key(seed=2)
    data = _merged(yaml.safe_dump({"ssh_authorized_keys": [theirs, ours + "  "]}), ssh_authorized_keys=(ours,))
    assert data["users"][0]["ssh_authorized_keys"] == [ours, theirs]
    assert "ssh_authorized_keys" not in data


@pytest.mark.parametrize(
    ("body", "key", "value"),
    [
        ("timezone: Europe/Paris\n", "timezone", "Europe/Paris"),
        ("ssh_pwauth: true\n", "ssh_pwauth", True),
        ("disable_root: false\n", "disable_root", False),
        ("growpart: {mode: 'off'}\n", "growpart", {"mode": "off"}),
        ("preserve_hostname: true\n", "preserve_hostname", True),
    ],
)
def test_rule_5_the_user_wins_other_keys(body, key, value):
    assert _merged(body)[key] == value


def test_package_update_follows_the_merged_packages():
    assert _merged("packages: [git]\n")["package_update"] is True
    assert _merged("package_update: false\n", packages=("git",))["package_update"] is False
    assert "package_update" not in _merged("timezone: UTC\n")


# --- validate_ssh_key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ktype",
    [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ],
)
def test_ssh_key_types_are_accepted(ktype):
    assert validate_ssh_key(_key(ktype)) == _key(ktype)


def test_ssh_key_is_normalised():
    body = REAL_KEY.split()[1]
    assert validate_ssh_key(REAL_KEY) == REAL_KEY
    assert validate_ssh_key(f"  ssh-ed25519\t{body}   root@vm  \n") == REAL_KEY
    assert validate_ssh_key(f"ssh-ed25519 {body}") == f"ssh-ed25519 {body}"
    assert validate_ssh_key(f"ssh-ed25519 {body} two words") == f"ssh-ed25519 {body} two words"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP x", "'ssh-dss' is not supported"),
        ("ssh-ed25519", "expected 'type base64-data"),
        ("", "expected 'type base64-data"),
        ("ssh-ed25519 not*base64 x", "not valid base64"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "not valid base64"),
        (f"ssh-rsa {_blob(*_fields('ssh-ed25519'))}", "not a valid ssh-rsa key"),
        (f"ssh-ed25519 {_blob(b'ssh-ed25519', b'x' * 31)}", "not a valid ssh-ed25519 key"),
        (f"ssh-ed25519 {_blob(b'ssh-ed25519', b'x' * 32, b'extra')}", "not a valid ssh-ed25519 key"),
        (f"ecdsa-sha2-nistp256 {_blob(b'ecdsa-sha2-nistp256', b'nistp384', b'q')}", "not a valid ecdsa-sha2-nistp256"),
        (f"ecdsa-sha2-nistp256 {_blob(b'ecdsa-sha2-nistp256', b'', b'q')}", "not a valid ecdsa-sha2-nistp256"),
        (f"ssh-ed25519 {base64.b64encode(b'garbage').decode()}", "not a valid ssh-ed25519 key"),
        (f"ssh-ed25519 {_blob(b'ssh-ed25519', b'x' * 32)[:-1]}", "not valid base64"),
        (f"ssh-ed25519 {base64.b64encode(_raw(b'ssh-ed25519', b'x' * 32)[:-3]).decode()}", "not a valid ssh-ed25519"),
        (REAL_KEY + "\n" + REAL_KEY, "one key per line"),
        ('command="ls" ' + REAL_KEY, "is not supported"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
    ],
)
def test_bad_ssh_keys_are_refused(line, message):
    with pytest.raises(CloudInitError, match=message):
        validate_ssh_key(line)


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web1", "a", "a" * 63, "WEB-1", "1web", "x-y-z"])
def test_hostnames_are_accepted(name):
    assert validate_hostname(name) == name


@pytest.mark.parametrize(
    "name", ["", "-web", "web-", "a" * 64, "web_1", "web.1", "web 1", "w\u00e9b", "web1\n", "<web>", "a:b", "#web"]
)
def test_bad_hostnames_are_refused(name):
    with pytest.raises(CloudInitError, match="is not valid: use 1-63 letters"):
        build_user_data(_spec(hostname=name))


@pytest.mark.parametrize("fqdn", ["web1.example.org", "web1", ".".join(["a" * 63] * 3) + "." + "b" * 61])
def test_fqdns_are_accepted(fqdn):
    assert validate_fqdn(fqdn) == fqdn
    assert _user_data(fqdn=fqdn)["fqdn"] == fqdn


@pytest.mark.parametrize(
    "fqdn",
    [
        "web1.example.org.",
        "web1..org",
        ".org",
        "web1.-x.org",
        "a" * 64 + ".org",
        ".".join(["a" * 63] * 3) + ".bb" + "b" * 61,
    ],
)
def test_bad_fqdns_are_refused(fqdn):
    with pytest.raises(CloudInitError, match="not a valid domain name"):
        build_user_data(_spec(fqdn=fqdn))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default_user": "root"}, "other than root"),
        ({"default_user": "Cloud"}, "Login user 'Cloud' is not valid"),
        ({"default_user": "a b"}, "is not valid"),
        ({"packages": ("-oAPT::Update::Pre-Invoke::=touch /x",)}, "Package name"),
        ({"packages": ("nginx git",)}, "Package name 'nginx git' is not valid"),
    ],
)
def test_bad_spec_fields_are_refused(kwargs, message):
    with pytest.raises(CloudInitError, match=message):
        build_user_data(_spec(**kwargs))


def test_meta_data():
    assert build_meta_data(_spec()) == "instance-id: i-0123abcd\nlocal-hostname: web1\n"


@pytest.mark.parametrize("instance_id", ["", "i/../x", "i 1", "-i", "x" * 129])
def test_bad_instance_ids_are_refused(instance_id):
    with pytest.raises(CloudInitError, match="Instance id"):
        build_meta_data(_spec(instance_id=instance_id))


# --- network-config ---------------------------------------------------------------------------


def _network(*nics: NicConfig) -> dict:
    return yaml.safe_load(build_network_config(_spec(nics=nics)))


def test_no_nics_means_no_network_config():
    assert build_network_config(_spec()) is None


def test_dhcp_network_config():
    assert _network(NicConfig(mac="52:54:00:00:00:01")) == {
        "version": 2,
        "ethernets": {
            "nic0": {
                "match": {"macaddress": "52:54:00:00:00:01"},
                "set-name": "eth0",
                "dhcp4": True,
                "dhcp6": False,
            }
        },
    }


def test_static_network_config():
    assert _network(STATIC)["ethernets"]["nic0"] == {
        "match": {"macaddress": "52:54:00:12:34:56"},
        "set-name": "eth0",
        "dhcp4": False,
        "dhcp6": False,
        "addresses": ["192.0.2.10/24", "2001:db8::5/64"],
        "routes": [{"to": "0.0.0.0/0", "via": "192.0.2.1"}],
        "gateway6": "2001:db8::1",
        "nameservers": {"addresses": ["192.0.2.53", "2001:db8::53"], "search": ["example.org"]},
    }


def test_several_nics_are_numbered_and_normalised():
    second = NicConfig(mac="52:54:00:AB:CD:EF", dhcp6=True, addresses=("2001:DB8:0::7/64",), search=("lan",))
    ethernets = _network(STATIC, second)["ethernets"]
    assert list(ethernets) == ["nic0", "nic1"]
    assert ethernets["nic1"] == {
        "match": {"macaddress": "52:54:00:ab:cd:ef"},
        "set-name": "eth1",
        "dhcp4": True,
        "dhcp6": True,
        "addresses": ["2001:db8::7/64"],
        "nameservers": {"search": ["lan"]},
    }


def test_link_local_ipv6_gateway_is_accepted():
    nic = NicConfig(mac="52:54:00:00:00:01", dhcp4=False, addresses=("2001:db8::5/64",), gateway6="fe80::1")
    assert _network(nic)["ethernets"]["nic0"]["gateway6"] == "fe80::1"


def _nic(**kw) -> NicConfig:
    return NicConfig(**{"mac": "52:54:00:00:00:02", "dhcp4": False, "addresses": ("192.0.2.10/24",), **kw})


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        (_nic(mac="52:54:00:00:00"), "NIC 2: MAC address '52:54:00:00:00' is not valid"),
        (_nic(mac="52-54-00-00-00-02"), "NIC 2: MAC address .* is not valid"),
        (_nic(mac="52:54:00:00:00:0g"), "NIC 2: MAC address .* is not valid"),
        (_nic(mac="01:00:5e:00:00:01"), "NIC 2: MAC address 01:00:5e:00:00:01 is a multicast address"),
        (_nic(mac="52:54:00:00:00:01"), "NIC 2: MAC address 52:54:00:00:00:01 is used by another NIC"),
        (_nic(mac="52:54:00:00:00:01".upper()), "NIC 2: MAC address 52:54:00:00:00:01 is used by another NIC"),
        (_nic(addresses=("192.0.2.300/24",)), "NIC 2: '192.0.2.300/24' is not an address with a prefix"),
        (_nic(addresses=("192.0.2.10",)), "NIC 2: '192.0.2.10' is not an address with a prefix"),
        (_nic(addresses=("192.0.2.0/24",)), "NIC 2: 192.0.2.0/24 is the network or broadcast address"),
        (_nic(addresses=("192.0.2.255/24",)), "NIC 2: 192.0.2.255/24 is the network or broadcast address"),
        (_nic(addresses=("127.0.0.5/8",)), "not a usable host address"),
        (_nic(addresses=()), "NIC 2: without DHCP it needs at least one static address"),
        (_nic(gateway4="10.0.0.1"), "NIC 2: gateway 10.0.0.1 is not in 192.0.2.0/24"),
        (_nic(gateway4="192.0.2.10"), "NIC 2: gateway 192.0.2.10 is the NIC's own address"),
        (_nic(gateway4="2001:db8::1"), "NIC 2: gateway '2001:db8::1' is not an IPv4 address"),
        (_nic(gateway4="router"), "NIC 2: gateway 'router' is not an IPv4 address"),
        (_nic(gateway6="2001:db8::1"), "NIC 2: gateway 2001:db8::1 needs a static IPv6 address in its subnet"),
        (_nic(gateway6="2001:db8::1", addresses=("2001:db9::5/64",)), "gateway 2001:db8::1 is not in 2001:db9::/64"),
        (_nic(dhcp4=True, addresses=(), gateway4="192.0.2.1"), "gateway 192.0.2.1 needs a static IPv4 address"),
        (_nic(nameservers=("dns.example.org",)), "NIC 2: name server 'dns.example.org' is not an IP address"),
        (_nic(search=("bad domain",)), "NIC 2: search domain 'bad domain' is not a valid domain name"),
    ],
)
def test_bad_nics_are_refused(nic, message):
    with pytest.raises(CloudInitError, match=message):
        build_network_config(_spec(nics=(NicConfig(mac="52:54:00:00:00:01"), nic)))
