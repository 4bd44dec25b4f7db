"""A private libvirtd in its own network, mount and PID namespaces, for tests that need
libvirt networks (bridges, dnsmasq, firewall rules) without touching the host.

    with PrivateLibvirtd.start(name="pxe") as lv:
        lv.virsh("net-define", "/path/net.xml")
        hypervisor_create(name="private", uri=lv.uri)   # qemu:///system?socket=/tmp/.../libvirt-sock

How it is kept apart from the host's own libvirtd:

- `unshare --net --mount --pid --fork --kill-child --mount-proc` runs a small shell as
  PID 1 of the new namespaces. It starts its own virtlogd and libvirtd (in the
  foreground, so they stay its children); dnsmasq and QEMU end up in the same PID
  namespace however they daemonize.
- In the private mount namespace, /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and
  /var/log/libvirt are bind mounts of directories in a temporary directory, and
  /run/libvirt is a tmpfs: no definitions, state, sockets, logs or pid files are shared
  with the host's daemons (the pid files go to the temporary directory). The libvirtd
  socket lives in the temporary directory too, visible from the host: a UNIX socket
  path works across network namespaces, so the portal, virsh and virtualbmc reach it
  through `?socket=` on a `qemu:///system` URI.
- The network namespace has only `lo`: the bridges libvirt creates there, their dnsmasq,
  their iptables rules and the guests cannot reach anything outside.

Teardown never looks processes up by name: it signals PID 1 of the namespace (whose
death makes the kernel kill everything else in that PID namespace), then `unshare`'s
own process group, and finally kills by pid anything still found in the recorded
network namespace. Mounts, bridges and firewall rules vanish with the namespaces.

Needs root, the Debian packages `dnsmasq-base` and `iptables` (libvirt's network driver
runs them) besides libvirt, QEMU and iproute2, and the `libvirt-qemu` user that
scripts/setup-host.sh creates. Start it from the main thread (or one that outlives it):
`unshare` gets SIGKILL when the thread that started it exits (PR_SET_PDEATHSIG), so a
killed test run cannot leave the namespace behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# PID 1 of the new namespaces. $1 is the work directory.
_INIT = r"""
set -eu
W=$1
# Mount points only; they exist wherever scripts/setup-host.sh ran (an empty directory at worst).
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mount -t tmpfs -o mode=0755 private-libvirt-run /run/libvirt
mount --bind "$W/etc" /etc/libvirt
mount --bind "$W/lib" /var/lib/libvirt
mount --bind "$W/cache" /var/cache/libvirt
mount --bind "$W/log" /var/log/libvirt
# A sysfs of this network namespace, so libvirt lists the namespace's interfaces, not the host's.
mount -t sysfs private-libvirt-sys /sys
ip link set lo up
virtlogd -f "$W/etc/virtlogd.conf" -p "$W/virtlogd.pid" &
vl=$!
libvirtd -f "$W/etc/libvirtd.conf" -p "$W/libvirtd.pid" &
lv=$!
echo "private-libvirtd: virtlogd $vl, libvirtd $lv (pids in the namespace)"
trap 'kill -TERM $lv $vl 2>/dev/null || true; wait; exit 0' TERM INT
wait $lv || true
echo "private-libvirtd: libvirtd exited"
kill -TERM $vl 2>/dev/null || true
wait
"""

_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved here: no dlopen between fork and exec

REQUIRED_COMMANDS = ("unshare", "nsenter", "ip", "libvirtd", "virtlogd", "virsh", "dnsmasq", "iptables")


def missing_commands() -> list[str]:
    """The commands a private libvirtd needs that are not installed (dnsmasq: dnsmasq-base)."""
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


@dataclass
class PrivateLibvirtd:
    workdir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    init_pid: int = 0  # PID 1 of the namespaces, as the host sees it
    netns: str = ""  # e.g. "net:[4026532301]", to find leftovers by pid
    _log: object = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.workdir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    # --- life cycle ---

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, name: str = "private", log_dir: Path | None = None, timeout: float = 60
    ) -> Iterator[PrivateLibvirtd]:
        """Start one, yield it when it answers, and always tear it down (even if starting fails)."""
        missing = missing_commands()
        if missing:
            raise RuntimeError(
                f"a private libvirtd needs {', '.join(missing)} (Debian: dnsmasq-base, iptables, "
                "iproute2, util-linux, libvirt-daemon); run scripts/setup-host.sh --test"
            )
        # Short: a UNIX socket path must fit in 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix=f"plv-{name}-", dir="/tmp"))
        log_dir = log_dir or workdir  # by default the log goes with the directory
        log_dir.mkdir(parents=True, exist_ok=True)
        lv = cls(workdir=workdir, log_path=log_dir / f"private-libvirtd-{name}.log")
        try:
            lv._write_config()
            lv._launch()
            lv._wait_ready(timeout)
            yield lv
        finally:
            lv.stop()

    def _write_config(self) -> None:
        w = self.workdir
        for sub in ("etc", "etc/qemu", "etc/qemu/networks", "etc/storage", "lib", "cache", "log", "sock"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)  # dnsmasq drops privileges and must reach TFTP roots placed under here
        (w / "etc" / "libvirtd.conf").write_text(
            textwrap.dedent(f"""\
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
            "unshare",
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-c",
            _INIT,
            "private-libvirtd-init",
            str(self.workdir),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 10
        while not self.init_pid:
            self.init_pid = next(iter(_children(self.proc.pid)), 0)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"unshare exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"unshare started no namespace; see {self.log_path}")
            time.sleep(0.02)
        # The child is in the new namespaces once unshare has forked it; wait until it is really in them.
        own = os.readlink("/proc/self/ns/net")
        while True:
            with contextlib.suppress(OSError):
                self.netns = os.readlink(f"/proc/{self.init_pid}/ns/net")
                if self.netns != own:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the private libvirtd's namespace never appeared")
            time.sleep(0.02)

    def _wait_ready(self, timeout: float) -> None:
        # The first call after a cold start blocks several seconds while libvirt probes QEMU.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the private libvirtd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.socket.exists():
                r = subprocess.run(["virsh", "-c", self.uri, "uri"], capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private libvirtd did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def namespace_pids(self) -> list[int]:
        """Every process in this libvirtd's network namespace (libvirtd, virtlogd, dnsmasq, QEMU...)."""
        if not self.netns:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/net") == self.netns:
                        pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 20) -> None:
        """Stop everything it started, by pid, and remove its directory. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # PID 1 stops libvirtd and virtlogd; its exit makes the kernel kill the rest of the PID namespace.
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # --kill-child: PID 1 goes with unshare
                proc.wait(timeout=10)
        # Belt and braces: nothing may outlive it in its network namespace.
        deadline = time.monotonic() + 10
        while leftovers := self.namespace_pids():
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {leftovers} of the private libvirtd would not die")
            time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.proc = None

    # --- use ---

    def virsh(self, *args: str, input: str | None = None, check: bool = True) -> str:
        r = subprocess.run(["virsh", "-c", self.uri, *args], input=input, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}\n{self.log_tail()}")
        return r.stdout

    def define_xml(self, kind: str, xml: str) -> None:
        """`kind` is net or pool: defines, starts and marks the object for autostart."""
        path = self.workdir / f"{kind}-{time.monotonic_ns()}.xml"
        path.write_text(xml)
        name = ET.fromstring(xml).findtext("name")
        self.virsh(f"{kind}-define", str(path))
        if kind == "pool":
            self.virsh("pool-build", name)
        self.virsh(f"{kind}-start", name)
        self.virsh(f"{kind}-autostart", name)

    def run_inside(self, *argv: str) -> subprocess.CompletedProcess:
        """A command in its network and mount namespaces (e.g. `ip -br addr`), for checks and debugging."""
        return subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "--net", "--mount", *argv], capture_output=True, text=True, timeout=30
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the thread that started it goes, even if pytest itself is
    killed; with --kill-child the whole namespace follows. (Start it from a long-lived thread.)"""
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
