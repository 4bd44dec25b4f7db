# Sourced by the test image builders: install the Debian packages in HOST_PACKAGES when missing,
# and set `versions` to "pkg=version" lines (part of each builder's cache key).
# Needs the caller's log() and die().

apt_get() {  # apt-get with the package lists refreshed once if they are missing or stale
    local opts=(-o APT::Sandbox::User=root -o Dpkg::Use-Pty=0)
    if ! DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" "$@" >&2; then
        log "apt-get $1 failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" "$@" >&2
    fi
}

host_versions() {  # "pkg=version" per installed package, in HOST_PACKAGES order
    local status pkg ver
    declare -A seen=()
    while IFS='|' read -r status pkg ver; do
        [ "${status:0:2}" = ii ] && seen[$pkg]=$ver
    done < <(dpkg-query -W -f='${db:Status-Abbrev}|${Package}|${Version}\n' "${HOST_PACKAGES[@]}" 2>/dev/null || true)
    for pkg in "${HOST_PACKAGES[@]}"; do
        [ -n "${seen[$pkg]:-}" ] || return 1
        printf '%s=%s\n' "$pkg" "${seen[$pkg]}"
    done
}

ensure_host_packages() {
    if ! versions=$(host_versions); then
        local missing=() p
        for p in "${HOST_PACKAGES[@]}"; do
            dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
        done
        log "installing: ${missing[*]}"
        apt_get install -y -qq --no-install-recommends "${missing[@]}"
        versions=$(host_versions) || die "packages still missing after apt-get install: ${missing[*]}"
    fi
}
