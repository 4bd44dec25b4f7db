#!/usr/bin/python3
"""Run inside a test guest at first boot: try to reach services of the hypervisor, print what answered.

Through each NIC in turn, connects over TCP and sends UDP to every (address, port) the test names, and
sends hand-made TCP SYNs through a raw socket to the hypervisor's loopback via its MAC on that NIC's
network (what an attacker with root in the guest would try when the kernel will not route 127/8).
Each result is one line "REACH <nic> <proto> <address>:<port> <open|closed>" on the serial console.
The test appends the call to main() with its targets and passes the whole file as the machine's
first-boot script.
"""

import os
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


def tcp(tag: str, address: str, port: int, *, attempts: int = 1) -> None:
    result = "closed"
    for _ in range(attempts):
        s = socket.socket()
        s.settimeout(TIMEOUT * (1 if attempts == 1 else 3))
        try:
            s.connect((address, port))
            result = "open"
            break
        except OSError:
            time.sleep(0.5)
        finally:
            s.close()
    say(f"REACH {tag} tcp {address}:{port} {result}")


def udp(tag: str, address: str, port: int) -> None:
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
    say(f"REACH {tag} udp {address}:{port} {result}")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def raw_syn_to_loopback(tag: str, gateway: str, dev: str, ports: list[int]) -> None:
    """SYNs to 127.0.0.1 framed for the hypervisor's MAC; a SYN-ACK back would mean the host answered."""
    subprocess.run(["ping", "-c", "1", "-W", "1", "-I", dev, gateway], capture_output=True)  # resolves its MAC (ARP)
    neigh = subprocess.run(["ip", "neigh", "show", gateway, "dev", dev], capture_output=True, text=True).stdout.split()
    if "lladdr" not in neigh:
        say(f"REACH {tag} raw no-arp {gateway}")
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
        say(f"REACH {tag} raw 127.0.0.1:{port} {'open' if port in answered else 'closed'}")


def device_of(mac: str) -> str:
    for dev in os.listdir("/sys/class/net"):
        with open(f"/sys/class/net/{dev}/address") as f:
            if f.read().strip() == mac:
                return dev
    raise SystemExit(f"no NIC with MAC {mac}")


def probe(
    tag: str,
    *,
    mac: str,
    address: str,
    gateway: str,
    targets: list[str],
    routed: list[str],
    ports: list[int],
    control: tuple[str, int],
    neighbours: list[tuple[str, int]] = (),
) -> None:
    """One NIC: bring it up (with `address`, when its network has no DHCP), route the `routed` targets (those
    not on its subnet) through `gateway` (the hypervisor's address there), as root in the guest would, and
    try every target and port, the `control` (which must answer: an open port is seen as open), and raw
    SYNs to the hypervisor's loopback framed for `gateway`'s MAC; and `neighbours`, (address, port) of
    other machines on its network, over TCP and UDP."""
    dev = device_of(mac)
    subprocess.run(["ip", "link", "set", dev, "up"], capture_output=True)
    if address:
        subprocess.run(["ip", "addr", "replace", address, "dev", dev], capture_output=True)
    mine = subprocess.run(["ip", "-4", "-br", "addr", "show", "dev", dev], capture_output=True, text=True).stdout
    say(f"REACH {tag} addresses " + " ".join(mine.split()))
    for target in routed:
        subprocess.run(["ip", "route", "replace", f"{target}/32", "via", gateway, "dev", dev], capture_output=True)
    # The control first and on its own, with a few tries: it shows the path works (ARP, the guard, the
    # peer), which a 2 s try among a hundred others can miss on a loaded emulated guest.
    tcp(tag, *control, attempts=3)
    threads = [threading.Thread(target=f, args=(tag, a, p)) for a in targets for p in ports for f in (tcp, udp)]
    threads += [threading.Thread(target=f, args=(tag, a, p)) for a, p in neighbours for f in (tcp, udp)]
    threads.append(threading.Thread(target=raw_syn_to_loopback, args=(tag, gateway, dev, ports)))
    for i, t in enumerate(threads):
        t.start()
        if i % 32 == 31:
            time.sleep(0.05)  # a little spread: the guest runs under emulation
    for t in threads:
        t.join()
    for target in routed:  # the next NIC's pass routes these its own way
        subprocess.run(["ip", "route", "del", f"{target}/32", "via", gateway, "dev", dev], capture_output=True)


def main(*, passes: list[dict], ports: list[int]) -> None:
    """Probe through each NIC in turn (`passes`: keyword arguments of probe, with a `tag`)."""
    global out
    out = open("/dev/ttyS0", "w", buffering=1)  # noqa: SIM115 - the serial console, for the whole run
    for p in passes:
        probe(p.pop("tag"), ports=ports, **p)
    say("REACH done")


# The test appends the call: main(passes=[...], ports=[...])
