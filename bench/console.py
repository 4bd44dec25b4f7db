"""Console open times through the portal, each next to its plain baseline, in one run (issue 18):

- page: click on Console to the first frame drawn on noVNC's canvas: from the machine's page (logged in) to
  its console page; plain: noVNC on a static page to a plain websockify in front of the same VNC server
  (which asks a password: the baseline gets one of its own before each open, and noVNC answers QEMU's
  challenge), from a blank page of the same static server.
- one-time URL: from the start of `POST /api/v1/machines/{id}/console/` (API token, no session) to the
  first frame of the URL it returns, opened in a blank tab of a browser with no portal session; plain:
  the same noVNC page opened in a blank tab, served with the Cross-Origin-Opener-Policy the portal's pages
  carry (Django's default), since that header alone gives a page a fresh renderer (cold memory cache).
- serial: click on Serial to the first byte of guest output in the page's terminal, from the machine's
  page; plain: xterm.js on a static page to a plain websockify in front of a TCP bridge (a process of its
  own) that opens the domain's serial port as a libvirt console stream, on one libvirt connection kept
  open for the whole run, and copies both ways: the least any proxy that reaches serial ports through
  libvirt (as the portal does, so remote hypervisors work) must do, with no checks; from a blank page.
  In both, the bench's page script sends Enter the moment the websocket opens and the tiny guest's shell
  answers.

Every open is timed from the same clock (the wall clock before the request, against the page's
performance.timeOrigin); the paths are interleaved so that load on the machine hits all of them alike.
Prints p50 / p95 / max and the ratios, the medians of the phases in the page (HTML in, websocket
created, upgraded, first message) and of the proxy's steps from its log. Asserts nothing.

Run: `.venv/bin/python bench/console.py [N]` (libvirtd must run; `make` targets start it).
Uses its own data directory and processes, and removes the machine it made.
"""

import functools
import http.server
import json
import os
import re
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VERBOSE = os.environ.get("BENCH_VERBOSE") == "1"  # also print where each page's time goes


class SerialBridge(socketserver.ThreadingTCPServer):
    """The plain serial baseline's target: each TCP connection gets the domain's serial console, opened as a
    libvirt console stream (taking it over, as nothing else may hold it) on one connection kept open for the
    run, and both directions copied; the stream's output arrives on libvirt's event loop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, uuid: str) -> None:
        import libvirt

        libvirt.virEventRegisterDefaultImpl()  # stream events and keepalive need libvirt's event loop
        threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
        self.libvirt = libvirt
        self.conn = libvirt.open("qemu:///system")
        self.conn.setKeepAlive(5, 3)
        self.dom = self.conn.lookupByUUIDString(uuid)
        super().__init__(("127.0.0.1", port), functools.partial(_BridgeHandler, bridge=self))


class _BridgeHandler(socketserver.BaseRequestHandler):
    def __init__(self, *args, bridge: SerialBridge, **kwargs) -> None:
        self.bridge = bridge
        super().__init__(*args, **kwargs)

    def handle(self) -> None:
        lv, sock = self.bridge.libvirt, self.request
        stream = self.bridge.conn.newStream(lv.VIR_STREAM_NONBLOCK)
        self.bridge.dom.openConsole(None, stream, lv.VIR_DOMAIN_CONSOLE_FORCE)

        t0 = time.perf_counter()
        first = []

        def on_output(s, events, _opaque):
            try:
                while (data := s.recv(16384)) not in (-2, b""):
                    if not first:
                        first.append(1)
                        if VERBOSE:
                            print(
                                f"bridge: first output {1000 * (time.perf_counter() - t0):.1f} ms after connect",
                                flush=True,
                            )
                    sock.sendall(data)
            except (lv.libvirtError, OSError):
                pass

        stream.eventAddCallback(
            lv.VIR_STREAM_EVENT_READABLE | lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP, on_output, None
        )
        try:
            while data := sock.recv(4096):
                if VERBOSE:
                    print(
                        f"bridge: input {data!r} {1000 * (time.perf_counter() - t0):.1f} ms after connect", flush=True
                    )
                while data:
                    sent = stream.send(data)
                    data = data[sent:] if sent != -2 else data
        except (lv.libvirtError, OSError):
            pass
        finally:
            for step in (stream.eventRemoveCallback, stream.abort):
                try:
                    step()
                except lv.libvirtError:
                    pass


if sys.argv[1:2] == ["--serial-bridge"]:  # the plain serial baseline's target, in a process of its own
    with SerialBridge(int(sys.argv[2]), sys.argv[3]) as bridge_server:
        bridge_server.serve_forever()
    sys.exit()

DATA = tempfile.mkdtemp(prefix="portal-bench-console-")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WEB, PROXY, PLAIN, PLAIN_SERIAL, BRIDGE, PAGE, PAGE_COOP = (free_port() for _ in range(7))
os.environ.update(
    {
        "PORTAL_DATA_DIR": DATA,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PORTAL_CONSOLE_PORT": str(PROXY),
        "PORTAL_CONSOLE_ALLOWED_ORIGINS": f"http://127.0.0.1:{WEB}",
        "DJANGO_ALLOW_ASYNC_UNSAFE": "true",
    }
)

import django  # noqa: E402

from bench.common import pct, run_main, wait  # noqa: E402
from portal.processes import stop_groups  # noqa: E402

django.setup()

from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: E402
from django.core.management import call_command  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Runs in every page before its scripts. Marks (ms since the navigation): the first websocket created, upgraded
# and its first message; `done`: the first frame with real pixels on the noVNC canvas, or for a serial page
# (window.__serial) the first byte of guest output in its terminal, after the page sent Enter on open.
PROBE = """
window.__marks = {};
const marks = window.__marks;
const NativeWebSocket = window.WebSocket;
// (A native WebSocket, not a subclass: noVNC checks the methods on the object's own prototype.)
function ProbedWebSocket(url, protocols) {
  const ws = new NativeWebSocket(url, protocols);
  marks.wsCreated ??= performance.now();
  ws.addEventListener('open', () => {
    marks.wsOpen ??= performance.now();
    if (window.__serial) ws.send(new Uint8Array([13]));
  });
  ws.addEventListener('message', () => { marks.firstMessage ??= performance.now(); });
  return ws;
}
ProbedWebSocket.prototype = NativeWebSocket.prototype;
Object.assign(ProbedWebSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
window.WebSocket = ProbedWebSocket;
document.addEventListener('DOMContentLoaded', () => { marks.html = performance.now(); });
(function poll() {
  if (window.__serial) {
    if (window.portalConsole && window.portalConsole.received > 0) { marks.done = performance.now(); return; }
  } else {
    const c = document.querySelector('canvas');
    if (c && c.width > 1) {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4 * 31) if (d[i] + d[i + 1] + d[i + 2] > 60) { marks.done = performance.now(); return; }
    }
  }
  requestAnimationFrame(poll);
})();
"""
SERIAL_FLAG = "window.__serial = true;"
PLAIN_PAGE = """<!doctype html><meta charset="utf-8"><body style="margin:0"><div id="s" style="height:100vh"></div>
<script type="module">
import RFB from "/novnc/core/rfb.js";
const password = decodeURIComponent(location.hash.slice(1));
new RFB(document.getElementById("s"), "ws://127.0.0.1:%d/", {credentials: {password}});
</script>"""
# The same terminal as the portal's serial page, on a plain websocket; `received` as the portal page counts it.
PLAIN_SERIAL_PAGE = """<!doctype html><meta charset="utf-8"><link rel="stylesheet" href="/xterm/css/xterm.css">
<body style="margin:0"><div id="s" style="height:100vh"></div>
<script type="module">
import { Terminal } from "/xterm/lib/xterm.mjs";
const term = new Terminal();
term.open(document.getElementById("s"));
window.portalConsole = { received: 0 };
const ws = new WebSocket("ws://127.0.0.1:%d/", ["binary"]);
ws.binaryType = "arraybuffer";
ws.onmessage = (e) => { const d = new Uint8Array(e.data); window.portalConsole.received += d.length; term.write(d); };
term.onData((d) => ws.send(new TextEncoder().encode(d)));
</script>"""
PROXY_STEPS = re.compile(r"(graphical|serial) console of .* ready in ([\d.]+) ms \(([^)]*)\)")


def start(argv, log=None, **kw):
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out, start_new_session=True, **kw)


def wait_port(port):
    wait(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30)


def setup_machine():
    from django.contrib.auth import get_user_model

    from hypervisors import images
    from hypervisors import services as hv_services
    from hypervisors.models import Hypervisor, Image
    from machines import services
    from machines.models import Machine

    out = subprocess.run(
        [str(ROOT / "scripts/build-test-images.sh")], capture_output=True, text=True, check=True
    ).stdout
    iso = dict(line.split("=", 1) for line in out.split())["tiny_iso"]
    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    hv = hv_services.hypervisor_create(name="local", uri="qemu:///system")
    image = images.image_create_from_upload(
        name="tiny-iso", kind="iso", fmt="iso", uploaded=SimpleUploadedFile("t.iso", Path(iso).read_bytes())
    )
    wait(lambda: Hypervisor.objects.get(pk=hv.pk).status == "online")
    wait(lambda: Image.objects.get(pk=image.pk).status == "ready")
    machine = services.machine_create(
        owner=user,
        hypervisor=Hypervisor.objects.get(pk=hv.pk),
        name="bench-console",
        deploy_type="iso",
        image=Image.objects.get(pk=image.pk),
        memory_mib=256,
        disk_gib=1,
    )
    wait(lambda: Machine.objects.get(pk=machine.pk).status == "active")

    def shell_up():  # the guest's serial log, through the worker
        services.machine_serial_log_request(machine=Machine.objects.get(pk=machine.pk), max_age=0)
        time.sleep(0.5)
        return "TINY-GUEST ready" in Machine.objects.get(pk=machine.pk).last_observed.serial_log

    wait(shell_up, 120)
    time.sleep(3)  # let the guest draw its shell prompt on the screen too
    return Machine.objects.get(pk=machine.pk)


def serve_static(directory: str, port: int, coop: bool = False):
    """The plain pages; with `coop`, sent with Cross-Origin-Opener-Policy: same-origin, as the portal's pages are."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def end_headers(self):
            if coop:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            super().end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def open_once(page, url: str, before=None, origin_page: str = "about:blank") -> dict:
    """Open url from `origin_page` (after calling `before`, timed too); the page's marks in seconds from the start,
    with `total`. The in-portal paths start from the machine's page, where the click on Console or Serial is, and
    their plain baselines from a blank page of their own server: each a navigation within one origin, as a click
    is. (From about:blank the portal's pages, which send Cross-Origin-Opener-Policy, get a fresh renderer each
    time and load every module from the disk cache, while a page without it keeps its renderer's memory cache.)"""
    if page.url != origin_page:
        page.goto(origin_page)
    started = time.time()
    if before:
        url = before()
    page.goto(url)
    page.wait_for_function("window.__marks && window.__marks.done !== undefined", timeout=30_000)
    origin, marks = page.evaluate("[performance.timeOrigin, window.__marks]")
    offset = origin / 1000 - started  # the navigation's start, from the moment the open was asked for
    out = {k: offset + v / 1000 for k, v in marks.items()}
    out["navigation"] = offset
    out["total"] = out.pop("done")
    page.goto(origin_page)
    return out


def main():
    from playwright.sync_api import sync_playwright

    from machines import services
    from machines.models import ConsoleSession, Machine
    from portal.models import ApiToken

    call_command("migrate", verbosity=0)
    call_command("collectstatic", "--noinput", verbosity=0)
    proxy_log = Path(DATA) / "console-proxy.log"
    procs = [
        start([sys.executable, "manage.py", "run_huey", "--workers", "2"]),
        start([sys.executable, "-m", "gunicorn", "config.wsgi", "-b", f"127.0.0.1:{WEB}", "-w", "2", "--threads", "4"]),
        start([sys.executable, "manage.py", "console_proxy", "--port", str(PROXY)], log=proxy_log),
    ]
    servers, machine = [], None
    try:
        wait_port(WEB)
        wait_port(PROXY)
        machine = setup_machine()
        from hypervisors.drivers import get_driver

        vnc_host, vnc_port = get_driver("qemu:///system").vnc_address(str(machine.uuid))
        procs.append(
            start(
                [sys.executable, __file__, "--serial-bridge", str(BRIDGE), str(machine.uuid)],
                log=Path(DATA) / "serial-bridge.log",
            )
        )
        wait_port(BRIDGE)
        procs.append(start([sys.executable, "-m", "websockify", f"127.0.0.1:{PLAIN}", f"{vnc_host}:{vnc_port}"]))
        procs.append(start([sys.executable, "-m", "websockify", f"127.0.0.1:{PLAIN_SERIAL}", f"127.0.0.1:{BRIDGE}"]))
        wait_port(PLAIN)
        wait_port(PLAIN_SERIAL)
        modules = ROOT / "node_modules"
        for name, target in (("novnc", "@novnc/novnc"), ("xterm", "@xterm/xterm")):
            link = Path(DATA) / name
            if not link.exists():
                link.symlink_to(modules / target)
        servers.append(serve_static(DATA, PAGE))
        servers.append(serve_static(DATA, PAGE_COOP, coop=True))
        _, api_key = ApiToken.issue(user=machine.owner)

        def one_time_url() -> str:
            request = urllib.request.Request(
                f"http://127.0.0.1:{WEB}/api/v1/machines/{machine.pk}/console/",
                method="POST",
                headers={"Authorization": f"Token {api_key}"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the bench's own portal
                return json.load(response)["url"]

        def plain_password() -> str:
            """VNC asks a password that only the proxy sets, and each portal open sets a new one: before each plain
            open (outside its time), give the baseline one of its own, which its noVNC answers."""
            _, _, password = get_driver("qemu:///system").vnc_open(str(machine.uuid), valid_for=60)
            return urllib.parse.quote(password)

        def serial_free() -> bool:  # libvirt lends the port to one client: let the last one go first
            time.sleep(0.5)  # the plain bridge lets go when websockify closes its connection
            return not ConsoleSession.objects.filter(kind="serial", ended__isnull=True).exists()

        home = tempfile.mkdtemp(prefix="bench-chromium-")
        os.environ["XDG_CONFIG_HOME"] = os.environ["XDG_CACHE_HOME"] = home
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)

            def context(serial=False, login=False):
                ctx = browser.new_context(viewport={"width": 1024, "height": 768})
                ctx.add_init_script((SERIAL_FLAG if serial else "") + PROBE)
                page = ctx.new_page()
                if login:
                    page.goto(f"http://127.0.0.1:{WEB}/login/")
                    page.fill("#id_username", "bench")
                    page.fill("#id_password", "bench-password-1")
                    page.click("button[type=submit]")
                    page.wait_for_url(f"http://127.0.0.1:{WEB}/")
                return page

            pages = {
                "portal": context(login=True),
                "plain": context(),
                "api": context(),
                "plain tab": context(),
                "serial": context(serial=True, login=True),
                "plain serial": context(serial=True),
            }
            (Path(DATA) / "plain.html").write_text(PLAIN_PAGE % PLAIN)
            (Path(DATA) / "plain-serial.html").write_text(PLAIN_SERIAL_PAGE % PLAIN_SERIAL)
            (Path(DATA) / "blank.html").write_text("<!doctype html><title>blank</title>")
            machine_page, plain_blank = (
                f"http://127.0.0.1:{WEB}/machines/{machine.pk}/",
                f"http://127.0.0.1:{PAGE}/blank.html",
            )
            opens = {
                "portal": lambda: open_once(pages["portal"], f"{machine_page}console/", origin_page=machine_page),
                "plain": lambda: open_once(
                    pages["plain"], f"http://127.0.0.1:{PAGE}/plain.html#{plain_password()}", origin_page=plain_blank
                ),
                # A one-time URL is opened from outside the portal (a terminal, a chat): from a blank tab; its plain
                # baseline too, with the portal's COOP header, which gives both a fresh renderer (cold memory cache).
                "api": lambda: open_once(pages["api"], "", before=one_time_url),
                "plain tab": lambda: open_once(
                    pages["plain tab"], f"http://127.0.0.1:{PAGE_COOP}/plain.html#{plain_password()}"
                ),
                "serial": lambda: open_once(pages["serial"], f"{machine_page}serial/", origin_page=machine_page),
                "plain serial": lambda: open_once(
                    pages["plain serial"], f"http://127.0.0.1:{PAGE}/plain-serial.html", origin_page=plain_blank
                ),
            }
            results: dict[str, list[dict]] = {name: [] for name in opens}
            for i in range(N + 1):  # the first round warms every path (module caches, first connections)
                order = list(opens) if i % 2 else list(reversed(opens))
                for name in order:
                    if "serial" in name:
                        wait(serial_free, 15)
                    sample = opens[name]()
                    if i:
                        results[name].append(sample)
            if VERBOSE:
                for name in ("portal", "plain"):
                    page = pages[name]
                    cdp = page.context.new_cdp_session(page)
                    cdp.send("Performance.enable")
                    before = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                    page.goto(
                        f"http://127.0.0.1:{WEB}/machines/{machine.pk}/console/"
                        if name == "portal"
                        else f"http://127.0.0.1:{PAGE}/plain.html#{plain_password()}"
                    )
                    page.wait_for_function("window.__marks && window.__marks.done !== undefined", timeout=30_000)
                    entries = page.evaluate("""performance.getEntriesByType('navigation').concat(
                        performance.getEntriesByType('resource')).map(e => [e.name, e.startTime, e.responseEnd,
                        e.transferSize, e.initiatorType]).concat(performance.getEntriesByType('mark').concat(
                        performance.getEntriesByType('paint')).map(e => [e.name, e.startTime, e.startTime, 0, 'mark'])
                        ).concat(Object.entries(window.__marks).map(([k, v]) => [k, v, v, 0, 'probe']))""")
                    after = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                    busy = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")
                    print(
                        f"\n{name}: renderer main thread, ms: "
                        + ", ".join(f"{k} {1000 * (after.get(k, 0) - before.get(k, 0)):.0f}" for k in busy)
                    )
                    print(f"\n{name}: resources (start, end ms, bytes over the wire)")
                    for url, begin, end, size, kind in sorted(entries, key=lambda e: e[1]):
                        print(f"  {begin:8.1f} {end:8.1f} {size:>8} {kind:<10} {url[-70:]}")
                    page.goto("about:blank")
            pages.clear()
            browser.close()

        def row(label, samples, base=None):
            totals = [s["total"] for s in samples]
            p50, p95 = statistics.median(totals), pct(totals, 95)
            ratio = f"{p50 / base[0]:>7.2f}x{p95 / base[1]:>6.2f}x" if base else ""
            print(f"{label:<40}{p50:>8.3f}{p95:>8.3f}{max(totals):>8.3f}{ratio}")
            return p50, p95

        print(f"console open, {N} opens of each path (after one warm-up round); seconds; ratio = portal / plain")
        print(f"{'path':<40}{'p50':>8}{'p95':>8}{'max':>8}{'p50 ×':>8}{'p95 ×':>7}")
        plain = row("plain websockify + noVNC, first frame", results["plain"])
        row("portal console page, first frame", results["portal"], plain)
        plain_tab = row("plain, from a blank tab, page with COOP", results["plain tab"])
        row("portal one-time API URL, first frame", results["api"], plain_tab)
        plain_serial = row("plain websockify + xterm.js, first byte", results["plain serial"])
        row("portal serial page, first byte", results["serial"], plain_serial)
        print("\nphases, medians in seconds from the start of each open (navigation: the page's own start)")
        phases = ("navigation", "html", "wsCreated", "wsOpen", "firstMessage", "total")
        print(f"{'path':<16}" + "".join(f"{p:>13}" for p in phases))
        for name, samples in results.items():
            cells = [statistics.median(v) if (v := [s[p] for s in samples if p in s]) else float("nan") for p in phases]
            print(f"{name:<16}" + "".join(f"{c:>13.3f}" for c in cells))
        steps: dict[tuple[str, str], list[float]] = {}
        for match in PROXY_STEPS.finditer(proxy_log.read_text(errors="replace")):
            steps.setdefault((match[1], "ready"), []).append(float(match[2]))
            for part in match[3].split(", "):
                step, _, ms = part.rpartition(" ")
                steps.setdefault((match[1], step), []).append(float(ms))
        if steps:
            print("\nthe proxy's steps before the upgrade, ms (every connection, warm-up included): median / p95")
            for (kind, step), values in steps.items():
                print(f"  {kind:<10}{step:<24}{statistics.median(values):>8.1f}{pct(values, 95):>8.1f}")
    finally:
        if machine is not None:  # after a failure too: no guest left running
            services.machine_delete(machine=machine)
            wait(lambda: not Machine.objects.filter(pk=machine.pk).exists())
        for server in servers:
            server.shutdown()
        stop_groups(procs)


if __name__ == "__main__":
    run_main(main, DATA)
