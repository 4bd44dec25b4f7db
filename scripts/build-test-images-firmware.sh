#!/usr/bin/env bash
# Builds the UEFI test guest images the integration tests boot, offline, from
# Debian packages, and caches them:
#
#   tiny_uefi_disk  qcow2 (64 MiB virtual, GPT + FAT ESP) for x86_64 UEFI (OVMF,
#                   machine q35): EFI/BOOT/BOOTX64.EFI is a standalone GRUB
#                   (x86_64-efi, embedded grub.cfg, timeout=0) that boots the
#                   SAME kernel and initramfs as the tiny guest of
#                   scripts/build-test-images.sh (tiny_kernel, tiny_initrd),
#                   with console=ttyS0,115200 console=tty0: its serial log
#                   shows the tiny guest's lines, `TINY-GUEST ready` among them.
#   arm64_disk      qcow2 (64 MiB virtual, GPT + FAT ESP) for aarch64 UEFI (AAVMF,
#                   machine virt, emulated): EFI/BOOT/BOOTAA64.EFI is a
#                   standalone GRUB (arm64-efi) that boots Debian's arm64 cloud
#                   kernel with a busybox initramfs; console=ttyAMA0. Its /init
#                   prints to the serial console:
#                       TINY-ARM64 init kernel=<release>
#                       TINY-ARM64 arch=aarch64          (uname -m)
#                       TINY-ARM64 ready
#                   then runs a root shell on the console (and nothing else).
#
# Both GRUBs echo `TINY-GRUB ...` lines before loading the kernel.
#
# Prints one `name=path` line per image on stdout and nothing else there
# (progress goes to stderr). Run as root. Idempotent: the images live in
#   ${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
# named by a hash of the inputs (this script's content, the versions of the
# host packages below, the pinned arm64 packages, and the tiny kernel and
# initramfs paths, which carry the hash of their own inputs), so a second run
# rebuilds nothing and answers in milliseconds. It runs
# scripts/build-test-images.sh first (instant when that one is cached).
#
# Host packages, installed with apt-get (--no-install-recommends) when missing:
#   grub-efi-amd64-bin grub-common   grub-mkstandalone and the x86_64-efi modules
#   mtools fdisk cpio qemu-utils     FAT without loop mounts, GPT (sfdisk),
#                                    the arm64 initramfs, qcow2
#   ovmf qemu-efi-aarch64            the firmware that boots them (OVMF, AAVMF)
#   qemu-system-arm                  qemu-system-aarch64, to boot the arm64 image
# Built into the arm64 image, downloaded as arm64 .debs and unpacked, never
# installed:
#   linux-image-<abi>-cloud-arm64 (what linux-image-cloud-arm64 depends on),
#   busybox-static (arm64), grub-efi-arm64-bin (arm64: its arm64-efi modules;
#   Debian builds that package for arm64 only).
# The arm64 packages are fetched with apt-get against a private state dir
# (APT::Architecture=arm64, the host's Debian sources, lists deleted after
# use): the host's dpkg architectures and apt lists are left alone. The first
# run pins what it downloaded (firmware.lock in the cache dir, the .debs in
# debs-firmware/), so later runs stay offline; `--refresh` (or
# PORTAL_TEST_IMAGE_REFRESH=1) resolves the current archive versions again.
# `--prune` deletes images of other inputs and unpinned .debs (fw-* only).
set -euo pipefail

CACHE_DIR=${PORTAL_TEST_IMAGE_DIR:-/var/cache/ansistack-portal/test-images}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
TINY_SCRIPT=$(dirname "$SELF")/build-test-images.sh
# shellcheck source=scripts/image-cache.sh
source "$(dirname "$SELF")/image-cache.sh"
parse_cache_args "$@"

HOST_PACKAGES=(grub-efi-amd64-bin grub-common mtools fdisk cpio qemu-utils ovmf qemu-efi-aarch64 qemu-system-arm)
ARM64_KERNEL_META=linux-image-cloud-arm64
ARM64_PACKAGES=(busybox-static grub-efi-arm64-bin)

X86_CMDLINE="console=ttyS0,115200 console=tty0"
ARM64_CMDLINE="console=ttyAMA0"
DISK_MB=64               # virtual size of each disk; the ESP fills it
ESP_GUID=C12A7328-F81F-11D2-BA4B-00A0C93EC93B

log() { printf '[build-test-images-firmware] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$EUID" -eq 0 ] || die "must run as root (it installs packages with apt-get)"
[ -x "$TINY_SCRIPT" ] || [ -f "$TINY_SCRIPT" ] || die "missing $TINY_SCRIPT"

mkdir -p "$CACHE_DIR"
LOCK_FILE=$CACHE_DIR/firmware.lock
DEB_DIR=$CACHE_DIR/debs-firmware     # not debs/: build-test-images.sh --prune cleans that one
QUICK_FILE=$CACHE_DIR/fw-quick

# --- the tiny guest's kernel and initramfs ------------------------------------
tiny_args=()
[ "$REFRESH" = 1 ] && tiny_args+=(--refresh)
tiny_out=$(bash "$TINY_SCRIPT" "${tiny_args[@]}") || die "$TINY_SCRIPT failed"
TINY_KERNEL=$(printf '%s\n' "$tiny_out" | sed -n 's/^tiny_kernel=//p')
TINY_INITRD=$(printf '%s\n' "$tiny_out" | sed -n 's/^tiny_initrd=//p')
[ -s "$TINY_KERNEL" ] && [ -s "$TINY_INITRD" ] || die "no tiny_kernel/tiny_initrd from $TINY_SCRIPT"
TINY_ID="tiny_kernel=$TINY_KERNEL tiny_initrd=$TINY_INITRD"

# The tiny paths carry the hash of the tiny guest's own inputs.
EXTRA_INPUTS=$TINY_ID
IMAGE_PREFIX=fw-
PAYLOAD_KEYS=(kernel_deb busybox_deb grub_deb)
quick_answer

# --- host packages ------------------------------------------------------------
# shellcheck source=scripts/host-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/host-packages.sh"
ensure_host_packages

# --- fast path: nothing to do ---------------------------------------------------
cached_answer

# --- slow path, one builder at a time --------------------------------------------
exec 9>"$CACHE_DIR/.fw-build.lock"
flock 9
# Work dirs left by a build that was killed (none can be running: we hold the lock).
# (Not .build-*: build-test-images.sh removes those while it holds its own lock.)
rm -rf "$CACHE_DIR"/.fw-build-* "$CACHE_DIR"/.fw-apt-*

WORK=$(mktemp -d "$CACHE_DIR/.fw-build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# apt-get or apt-cache ($1) against a private state dir that knows only arm64 packages from the
# host's Debian sources (taken from `apt-cache policy`: origin Debian).
arm64_apt() {
    local A=$WORK/apt
    local opts=(-o "Dir::State=$A" -o "Dir::State::lists=$A/lists" -o "Dir::State::status=$A/status"
        -o "Dir::Cache=$A" -o "Dir::Cache::archives=$A/archives"
        -o "Dir::Etc::sourcelist=$A/sources.list" -o "Dir::Etc::sourceparts=$A/parts"
        -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Acquire::Languages=none
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    local tool=$1
    shift
    DEBIAN_FRONTEND=noninteractive "$tool" "${opts[@]}" "$@"
}

if [ "$REFRESH" = 1 ] || ! payload_ok; then
    A=$WORK/apt
    mkdir -p "$A/lists/partial" "$A/archives/partial" "$A/parts" "$WORK/dl" "$DEB_DIR"
    : >"$A/status"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    opt="arch=arm64"
    [ -s "$keyring" ] && opt+=" signed-by=$keyring"
    apt-cache policy | awk -v opt="$opt" '
        /^ *-?[0-9]+ [a-z+]+:\/\// {
            uri = $2; n = split($3, part, "/"); getline
            if ($0 ~ /[ ,]o=Debian(,|$)/ && n == 2) print "deb [" opt "] " uri " " part[1] " " part[2]
        }' | sort -u >"$A/sources.list"
    [ -s "$A/sources.list" ] || die "no Debian archive in 'apt-cache policy' (run apt-get update?)"
    log "fetching the arm64 package lists: $(awk '{print $(NF-1), $NF}' "$A/sources.list" | tr '\n' ' ')"
    arm64_apt apt-get update -qq >&2 || die "apt-get update (arm64) failed"
    kernel_pkg=$(arm64_apt apt-cache show --no-all-versions "$ARM64_KERNEL_META" 2>/dev/null |
        sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -n1) || true
    [ -n "$kernel_pkg" ] || die "cannot find the kernel package $ARM64_KERNEL_META depends on"
    log "downloading (arm64) $kernel_pkg ${ARM64_PACKAGES[*]}"
    (cd "$WORK/dl" && arm64_apt apt-get -q download "$kernel_pkg" "${ARM64_PACKAGES[@]}" >&2) || die "apt-get download (arm64) failed"
    lock=""
    for deb in "$WORK"/dl/*.deb; do
        pkg=$(dpkg-deb -f "$deb" Package)
        ver=$(dpkg-deb -f "$deb" Version)
        name="${pkg}_${ver//:/%3a}_$(dpkg-deb -f "$deb" Architecture).deb"
        mv -f "$deb" "$DEB_DIR/$name"
        case "$pkg" in
            linux-image-*) lock+="kernel_package=$pkg"$'\n'"kernel_version=$ver"$'\n'"kernel_deb=$name"$'\n' ;;
            busybox-static) lock+="busybox_version=$ver"$'\n'"busybox_deb=$name"$'\n' ;;
            grub-efi-arm64-bin) lock+="grub_version=$ver"$'\n'"grub_deb=$name"$'\n' ;;
        esac
    done
    rm -rf "$A"
    printf '%s' "$lock" | sort >"$WORK/firmware.lock"
    mv -f "$WORK/firmware.lock" "$LOCK_FILE"
    payload_ok || die "download incomplete: $(tr '\n' ' ' <"$LOCK_FILE")"
fi

built_answer  # another run may have built them while we waited for the lock

log "building UEFI images $KEY ($(lock_value kernel_package) $(lock_value kernel_version), busybox $(lock_value busybox_version), grub $(lock_value grub_version))"
started=$SECONDS

# --- GPT disk with one FAT ESP: make_disk OUT.qcow2 LABEL SERIAL SRC=DEST... --------
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
make_disk() {
    local out=$1 label=$2 serial=$3 spec src dest dir
    shift 3
    local part_start=2048 part_sectors=$(((DISK_MB - 2) * 2048))
    local part=$WORK/esp.img raw=$WORK/disk.img
    rm -f "$part" "$raw"
    truncate -s "$((DISK_MB - 2))M" "$part"
    mformat -i "$part" -T "$part_sectors" -h 64 -s 32 -H "$part_start" -v "$label" -N "$serial" :: >&2
    for spec in "$@"; do
        src=${spec%%=*} dest=${spec#*=}
        dir=${dest%/*}
        # mmd every missing parent directory
        local d="" c
        for c in ${dir//\// }; do
            d+="/$c"
            mdir -i "$part" "::$d" >/dev/null 2>&1 || mmd -i "$part" "::$d"
        done
        mcopy -i "$part" "$src" "::$dest"
    done
    truncate -s "${DISK_MB}M" "$raw"
    # Fixed identifiers so that a rebuild from the same inputs gives the same disk.
    sfdisk --quiet --no-reread --no-tell-kernel "$raw" >&2 <<EOF
label: gpt
label-id: 7E57D15C-0000-4000-8000-${serial}0000
unit: sectors
first-lba: 2048
start=$part_start, size=$part_sectors, type=$ESP_GUID, uuid=7E57D15C-0001-4000-8000-${serial}0000, name="EFI system partition"
EOF
    dd if="$part" of="$raw" bs=1M seek=1 conv=notrunc status=none
    qemu-img convert -c -f raw -O qcow2 "$raw" "$out"
    rm -f "$part" "$raw"
}

GRUB_MODULES="part_gpt part_msdos fat search search_fs_file search_label serial terminal linux echo test normal gzio"

# --- x86_64: standalone GRUB + the tiny kernel and initramfs ---------------------
cat >"$WORK/grub-x86.cfg" <<EOF
# Embedded in BOOTX64.EFI by build-test-images-firmware.sh
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
set timeout=0
set timeout_style=hidden
set default=0
search --no-floppy --set=root --file /tiny/vmlinuz
echo "TINY-GRUB x86_64-efi root=\$root"
menuentry 'tiny' {
    echo 'TINY-GRUB loading /tiny/vmlinuz'
    linux /tiny/vmlinuz $X86_CMDLINE
    initrd /tiny/initrd.img
}
EOF
# shellcheck disable=SC2086 # module lists
# efi_gop: with a video device, the kernel gets GOP's framebuffer (efifb), so
# console=tty0 shows on the guest's screen too ("no suitable video mode" without one).
grub-mkstandalone -O x86_64-efi -d /usr/lib/grub/x86_64-efi -o "$WORK/BOOTX64.EFI" \
    --modules="$GRUB_MODULES efi_gop" --install-modules="$GRUB_MODULES efi_gop" \
    --locales= --fonts= --themes= \
    "boot/grub/grub.cfg=$WORK/grub-x86.cfg" >&2
make_disk "$WORK/uefi.qcow2" TINYUEFI 5eed0e86 \
    "$WORK/BOOTX64.EFI=EFI/BOOT/BOOTX64.EFI" \
    "$TINY_KERNEL=tiny/vmlinuz" "$TINY_INITRD=tiny/initrd.img"

# --- aarch64: standalone GRUB + Debian's arm64 kernel + busybox initramfs ---------
dpkg-deb -x "$DEB_DIR/$(lock_value grub_deb)" "$WORK/grub-arm64"
GRUB_ARM64=$WORK/grub-arm64/usr/lib/grub/arm64-efi
[ -f "$GRUB_ARM64/kernel.img" ] || die "no arm64-efi GRUB in $(lock_value grub_deb)"
dpkg-deb -x "$DEB_DIR/$(lock_value kernel_deb)" "$WORK/k"
ARM_KERNEL=$(find "$WORK/k/boot" -name 'vmlinuz-*' | head -n1)
[ -s "$ARM_KERNEL" ] || die "no vmlinuz in $(lock_value kernel_deb)"
dpkg-deb -x "$DEB_DIR/$(lock_value busybox_deb)" "$WORK/bb"
[ -f "$WORK/bb/bin/busybox" ] || die "no busybox in $(lock_value busybox_deb)"

R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root}
chmod 1777 "$R/tmp"
cp "$WORK/bb/bin/busybox" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"    # the host cannot run it to list its applets: /init installs them
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "mknod /dev/console failed (not fatal)"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$R/etc/group"
cat >"$R/init" <<'EOF'
#!/bin/sh
# /init of the AnsiStack Portal tiny arm64 test guest (build-test-images-firmware.sh).
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t devtmpfs -o mode=0755 devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname tiny-arm64
echo "TINY-ARM64 init kernel=$(uname -r)"
echo "TINY-ARM64 arch=$(uname -m)"
echo 4 >/proc/sys/kernel/printk
echo "TINY-ARM64 ready"
cd /root
while :; do
    setsid cttyhack /bin/sh -l
    sleep 1
done
EOF
chmod 755 "$R/init"
printf "export PS1='\\\\h:\\\\w# '\n" >"$R/etc/profile"
(cd "$R" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -6n >"$WORK/initrd-arm64.img"

cat >"$WORK/grub-arm64.cfg" <<EOF
# Embedded in BOOTAA64.EFI by build-test-images-firmware.sh
# (AAVMF's console is the PL011 serial port: GRUB's console terminal writes there.)
set timeout=0
set timeout_style=hidden
set default=0
search --no-floppy --set=root --file /tiny/Image
echo "TINY-GRUB arm64-efi root=\$root"
menuentry 'tiny-arm64' {
    echo 'TINY-GRUB loading /tiny/Image'
    linux /tiny/Image $ARM64_CMDLINE
    initrd /tiny/initrd.img
}
EOF
# shellcheck disable=SC2086 # module lists
grub-mkstandalone -O arm64-efi -d "$GRUB_ARM64" -o "$WORK/BOOTAA64.EFI" \
    --modules="${GRUB_MODULES/ serial/}" --install-modules="${GRUB_MODULES/ serial/}" \
    --locales= --fonts= --themes= \
    "boot/grub/grub.cfg=$WORK/grub-arm64.cfg" >&2
make_disk "$WORK/arm64.qcow2" TINYARM64 5eeda064 \
    "$WORK/BOOTAA64.EFI=EFI/BOOT/BOOTAA64.EFI" \
    "$ARM_KERNEL=tiny/Image" "$WORK/initrd-arm64.img=tiny/initrd.img"

# --- into the cache, manifest last ------------------------------------------------
: >"$WORK/manifest"
for pair in tiny_uefi_disk:uefi arm64_disk:arm64; do
    name=${pair%%:*} src=$WORK/${pair#*:}.qcow2
    dst=$CACHE_DIR/fw-$KEY.${pair#*:}.qcow2
    chmod 444 "$src"
    mv -f "$src" "$dst"
    printf '%s=%s\n' "$name" "$dst" >>"$WORK/manifest"
done
mv -f "$WORK/manifest" "$MANIFEST"
log "built in $((SECONDS - started)) s: $(du -ch "$CACHE_DIR"/fw-"$KEY".*.qcow2 | tail -n1 | cut -f1)"
emit "$MANIFEST"
