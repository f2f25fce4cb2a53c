#!/usr/bin/env bash
# QEMU 11.1 (Debian trixie-backports' qemu-system-x86) on a machine whose own Debian ships an
# older QEMU: a minimal trixie root holds it, and it runs in the host's own namespaces through
# that root's loader, so that sockets, -virtfs path=/ and memfds see the real host.
#
#   scripts/qemu11.sh --install   # idempotent: creates the root if missing (a few minutes, ~400 MB)
#   scripts/qemu11.sh --root      # prints the root; exits 1 (reason on stderr) if QEMU 11.1 is not there
#   scripts/qemu11.sh --check     # exits 0 if QEMU 11.1 runs, else prints why and exits 1
#   scripts/qemu11.sh ARGS...     # runs qemu-system-x86_64 11.1 with ARGS
#
# VFIO_LIVE_QEMU11_ROOT overrides the root (default /var/lib/vfio-live/qemu-11.1).
set -euo pipefail
root="${VFIO_LIVE_QEMU11_ROOT:-/var/lib/vfio-live/qemu-11.1}"
mirror="${VFIO_LIVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# Complete when the install wrote its marker, or (a root made by hand) when it answers as 11.x.
present() {
    [ -x "$root/usr/bin/qemu-system-x86_64" ] && [ -x "$root/lib64/ld-linux-x86-64.so.2" ] || return 1
    [ -f "$root/.vfio-live-qemu11-complete" ] || version | grep -q 'version 11\.'
}

run() {
    exec "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
}

install() {
    if present; then echo "qemu11: present at $root"; return 0; fi
    local sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
    if ! command -v debootstrap >/dev/null; then
        echo "qemu11: installing debootstrap (Debian)"
        $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
            || { echo "qemu11: cannot install debootstrap (no network or no apt?)" >&2; return 1; }
    fi
    echo "qemu11: debootstrap --variant=minbase trixie $root $mirror (a few minutes)"
    $sudo_ mkdir -p "$(dirname "$root")"
    local log; log="$(mktemp /tmp/vfio-live-qemu11-install.XXXXXX)"
    # A partial root from an interrupted run is resumed by debootstrap itself.
    if ! $sudo_ debootstrap --variant=minbase trixie "$root" "$mirror" >"$log" 2>&1; then
        echo "qemu11: debootstrap failed (no network?); its last lines:" >&2; tail -n 5 "$log" >&2; return 1
    fi
    echo "deb $mirror trixie-backports main" | $sudo_ tee "$root/etc/apt/sources.list.d/backports.list" >/dev/null
    echo "qemu11: apt-get install -t trixie-backports qemu-system-x86 (in the root)"
    if ! $sudo_ chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86' >>"$log" 2>&1; then
        echo "qemu11: installing qemu-system-x86 in the root failed; its last lines:" >&2; tail -n 5 "$log" >&2; return 1
    fi
    version | grep -q 'version 11\.' || { echo "qemu11: the installed QEMU is not 11.x: $(version | head -n 1)" >&2; return 1; }
    $sudo_ touch "$root/.vfio-live-qemu11-complete"
    rm -f "$log"
    echo "qemu11: $(version | head -n 1)"
}

version() { (run --version) 2>&1; }

case "${1:-}" in
    --install) install ;;
    --root)
        if present; then echo "$root"; else echo "qemu11: QEMU 11.1 is not installed at $root (run scripts/qemu11.sh --install)" >&2; exit 1; fi ;;
    --check)
        if ! present; then echo "QEMU 11.1 is not installed at $root (scripts/qemu11.sh --install)"; exit 1; fi
        v="$(version | head -n 1)"
        case "$v" in *"version 11."*) exit 0 ;; *) echo "QEMU at $root does not run as 11.x: $v"; exit 1 ;; esac ;;
    "") echo "usage: scripts/qemu11.sh --install | --root | --check | QEMU-ARGS..." >&2; exit 2 ;;
    *)
        present || { echo "qemu11: QEMU 11.1 is not installed at $root (run scripts/qemu11.sh --install)" >&2; exit 1; }
        run "$@" ;;
esac
