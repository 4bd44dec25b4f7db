"""A second hypervisor host on this machine, reached only over the network and only over TLS:
a libvirtd in a named network namespace, joined to the host by a veth pair on a private /30, with
certificates made by the portal's own `manage.py lab_certs`.

    with RemoteTlsHost.start() as remote:
        hypervisor_create(name="remote", uri=remote.uri)  # qemu+tls://10.213.0.2/system?pkipath=/tmp/ptls-.../certs/client
        remote.link_down(); ...; remote.link_up()

How it is kept apart from the host:

- Network: `ip netns add ptls-<pid>`, a veth pair (`ptls<pid>h` on the host, `ptls<pid>n` inside) on the
  first free /30 of 10.213.0.0/24 (host side .1, namespace side .2). A second host in the same run passes
  `instance="b"` (up to "z"): namespace `ptls-<pid>b`, its own pair and the next free /30. No route,
  forwarding or NAT leads further: the namespace reaches the host's end of the pair and nothing else.
- Mounts: inside the namespace, `unshare --mount --uts --pid --fork --kill-child --mount-proc` runs a small
  shell as PID 1 of new namespaces. It mounts a tmpfs over /run (so also /var/run) before anything else
  (a libvirtd that shares the host's /run unlinks the host daemon's sockets), binds private directories
  over /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, sets its own host name,
  and starts its own virtlogd and `libvirtd -f CONF --listen` in the foreground. The configuration names
  the TLS files (the lab_certs `server/` directory) directly: nothing under /etc/pki is read or written,
  on the host or inside. `listen_tls = 1`, `listen_tcp = 0`, `listen_addr` = the namespace's address.
- The portal's side: the client files (lab_certs' `client/` directory) are named by `?pkipath=` in the
  URI, so the host's /etc/pki stays as it is.
- A UNIX socket in the work directory (visible from the host) stands for the hypervisor's own shell:
  `virsh_local` sets it up there (the `default` dir pool, in the work directory's `images/`); the
  portal itself only ever uses the TLS URI.

Outage: `link_down()` sets the namespace's end of the pair down. The host's end then has no carrier and
keeps its route (flagged linkdown), so nothing to the namespace's address leaves the veth: its ARP
requests go unanswered, established connections hear nothing (libvirt's keepalive ends them) and a new
connect fails after the ARP timeout with "No route to host", as for a host on the LAN that vanished. (Setting the host's end down instead would delete that route, and packets to the
address would follow the default route off the machine.) `link_up()` brings it back.

Teardown never looks anything up by name pattern alone: it signals PID 1 of the namespaces (whose death
makes the kernel kill everything else in the PID namespace), kills by pid whatever `ip netns pids` still
lists, deletes the veth pair (a deleted namespace can linger in the kernel while orphaned sockets in
it time out, and its interfaces with it), then the namespace. The unshare process gets SIGKILL
when the thread that started it exits (PR_SET_PDEATHSIG), so even a killed test run leaves no process;
the named namespace it leaves is removed by the next start (`remove_stale`: a `ptls-<pid>` whose pid is
gone). Needs root, iproute2, util-linux, libvirt and QEMU, and the `libvirt-qemu` user that
scripts/setup-host.sh creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BASE_DIR = Path(__file__).resolve().parents[2]
SUBNETS = ipaddress.IPv4Network("10.213.0.0/24")  # carved into /30s: one per live RemoteTlsHost
TLS_PORT = 16514
WORK_ROOT = Path("/tmp")  # short: a UNIX socket path under it must fit in 108 bytes
PREFIX = "ptls-"
NAME_RE = re.compile(rf"{PREFIX}(\d+)([b-z]?)")  # ptls-<pid of the run>, and a letter for its further hosts
_ROUTE_TYPES = {"unicast", "unreachable", "blackhole", "prohibit", "local", "broadcast", "multicast", "throw"}

# PID 1 of the new mount, UTS and PID namespaces (already inside the network namespace).
# $1 the work directory, $2 the host name.
_INIT = r"""
set -eu
W=$1
mount -t tmpfs -o mode=0755 ptls-run /run
mount --bind "$W/etc" /etc/libvirt
mount --bind "$W/lib" /var/lib/libvirt
mount --bind "$W/cache" /var/cache/libvirt
mount --bind "$W/log" /var/log/libvirt
# /var/lock is /run/lock: libvirt locks a guest's pty there when a client opens its serial console.
mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu /run/libvirt /run/lock
hostname "$2"
virtlogd -f "$W/etc/virtlogd.conf" -p /run/virtlogd.pid &
vl=$!
libvirtd -f "$W/etc/libvirtd.conf" -p /run/libvirtd.pid --listen &
lv=$!
echo "remote-tls: virtlogd $vl, libvirtd $lv (pids in the namespace)"
trap 'kill -TERM $lv $vl 2>/dev/null || true; wait; exit 0' TERM INT
# SIGUSR1: libvirtd is stopped as its operator would stop it (its guests run on), and started again once
# $W/start-libvirtd appears (RemoteTlsHost.stop_libvirtd, start_libvirtd).
restart=0
trap 'restart=1' USR1
while :; do
    wait $lv || true
    [ "$restart" = 1 ] || break
    restart=0
    kill -TERM $lv 2>/dev/null || true
    wait $lv 2>/dev/null || true
    echo "remote-tls: libvirtd stopped"
    while [ ! -e "$W/start-libvirtd" ]; do sleep 0.1; done
    rm -f "$W/start-libvirtd"
    libvirtd -f "$W/etc/libvirtd.conf" -p /run/libvirtd.pid --listen &
    lv=$!
    echo "remote-tls: libvirtd started again ($lv)"
done
echo "remote-tls: libvirtd exited"
kill -TERM $vl 2>/dev/null || true
wait
"""

_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved here: no dlopen between fork and exec

REQUIRED_COMMANDS = ("ip", "unshare", "libvirtd", "virtlogd", "virsh")


def missing_commands() -> list[str]:
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(name: str) -> list[int]:
    r = _run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def host_end(name: str) -> str:
    """The host's end of the veth pair of namespace `name` (the namespace's end is ...n)."""
    return f"{name.replace('-', '')}h"


def delete_netns(name: str, timeout: float = 10) -> None:
    """Kill every process left in network namespace `name` by pid, delete the veth pair (the namespace
    itself may linger in the kernel while orphaned sockets in it time out, and its end with it), then
    the namespace."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {name} would not die")
        time.sleep(0.05)
    _run("ip", "link", "del", host_end(name), check=False)
    _run("ip", "netns", "del", name, check=False)


def our_namespaces() -> list[str]:
    """The names of the network namespaces made by this module (by any run)."""
    r = _run("ip", "-j", "netns", "list", check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [n["name"] for n in json.loads(r.stdout) if NAME_RE.fullmatch(n["name"])]


def remove_stale() -> list[str]:
    """Remove the namespaces of runs that died without tearing down (their pid is gone)."""
    stale = [n for n in our_namespaces() if not _pid_alive(int(NAME_RE.fullmatch(n)[1]))]  # type: ignore[index]
    for name in stale:
        delete_netns(name)
        for workdir in WORK_ROOT.glob(f"{name}-*"):
            shutil.rmtree(workdir, ignore_errors=True)
    return stale


def free_subnet(subnets: ipaddress.IPv4Network = SUBNETS, prefix: int = 30) -> ipaddress.IPv4Network:
    """The first /prefix of `subnets` that no route or address on the host overlaps."""
    used = []
    for line in _run("ip", "-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        words = [w for w in line.split() if w not in _ROUTE_TYPES]
        with contextlib.suppress(ValueError, IndexError):
            used.append(ipaddress.ip_network(words[0], strict=False))  # "default" is skipped: ValueError
    for line in _run("ip", "-4", "-o", "addr").stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for net in subnets.subnets(new_prefix=prefix):
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError(f"no free /{prefix} left in {subnets}")


@dataclass
class NamespaceHost:
    """What the test hypervisor hosts share (the TLS one here, the SSH one in tests/integration/remote_ssh.py): a
    network namespace joined to the host by a veth /30 (the host's end .1, the namespace's .2), a work directory
    with a pool, and a teardown by PID 1 of its namespaces and `ip netns pids`."""

    name: str  # network namespace, <prefix><pid of the test run>[instance letter]
    workdir: Path
    subnet: ipaddress.IPv4Network
    hostname: str
    log_path: Path
    proc: subprocess.Popen | None = None
    init_pid: int = 0  # PID 1 of the inner namespaces, as the host sees it
    started_in: float = 0.0  # seconds from nothing to its libvirtd answering
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_if(self) -> str:
        return host_end(self.name)

    @property
    def ns_if(self) -> str:
        return f"{self.name.replace('-', '')}n"

    @property
    def pool_path(self) -> Path:
        return self.workdir / "images"

    def virsh_local(self, *args: str, check: bool = True) -> str:
        """virsh on the hypervisor itself (each kind of host reaches its own libvirtd its own way)."""
        raise NotImplementedError

    def _make_network(self) -> None:
        prefix = self.subnet.prefixlen
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/{prefix}", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.ip}/{prefix}", "dev", self.ns_if)
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")

    def _define_pool(self) -> None:
        """A dir pool `default` in the namespace's private files, defined on the hypervisor itself."""
        xml = self.workdir / "pool.xml"
        xml.write_text(f"<pool type='dir'><name>default</name><target><path>{self.pool_path}</path></target></pool>")
        for args in (("pool-define", str(xml)), ("pool-start", "default"), ("pool-autostart", "default")):
            self.virsh_local(*args)

    def stop(self, timeout: float = 20) -> None:
        """Stop everything it started, delete the namespace and the files. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if self.init_pid:  # stops its daemons; its exit makes the kernel kill the rest
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # --kill-child: PID 1 goes with unshare
                proc.wait(timeout=10)
        self.proc = None
        delete_netns(self.name)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def link_down(self) -> None:
        """The host vanishes: packets to it are dropped in the veth (nothing leaves the machine)."""
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "down")
        route = _run("ip", "-4", "-o", "route", "get", self.ip).stdout
        if f"dev {self.host_if}" not in route:  # never let its address fall through to the default route
            self.link_up()
            raise RuntimeError(f"with the link down, {self.ip} would route elsewhere: {route.strip()}")

    def link_up(self) -> None:
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")

    def netns_pids(self) -> list[int]:
        return netns_pids(self.name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# The one client the host's libvirtd lets in, as `manage.py lab_certs` prints it: the worker's certificate. Another
# certificate from the same CA (say, an operator's) is refused.
ALLOWED_CLIENT_DN = "O=AnsiStack Portal lab,CN=portal"


@dataclass
class RemoteTlsHost(NamespaceHost):
    certs_in: float = 0.0  # of `started_in`, `manage.py lab_certs`
    lab_certs_output: str = ""

    # --- addresses and files ---

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    @property
    def client_pki(self) -> Path:
        return self.certs / "client"

    @property
    def uri(self) -> str:
        """What the portal dials: TLS, the client files by pkipath (nothing read from /etc/pki)."""
        return f"qemu+tls://{self.ip}/system?pkipath={self.client_pki}"

    @property
    def socket(self) -> Path:
        return self.workdir / "sock" / "libvirt-sock"

    @property
    def local_uri(self) -> str:
        """The hypervisor's own local socket, for setting it up as its operator would (not for the portal)."""
        return f"qemu:///system?socket={self.socket}"

    # --- life cycle ---

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, hostname: str = "remote-tls", log_dir: Path | None = None, timeout: float = 60, instance: str = ""
    ) -> Iterator[RemoteTlsHost]:
        """Start one, yield it once it answers over TLS with a started `default` pool, and always tear
        it down (even when starting fails). `instance` ("b".."z") names a further host of the same run."""
        missing = missing_commands()
        if missing:
            raise RuntimeError(f"a remote TLS host needs {', '.join(missing)}; run scripts/setup-host.sh --test")
        remove_stale()
        started = time.monotonic()
        name = f"{PREFIX}{os.getpid()}{instance}"
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"instance {instance!r}: one letter from b to z, or none")
        if name in our_namespaces():
            raise RuntimeError(f"network namespace {name} exists already (one RemoteTlsHost per instance and run)")
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_ROOT))
        log_dir = log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        host = cls(
            name=name,
            workdir=workdir,
            subnet=free_subnet(),
            hostname=hostname,
            log_path=log_dir / f"libvirtd-{hostname}.log",
        )
        try:
            host._make_certs()
            host.certs_in = time.monotonic() - started
            host._write_config()
            host._make_network()
            host._launch()
            host._wait_ready(timeout)
            host.started_in = time.monotonic() - started
            host._define_pool()
            yield host
        finally:
            host.stop()

    def _make_certs(self) -> None:
        """The portal's own command, as an operator runs it."""
        r = subprocess.run(
            [sys.executable, "manage.py", "lab_certs", str(self.certs), "--server-ip", self.ip],
            cwd=BASE_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise RuntimeError(f"manage.py lab_certs failed: {r.stderr.strip()}")
        self.lab_certs_output = r.stdout

    def _write_config(self) -> None:
        w = self.workdir
        for sub in ("etc", "etc/qemu", "etc/storage", "lib", "cache", "log", "sock", "images"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        server = self.certs / "server"
        (w / "etc" / "libvirtd.conf").write_text(
            textwrap.dedent(f"""\
            listen_tls = 1
            listen_tcp = 0
            listen_addr = "{self.ip}"
            tls_port = "{TLS_PORT}"
            ca_file = "{server / "cacert.pem"}"
            cert_file = "{server / "servercert.pem"}"
            key_file = "{server / "serverkey.pem"}"
            tls_no_verify_certificate = 0
            tls_allowed_dn_list = ["{ALLOWED_CLIENT_DN}"]
            auth_tls = "none"
            unix_sock_dir = "{w / "sock"}"
            unix_sock_ro_perms = "0777"
            unix_sock_rw_perms = "0700"
            auth_unix_ro = "none"
            auth_unix_rw = "none"
            log_outputs = "3:stderr"
            """)
        )
        (w / "etc" / "virtlogd.conf").write_text('log_outputs = "3:stderr"\n')
        # Root QEMU in the caller's cgroup, as on the host (scripts/setup-host.sh), without a security driver.
        (w / "etc" / "qemu.conf").write_text(
            textwrap.dedent("""\
            user = "root"
            group = "root"
            cgroup_controllers = [ ]
            security_driver = "none"
            """)
        )

    def _launch(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [
            "ip",
            "netns",
            "exec",
            self.name,
            "unshare",
            "--mount",
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-c",
            _INIT,
            "remote-tls-init",
            str(self.workdir),
            self.hostname,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Until libvirtd answers over TLS with the portal's URI; the first call after a cold start
        blocks several seconds while libvirt probes QEMU."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace's libvirtd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if not self.init_pid:
                self.init_pid = next(iter(_children(self.proc.pid)), 0)
            r = subprocess.run(
                ["virsh", "-c", self.uri, "uri"], capture_output=True, text=True, timeout=max(5, timeout)
            )
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the namespace's libvirtd did not answer over TLS within {timeout} s ({r.stderr.strip()}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    # --- use ---

    def _log_count(self, line: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(line)
        except OSError:
            return 0

    def _tls_answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.ip, TLS_PORT), timeout=1):
            return True
        return False

    def stop_libvirtd(self, timeout: float = 20) -> None:
        """Stop the host's libvirtd (its guests run on), by a signal to PID 1 of its namespaces; until it is gone."""
        stops = self._log_count("libvirtd stopped")
        os.kill(self.init_pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self._tls_answers() or self._log_count("libvirtd stopped") == stops:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not stop within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def start_libvirtd(self, timeout: float = 30) -> None:
        """Start it again, as its operator would; until it answers over TLS."""
        (self.workdir / "start-libvirtd").touch()
        deadline = time.monotonic() + timeout
        while not self._tls_answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start again within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def virsh_local(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["virsh", "-c", self.local_uri, *args], capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}\n{self.log_tail()}")
        return r.stdout


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the thread that started it goes, even if pytest itself is
    killed; with --kill-child the inner namespaces follow."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == pid:
                            kids.append(int(entry))
                        break
    return kids
