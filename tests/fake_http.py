"""A tiny HTTP server on a loopback address for import tests: each path answers with raw bytes written by a
function, so a test can redirect, drip or lie about the length."""

from __future__ import annotations

import io
import socketserver
import threading
import time
from collections.abc import Callable

Responder = Callable[[io.BufferedIOBase], None]


class FakeHttpServer:
    def __init__(self, address: str = "127.0.0.2") -> None:
        self.routes: dict[str, Responder] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode("latin-1")
                headers = {}
                while (h := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
                outer.requests.append((path, headers))
                responder = outer.routes.get(path, not_found)
                try:
                    responder(self.wfile)
                except OSError:
                    pass  # the client went away (a refused import stops reading)

        self.server = socketserver.ThreadingTCPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{address}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def not_found(out: io.BufferedIOBase) -> None:
    out.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def body(data: bytes, *, length: bool = True) -> Responder:
    def respond(out: io.BufferedIOBase) -> None:
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
        if length:
            head += b"Content-Length: %d\r\n" % len(data)
        out.write(head + b"\r\n" + data)

    return respond


def redirect(location: str, status: int = 302) -> Responder:
    def respond(out: io.BufferedIOBase) -> None:
        out.write(
            b"HTTP/1.1 %d Found\r\nLocation: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            % (status, location.encode())
        )

    return respond


def drip_body(total: int, every: float) -> Responder:
    """Announces `total` bytes and sends one every `every` seconds: no single read ever waits long."""

    def respond(out: io.BufferedIOBase) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % total)
        out.flush()
        for _ in range(total):
            out.write(b"x")
            out.flush()
            time.sleep(every)

    return respond


def drip_headers(every: float, count: int = 1000) -> Responder:
    """A status line, then headers one byte at a time: the body never starts."""

    def respond(out: io.BufferedIOBase) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        out.flush()
        for _ in range(count):
            out.write(b"a")
            out.flush()
            time.sleep(every)

    return respond
