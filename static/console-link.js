// What the console pages share: a one-time key from the portal, and the console proxy's address.

// POST to the page's token URL (CSRF-checked); resolves to {token, reconnect, view_only, expires_at}.
export async function issueToken(tokenUrl, kind = "vnc") {
  const csrf = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="))?.split("=")[1];
  const r = await fetch(tokenUrl, {
    method: "POST", credentials: "same-origin",
    headers: { "X-CSRFToken": csrf, "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ kind }),
  });
  if (!r.ok) {
    const reason = r.headers.get("Content-Type")?.includes("json") ? (await r.json()).error : "";
    throw new Error(reason || `the portal refused a console key (${r.status})`);
  }
  return r.json();
}

// ws(s)://<proxy>/<kind path>/<machine>?token=...: PORTAL_CONSOLE_URL, or this host on the proxy's port.
export function proxyUrl(config, path, machineId, token) {
  const base = config.consoleUrl ||
    `${location.protocol === "https:" ? "wss" : "ws"}://${location.hostname}:${config.consolePort}`;
  return `${base.replace(/\/$/, "")}/${path}/${machineId}?token=${encodeURIComponent(token)}`;
}

// The websocket subprotocols to offer: "binary" (which the proxy picks) and the token's reconnect secret,
// kept in memory only. A header, unlike the URL that carries the token, reaches no access log; within the
// reconnect grace the proxy lets a spent token in again only with this secret.
export function proxyProtocols(reconnect) {
  return reconnect ? ["binary", `portal-reconnect.${reconnect}`] : ["binary"];
}
