#!/usr/bin/env bash
# Installs and starts what the portal needs on the host: the Debian packages,
# libvirtd with QEMU (started by hand where systemd is not PID 1), and the
# `default` storage pool. Idempotent: a second run installs nothing and never
# starts a second daemon.
#
#   scripts/setup-host.sh           packages for `make run`
#   scripts/setup-host.sh --test    also what the test suite needs (Chromium, ...)
set -euo pipefail

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

say() { printf '[setup-host] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host.sh must run as root (it installs packages and starts libvirtd)" >&2
    exit 1
fi

have_systemd=0
[ -d /run/systemd/system ] && have_systemd=1

packages=(
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    libvirt-dev pkg-config gcc python3-dev
    qemu-system-x86 qemu-utils seabios ipxe-qemu ipmitool
    ovmf qemu-system-arm qemu-efi-aarch64
    python3-venv ca-certificates openssh-client
)
command -v npm >/dev/null || packages+=(nodejs npm)
# Without systemd, libvirt-daemon-system would pull systemd in and replace init.
[ "$have_systemd" = 1 ] && packages+=(libvirt-daemon-system)
if [ "$want_test" = 1 ]; then
    # Browser tests; private libvirtd networks (DHCP/TFTP) inside network namespaces for the PXE and NIC
    # tests, and ping to reach their guests.
    packages+=(chromium fonts-dejavu-core dnsmasq-base iptables iproute2 iputils-ping)
fi

installed_now=0
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    installed_now=1
else
    say "Debian packages already installed"
fi

# The test suite's second run (scripts/engines.sh) uses PostgreSQL and Redis on private ports. Installed
# without starting the distribution's own instances: no cluster made on install, no init script run.
if [ "$want_test" = 1 ]; then
    engines=()
    for p in postgresql redis-server; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || engines+=("$p")
    done
    if [ ${#engines[@]} -gt 0 ]; then
        say "installing (not started): ${engines[*]}"
        mkdir -p /etc/postgresql-common
        [ -e /etc/postgresql-common/createcluster.conf ] || echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf
        made_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        [ "$installed_now" = 1 ] || apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${engines[@]}" >/dev/null
        [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
    fi
fi

# libvirt looks these up before reading qemu.conf, even when QEMU runs as root.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
getent group libvirt >/dev/null || groupadd --system libvirt
mkdir -p /var/log/libvirt /var/lib/libvirt/images /run/libvirt

# One line per setting, replaced or appended, so the script can run again.
set_conf() {  # file key value
    local file=$1 key=$2 value=$3
    touch "$file"
    if grep -qE "^[#[:space:]]*${key}[[:space:]]*=" "$file"; then
        sed -i -E "s|^[#[:space:]]*${key}[[:space:]]*=.*|${key} = ${value}|" "$file"
    else
        printf '%s = %s\n' "$key" "$value" >>"$file"
    fi
}

if [ "$have_systemd" = 0 ]; then
    set_conf /etc/libvirt/qemu.conf user '"root"'
    set_conf /etc/libvirt/qemu.conf group '"root"'
    # Keep QEMU in the caller's cgroup: no systemd to hand out machine slices.
    set_conf /etc/libvirt/qemu.conf cgroup_controllers '[ ]'
    # No polkit here: local root-owned sockets are the access control.
    set_conf /etc/libvirt/libvirtd.conf auth_unix_ro '"none"'
    set_conf /etc/libvirt/libvirtd.conf auth_unix_rw '"none"'
fi

running() {  # pidfile
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if [ "$have_systemd" = 1 ]; then
    systemctl enable --now libvirtd.service >/dev/null
else
    if running /run/virtlogd.pid; then
        say "virtlogd already running (pid $(cat /run/virtlogd.pid))"
    else
        say "starting virtlogd"
        virtlogd -d
    fi
    if running /run/libvirtd.pid && [ "$installed_now" = 1 ]; then
        # New emulators or firmware appear in libvirt's capabilities only after a restart;
        # running guests keep running (QEMU outlives libvirtd).
        pid=$(cat /run/libvirtd.pid)
        say "restarting libvirtd (pid $pid) to pick up newly installed packages"
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    if running /run/libvirtd.pid; then
        say "libvirtd already running (pid $(cat /run/libvirtd.pid))"
    else
        say "starting libvirtd"
        libvirtd -d
    fi
fi

# The first call after a cold start blocks several seconds while libvirt probes QEMU.
for _ in $(seq 1 60); do
    virsh -c qemu:///system uri >/dev/null 2>&1 && break
    sleep 0.5
done
virsh -c qemu:///system uri >/dev/null || { echo "libvirtd did not answer on qemu:///system" >&2; exit 1; }

if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    say "defining storage pool 'default' at /var/lib/libvirt/images"
    virsh -c qemu:///system pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh -c qemu:///system pool-autostart default >/dev/null
fi
# Read the whole output first: grep -q exiting early would fail the pipeline under pipefail.
pool_state=$(virsh -c qemu:///system pool-info default)
if ! grep -qE '^State:\s+running' <<<"$pool_state"; then
    virsh -c qemu:///system pool-start default >/dev/null
fi
# The portal's network guards (libvirt nwfilter rules) match guests' traffic by bridge port, which
# iptables sees only with bridge netfilter on: without it a guest on a portal network would be unguarded.
modprobe br_netfilter 2>/dev/null || true  # built into some kernels; a module on Debian's
for knob in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
    if [ -w "/proc/sys/net/bridge/$knob" ]; then
        echo 1 >"/proc/sys/net/bridge/$knob"
    else
        echo "net.bridge.$knob is not available: the portal's network guards need bridge netfilter" >&2
        exit 1
    fi
done
# A unicast packet inside a broadcast or multicast frame is dropped, not taken: the host guard of a
# published bridge filters frames by MAC, and a packet for the hypervisor must not slip in under a group MAC.
for knob in /proc/sys/net/ipv4/conf/all/drop_unicast_in_l2_multicast \
    /proc/sys/net/ipv6/conf/{all,default}/drop_unicast_in_l2_multicast; do
    if [ -w "$knob" ]; then echo 1 >"$knob"; fi
done
say "libvirtd ready on qemu:///system"
