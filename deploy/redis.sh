#!/usr/bin/env bash
# Print the absolute path of a working `redis-server` as the last line of stdout (Debian's
# `redis-server` package, installed as root when missing, its own service kept from running:
# deploy/debian_binary.sh). The tests and the replicas' end-to-end test start their own server
# with it, on a free loopback port (tests/redis_server.py); where there is none and this is not
# root, the script says why and exits with status 1, and FAIRGATE_SKIP_REDIS=1 skips those tests.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/debian_binary.sh" redis-server redis-server
