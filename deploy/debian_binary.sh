#!/usr/bin/env bash
# Print the absolute path of a working server binary as the last line of stdout, installing the
# Debian package that has it when there is none and this runs as root. The tests and benchmarks
# that need Redis, PostgreSQL or haproxy start their own server with it (a free loopback port, a
# directory of their own); deploy/redis.sh, deploy/postgres.sh and deploy/haproxy.sh say which.
#
#   deploy/debian_binary.sh BINARY PACKAGE [SEARCH_DIR...]
#
# Where the binary comes from, first that works (`BINARY --version` or `-v` runs):
#   1. BINARY on PATH (how to use another build: put it first on PATH);
#   2. each SEARCH_DIR, then /usr/sbin and /usr/bin (outside a root shell's PATH at times); a
#      SEARCH_DIR may be a glob (/usr/lib/postgresql/*/bin), the newest version first;
#   3. as root, `apt-get install -y PACKAGE`, after `apt-get update` when apt's package lists do
#      not know it. Its service is never left running: a policy-rc.d that says no while it
#      installs (when the system has none), and stopped and disabled if it started all the same.
# apt's output and any error go to stderr. Not root and no binary, or a failed install: the script
# says why and exits with status 1.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: deploy/debian_binary.sh BINARY PACKAGE [SEARCH_DIR...]" >&2; exit 2; }
binary=$1
package=$2
shift 2
search_dirs=("$@")

fail() {
    echo "deploy/debian_binary.sh: $*" >&2
    exit 1
}

runs() {
    "$1" --version >/dev/null 2>&1 || "$1" -v >/dev/null 2>&1
}

# The absolute path of $1 without resolving symlinks (PATH may hold relative directories).
absolute() {
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

found() {
    if on_path=$(command -v "$binary") && runs "$on_path"; then
        absolute "$on_path"
        return 0
    fi
    local dir candidate
    for dir in "${search_dirs[@]}" /usr/sbin /usr/bin; do
        # Globs expand in version order; the last is the newest.
        for candidate in $(printf '%s\n' $dir/"$binary" | sort -rV); do
            if [ -x "$candidate" ] && runs "$candidate"; then
                echo "$candidate"
                return 0
            fi
        done
    done
    return 1
}

if found; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    fail "no $binary found, and not root to install Debian's $package package: run" \
        "'apt-get install $package' as root, or put a $binary on PATH"
fi
command -v apt-get >/dev/null 2>&1 || fail "no $binary found and no apt-get to install it with"

# Wait for another apt (a second run installing the same package) rather than fail.
apt_options=(-q -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600)
export DEBIAN_FRONTEND=noninteractive

# invoke-rc.d asks /usr/sbin/policy-rc.d whether a package may start its service; 101: no.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# deploy/debian_binary.sh: no service starts while it installs\nexit 101\n' \
        >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

candidate=$(apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    echo "deploy/debian_binary.sh: apt does not know $package yet; apt-get update" >&2
    # A source that cannot be reached fails the update but may not matter: the install decides.
    apt-get "${apt_options[@]}" update >&2 || echo "deploy/debian_binary.sh: apt-get update failed" >&2
fi
echo "deploy/debian_binary.sh: installing Debian's $package package" >&2
apt-get "${apt_options[@]}" install -y --no-install-recommends "$package" >&2 \
    || fail "apt-get install $package failed (its output above)"

# Started anyway (no policy-rc.d honoured, or systemd): stop it and keep it from coming back.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now "$package" >&2 2>&1 || true
elif command -v service >/dev/null 2>&1; then
    service "$package" stop >&2 2>&1 || true
fi

installed=$(found) || fail "Debian's $package package installed, but no $binary that runs was found"
echo "$installed"
