#!/usr/bin/env bash
# Print the absolute path of a working Chromium as the last line of stdout, installing Debian's
# `chromium` package when there is none and we are root. The dashboard's browser tests drive it
# through Playwright (tests/observability/test_dashboard_browser.py).
#
#   deploy/chromium.sh
#
# Where the browser comes from, first that works (`--version` runs):
#   1. $FAIRGATE_CHROMIUM, when set (another build: point it there);
#   2. `chromium` on PATH (Debian's package installs /usr/bin/chromium), then `chromium-browser`;
#   3. as root (CI runs as root): `apt-get install -y chromium`, after an `apt-get update` when
#      apt's lists do not know the package. Without root the script says how to get one.
# Playwright's own browser downloads are never used: the machines that run the tests have no
# network beyond the package mirror. Start the browser with
#   --headless --no-sandbox --disable-gpu --disable-background-networking
#   --disable-component-update --disable-sync --no-first-run
# (the tests do): it must not try to reach anything, and it runs as root in CI.
# apt's output and any error go to stderr; on failure the script says why and exits with status 1.
set -euo pipefail

fail() {
    echo "deploy/chromium.sh: $*" >&2
    exit 1
}

runs() {
    # Chromium prints its version without starting a browser (no display needed).
    timeout 60 "$1" --version >/dev/null 2>&1
}

absolute() {
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

if [ -n "${FAIRGATE_CHROMIUM:-}" ]; then
    runs "$FAIRGATE_CHROMIUM" || fail "FAIRGATE_CHROMIUM=$FAIRGATE_CHROMIUM does not run"
    absolute "$FAIRGATE_CHROMIUM"
    exit 0
fi
for name in chromium chromium-browser; do
    if on_path=$(command -v "$name") && runs "$on_path"; then
        absolute "$on_path"
        exit 0
    fi
done

how="install Debian's package (sudo apt-get install -y chromium), or point FAIRGATE_CHROMIUM at a Chromium or Chrome binary"
[ "$(id -u)" = 0 ] || fail "no chromium on PATH, and not root to install it: $how"
command -v apt-get >/dev/null 2>&1 || fail "no chromium on PATH, and no apt-get to install it: $how"

# Two test runs at once install it once: the second waits here, then finds the first one's.
if command -v flock >/dev/null 2>&1; then
    exec 9>/tmp/fairgate-chromium-install.lock
    flock -w 900 9 || fail "waited 900 s for /tmp/fairgate-chromium-install.lock (another install)"
    if on_path=$(command -v chromium) && runs "$on_path"; then
        absolute "$on_path"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_options=(-q -y -o Acquire::Retries=3 --no-install-recommends)
echo "deploy/chromium.sh: installing Debian's chromium package" >&2
if ! apt-get "${apt_options[@]}" install chromium >&2; then
    echo "deploy/chromium.sh: apt's lists could not supply it; apt-get update, then again" >&2
    apt-get -q -o Acquire::Retries=3 update >&2 || echo "deploy/chromium.sh: apt-get update failed" >&2
    apt-get "${apt_options[@]}" install chromium >&2 || fail "apt-get install chromium failed (above): $how"
fi
on_path=$(command -v chromium) || fail "apt-get installed chromium but there is no chromium on PATH"
if ! runs "$on_path"; then
    "$on_path" --version >&2 || true
    fail "$on_path does not run on this machine (its error above)"
fi
echo "deploy/chromium.sh: $("$on_path" --version 2>&1 | head -n 1)" >&2
absolute "$on_path"
