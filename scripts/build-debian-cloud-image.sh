#!/usr/bin/env bash
# Builds a small Debian 12 (bookworm, amd64) cloud image with real cloud-init,
# for the portal's "real cloud-init" integration test, and caches it:
#
#   debian12_cloud   qcow2, 2 GiB virtual, MBR disk for SeaBIOS:
#                      vda1  128 MiB FAT16, syslinux, the kernel and initrd
#                      vda2  ext4 root (label debian-root), last, so that
#                            cloud-init's growpart can grow it
#
# Prints exactly one line, `debian12_cloud=<path>`, on stdout (progress goes
# to stderr). Run as root. Idempotent: the image lives in
#   ${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
# as debian12-cloud-<hash>.qcow2, keyed by a hash of this script's content, so
# a second run rebuilds nothing and answers in milliseconds. Older images are
# never deleted here (qcow2 overlays may still use them as backing files).
#
# How, without loop mounts: debootstrap (minbase) from the host's Debian
# mirror, then cloud-init, systemd, the cloud kernel and friends installed with
# apt-get in the chroot (`--include=cloud-init` fails on a virtual
# dependency); the root filesystem is made with `mkfs.ext4 -d <dir>` and the
# boot partition with mtools + `syslinux --install` on image files, then both
# are copied into a raw disk that has syslinux's mbr.bin and an sfdisk
# partition table, and converted to compressed qcow2.
#
# The guest: systemd, dbus (so the ACPI power button powers it off), udev,
# cloud-init with `datasource_list: [ NoCloud, None ]`, netplan.io rendering to
# systemd-networkd + systemd-resolved (as Debian's own bookworm cloud images),
# openssh-server without host keys (cloud-init generates them on first boot),
# sudo, cloud-guest-utils (growpart), qemu-guest-agent (started by its udev
# rule when the virtio port org.qemu.guest_agent.0 appears, which the portal's
# domains have: quiesced snapshots, addresses), linux-image-cloud-amd64 (virtio, no
# AHCI: use machine type `pc`, IDE CD-ROMs, virtio disks and NICs). Kernel
# command line: root=UUID=... console=tty0 console=ttyS0,115200 (serial last,
# so cloud-init's output lands on the serial port). Empty /etc/machine-id, a
# locked root account, no documentation or man pages, no apt lists, the apt
# timers disabled (a test guest must not fetch anything by itself).
# Kernel upgrades inside the guest are not booted: syslinux reads the kernel
# and initrd from vda1, which the guest does not mount.
set -euo pipefail

CACHE_DIR=${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
KEY=$(sha256sum "$SELF" | cut -c1-16)
IMAGE=$CACHE_DIR/debian12-cloud-$KEY.qcow2

# --- fast path: already built ------------------------------------------------
if [ -s "$IMAGE" ]; then
    printf 'debian12_cloud=%s\n' "$IMAGE"
    exit 0
fi

# From here on stdout is stderr; the one result line goes to fd 3.
exec 3>&1 1>&2

log() { printf '[build-debian-cloud-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$EUID" -eq 0 ] || die "must run as root (debootstrap, chroot, apt-get)"

SUITE=bookworm
ARCH=amd64
DISK_MIB=2048            # virtual size
BOOT_START=2048          # sectors: vda1 at 1 MiB
BOOT_MIB=128
ROOT_LABEL=debian-root
KERNEL_CMDLINE="console=tty0 console=ttyS0,115200"
HOST_PACKAGES=(debootstrap debian-archive-keyring fdisk e2fsprogs mtools syslinux syslinux-common qemu-utils)
GUEST_PACKAGES=(
    systemd systemd-sysv udev dbus libpam-systemd
    linux-image-cloud-amd64 initramfs-tools zstd
    cloud-init cloud-guest-utils fdisk e2fsprogs
    netplan.io systemd-resolved iproute2 iputils-ping ca-certificates
    openssh-server sudo less qemu-guest-agent
)

started=$SECONDS

# --- host tools ---------------------------------------------------------------
apt_get() {  # apt-get, with the package lists refreshed once if that fails
    local opts=(-o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
    if ! DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" "$@"; then
        log "apt-get $1 failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" "$@"
    fi
}
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing on the host: ${missing[*]}"
    apt_get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- the host's Debian mirror -------------------------------------------------
host_sources() {  # "URI SUITE" for every deb source of the host's Debian config
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -r "$f" ]; then
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            types = ""; uris = ""; suites = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                line = $i
                if (line ~ /^[ \t]*#/) continue
                if (match(line, /^[A-Za-z-]+:/)) {
                    key = tolower(substr(line, 1, RLENGTH - 1))
                    val = substr(line, RLENGTH + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
            }
            if (types !~ /(^|[ \t])deb([ \t]|$)/ || enabled == "no") next
            n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
            for (a = 1; a <= n; a++) for (b = 1; b <= m; b++) print u[a], s[b]
        }' "$f"
    fi
    if [ -r /etc/apt/sources.list ]; then
        sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\)[[:space:]]\+\([^[:space:]]\+\).*/\2 \3/p' \
            /etc/apt/sources.list
    fi
}
sources=$(host_sources | sed 's#/*  *# #' || true)
MIRROR=$(awk -v s="$SUITE" '$2 == s { print $1; exit }' <<<"$sources")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
UPDATES=no
grep -qxF "$MIRROR $SUITE-updates" <<<"$sources" && UPDATES=yes
SECURITY=$(awk -v s="$SUITE-security" '$2 == s { print $1; exit }' <<<"$sources")
SECURITY=${SECURITY%/}
log "mirror $MIRROR (updates: $UPDATES, security: ${SECURITY:-none})"

# --- one builder at a time ------------------------------------------------------
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.debian12-cloud.lock"
flock 9
if [ -s "$IMAGE" ]; then  # another run built it while we waited for the lock
    printf 'debian12_cloud=%s\n' "$IMAGE" >&3
    exit 0
fi

unmount_under() {  # unmount everything mounted at or below $1, deepest first
    local m
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" || log "cannot unmount $m"
        done
}
chrooted_pids() {  # the processes whose root is $1
    local p
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ]; then echo "${p#/proc/}"; fi
    done
}
kill_chrooted() {  # end the processes started in the chroot $1 (by pid): TERM, then KILL
    local pids
    pids=$(chrooted_pids "$1")
    [ -n "$pids" ] || return 0
    log "stopping the processes left in the chroot: $(tr '\n' ' ' <<<"$pids")"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(chrooted_pids "$1")
        [ -n "$pids" ] || return 0
        sleep 0.5
    done
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.5
}
remove_work() {  # $1 = a work dir of this script
    [ -d "$1" ] || return 0
    kill_chrooted "$1/root"
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}
# Work dirs of builds that were killed (none can be running: we hold the lock).
for d in "$CACHE_DIR"/.debian12-cloud-build-*; do
    if [ -d "$d" ]; then
        log "removing the leftovers of an interrupted build: $d"
        remove_work "$d"
    fi
done
rm -f "$CACHE_DIR"/debian12-cloud-*.qcow2.part

WORK=$(mktemp -d "$CACHE_DIR/.debian12-cloud-build-XXXXXX")
trap 'remove_work "$WORK"; rm -f "$IMAGE.part"' EXIT
trap 'exit 130' INT TERM HUP  # run the EXIT trap on these too
R=$WORK/root

# --- stage 1: debootstrap -----------------------------------------------------------
log "debootstrap $SUITE ($ARCH, minbase) into $R"
debootstrap --arch="$ARCH" --variant=minbase --components=main \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
log "debootstrap done at $((SECONDS - started)) s"
unmount_under "$R"  # debootstrap leaves nothing mounted, but be sure

# --- stage 2: packages in the chroot --------------------------------------------------
{
    echo "deb $MIRROR $SUITE main"
    if [ "$UPDATES" = yes ]; then echo "deb $MIRROR $SUITE-updates main"; fi
    if [ -n "$SECURITY" ]; then echo "deb $SECURITY $SUITE-security main"; fi
} >"$R/etc/apt/sources.list"

# Only while building: no daemons started in the chroot, the host's resolver,
# and the host's view of Release file dates (a snapshot mirror may be "expired").
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
rm -f "$R/etc/resolv.conf"
cp -L /etc/resolv.conf "$R/etc/resolv.conf"
cat >"$R/etc/apt/apt.conf.d/99zz-portal-build" <<'EOF'
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Dpkg::Use-Pty "0";
Dpkg::Options { "--force-confdef"; "--force-confold"; };
EOF

# Kept in the image: no docs, man pages or translations (small image).
cat >"$R/etc/dpkg/dpkg.cfg.d/01-portal-nodoc" <<'EOF'
# Test image: no documentation (copyright files are kept).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF

# The initramfs: every block driver (MODULES=most), and virtio for sure.
mkdir -p "$R/etc/initramfs-tools/conf.d"
printf 'MODULES=most\n' >"$R/etc/initramfs-tools/conf.d/portal-modules"
cat >"$R/etc/initramfs-tools/modules" <<'EOF'
# Added by build-debian-cloud-image.sh: the portal's guests boot from virtio.
virtio_pci
virtio_blk
virtio_scsi
virtio_net
ext4
EOF

in_root() {
    chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true "$@"
}
mount -t proc proc "$R/proc"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t tmpfs -o mode=755 tmpfs "$R/run"

log "apt-get install in the chroot: ${GUEST_PACKAGES[*]}"
in_root apt-get update -qq
in_root apt-get install -y -qq "${GUEST_PACKAGES[@]}" >"$WORK/apt.log" 2>&1 ||
    { tail -n 40 "$WORK/apt.log" >&2; die "apt-get install in the chroot failed (log above)"; }
in_root apt-get clean
log "packages installed at $((SECONDS - started)) s"

KVER=$(in_root linux-version list | sort -V | tail -n 1)
[ -n "$KVER" ] && [ -f "$R/boot/vmlinuz-$KVER" ] || die "no kernel installed in the chroot"
[ -f "$R/boot/initrd.img-$KVER" ] || in_root update-initramfs -c -k "$KVER"
in_root lsinitramfs "/boot/initrd.img-$KVER" >"$WORK/initrd.list"
grep -q '/virtio_blk\.ko' "$WORK/initrd.list" ||
    grep -qw virtio_blk "$R/lib/modules/$KVER/modules.builtin" ||
    die "the initramfs has no virtio_blk"
# Nothing to enable for the guest agent (its unit's [Install] is empty): udev starts it when the port shows up.
grep -qs 'org.qemu.guest_agent.0' "$R"/lib/udev/rules.d/*qemu-guest-agent*.rules \
    "$R"/usr/lib/udev/rules.d/*qemu-guest-agent*.rules ||
    die "qemu-guest-agent has no udev rule for org.qemu.guest_agent.0"

# --- stage 3: configure --------------------------------------------------------
ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)

cat >"$R/etc/fstab" <<EOF
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$ROOT_UUID  /  ext4  rw,discard,errors=remount-ro  0  1
EOF
echo debian >"$R/etc/hostname"
cat >"$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF

cat >"$R/etc/cloud/cloud.cfg.d/99-portal-nocloud.cfg" <<'EOF'
# The portal hands guests a NoCloud seed (an ISO labelled cidata): look for
# nothing else, so that boot never waits for a metadata server.
datasource_list: [ NoCloud, None ]
# The image's locale, so cloud-init runs no locale-gen (Debian's locale-gen
# ignores the locale it is asked for, and cloud-init's default en_US.UTF-8 fails).
locale: C.UTF-8
# No DSA host key: sshd does not use one, and generating it costs boot time.
ssh_genkeytypes: [rsa, ecdsa, ed25519]
# The hostname resolves (127.0.1.1 in /etc/hosts), so sudo does not complain.
manage_etc_hosts: localhost
EOF
printf 'LANG=C.UTF-8\n' >"$R/etc/default/locale"

# Networking as in Debian's bookworm cloud images: cloud-init writes netplan,
# netplan renders systemd-networkd, systemd-resolved serves DNS.
in_root systemctl enable systemd-networkd.service systemd-resolved.service
# A test guest must not fetch anything by itself.
in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true
in_root systemctl mask apt-daily.service apt-daily-upgrade.service

# No password for root (locked), no baked-in ssh host keys, a machine-id
# generated on each first boot.
in_root usermod -p '*' root
rm -f "$R"/etc/ssh/ssh_host_*
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$R/var/lib/dbus/machine-id"

# --- stage 4: clean up --------------------------------------------------------------
kill_chrooted "$R"
unmount_under "$R"
rm -f "$R/usr/sbin/policy-rc.d" "$R/etc/apt/apt.conf.d/99zz-portal-build"
rm -f "$R/etc/resolv.conf"
ln -s ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
find "$R/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$R/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$R/usr/share/man" "$R/usr/share/info" "$R/usr/share/lintian" -mindepth 1 -delete 2>/dev/null || true
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find "$R/var/lib/apt/lists" -mindepth 1 -maxdepth 1 -type f -delete
rm -rf "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb
rm -f "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
rm -rf "$R"/var/lib/cloud/* "$R"/tmp/* "$R"/var/tmp/* "$R/root/.bash_history"
find "$R/var/log" -type f -delete
[ -z "$(ls -A "$R/run")" ] || rm -rf "${R:?}"/run/*
[ -z "$(ls -A "$R/proc")$(ls -A "$R/sys")" ] || die "proc or sys still populated in the chroot"
log "root filesystem: $(du -sh --one-file-system "$R" | cut -f1)"

# --- stage 5: the disk -------------------------------------------------------------
BOOT_SECTORS=$((BOOT_MIB * 2048))
ROOT_START=$((BOOT_START + BOOT_SECTORS))
ROOT_SECTORS=$((DISK_MIB * 2048 - ROOT_START))

log "ext4 root ($((ROOT_SECTORS / 2048)) MiB, UUID $ROOT_UUID)"
truncate -s $((ROOT_SECTORS * 512)) "$WORK/root.img"
mkfs.ext4 -q -F -L "$ROOT_LABEL" -U "$ROOT_UUID" -d "$R" "$WORK/root.img"
e2fsck -fn "$WORK/root.img" >"$WORK/e2fsck.log" 2>&1 ||
    { cat "$WORK/e2fsck.log" >&2; die "the root filesystem does not check clean"; }

log "FAT boot partition ($BOOT_MIB MiB) with syslinux"
truncate -s $((BOOT_SECTORS * 512)) "$WORK/boot.img"
mformat -i "$WORK/boot.img" -T "$BOOT_SECTORS" -h 64 -s 32 -H "$BOOT_START" -v DEBIANBOOT ::
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img root=UUID=$ROOT_UUID ro $KERNEL_CMDLINE
EOF
cp "$R/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$WORK/initrd.img"
mcopy -i "$WORK/boot.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/
syslinux --install "$WORK/boot.img"

log "partitioned disk ($DISK_MIB MiB)"
truncate -s "${DISK_MIB}M" "$WORK/disk.img"
sfdisk -q --no-reread --no-tell-kernel "$WORK/disk.img" <<EOF
label: dos
unit: sectors

start=$BOOT_START, size=$BOOT_SECTORS, type=e, bootable
start=$ROOT_START, size=$ROOT_SECTORS, type=83
EOF
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/disk.img" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/boot.img" of="$WORK/disk.img" bs=512 seek="$BOOT_START" conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$WORK/disk.img" bs=1M seek=$((ROOT_START / 2048)) conv=notrunc,sparse status=none

log "qcow2 (compressed)"
qemu-img convert -f raw -O qcow2 -c -W "$WORK/disk.img" "$IMAGE.part"
chmod 444 "$IMAGE.part"
mv -f "$IMAGE.part" "$IMAGE"
log "built in $((SECONDS - started)) s: $(du -h "$IMAGE" | cut -f1) ($KVER)"
printf 'debian12_cloud=%s\n' "$IMAGE" >&3
