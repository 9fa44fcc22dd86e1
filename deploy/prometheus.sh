#!/usr/bin/env bash
# Print the absolute path of a working `prometheus` binary (or, asked for it, `promtool`) as the
# last line of stdout, fetching Debian's `prometheus` package without root when there is none. The
# observability tests run both: prometheus scrapes, promtool checks and tests the alerting rules of
# deploy/observability/.
#
#   deploy/prometheus.sh [prometheus|promtool]     (default: prometheus)
#
# Where the binary comes from, first that works (`BINARY --version` runs):
#   1. that binary on PATH (how to use another build: put it first on PATH);
#   2. the copy fetched earlier: $FAIRGATE_HOME/prometheus/bin/BINARY, by default
#      ~/.cache/fairgate/prometheus/bin/BINARY (the same cache as the default model);
#   3. `apt-get download prometheus` into that directory and `dpkg-deb -x` the package there; the
#      package ships both binaries, and both are kept (a cache from before promtool was kept has
#      only prometheus: asked for promtool, it is fetched again). Neither step needs root. When
#      apt's own package lists do not know the package (a slim image with an emptied
#      /var/lib/apt/lists, or lists too old for the mirror), the lists are fetched into
#      $FAIRGATE_HOME/prometheus/apt with `apt-get update -o Dir::State::Lists=... -o Dir::Cache=...`,
#      which needs no root either.
# The package's binaries are Go and need only libc. apt's output and any error go to stderr;
# without apt-get and dpkg-deb, or when the download fails, the script says why and exits with
# status 1 (2 for an argument it does not know).
set -euo pipefail

cache="${FAIRGATE_HOME:-${HOME:?deploy/prometheus.sh: set FAIRGATE_HOME or HOME}/.cache/fairgate}/prometheus"
binary=${1:-prometheus}
case "$#:$binary" in
    [01]:prometheus | [01]:promtool) ;;
    *)
        echo "usage: deploy/prometheus.sh [prometheus|promtool]" >&2
        exit 2
        ;;
esac
# Both binaries of the package, kept side by side; $binary is the one asked for.
binaries=(prometheus promtool)
cached_bin="$cache/bin/$binary"

runs() {
    "$1" --version >/dev/null 2>&1
}

fail() {
    echo "deploy/prometheus.sh: $*" >&2
    exit 1
}

# The absolute path of $1 without resolving symlinks (PATH may hold relative directories).
absolute() {
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

if on_path=$(command -v "$binary") && runs "$on_path"; then
    absolute "$on_path"
    exit 0
fi
if runs "$cached_bin"; then
    echo "$cached_bin"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || fail "no $binary on PATH, and no $tool to fetch" \
        "Debian's prometheus package with; install Prometheus (2.x or later) and put $binary" \
        "on PATH," \
        "or set FAIRGATE_SKIP_PROMETHEUS=1 to skip the tests that need it"
done

mkdir -p "$cache"
# Two test runs at once fetch it once: the second waits here, then finds the first one's copy.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.lock"
    flock -w 600 9 || fail "waited 600 s for $cache/.lock (another fetch of prometheus)"
    # Another run may have fetched the package while this one waited.
    if runs "$cached_bin"; then
        echo "$cached_bin"
        exit 0
    fi
fi

work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

apt_options=(-q -o Acquire::Retries=3)
if [ "$(id -u)" = 0 ]; then
    # As root apt would hand the download to its `_apt` user, who cannot write to this directory.
    apt_options+=(-o APT::Sandbox::User=root)
fi

echo "deploy/prometheus.sh: fetching Debian's prometheus package into $cache" >&2
if ! (cd "$work" && apt-get "${apt_options[@]}" download prometheus) >"$work/system.log" 2>&1; then
    echo "deploy/prometheus.sh: apt's package lists could not supply it" \
        "($(tail -n 1 "$work/system.log")); fetching the lists into $cache/apt" >&2
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial"
    apt_options+=(-o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache")
    # A source that cannot be reached fails the update but may not matter: the download decides.
    apt-get "${apt_options[@]}" update >&2 || echo "deploy/prometheus.sh: apt-get update failed" >&2
    (cd "$work" && apt-get "${apt_options[@]}" download prometheus) >&2 \
        || fail "apt-get download prometheus failed, with the system's package lists" \
            "($(tail -n 1 "$work/system.log")) and with freshly fetched ones (above)"
fi

debs=("$work"/prometheus_*.deb)
[ -f "${debs[0]}" ] || fail "apt-get download prometheus left no prometheus_*.deb in $work"
dpkg-deb -x "${debs[0]}" "$work/root" || fail "dpkg-deb -x ${debs[0]} failed"
for name in "${binaries[@]}"; do
    fetched="$work/root/usr/bin/$name"
    [ -f "$fetched" ] || fail "${debs[0]##*/} has no usr/bin/$name"
    if ! runs "$fetched"; then
        "$fetched" --version >&2 || true
        fail "the $name binary in ${debs[0]##*/} does not run on this machine (its error above)"
    fi
done
mkdir -p "$cache/bin"
# Each renamed into place: a concurrent reader sees the old state or a complete binary.
for name in "${binaries[@]}"; do
    mv "$work/root/usr/bin/$name" "$cache/bin/.$name.$$"
    mv -f "$cache/bin/.$name.$$" "$cache/bin/$name"
done
echo "deploy/prometheus.sh: $("$cached_bin" --version 2>&1 | head -n 1)" >&2
echo "$cached_bin"
