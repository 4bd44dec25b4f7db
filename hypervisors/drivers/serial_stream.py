"""A libvirt console stream joined to a socket: the serial console's pump, for LibvirtDriver.serial_console."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time

import libvirt

from hypervisors.drivers.connections import close_quietly

log = logging.getLogger(__name__)


class ConsoleBridge:
    """Copies between a libvirt console stream and one end of a socket pair.

    Guest output: the stream's callback (on libvirt's event loop, shared by every connection of the
    process) only takes what is there and queues it; a thread of its own writes it to the socket, so a
    reader that stops reading never stalls the loop: when the queue is full the session ends. Keyboard
    input: a thread from the socket to the stream. The first end of either side, or the connection's
    death (keepalive), ends both and closes the session's connection, never on the event loop."""

    QUEUE_CHUNKS = 256  # up to 4 MiB of output waiting for a slow reader

    def __init__(self, conn: libvirt.virConnect, stream: libvirt.virStream, sock: socket.socket) -> None:
        self.conn, self.stream, self.sock = conn, stream, sock
        self.output: queue.Queue = queue.Queue(self.QUEUE_CHUNKS)
        self._closed = False
        self._ending = False
        self._lock = threading.Lock()

    def start(self) -> None:
        events = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        self.stream.eventAddCallback(events, self._on_stream, None)
        self.conn.registerCloseCallback(lambda _conn, _reason, _opaque: self._end(), None)
        threading.Thread(target=self._pump_output, name="serial-console-output", daemon=True).start()
        threading.Thread(target=self._pump_input, name="serial-console-input", daemon=True).start()

    def _end(self) -> None:
        """From any thread, once: have the output thread close everything (after what is queued)."""
        with self._lock:
            if self._ending:
                return
            self._ending = True
        try:
            self.output.put_nowait(None)
        except queue.Full:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # the output thread's send fails: it closes

    def _on_stream(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if self._ending:
            return
        try:
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                while True:
                    data = stream.recv(16384)
                    if data == -2:  # nothing more for now
                        return
                    if not data:
                        break  # the console closed (another client took it, or the guest stopped)
                    self.output.put_nowait(data)
        except queue.Full:
            log.info("serial console: the reader fell %d chunks behind; closing", self.QUEUE_CHUNKS)
        except libvirt.libvirtError as e:
            log.debug("serial console output: %s", e)
        # At the end of the stream libvirt would call back on every turn of its loop: stop that here.
        with contextlib.suppress(libvirt.libvirtError):
            stream.eventRemoveCallback()
        self._end()

    def _pump_output(self) -> None:
        try:
            while (data := self.output.get()) is not None:
                self.sock.sendall(data)
        except OSError as e:
            log.debug("serial console output: %s", e)
        self.close()

    def _pump_input(self) -> None:
        try:
            while data := self.sock.recv(4096):
                while data and not self._closed:
                    sent = self.stream.send(data)
                    if sent == -2:  # the guest's port is full: wait a little
                        time.sleep(0.01)
                        continue
                    data = data[sent:]
        except (libvirt.libvirtError, OSError) as e:
            log.debug("serial console input: %s", e)
        self._end()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for step in (self.stream.eventRemoveCallback, self.stream.abort, self.conn.unregisterCloseCallback):
            try:
                step()
            except libvirt.libvirtError:
                pass
        self.stream.cb = self.stream.cbOpaque = None  # libvirt-python keeps the callback: a cycle through us
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        close_quietly(self.conn)
