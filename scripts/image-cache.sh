# Sourced by the test image builders (build-test-images.sh, build-test-images-firmware.sh): their
# command line, the cache of built images and how they answer from it.
#
# The caller sets CACHE_DIR, SELF (its own path), LOCK_FILE (the pinned .debs), DEB_DIR, QUICK_FILE,
# IMAGE_PREFIX (its images are $CACHE_DIR/$IMAGE_PREFIX<key>.*), PAYLOAD_KEYS (the lock's keys of its
# .debs), optionally EXTRA_INPUTS (more of its inputs, one string), and `versions` (from
# host-packages.sh) before key_of; and defines log() and die().

parse_cache_args() {  # "$@" -> REFRESH, PRUNE
    REFRESH=${PORTAL_TEST_IMAGE_REFRESH:-0}
    PRUNE=0
    local arg
    for arg in "$@"; do
        case "$arg" in
            --refresh) REFRESH=1 ;;
            --prune) PRUNE=1 ;;
            *) echo "usage: $0 [--refresh] [--prune]" >&2; exit 2 ;;
        esac
    done
}

# The identity (path, size, mtime) of the builder, of dpkg's status file and of the lock file, and the
# extra inputs: while none of them changes, the last answer holds.
quick_signature() {
    printf '%s' "${EXTRA_INPUTS:+$EXTRA_INPUTS }"
    stat -c '%n %s %.9Y' "$SELF" /var/lib/dpkg/status "$LOCK_FILE" 2>/dev/null | tr '\n' ' '
}

# Quickest path, one `stat` and no hashing: print the last run's answer and exit, if it still holds.
# Any change falls through to the hash of every input (key_of), which decides.
quick_answer() {
    [ "$REFRESH" != 1 ] && [ "$PRUNE" != 1 ] && [ -s "$QUICK_FILE" ] || return 0
    local recorded="" line lines=()
    {
        IFS= read -r recorded || true
        while IFS= read -r line; do
            [ -s "${line#*=}" ] || { lines=(); break; }
            lines+=("$line")
        done
    } <"$QUICK_FILE"
    if [ ${#lines[@]} -gt 0 ] && [ "$recorded" = "$(quick_signature)" ]; then
        printf '%s\n' "${lines[@]}"
        exit 0
    fi
}

emit() {  # $1 = manifest: print it, and record it for the quickest path
    cat "$1"
    { quick_signature; echo; cat "$1"; } >"$QUICK_FILE.$$" && mv -f "$QUICK_FILE.$$" "$QUICK_FILE"
    [ "$PRUNE" = 1 ] || return 0
    # --prune: delete the images of other inputs and the .debs no longer pinned.
    # (Not done by default: qcow2 overlays may still use an older base image.)
    local f name=${1##*/}
    for f in "$CACHE_DIR/$IMAGE_PREFIX"*; do
        [ -e "$f" ] && [ "$f" != "$QUICK_FILE" ] || continue
        case "${f##*/}" in "${name%.manifest}".*) ;; *) log "pruning ${f##*/}"; rm -f "$f" ;; esac
    done
    for f in "$DEB_DIR"/*.deb; do
        [ -e "$f" ] || continue
        grep -qxF "$(basename "$f")" <(sed -n 's/^[a-z0-9_]*_deb=//p' "$LOCK_FILE") || { log "pruning ${f##*/}"; rm -f "$f"; }
    done
}

lock_value() { sed -n "s/^$1=//p" "$LOCK_FILE"; }

payload_ok() {  # the pinned .debs are here
    [ -s "$LOCK_FILE" ] || return 1
    local key f
    for key in "${PAYLOAD_KEYS[@]}"; do
        f=$(lock_value "$key")
        [ -n "$f" ] && [ -s "$DEB_DIR/$f" ] || return 1
    done
}

key_of() {  # hash of every input
    { sha256sum <"$SELF"; printf '%s\n' "$versions"; [ -z "${EXTRA_INPUTS:-}" ] || printf '%s\n' "$EXTRA_INPUTS"
      cat "$LOCK_FILE"; } | sha256sum | cut -c1-16
}

manifest_ok() {  # $1 = manifest; every path in it exists
    local line
    [ -s "$1" ] || return 1
    while IFS= read -r line; do
        [ -s "${line#*=}" ] || return 1
    done <"$1"
}

built_answer() {  # sets KEY and MANIFEST; if the images of these inputs are built, prints them and exits
    KEY=$(key_of)
    MANIFEST=$CACHE_DIR/$IMAGE_PREFIX$KEY.manifest
    if manifest_ok "$MANIFEST"; then
        emit "$MANIFEST"
        exit 0
    fi
}

cached_answer() {  # fast path, before taking the build lock
    [ "$REFRESH" != 1 ] && payload_ok || return 0
    built_answer
}
