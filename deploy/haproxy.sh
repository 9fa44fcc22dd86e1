#!/usr/bin/env bash
# Print the absolute path of a working `haproxy` as the last line of stdout (Debian's `haproxy`
# package, installed as root when missing: deploy/debian_binary.sh). The replicas' end-to-end
# test and benchmark put it in front of two gateway replicas.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/debian_binary.sh" haproxy haproxy
