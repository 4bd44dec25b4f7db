// The portal's serial console page: xterm.js on a websocket to the console proxy's /serial/ path,
// which joins it to the guest's serial port (a libvirt console stream).
import { Terminal } from "./vendor/xterm/lib/xterm.mjs";
import { FitAddon } from "./vendor/xterm-fit/lib/addon-fit.mjs";
import { issueToken, proxyProtocols, proxyUrl } from "./console-link.js";

const config = JSON.parse(document.getElementById("console-config").textContent);
const statusEl = document.getElementById("console-status");
const term = new Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14, lineHeight: 1.2, // room for underscores
  fontFamily: "DejaVu Sans Mono, monospace" });
const fit = new FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("serial-screen"));
fit.fit();
window.addEventListener("resize", () => fit.fit());
let ws = null;
const encoder = new TextEncoder();
// For people and tests alike: the state of the page's connection, and what the terminal shows.
window.portalConsole = { state: "idle", received: 0, text: () => screenText() };

function screenText() {
  const buffer = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i)?.translateToString(true) ?? "");
  return lines.join("\n");
}

function setStatus(state, text, colour) {
  statusEl.textContent = text;
  statusEl.dataset.state = state;
  statusEl.className = `badge text-bg-${colour} align-middle fs-6`;
  window.portalConsole.state = state;
}

term.onData((data) => {
  if (ws?.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
});

// The page's early script (templates/machines/_console_early.html) opened the first websocket with the key
// that came with the page, while this module loaded; what the guest sent meanwhile waits in it, in order.
const early = window.portalConsoleEarly || (window.portalConsoleEarly = { config, key: null, channel: null });

// takeOver: disconnect whoever has the serial port (libvirt lends it to one client); only the
// "Take over" button, which the page shows when another session has the port, asks for it.
async function connect(takeOver = false) {
  if (ws) {
    // Let the proxy hand this page's own session back to libvirt before asking for the port again.
    const old = ws;
    ws = null;
    old.onclose = null;
    await new Promise((done) => { old.addEventListener("close", done, { once: true }); old.close(); setTimeout(done, 2000); });
    await new Promise((done) => setTimeout(done, 500));
  }
  takeOverButton.hidden = true;
  setStatus("connecting", "Connecting…", "warning");
  let socket;
  if (early.channel && !takeOver) {
    [socket, early.channel] = [early.channel, null]; // opened with the page's key, once
  } else {
    let body;
    try {
      body = await issueToken(config.tokenUrl, "serial");
    } catch (e) {
      setStatus("failed", e.message, "danger");
      return;
    }
    const url = proxyUrl(config, "serial", config.machineId, body.token) + (takeOver ? "&take_over=1" : "");
    socket = new WebSocket(url, proxyProtocols(body.reconnect));
    socket.binaryType = "arraybuffer";
  }
  socket.onopen = () => {
    setStatus("connected", "Connected", "success");
    term.focus(); // nothing is sent for the user: Enter could answer an installer's question
  };
  socket.onmessage = (e) => {
    const data = new Uint8Array(e.data);
    window.portalConsole.received += data.length;
    term.write(data);
  };
  socket.onclose = (e) => {
    const clean = e.code === 1000;
    setStatus(clean ? "disconnected" : "failed", clean ? "Disconnected" : (e.reason || "Connection refused or lost"),
      clean ? "secondary" : "danger");
    takeOverButton.hidden = !(e.reason || "").includes("Active console session");
  };
  ws = socket;
}

const takeOverButton = document.getElementById("btn-takeover");
takeOverButton.addEventListener("click", () => connect(true));
document.getElementById("btn-reconnect").addEventListener("click", () => connect(false));
connect();
