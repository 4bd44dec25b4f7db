"""Console open time: from opening the console page to the first frame drawn, through the portal
(page, token POST, proxy with its checks, live VNC lookup) next to noVNC on a plain websockify
in the same run. Prints p50 and p95; asserts nothing.

Run: `.venv/bin/python bench/console.py [N]` (libvirtd must run; `make` targets start it).
Uses its own data directory and processes, and removes the machine it made.
"""

import functools
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = tempfile.mkdtemp(prefix="portal-bench-console-")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WEB, PROXY, PLAIN, PAGE = free_port(), free_port(), free_port(), free_port()
os.environ.update({"PORTAL_DATA_DIR": DATA, "DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_CONSOLE_PORT": str(PROXY),
                   "PORTAL_CONSOLE_ALLOWED_ORIGINS": f"http://127.0.0.1:{WEB}", "DJANGO_ALLOW_ASYNC_UNSAFE": "true"})  # fmt: skip

import django  # noqa: E402

from bench.common import pct, run_main, wait  # noqa: E402
from portal.processes import stop_groups  # noqa: E402

django.setup()

from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: E402
from django.core.management import call_command  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
# Runs in every page before its scripts: time the first frame with real pixels on the noVNC canvas.
FIRST_FRAME = """
window.__firstFrame = null;
(function poll() {
  const c = document.querySelector('canvas');
  if (c && c.width > 1) {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4 * 31) if (d[i] + d[i + 1] + d[i + 2] > 60) { window.__firstFrame = performance.now(); return; }
  }
  requestAnimationFrame(poll);
})();
"""
PLAIN_PAGE = """<!doctype html><meta charset="utf-8"><body style="margin:0"><div id="s" style="height:100vh"></div>
<script type="module">
import RFB from "/core/rfb.js";
new RFB(document.getElementById("s"), "ws://127.0.0.1:%d/", {credentials: {password: %s}});
</script>"""


def start(argv, **kw):
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw
    )


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
    image = images.image_create_from_upload(name="tiny-iso", kind="iso", fmt="iso",
                                            uploaded=SimpleUploadedFile("t.iso", Path(iso).read_bytes()))  # fmt: skip
    wait(lambda: Hypervisor.objects.get(pk=hv.pk).status == "online")
    wait(lambda: Image.objects.get(pk=image.pk).status == "ready")
    machine = services.machine_create(owner=user, hypervisor=Hypervisor.objects.get(pk=hv.pk), name="bench-console",
                                      deploy_type="iso", image=Image.objects.get(pk=image.pk), memory_mib=256, disk_gib=1)  # fmt: skip
    wait(lambda: Machine.objects.get(pk=machine.pk).status == "active")
    time.sleep(8)  # let the guest draw its shell prompt
    return Machine.objects.get(pk=machine.pk)


def measure(browser, url, login=None) -> list[float]:
    times = []
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    context.add_init_script(FIRST_FRAME)
    page = context.new_page()
    if login:
        login(page)
    for _ in range(N):
        page.goto(url)
        page.wait_for_function("window.__firstFrame !== null", timeout=30_000)
        times.append(page.evaluate("window.__firstFrame") / 1000)
        page.goto("about:blank")
    context.close()
    return times


def main():
    from playwright.sync_api import sync_playwright

    from machines import services

    call_command("migrate", verbosity=0)
    call_command("collectstatic", "--noinput", verbosity=0)
    procs = [start([sys.executable, "manage.py", "run_huey", "--workers", "2"]),
             start([sys.executable, "-m", "gunicorn", "portal.wsgi", "-b", f"127.0.0.1:{WEB}", "-w", "2", "--threads", "4"]),
             start([sys.executable, "manage.py", "console_proxy", "--port", str(PROXY)])]  # fmt: skip
    server = None
    try:
        wait_port(WEB)
        wait_port(PROXY)
        machine = setup_machine()
        from hypervisors.drivers import get_driver

        vnc_host, vnc_port = get_driver("qemu:///system").vnc_address(str(machine.uuid))
        procs.append(start([sys.executable, "-m", "websockify", f"127.0.0.1:{PLAIN}", f"{vnc_host}:{vnc_port}"]))
        wait_port(PLAIN)
        novnc = ROOT / "node_modules/@novnc/novnc"
        for sub in ("core", "vendor"):
            target = Path(DATA) / sub
            if not target.exists():
                target.symlink_to(novnc / sub)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=DATA)
        handler.log_message = lambda *a: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", PAGE), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def login(page):
            page.goto(f"http://127.0.0.1:{WEB}/login/")
            page.fill("#id_username", "bench")
            page.fill("#id_password", "bench-password-1")
            page.click("button[type=submit]")
            page.wait_for_url(f"http://127.0.0.1:{WEB}/")

        home = tempfile.mkdtemp(prefix="bench-chromium-")
        os.environ["XDG_CONFIG_HOME"] = os.environ["XDG_CACHE_HOME"] = home
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            # Warm both paths once (module caches, the first libvirt connection).
            measure_once = N
            portal = measure(browser, f"http://127.0.0.1:{WEB}/machines/{machine.pk}/console/", login)
            # VNC asks a password that only the proxy sets: give the plain baseline one of its own for the run.
            _, _, password = get_driver("qemu:///system").vnc_open(str(machine.uuid), valid_for=3600)
            (Path(DATA) / "plain.html").write_text(PLAIN_PAGE % (PLAIN, json.dumps(password)))
            plain = measure(browser, f"http://127.0.0.1:{PAGE}/plain.html")
            browser.close()
        print(f"console open to first frame drawn, {measure_once} opens each; seconds")
        print(f"{'path':<34}{'p50':>8}{'p95':>8}{'max':>8}")
        for label, values in (("portal (page, token, proxy checks)", portal), ("plain websockify + noVNC", plain)):
            print(f"{label:<34}{statistics.median(values):>8.3f}{pct(values, 95):>8.3f}{max(values):>8.3f}")
        services.machine_delete(machine=machine)
        from machines.models import Machine

        wait(lambda: not Machine.objects.filter(pk=machine.pk).exists())
    finally:
        if server:
            server.shutdown()
        stop_groups(procs)


if __name__ == "__main__":
    run_main(main, DATA)
