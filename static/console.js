// The portal's console page: noVNC's RFB (the official ES modules) with a small UI.
import RFB from "./vendor/novnc/core/rfb.js";
import { issueToken, proxyProtocols, proxyUrl } from "./console-link.js";

performance.mark("console-script"); // noVNC is in: from here on the page drives the connection
const config = JSON.parse(document.getElementById("console-config").textContent);
const screen = document.getElementById("console-screen");
const statusEl = document.getElementById("console-status");
const controls = ["btn-cad", "btn-keys", "btn-paste"].map((id) => document.getElementById(id));
let rfb = null;
let scale = true;
let viewOnly = false;
// For people and tests alike: the state of the page's connection.
window.portalConsole = { state: "idle", frames: 0 };

function setStatus(state, text, colour) {
  statusEl.textContent = text;
  statusEl.dataset.state = state;
  statusEl.className = `badge text-bg-${colour} align-middle fs-6`;
  window.portalConsole.state = state;
  controls.forEach((b) => { b.disabled = state !== "connected"; });
}

// The page's early script (templates/machines/_console_early.html) read the key that came with the page, or
// the one-time URL's fragment (machine, token, reconnect secret: it never reaches a server, and is out of the
// address bar and history already), and opened the websocket while this module loaded. The page keeps the key
// in memory: on its own pages Reconnect asks the portal for a fresh one; on a one-time URL it spends the same
// token again, which the proxy allows within its grace with the secret.
// (Were this module first, the early script would stand aside: this sets window.portalConsoleEarly.)
const early = window.portalConsoleEarly || (window.portalConsoleEarly = { config, key: null, channel: null });
const machineId = early.config.machineId;
const firstKey = early.key;
if (firstKey && firstKey.view_only !== undefined) viewOnly = firstKey.view_only;

// {token, reconnect}: a fresh pair from the portal on its own pages, else the one-time URL's.
async function getToken() {
  if (config.tokenUrl) {
    const body = await issueToken(config.tokenUrl, "vnc");
    viewOnly = body.view_only;
    return body;
  }
  if (!firstKey?.token) throw new Error("this console link has no key; ask for a new console URL");
  return firstKey;
}

async function connect() {
  if (rfb) { rfb.disconnect(); rfb = null; }
  setStatus("connecting", "Connecting…", "warning");
  let target, protocols;
  if (early.channel) {
    [target, early.channel] = [early.channel, null]; // opened with the page's key, once
  } else {
    try {
      const key = await getToken();
      [target, protocols] = [proxyUrl(config, "console", machineId, key.token), proxyProtocols(key.reconnect)];
    } catch (e) {
      setStatus("failed", e.message, "danger");
      return;
    }
  }
  rfb = new RFB(screen, target, protocols ? { wsProtocols: protocols } : {});
  rfb.scaleViewport = scale;
  rfb.viewOnly = viewOnly; // the proxy drops input anyway; this keeps the page honest about it
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    performance.mark("console-connected");
    setStatus("connected", viewOnly ? "Connected (view only)" : "Connected", "success");
    rfb.focus();
  });
  rfb.addEventListener("disconnect", (e) => {
    setStatus(e.detail.clean ? "disconnected" : "failed",
      e.detail.clean ? "Disconnected" : "Connection refused or lost", e.detail.clean ? "secondary" : "danger");
  });
  rfb.addEventListener("desktopname", (e) => { document.title = `${e.detail.name} · console`; });
}

// Key events go to QEMU as scancodes, so shifted characters need Shift pressed explicitly.
const KEY = { shift: [0xffe1, "ShiftLeft"], ctrl: [0xffe3, "ControlLeft"], alt: [0xffe9, "AltLeft"],
  escape: [0xff1b, "Escape"], tab: [0xff09, "Tab"], enter: [0xff0d, "Enter"], f1: [0xffbe, "F1"], f2: [0xffbf, "F2"],
  f7: [0xffc4, "F7"], c: [0x63, "KeyC"] };
const PAIRS = [["`~", "Backquote"], ["1!", "Digit1"], ["2@", "Digit2"], ["3#", "Digit3"], ["4$", "Digit4"],
  ["5%", "Digit5"], ["6^", "Digit6"], ["7&", "Digit7"], ["8*", "Digit8"], ["9(", "Digit9"], ["0)", "Digit0"],
  ["-_", "Minus"], ["=+", "Equal"], ["[{", "BracketLeft"], ["]}", "BracketRight"], ["\\|", "Backslash"],
  [";:", "Semicolon"], ["'\"", "Quote"], [",<", "Comma"], [".>", "Period"], ["/?", "Slash"]];
const CHARS = { " ": [0x20, "Space", false], "\n": [0xff0d, "Enter", false], "\t": [0xff09, "Tab", false] };
for (const [pair, code] of PAIRS) {
  CHARS[pair[0]] = [pair.charCodeAt(0), code, false];
  CHARS[pair[1]] = [pair.charCodeAt(1), code, true];
}
for (let i = 0; i < 26; i++) {
  const lower = String.fromCharCode(97 + i), upper = lower.toUpperCase();
  CHARS[lower] = [lower.charCodeAt(0), `Key${upper}`, false];
  CHARS[upper] = [upper.charCodeAt(0), `Key${upper}`, true];
}

function typeText(text) {
  for (const ch of text) {
    const key = CHARS[ch];
    if (!key) continue; // outside the US layout: skipped rather than sent wrong
    const [keysym, code, shifted] = key;
    if (shifted) rfb.sendKey(...KEY.shift, true);
    rfb.sendKey(keysym, code);
    if (shifted) rfb.sendKey(...KEY.shift, false);
  }
}
window.portalConsole.type = (text) => typeText(text);

function sendCombo(combo) {
  const keys = combo.split("+").map((k) => KEY[k]);
  keys.forEach((k) => rfb.sendKey(...k, true));
  keys.slice().reverse().forEach((k) => rfb.sendKey(...k, false));
}

document.getElementById("btn-cad").addEventListener("click", () => rfb?.sendCtrlAltDel());
document.querySelectorAll("[data-keys]").forEach((b) => b.addEventListener("click", () => rfb && sendCombo(b.dataset.keys)));
document.getElementById("btn-type").addEventListener("click", () => {
  const box = document.getElementById("paste-text");
  if (rfb) typeText(box.value);
  box.value = "";
  rfb?.focus();
});
document.getElementById("btn-scale").addEventListener("click", (e) => {
  scale = !scale;
  e.currentTarget.classList.toggle("active", scale);
  e.currentTarget.setAttribute("aria-pressed", String(scale));
  if (rfb) rfb.scaleViewport = scale;
});
document.getElementById("btn-full").addEventListener("click", () => screen.requestFullscreen?.());
document.getElementById("btn-reconnect").addEventListener("click", connect);

connect();
