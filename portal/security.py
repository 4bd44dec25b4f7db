"""The Content-Security-Policy of every response (Django 5.2 has none built in).

Scripts run only from the portal's own static files, or inline with this response's nonce
(`nonce="{{ request.csp_nonce }}"`: the console page's early websocket, which must run while the head is
parsed). Inline event handlers (onclick=…) never run: pages use data-confirm and the like, handled in
static/portal.js. Styles allow inline attributes and <style> elements: xterm.js and htmx add them at run
time, and a style cannot run code. The console's websocket goes to the console proxy's own origin
(PORTAL_CONSOLE_URL, else the page's host at PORTAL_CONSOLE_PORT), which connect-src names. No page may be
framed (frame-ancestors 'none', as X-Frame-Options DENY says to older browsers). Django's SecurityMiddleware
sends the rest: nosniff, Referrer-Policy, and HSTS behind TLS (config/settings.py).
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http.request import split_domain_port


def console_sources(request) -> list[str]:
    """Where the console pages' websockets may connect, besides the portal's own origin."""
    if settings.PORTAL_CONSOLE_URL:
        url = urlsplit(settings.PORTAL_CONSOLE_URL)
        return [f"{url.scheme}://{url.netloc}"]
    try:
        host, _ = split_domain_port(request.get_host())
    except DisallowedHost:
        return []  # the response is Django's 400 already
    if not host or host.startswith("["):
        # CSP's host sources cannot name an IPv6 literal: the scheme alone, for the console's websocket only.
        return ["ws:", "wss:"]
    port = settings.PORTAL_CONSOLE_PORT
    return [f"ws://{host}:{port}", f"wss://{host}:{port}"]


def policy(request, nonce: str) -> str:
    directives = {
        "default-src": ["'self'"],
        "script-src": ["'self'", f"'nonce-{nonce}'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        # data: for Bootstrap's icons in CSS, and noVNC's cursors and JPEG rectangles (data: URLs it makes).
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'", *console_sources(request)],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(sources)}" for name, sources in directives.items())


class ContentSecurityPolicyMiddleware:
    """Gives each request a fresh nonce (request.csp_nonce) and its response the policy above."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.csp_nonce = nonce = secrets.token_urlsafe(18)
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", policy(request, nonce))
        return response
