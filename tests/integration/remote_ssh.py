"""A hypervisor host on this machine reached only over qemu+ssh://: a libvirtd and an sshd in a named
network namespace, joined to the host by a veth pair on a private /30 of 10.214.0.0/24.

    with RemoteSshHost.start() as remote:
        remote.authorize(worker_public_key)
        hypervisor_create(name="remote-ssh", uri=remote.uri)  # qemu+ssh://root@10.214.0.2/system
        remote.rotate_host_key(); remote.link_down(); ...; remote.link_up()

How it is kept apart from the host (as RemoteTlsHost in remote_host.py, whose helpers it uses):

- Network: `ip netns add pssh-<pid>`, a veth pair (`pssh<pid>h` on the host, `pssh<pid>n` inside) on the
  first free /30 of 10.214.0.0/24 (host side .1, namespace side .2); nothing routes further.
- Mounts: `unshare --mount --uts --pid --fork --kill-child --mount-proc` runs a small shell as PID 1 of new
  namespaces. It mounts a tmpfs over /run first (libvirtd's UNIX socket then lives in the namespace's own
  /run/libvirt: the host's /run and its daemon's sockets are never touched), binds private directories
  over /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, and a copy of /etc/passwd
  that also has sshd's privilege separation user (the host's file is not changed), sets its own host
  name, and starts virtlogd, `libvirtd -f CONF` (no network listener at all: only its UNIX socket) and
  `sshd -D -f CONF`.
- sshd: its own configuration and a host key made for this run in the work directory, listening only on
  the namespace's address, public keys only, `AuthorizedKeysFile` a file of the work directory
  (`authorize()` writes it), root only, no PAM, no forwarding. A session runs libvirt's
  `virt-ssh-helper qemu:///system`, which reaches the namespace's libvirtd on its private socket.
- sshd itself: the host's /usr/sbin/sshd when installed; else Debian's `openssh-server` (and `libwrap0`)
  fetched with `apt-get download` and unpacked, never installed, into CACHE (nothing on the host changes:
  no service, no host keys in /etc/ssh, no user).
- `virsh_local` runs virsh in the namespace's mount namespace (nsenter) on that private socket, as the
  hypervisor's own operator would; the portal only ever uses the SSH URI.

Outage: `link_down()` sets the namespace's end of the pair down (RemoteTlsHost's way: the host's end keeps
its route, so nothing to the address leaves the veth). Teardown: SIGTERM to PID 1 of the namespaces, then
by pid whatever `ip netns pids` still lists, the veth pair, the namespace; a dead run's namespace is
removed by the next start (`remove_stale`)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration.remote_host import (
    WORK_ROOT,
    NamespaceHost,
    _children,
    _die_with_parent,
    _pid_alive,
    _run,
    delete_netns,
    free_subnet,
)

SUBNETS = ipaddress.IPv4Network("10.214.0.0/24")  # apart from the TLS host's 10.213.0.0/24
PREFIX = "pssh-"
NAME_RE = re.compile(rf"{PREFIX}(\d+)([b-z]?)")
SSH_PORT = 22
CACHE = Path("/var/cache/ansistack-portal/test-sshd")  # the unpacked openssh-server, when the host has none
SSHD_UID = 64999  # the privilege separation user in the namespace's own /etc/passwd
REQUIRED_COMMANDS = ("ip", "unshare", "nsenter", "libvirtd", "virtlogd", "virsh", "virt-ssh-helper", "ssh-keygen")

# PID 1 of the new mount, UTS and PID namespaces (already inside the network namespace).
# $1 the work directory, $2 the host name, $3 sshd, $4 LD_LIBRARY_PATH for sshd ("" for the host's).
_INIT = r"""
set -eu
W=$1
mount -t tmpfs -o mode=0755 pssh-run /run
mount --bind "$W/etc" /etc/libvirt
mount --bind "$W/lib" /var/lib/libvirt
mount --bind "$W/cache" /var/cache/libvirt
mount --bind "$W/log" /var/log/libvirt
mount --bind "$W/passwd" /etc/passwd
# /var/lock is /run/lock: libvirt locks a guest's pty there when a client opens its serial console.
mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu /run/libvirt /run/sshd /run/lock
chmod 0755 /run/sshd
hostname "$2"
virtlogd -f "$W/etc/virtlogd.conf" -p /run/virtlogd.pid &
vl=$!
libvirtd -f "$W/etc/libvirtd.conf" -p /run/libvirtd.pid &
lv=$!
LD_LIBRARY_PATH="$4" "$3" -D -e -f "$W/ssh/sshd_config" &
sd=$!
echo "remote-ssh: virtlogd $vl, libvirtd $lv, sshd $sd (pids in the namespace)"
trap 'kill -TERM $sd $lv $vl 2>/dev/null || true; wait; exit 0' TERM INT
wait $lv || true
echo "remote-ssh: libvirtd exited"
kill -TERM $sd $vl 2>/dev/null || true
wait
"""


def missing_commands() -> list[str]:
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


def our_namespaces() -> list[str]:
    r = _run("ip", "-j", "netns", "list", check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [n["name"] for n in json.loads(r.stdout) if NAME_RE.fullmatch(n["name"])]


def remove_stale() -> list[str]:
    """The namespaces of runs that died without tearing down (their pid is gone)."""
    stale = []
    for name in our_namespaces():
        match = NAME_RE.fullmatch(name)
        if match and not _pid_alive(int(match.group(1))):
            delete_netns(name)
            for workdir in WORK_ROOT.glob(f"{name}-*"):
                shutil.rmtree(workdir, ignore_errors=True)
            stale.append(name)
    return stale


def sshd_binary() -> tuple[Path, str]:
    """(sshd, LD_LIBRARY_PATH it needs): the host's, or Debian's openssh-server unpacked into CACHE."""
    if Path("/usr/sbin/sshd").exists():
        return Path("/usr/sbin/sshd"), ""
    root = CACHE / "root"
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    if not (root / "usr/sbin/sshd").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            r = subprocess.run(
                ["apt-get", "download", "openssh-server", "libwrap0"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if r.returncode != 0:
                raise RuntimeError(f"apt-get download openssh-server libwrap0: {r.stderr.strip()}")
            unpacked = Path(tmp) / "root"
            for deb in Path(tmp).glob("*.deb"):
                _run("dpkg-deb", "-x", str(deb), str(unpacked), timeout=120)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(unpacked, root)
    return root / "usr/sbin/sshd", libs


@dataclass
class RemoteSshHost(NamespaceHost):
    # --- addresses and files ---

    @property
    def uri(self) -> str:
        """What the portal dials: plain qemu+ssh as root; the portal adds its own ssh client, key and pins."""
        return f"qemu+ssh://root@{self.ip}/system"

    @property
    def host_key_path(self) -> Path:
        return self.workdir / "ssh" / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "ssh" / "authorized_keys"

    def host_key(self) -> str:
        """The host's public key line (`ssh-ed25519 AAAA...`), as its operator reads it from the .pub file."""
        return " ".join(Path(f"{self.host_key_path}.pub").read_text().split()[:2])

    def host_key_fingerprint(self) -> str:
        """As `ssh-keygen -lf` prints it on the host: SHA256:..."""
        return _run("ssh-keygen", "-lf", f"{self.host_key_path}.pub").stdout.split()[1]

    # --- life cycle ---

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, hostname: str = "remote-ssh", log_dir: Path | None = None, timeout: float = 60, instance: str = ""
    ) -> Iterator[RemoteSshHost]:
        """Start one, yield it once sshd answers and libvirtd has a started `default` pool, and always tear
        it down (even when starting fails)."""
        missing = missing_commands()
        if missing:
            raise RuntimeError(f"a remote SSH host needs {', '.join(missing)}; run scripts/setup-host.sh --test")
        remove_stale()
        started = time.monotonic()
        name = f"{PREFIX}{os.getpid()}{instance}"
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"instance {instance!r}: one letter from b to z, or none")
        if name in our_namespaces():
            raise RuntimeError(f"network namespace {name} exists already (one RemoteSshHost per instance and run)")
        sshd, libs = sshd_binary()
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_ROOT))
        log_dir = log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        host = cls(
            name=name,
            workdir=workdir,
            subnet=free_subnet(SUBNETS),
            hostname=hostname,
            log_path=log_dir / f"remote-{hostname}.log",
        )
        try:
            host._write_config()
            host._make_network()
            host._launch(sshd, libs)
            host._wait_ready(timeout)
            host.started_in = time.monotonic() - started
            host._define_pool()
            yield host
        finally:
            host.stop()

    def _write_config(self) -> None:
        w = self.workdir
        for sub in ("etc", "etc/qemu", "etc/storage", "lib", "cache", "log", "images", "ssh"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        # Only the UNIX socket, in the namespace's private /run/libvirt: the network sees nothing but sshd.
        (w / "etc" / "libvirtd.conf").write_text(
            textwrap.dedent("""\
            listen_tls = 0
            listen_tcp = 0
            unix_sock_ro_perms = "0777"
            unix_sock_rw_perms = "0700"
            auth_unix_ro = "none"
            auth_unix_rw = "none"
            log_outputs = "3:stderr"
            """)
        )
        (w / "etc" / "virtlogd.conf").write_text('log_outputs = "3:stderr"\n')
        (w / "etc" / "qemu.conf").write_text(
            textwrap.dedent(f"""\
            user = "root"
            group = "root"
            cgroup_controllers = [ ]
            security_driver = "none"
            vnc_listen = "{self.ip}"
            """)
        )
        passwd = Path("/etc/passwd").read_text()
        if not re.search(r"^sshd:", passwd, re.M):
            passwd += f"sshd:x:{SSHD_UID}:65534::/run/sshd:/usr/sbin/nologin\n"
        (w / "passwd").write_text(passwd)
        _run(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.hostname}-host", "-f", str(self.host_key_path)
        )
        self.authorized_keys.write_text("")
        (w / "ssh" / "sshd_config").write_text(
            textwrap.dedent(f"""\
            ListenAddress {self.ip}:{SSH_PORT}
            HostKey {self.host_key_path}
            PidFile none
            AuthorizedKeysFile {self.authorized_keys}
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            AllowUsers root
            UsePAM no
            StrictModes no
            AllowTcpForwarding no
            AllowAgentForwarding no
            X11Forwarding no
            PermitTunnel no
            PrintMotd no
            LogLevel VERBOSE
            """)
        )

    def _launch(self, sshd: Path, libs: str) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = ["ip", "netns", "exec", self.name, "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child"]
        argv += ["--mount-proc", "--propagation", "private", "sh", "-c", _INIT, "remote-ssh-init"]
        argv += [str(self.workdir), self.hostname, str(sshd), libs]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Until sshd hands out its banner on the address and libvirtd answers on its private socket."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace's init exited ({self.proc.returncode}):\n{self.log_tail()}")
            if not self.init_pid:
                self.init_pid = next(iter(_children(self.proc.pid)), 0)
            if self.init_pid and self._sshd_answers() and self.virsh_local("uri", check=False, timeout=10):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd or libvirtd did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _sshd_answers(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.ip, SSH_PORT), timeout=2) as s:
                return s.recv(4) == b"SSH-"
        except OSError:
            return False

    # --- the host's side ---

    def authorize(self, public_key: str) -> None:
        """Let this key log in as root (a line in the AuthorizedKeysFile, as an operator installs it)."""
        with open(self.authorized_keys, "a") as f:
            f.write(public_key.strip() + "\n")

    def sshd_pid(self) -> int:
        """sshd's listener, as the host sees it (the child of PID 1 of the namespaces running sshd_config)."""
        config = str(self.workdir / "ssh" / "sshd_config")
        for pid in _children(self.init_pid):
            with contextlib.suppress(OSError):
                if config in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    return pid
        raise RuntimeError(f"no sshd in {self.name}:\n{self.log_tail()}")

    def drop_sessions(self) -> list[int]:
        """End every SSH session (the listener's children, by pid), as a host's reboot does: the worker's
        libvirt connections over them close, and its next connection logs in afresh."""
        sessions = _children(self.sshd_pid())
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return sessions

    def rotate_host_key(self, timeout: float = 10) -> str:
        """A new host key, as after a reinstall (or another machine at this address); sshd restarts on SIGHUP
        and serves it. Returns the new public key line."""
        old = self.host_key()
        for suffix in ("", ".pub"):
            Path(f"{self.host_key_path}{suffix}").unlink()
        _run(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.hostname}-host", "-f", str(self.host_key_path)
        )
        os.kill(self.sshd_pid(), signal.SIGHUP)
        new = self.host_key()
        deadline = time.monotonic() + timeout
        while new.split()[1] not in self.scan():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd still serves the old key {old[:40]}...:\n{self.log_tail()}")
            time.sleep(0.2)
        return new

    def scan(self) -> str:
        return _run("ssh-keyscan", "-T", "3", "-t", "ed25519", self.ip, check=False).stdout

    def virsh_local(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """virsh on the hypervisor itself: in the namespaces' mount and network namespace, on its own socket."""
        argv = ["nsenter", "-t", str(self.init_pid), "-m", "-n", "virsh", "-c", "qemu:///system", *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}\n{self.log_tail()}")
        return r.stdout if r.returncode == 0 else ""
