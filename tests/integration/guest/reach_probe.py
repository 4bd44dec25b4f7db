#!/usr/bin/python3
"""Run inside a test guest at first boot: try to reach services of the hypervisor, print what answered.

Connects over TCP and sends UDP to every (address, port) in TARGETS (filled in by the test), and
sends hand-made TCP SYNs through a raw socket to the hypervisor's loopback via the default gateway's
MAC (what an attacker with root in the guest would try when the kernel will not route 127/8).
Each result is one line "REACH <proto> <address>:<port> <open|closed>" on the serial console.
The test appends the call to main() with its targets and passes the whole file as the machine's
first-boot script.
"""

import socket
import struct
import subprocess
import sys
import threading
import time

TIMEOUT = 2.0
out = sys.stdout
lock = threading.Lock()


def say(line: str) -> None:
    with lock:
        out.write(line + "\n")


def tcp(address: str, port: int) -> None:
    s = socket.socket()
    s.settimeout(TIMEOUT)
    try:
        s.connect((address, port))
        result = "open"
    except OSError:
        result = "closed"
    finally:
        s.close()
    say(f"REACH tcp {address}:{port} {result}")


def udp(address: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(b"reach-probe", (address, port))
        s.recvfrom(512)
        result = "open"
    except OSError:
        result = "closed"
    finally:
        s.close()
    say(f"REACH udp {address}:{port} {result}")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def raw_syn_to_loopback(gateway: str, ports: list[int]) -> None:
    """SYNs to 127.0.0.1 framed for the hypervisor's MAC; a SYN-ACK back would mean the host answered."""
    route = subprocess.run(["ip", "-4", "route", "get", gateway], capture_output=True, text=True).stdout.split()
    if "dev" not in route:
        say(f"REACH raw no-route {gateway}")
        return
    dev = route[route.index("dev") + 1]
    subprocess.run(["ping", "-c", "1", "-W", "1", gateway], capture_output=True)  # resolves its MAC (ARP)
    neigh = subprocess.run(["ip", "neigh", "show", gateway], capture_output=True, text=True).stdout.split()
    if "lladdr" not in neigh:
        say(f"REACH raw no-arp {gateway}")
        return
    dst_mac = bytes.fromhex(neigh[neigh.index("lladdr") + 1].replace(":", ""))
    src_mac = bytes.fromhex(open(f"/sys/class/net/{dev}/address").read().strip().replace(":", ""))
    src_ip = subprocess.run(["ip", "-4", "-o", "addr", "show", dev], capture_output=True, text=True).stdout.split()
    src = socket.inet_aton(src_ip[src_ip.index("inet") + 1].split("/")[0])
    dst = socket.inet_aton("127.0.0.1")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.bind((dev, 0))
    sock.settimeout(0.2)
    for port in ports:
        tcp_header = struct.pack("!HHLLBBHHH", 40000 + port % 20000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp_header))
        tcp_header = tcp_header[:16] + struct.pack("!H", checksum(pseudo + tcp_header)) + tcp_header[18:]
        ip_header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp_header), port, 0, 64, socket.IPPROTO_TCP, 0, src, dst
        )
        ip_header = ip_header[:10] + struct.pack("!H", checksum(ip_header)) + ip_header[12:]
        sock.send(dst_mac + src_mac + b"\x08\x00" + ip_header + tcp_header)
    answered = set()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(2048)
        except OSError:
            continue
        ip = frame[14:]
        if len(ip) >= 40 and ip[9] == socket.IPPROTO_TCP and ip[12:16] == dst:
            flags, sport = ip[33], struct.unpack("!H", ip[20:22])[0]
            if flags & 0x12 == 0x12:  # SYN-ACK
                answered.add(sport)
    for port in ports:
        say(f"REACH raw 127.0.0.1:{port} {'open' if port in answered else 'closed'}")


def main(*, addresses: list[str], ports: list[int], control: tuple[str, int], raw_via: str) -> None:
    """Probe every address and port; `control` must answer (it proves an open port is seen as open);
    `raw_via` is the hypervisor's address on the guest's network, whose MAC the raw frames go to."""
    global out
    out = open("/dev/ttyS0", "w", buffering=1)  # noqa: SIM115 - the serial console, for the whole run
    mine = subprocess.run(["ip", "-4", "-br", "addr"], capture_output=True, text=True).stdout
    say("REACH addresses " + " ".join(mine.split()))
    for address in addresses:  # as root would: a route to each address through the hypervisor (none is offered)
        if address != raw_via and not address.endswith(".255"):
            subprocess.run(["ip", "route", "replace", f"{address}/32", "via", raw_via], capture_output=True)
    threads = [threading.Thread(target=f, args=(a, p)) for a in addresses for p in ports for f in (tcp, udp)]
    threads.append(threading.Thread(target=tcp, args=control))
    threads.append(threading.Thread(target=raw_syn_to_loopback, args=(raw_via, ports)))
    for i, t in enumerate(threads):
        t.start()
        if i % 32 == 31:
            time.sleep(0.05)  # a little spread: the guest runs under emulation
    for t in threads:
        t.join()
    say("REACH done")


# The test appends the call: main(addresses=[...], ports=[...], control=(...), raw_via="...")
