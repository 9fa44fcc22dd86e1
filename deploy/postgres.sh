#!/usr/bin/env bash
# Print the directory of working PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) as the
# last line of stdout, installing Debian's `postgresql` package when there are none and this runs
# as root. The store tests start their own server from there (tests/postgres.py).
#
#   deploy/postgres.sh
#
# Where the binaries come from, first that works (each of the three runs with `--version`):
#   1. the directory of `initdb` on PATH, when `pg_ctl` and `postgres` are beside it (how to use
#      another build: put its bin directory first on PATH);
#   2. /usr/lib/postgresql/<version>/bin, the newest version first (where Debian's packages put
#      them, off PATH); FAIRGATE_POSTGRES_LIBDIR names another directory to look in instead;
#   3. as root: `apt-get install -y postgresql` (after `apt-get update` when apt does not know the
#      package, or when the install fails with the lists it has), then 2. again. The install is
#      told not to create and start Debian's default cluster ("main" on port 5432): a drop-in in
#      /etc/postgresql-common/createcluster.d says `create_main_cluster = false`, since the tests
#      run their own servers and nothing else wants one.
# Not root and none found: the script says why (and what to install) and exits with status 1.
# apt's output goes to stderr, so the last stdout line is always the directory or nothing.
set -euo pipefail

libdir="${FAIRGATE_POSTGRES_LIBDIR:-/usr/lib/postgresql}"
binaries=(initdb pg_ctl postgres)

fail() {
    echo "deploy/postgres.sh: $*" >&2
    exit 1
}

# Whether directory $1 holds the three binaries and each of them runs.
works() {
    local name
    for name in "${binaries[@]}"; do
        [ -x "$1/$name" ] && "$1/$name" --version >/dev/null 2>&1 || return 1
    done
}

# The first directory that works, printed absolute; status 1 when none does.
find_binaries() {
    local on_path dir candidates=()
    if on_path=$(command -v initdb) && dir=$(cd "${on_path%/*}/" && pwd) && works "$dir"; then
        echo "$dir"
        return 0
    fi
    mapfile -t candidates < <(compgen -G "$libdir/*/bin" || true)
    if [ "${#candidates[@]}" -gt 1 ]; then
        # Newest version first: sort -V orders 9.6 < 10 < 15 as versions, not as text.
        mapfile -t candidates < <(printf '%s\n' "${candidates[@]}" | sort -rV)
    fi
    for dir in "${candidates[@]}"; do
        if works "$dir"; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if find_binaries; then
    exit 0
fi

if [ "$EUID" != 0 ]; then
    fail "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in $libdir/*/bin," \
        "and not root, so cannot install them: run 'apt-get install postgresql' as root (or put" \
        "a PostgreSQL build's bin directory first on PATH), or set FAIRGATE_SKIP_POSTGRES=1 to" \
        "skip the tests that need it"
fi
command -v apt-get >/dev/null 2>&1 \
    || fail "no PostgreSQL server binaries on PATH or in $libdir/*/bin, and no apt-get to install" \
        "Debian's postgresql package with: install PostgreSQL and put its bin directory on PATH," \
        "or set FAIRGATE_SKIP_POSTGRES=1 to skip the tests that need it"

# The tests start their own servers: without this, the package would create Debian's default
# cluster and start it on port 5432 (postgresql-common reads this directory, see
# createcluster.conf's include_dir).
dropin=/etc/postgresql-common/createcluster.d/fairgate-no-main-cluster.conf
if [ ! -e "$dropin" ]; then
    mkdir -p "$(dirname "$dropin")"
    printf '%s\n' "# deploy/postgres.sh: fairgate's tests run their own servers" \
        "create_main_cluster = false" >"$dropin"
fi

export DEBIAN_FRONTEND=noninteractive
# Wait for another apt (a second test run installing the same package) rather than fail.
apt_options=(-q -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
apt_install=(apt-get "${apt_options[@]}" install -y --no-install-recommends postgresql)
updated=0
update() {
    # A source that cannot be reached fails the update but may not matter: the install decides.
    apt-get "${apt_options[@]}" update >&2 || echo "deploy/postgres.sh: apt-get update failed" >&2
    updated=1
}

echo "deploy/postgres.sh: installing Debian's postgresql package" >&2
# No candidate: the lists are empty (a slim image) or do not know the package.
if ! apt-cache policy postgresql 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    update
fi
if ! "${apt_install[@]}" >&2; then
    [ "$updated" = 0 ] || fail "apt-get install postgresql failed (its output above)"
    # Lists too old for the mirror: the downloads 404. Fetch new ones and try once more.
    update
    "${apt_install[@]}" >&2 || fail "apt-get install postgresql failed, also after apt-get update"
fi

find_binaries || fail "apt-get installed postgresql, but no working initdb, pg_ctl and postgres" \
    "are on PATH or in $libdir/*/bin"
