"""Properties of the cloud-init merge and the network-config builder (machines/cloudinit.py), for any input
of the shapes they accept (issue 14): the merge follows the five rules of the module's docstring, and the
network config holds every NIC as given, numbered in order and matched by its normalised MAC."""

import ipaddress

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from machines.cloudinit import CloudInitError, NicConfig, SeedSpec, build_network_config, build_user_data

PROPERTY = settings(max_examples=50, deadline=None, database=None, derandomize=True)

DEFAULT_USER = "cloud"
KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFeTO+Es65ZCdEVCmOmjPHnpZqv+Eun2KdtTth2B/UDB root@vm",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD tester@portal",
)
LIST_KEYS = ("packages", "runcmd", "write_files", "bootcmd")

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 -_./:", min_size=1, max_size=12)
packages = st.lists(st.from_regex(r"[a-z][a-z0-9.+-]{0,10}", fullmatch=True), max_size=4)
commands = st.lists(st.one_of(words, st.lists(words, min_size=1, max_size=3)), max_size=3)
files = st.lists(st.fixed_dictionaries({"path": st.from_regex(r"/etc/[a-z]{1,8}", fullmatch=True), "content": words}))
other_users = st.fixed_dictionaries({"name": st.sampled_from(["alice", "bob"]), "shell": st.just("/bin/sh")})
default_entry = st.fixed_dictionaries(
    {"name": st.just(DEFAULT_USER)},
    optional={
        "shell": st.sampled_from(["/bin/zsh", "/bin/sh"]),
        "ssh_authorized_keys": st.lists(st.sampled_from(KEYS)),
    },
)
user_data = st.fixed_dictionaries(
    {},
    optional={
        "packages": packages,
        "runcmd": commands,
        "bootcmd": commands,
        "write_files": files,
        "users": st.lists(
            st.one_of(st.sampled_from(["default", DEFAULT_USER]), other_users, default_entry), max_size=4
        ),
        "ssh_authorized_keys": st.lists(st.sampled_from(KEYS), max_size=3),
        "package_update": st.booleans(),
        "timezone": st.sampled_from(["UTC", "Europe/Paris"]),
        "ssh_pwauth": st.booleans(),
        "growpart": st.just({"mode": "off"}),
    },
)


def _unique(items: list) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


@PROPERTY
@given(
    user=user_data,
    own_packages=packages,
    own_keys=st.lists(st.sampled_from(KEYS), max_size=2),
    script=st.one_of(st.just(""), words),
)
def test_the_merge_follows_the_five_rules(user, own_packages, own_keys, script):
    spec = SeedSpec(
        instance_id="i-1",
        hostname="vm",
        default_user=DEFAULT_USER,
        ssh_authorized_keys=tuple(own_keys),
        packages=tuple(own_packages),
        script=script,
        user_data="#cloud-config\n" + yaml.safe_dump(user) if user else "",
    )
    text = build_user_data(spec)
    assert text.startswith("#cloud-config\n")
    merged = yaml.safe_load(text)
    generated = yaml.safe_load(build_user_data(SeedSpec(**{**spec.__dict__, "user_data": ""})))
    # 1. The name is the portal's.
    assert merged["hostname"] == "vm"
    # 2. Lists: generated items first, then the user's; packages without duplicates.
    for key in LIST_KEYS:
        expected = [*generated.get(key, []), *user.get(key, [])]
        assert merged.get(key, []) == (_unique(expected) if key == "packages" else expected)
    # 3. and 4. The default user first, with every key once (its own, the top-level ones, its entries' ones),
    # its entries' other settings, and the other users after it in order.
    default, *others = merged["users"]
    entries = [e for e in user.get("users", []) if isinstance(e, dict) and e["name"] == DEFAULT_USER]
    keys = [
        *own_keys,
        *user.get("ssh_authorized_keys", []),
        *(k for e in entries for k in e.get("ssh_authorized_keys", [])),
    ]
    assert default["name"] == DEFAULT_USER and default["ssh_authorized_keys"] == _unique(keys)
    assert default["shell"] == next((e["shell"] for e in reversed(entries) if "shell" in e), "/bin/bash")
    assert others == [e for e in user.get("users", []) if e not in ("default", DEFAULT_USER) and e not in entries]
    # 5. Any other key: the user's value wins.
    for key in ("timezone", "ssh_pwauth", "growpart"):
        assert merged.get(key) == user.get(key, generated.get(key))
    # package_update follows the merged packages unless the user set it.
    if "package_update" in user:
        assert merged["package_update"] is user["package_update"]
    elif merged.get("packages"):
        assert merged["package_update"] is True


macs = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.booleans()).map(
    lambda t: (
        f"52:54:00:{t[0]:02x}:{t[1]:02x}:{t[2]:02x}".upper() if t[3] else f"52:54:00:{t[0]:02x}:{t[1]:02x}:{t[2]:02x}"
    )
)


@st.composite
def nics(draw, mac: str) -> NicConfig:
    net4 = ipaddress.ip_network(f"10.{draw(st.integers(0, 255))}.{draw(st.integers(0, 255))}.0/24")
    net6 = ipaddress.ip_network(f"2001:db8:{draw(st.integers(0, 0xFFFF)):x}::/64")
    hosts4 = draw(st.lists(st.integers(1, 254), unique=True, max_size=3))
    hosts6 = draw(st.lists(st.integers(1, 0xFFFF), unique=True, max_size=2))
    addresses = [f"{net4[h]}/24" for h in hosts4] + [f"{net6[h]}/64" for h in hosts6]
    dhcp4 = draw(st.booleans()) or not addresses
    gateway4 = (
        str(net4[draw(st.integers(1, 254).filter(lambda h: h not in hosts4))]) if hosts4 and draw(st.booleans()) else ""
    )
    gateway6 = draw(st.sampled_from(["", "fe80::1", str(net6[0x10000])])) if hosts6 else ""
    return NicConfig(
        mac=mac,
        dhcp4=dhcp4,
        dhcp6=draw(st.booleans()),
        addresses=tuple(draw(st.permutations(addresses))),
        gateway4=gateway4,
        gateway6=gateway6,
        nameservers=tuple(draw(st.lists(st.sampled_from(["192.0.2.53", "2001:db8::53", "10.0.0.1"]), max_size=2))),
        search=tuple(draw(st.lists(st.sampled_from(["lan", "example.org"]), max_size=2))),
    )


nic_lists = st.lists(macs, min_size=1, max_size=4, unique_by=str.lower).flatmap(
    lambda ms: st.tuples(*(nics(m) for m in ms))
)


@PROPERTY
@given(nic_list=nic_lists)
def test_the_network_config_holds_every_nic_as_given(nic_list):
    config = yaml.safe_load(build_network_config(SeedSpec(instance_id="i-1", hostname="vm", nics=nic_list)))
    assert config["version"] == 2 and list(config["ethernets"]) == [f"nic{i}" for i in range(len(nic_list))]
    for index, (nic, eth) in enumerate(zip(nic_list, config["ethernets"].values(), strict=True)):
        assert eth["match"] == {"macaddress": nic.mac.lower()} and eth["set-name"] == f"eth{index}"
        assert (eth["dhcp4"], eth["dhcp6"]) == (nic.dhcp4, nic.dhcp6)
        assert eth.get("addresses", []) == [str(ipaddress.ip_interface(a)) for a in nic.addresses]
        assert eth.get("routes", []) == ([{"to": "0.0.0.0/0", "via": nic.gateway4}] if nic.gateway4 else [])
        assert eth.get("gateway6", "") == nic.gateway6
        servers = eth.get("nameservers", {})
        assert servers.get("addresses", []) == list(nic.nameservers) and servers.get("search", []) == list(nic.search)


@PROPERTY
@given(nic_list=nic_lists, pick=st.integers(0, 3))
def test_a_mac_given_twice_in_any_case_is_refused(nic_list, pick):
    again = nic_list[pick % len(nic_list)]
    twin = NicConfig(mac=again.mac.swapcase(), dhcp4=True)
    with pytest.raises(CloudInitError, match=f"NIC {len(nic_list) + 1}: MAC address .* is used by another NIC"):
        build_network_config(SeedSpec(instance_id="i-1", hostname="vm", nics=(*nic_list, twin)))
