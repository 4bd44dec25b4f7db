#!/usr/bin/env bash
# Builds the tiny guest images the integration tests boot, offline, from Debian
# packages, and caches them:
#
#   tiny_disk    qcow2 disk (64 MiB virtual, MBR + FAT16 + syslinux) for SeaBIOS
#   tiny_iso     bootable ISO 9660 (isolinux, El Torito, hybrid), volume id TINYBOOT
#   tiny_kernel  Debian's cloud kernel (vmlinuz), for network-boot tests
#   tiny_initrd  the busybox initramfs (gzip'd newc cpio) that all of them boot
#
# Prints one `name=path` line per image on stdout and nothing else there
# (progress goes to stderr). Run as root. Idempotent: the images live in
#   ${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
# named by a hash of the inputs (this script's content, the versions of the
# host tools that build them, the kernel and busybox packages they contain),
# so a second run rebuilds nothing and answers in milliseconds.
#
# The kernel (linux-image-*-cloud-amd64) and busybox-static packages are
# downloaded with `apt-get download` and unpacked, never installed. The first
# run pins the versions it downloaded (payload.lock in the cache dir, with
# the .deb files next to it), so later runs stay offline and reproducible;
# `--refresh` (or PORTAL_TEST_IMAGE_REFRESH=1) resolves the current archive
# versions again. The host tools (syslinux, isolinux, mtools, xorriso,
# qemu-utils) are installed with apt-get when missing.
#
# The guest's /init (PID 1) mounts proc/sys/dev, loads its modules, finds the
# NoCloud seed (ISO 9660 or FAT volume labelled `cidata`), prints its files to
# every console between marker lines, sets the hostname from meta-data, runs
# DHCP on its NICs (never waits more than a few seconds), prints
# `TINY-GUEST ready`, then hands over to busybox init: a root shell on ttyS0
# and on tty1 (VGA), acpid so the ACPI power button powers it off.
# Serial log lines it prints:
#   TINY-GUEST init kernel=<release>
#   TINY-GUEST cidata=<device>          or  TINY-GUEST no-cidata
#   ===CIDATA-BEGIN meta-data===  ...  ===CIDATA-END meta-data===   (and
#   user-data, network-config, vendor-data when present)
#   TINY-GUEST hostname=<name>
#   TINY-GUEST net <if>=<address/prefix>   or  TINY-GUEST net <if>=no-lease
#   TINY-GUEST ready
# Kernel command line options it reads: tiny.wait=SECONDS (how long to look
# for the seed, default 3), tiny.dhcp=0 (skip DHCP).
set -euo pipefail

CACHE_DIR=${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
# shellcheck source=scripts/image-cache.sh
source "$(dirname "$SELF")/image-cache.sh"
parse_cache_args "$@"

# Built into the images: downloaded and unpacked, never installed.
KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PACKAGE=busybox-static
# Needed on the host to build them.
HOST_PACKAGES=(syslinux syslinux-common isolinux mtools xorriso qemu-utils)

# Modules the guest loads (with their dependencies), in this order: the
# consumers (sr_mod, sd_mod) before the host drivers, so that disks and
# CD-ROMs exist by the time the host driver's modprobe returns.
GUEST_MODULES="cdrom sr_mod sd_mod isofs fat vfat nls_cp437 nls_iso8859-1 nls_utf8
ata_piix ata_generic virtio_pci virtio_blk virtio_scsi virtio_net virtio_console
virtio_balloon virtio-rng button evdev"
KERNEL_CMDLINE="console=tty0 console=ttyS0,115200"

log() { printf '[build-test-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$EUID" -eq 0 ] || die "must run as root (it installs packages with apt-get)"

LOCK_FILE=$CACHE_DIR/payload.lock
DEB_DIR=$CACHE_DIR/debs
QUICK_FILE=$CACHE_DIR/quick
IMAGE_PREFIX=tiny-
PAYLOAD_KEYS=(kernel_deb busybox_deb)
quick_answer

# --- host tools ------------------------------------------------------------
# shellcheck source=scripts/host-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/host-packages.sh"
ensure_host_packages

mkdir -p "$CACHE_DIR"

# --- fast path: nothing to do ----------------------------------------------
cached_answer

# --- slow path, one builder at a time ---------------------------------------
exec 9>"$CACHE_DIR/.build.lock"
flock 9
# Work dirs left by a build that was killed (none can be running: we hold the lock).
rm -rf "$CACHE_DIR"/.build-*

WORK=$(mktemp -d "$CACHE_DIR/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$REFRESH" = 1 ] || ! payload_ok; then
    log "resolving $KERNEL_META and $BUSYBOX_PACKAGE"
    meta=$(apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null || true)
    if [ -z "$meta" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        meta=$(apt-cache show --no-all-versions "$KERNEL_META")
    fi
    # Depends: linux-image-6.1.0-NN-cloud-amd64 (= 6.1.x-y)
    kernel_pkg=$(printf '%s\n' "$meta" | sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -n1)
    [ -n "$kernel_pkg" ] || die "cannot find the kernel package $KERNEL_META depends on"
    mkdir -p "$WORK/dl" "$DEB_DIR"
    log "downloading $kernel_pkg $BUSYBOX_PACKAGE"
    (cd "$WORK/dl" && apt_get download -q "$kernel_pkg" "$BUSYBOX_PACKAGE")
    lock=""
    for deb in "$WORK"/dl/*.deb; do
        pkg=$(dpkg-deb -f "$deb" Package)
        ver=$(dpkg-deb -f "$deb" Version)
        name="${pkg}_${ver//:/%3a}_$(dpkg-deb -f "$deb" Architecture).deb"
        mv -f "$deb" "$DEB_DIR/$name"
        case "$pkg" in
            linux-image-*) lock+="kernel_package=$pkg"$'\n'"kernel_version=$ver"$'\n'"kernel_deb=$name"$'\n' ;;
            "$BUSYBOX_PACKAGE") lock+="busybox_version=$ver"$'\n'"busybox_deb=$name"$'\n' ;;
        esac
    done
    printf '%s' "$lock" | sort >"$WORK/payload.lock"
    mv -f "$WORK/payload.lock" "$LOCK_FILE"
    payload_ok || die "download incomplete: $(tr '\n' ' ' <"$LOCK_FILE")"
fi

built_answer  # another run may have built them while we waited for the lock

log "building tiny images $KEY ($(lock_value kernel_package) $(lock_value kernel_version), busybox $(lock_value busybox_version))"
started=$SECONDS

# --- unpack the payload ----------------------------------------------------
dpkg-deb -x "$DEB_DIR/$(lock_value busybox_deb)" "$WORK/bb"
BB=$WORK/bb/bin/busybox
[ -x "$BB" ] || die "no busybox in $(lock_value busybox_deb)"
dpkg-deb -x "$DEB_DIR/$(lock_value kernel_deb)" "$WORK/k"
KVER=$(find "$WORK/k/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)
[ -f "$WORK/k/boot/vmlinuz-$KVER" ] || die "no vmlinuz-$KVER in $(lock_value kernel_deb)"
"$BB" depmod -b "$WORK/k" "$KVER"

# --- initramfs ---------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/udhcpc,etc/acpi/PWRF,proc,sys,dev,run,tmp,root,mnt/cidata,var/log,lib/modules/"$KVER"}
ln -s ../run "$R/var/run"
chmod 1777 "$R/tmp"
cp "$BB" "$R/bin/busybox"
"$BB" --list-full | while read -r applet; do
    case "$applet" in bin/busybox) continue ;; esac
    [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
# The kernel opens /dev/console before /init runs; /init copes if this fails.
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "mknod /dev/console failed (not fatal)"

# The modules and everything they depend on (modules.dep lists the closure).
MODDIR=$WORK/k/lib/modules/$KVER
for m in $GUEST_MODULES; do
    want=${m//-/_}
    line=$(awk -v want="$want" -F: '{ n = $1; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n); if (n == want) { print; exit } }' "$MODDIR/modules.dep")
    if [ -z "$line" ]; then
        grep -q "/${m}.ko\$\|/${want}.ko\$" "$MODDIR/modules.builtin" || log "module $m not in $KVER (skipped)"
        continue
    fi
    for f in ${line/:/ }; do
        mkdir -p "$R/lib/modules/$KVER/$(dirname "$f")"
        cp "$MODDIR/$f" "$R/lib/modules/$KVER/$f"
    done
done
cp "$MODDIR"/modules.builtin "$MODDIR"/modules.order "$R/lib/modules/$KVER/"
"$BB" depmod -b "$R" "$KVER"
# shellcheck disable=SC2086 # one module per line
printf '%s\n' $GUEST_MODULES >"$R/etc/modules"

cat >"$R/init" <<'EOF'
#!/bin/sh
# /init of the AnsiStack Portal tiny test guest (built by scripts/build-test-images.sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs -o mode=0755 devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname tiny
echo tiny >/etc/hostname
ip link set lo up 2>/dev/null

cmdline_value() {  # name default
    local w
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}

# Every active console: the serial port and the VGA screen (tty0).
consoles=""
for c in $(cat /sys/class/tty/console/active 2>/dev/null); do
    [ -c "/dev/$c" ] && consoles="$consoles /dev/$c"
done
[ -n "$consoles" ] || consoles=/dev/console

volume_id() {  # the ISO 9660 volume id of $1 (32 bytes at 32808), trailing blanks cut
    dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d '\000' | sed 's/ *$//'
}

find_cidata() {
    local d id
    for d in /dev/sr* /dev/vd* /dev/sd* /dev/hd*; do
        [ -b "$d" ] || continue
        id=$(volume_id "$d")
        case "$id" in cidata|CIDATA) echo "$d"; return 0 ;; esac
    done
    # A FAT (vfat) seed labelled cidata on a disk.
    findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null
}

print_file() {  # name path
    echo "===CIDATA-BEGIN $1==="
    cat "$2"
    [ -z "$(tail -c 1 "$2")" ] || echo
    echo "===CIDATA-END $1==="
}

main() {
    echo "TINY-GUEST init kernel=$(uname -r)"
    for m in $(cat /etc/modules); do
        modprobe -q "$m" 2>/dev/null
    done
    # Keep kernel chatter off the consoles from here on (warnings and worse only).
    echo 4 >/proc/sys/kernel/printk

    wait_s=$(cmdline_value tiny.wait 3)
    tries=$((wait_s * 5))
    dev=""
    while :; do
        dev=$(find_cidata) && [ -n "$dev" ] && break
        dev=""
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || break
        usleep 200000
    done

    if [ -n "$dev" ] && { mount -t iso9660 -o ro "$dev" /mnt/cidata 2>/dev/null ||
                          mount -t vfat -o ro "$dev" /mnt/cidata 2>/dev/null; }; then
        echo "TINY-GUEST cidata=$dev"
        for f in meta-data user-data network-config vendor-data; do
            [ -f "/mnt/cidata/$f" ] && print_file "$f" "/mnt/cidata/$f"
        done
        name=$(sed -n 's/^local-hostname:[[:space:]]*//p' /mnt/cidata/meta-data 2>/dev/null |
               head -n 1 | tr -d "\"'\r" | sed 's/[[:space:]]*$//')
        if [ -n "$name" ]; then
            hostname "$name"
            echo "$name" >/etc/hostname
        fi
    else
        echo "TINY-GUEST no-cidata"
    fi
    echo "TINY-GUEST hostname=$(hostname)"

    if [ "$(cmdline_value tiny.dhcp 1)" != 0 ]; then
        ifaces=""
        for n in /sys/class/net/*; do
            n=${n##*/}
            [ "$n" = lo ] || [ ! -e "/sys/class/net/$n/device" ] && continue
            ifaces="$ifaces $n"
            ip link set "$n" up
            udhcpc -i "$n" -n -q -t 3 -T 1 -s /etc/udhcpc/default.script >/dev/null 2>&1 &
        done
        wait
        for n in $ifaces; do
            if [ -s "/run/udhcpc.$n" ]; then
                echo "TINY-GUEST net $n=$(cat "/run/udhcpc.$n")"
            else
                echo "TINY-GUEST net $n=no-lease"
            fi
        done
    fi
    echo "TINY-GUEST ready"
}

main 2>&1 | tee $consoles >/dev/null

# Hand over to busybox init: shells on the serial port and the VGA console,
# acpid for the power button. The serial line only if a UART is there.
{
    if [ "$(cat /sys/class/tty/ttyS0/type 2>/dev/null || echo 0)" != 0 ]; then
        echo "ttyS0::respawn:/sbin/getty -n -i -L -l /bin/tinysh 115200 ttyS0 vt100"
    fi
    echo "tty1::respawn:/sbin/getty -n -i -l /bin/tinysh 0 tty1 linux"
    ls /dev/input/event* >/dev/null 2>&1 && echo "::respawn:/sbin/acpid -f -l /run/acpid.log"
    echo "::ctrlaltdel:/sbin/reboot"
    echo "::shutdown:/bin/sync"
} >/etc/inittab
exec /sbin/init
EOF
chmod 755 "$R/init"

cat >"$R/bin/tinysh" <<'EOF'
#!/bin/sh
# Login "program" for getty: an interactive root shell.
export HOME=/root TERM=${TERM:-linux} PS1='\h:\w# '
cd /root
exec /bin/sh
EOF

cat >"$R/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configures the lease on $interface.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip -4 addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        echo "$ip/${mask:-24}" >"/run/udhcpc.$interface"
        ;;
esac
exit 0
EOF

# busybox acpid runs /etc/acpi/PWRF/00000080 on the power button.
printf '#!/bin/sh\nexec /sbin/poweroff\n' >"$R/etc/acpi/PWRF/00000080"
chmod 755 "$R/bin/tinysh" "$R/etc/udhcpc/default.script" "$R/etc/acpi/PWRF/00000080"

printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$R/etc/group"
: >"$R/etc/fstab"

(cd "$R" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) | gzip -6n >"$WORK/initrd.img"
cp "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# --- bootable ISO ---------------------------------------------------------------
ISO=$WORK/iso
mkdir -p "$ISO/isolinux"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$ISO/isolinux/"
cp "$WORK/vmlinuz" "$WORK/initrd.img" "$ISO/"
cat >"$ISO/isolinux/isolinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT tiny
PROMPT 0
TIMEOUT 0
LABEL tiny
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img $KERNEL_CMDLINE
EOF
if ! xorriso -as mkisofs -quiet -o "$WORK/tiny.iso" -V TINYBOOT -J -R \
    -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table \
    -isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin "$ISO" >"$WORK/xorriso.log" 2>&1; then
    cat "$WORK/xorriso.log" >&2
    die "xorriso failed"
fi

# --- bootable disk: MBR (syslinux mbr.bin) + one FAT16 partition at 1 MiB ------
DISK_MB=64
part_start=2048
part_sectors=$(((DISK_MB - 1) * 2048))
truncate -s "$((DISK_MB - 1))M" "$WORK/part.img"
mformat -i "$WORK/part.img" -T "$part_sectors" -h 64 -s 32 -H "$part_start" -v TINYDISK -N 71a7d15c :: >&2
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT tiny
PROMPT 0
TIMEOUT 0
LABEL tiny
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img $KERNEL_CMDLINE
EOF
mcopy -i "$WORK/part.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/
syslinux --install "$WORK/part.img"

le32() {  # printf escapes of a little-endian 32-bit number
    printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255))
}
truncate -s "${DISK_MB}M" "$WORK/disk.img"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/disk.img" conv=notrunc status=none
# Partition 1: active, type 0x0e (FAT16, LBA), CHS fields saturated.
# shellcheck disable=SC2059
printf "\\x80\\xfe\\xff\\xff\\x0e\\xfe\\xff\\xff$(le32 $part_start)$(le32 "$part_sectors")" |
    dd of="$WORK/disk.img" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$WORK/disk.img" bs=1 seek=510 conv=notrunc status=none
dd if="$WORK/part.img" of="$WORK/disk.img" bs=1M seek=1 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$WORK/disk.img" "$WORK/tiny.qcow2"

# --- into the cache, manifest last ------------------------------------------
declare -A outputs=(
    [tiny_disk]="tiny.qcow2:tiny-$KEY.qcow2"
    [tiny_iso]="tiny.iso:tiny-$KEY.iso"
    [tiny_kernel]="vmlinuz:tiny-$KEY.vmlinuz"
    [tiny_initrd]="initrd.img:tiny-$KEY.initrd.img"
)
: >"$WORK/manifest"
for name in tiny_disk tiny_iso tiny_kernel tiny_initrd; do
    src=${outputs[$name]%%:*}
    dst=$CACHE_DIR/${outputs[$name]#*:}
    chmod 444 "$WORK/$src"
    mv -f "$WORK/$src" "$dst"
    printf '%s=%s\n' "$name" "$dst" >>"$WORK/manifest"
done
mv -f "$WORK/manifest" "$MANIFEST"
log "built in $((SECONDS - started)) s: $(du -ch "$CACHE_DIR"/tiny-"$KEY".* | tail -n1 | cut -f1)"
emit "$MANIFEST"
