#!/usr/bin/env bash
# Makes the runtime base image `taskd-base:bookworm` on this machine, without a container
# registry: a Debian bookworm minbase rootfs from debootstrap, `docker import`ed under a project
# tag. Reused while present (delete it with `docker image rm taskd-base:bookworm` to remake it).
#
# The Debian mirror is the one apt's sources already name on this host (deb822 *.sources or
# one-line *.list); TASKD_DEBIAN_MIRROR overrides it. The suite is bookworm so that binaries built
# on a bookworm host (glibc 2.36) run in the image.
#
# Env: TASKD_BASE_IMAGE (tag, default taskd-base:bookworm), TASKD_DEBIAN_MIRROR (optional).
set -euo pipefail

TAG="${TASKD_BASE_IMAGE:-taskd-base:bookworm}"
SUITE=bookworm

log() { printf 'base-image: %s\n' "$*" >&2; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "reusing $TAG"
    exit 0
fi

# One maker at a time on this machine (parallel test runs share the image).
exec 9>"${TMPDIR:-/tmp}/taskd-base-image.lock"
flock -w 600 9 || { log "could not take the base image lock in 600 s"; exit 1; }
if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "reusing $TAG (made by a concurrent run)"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    if [ "$(id -u)" -ne 0 ]; then
        log "debootstrap is missing and this is not root: apt-get install debootstrap first"
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# The first mirror that apt's sources name for the bookworm suite itself (not -security or
# -updates), from /etc/apt/sources.list, sources.list.d/*.list and sources.list.d/*.sources.
find_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && files+=("$f")
    done
    if [ "${#files[@]}" -gt 0 ]; then
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "${files[@]}"
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""; enabled = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "types:"   { $1 = ""; types = $0; sub(/^ +/, "", types) }
            tolower($1) == "uris:"    { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
            tolower($1) == "suites:"  { $1 = ""; suites = $0; sub(/^ +/, "", suites) }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (!found) flush() }' "$f"
    done
}

MIRROR="${TASKD_DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR="$(find_mirror | head -n 1)"
fi
if [ -z "$MIRROR" ]; then
    log "no Debian mirror for $SUITE found in apt's sources; set TASKD_DEBIAN_MIRROR"
    exit 1
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/taskd-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT

log "debootstrap --variant=minbase $SUITE from $MIRROR"
started=$SECONDS
if ! debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1; then
    tail -n 30 "$ROOTFS.log" >&2
    rm -f "$ROOTFS.log"
    log "debootstrap failed"
    exit 1
fi
rm -f "$ROOTFS.log"

# Nothing of the package caches is needed at run time.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/var/log/*.log "$ROOTFS"/debootstrap

log "importing as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . |
    docker import --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE" - "$TAG" >/dev/null
log "made $TAG in $((SECONDS - started)) s"
