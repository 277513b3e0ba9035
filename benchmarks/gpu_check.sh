#!/usr/bin/env bash
# The first minutes on a lent GPU machine (its image: Python 3.12, torch with CUDA,
# transformers 5.17; no network): qspec's loop on CUDA in one table, within 8 minutes.
#
# What qspec imports beyond that image (pydantic and its parts) travels as wheels in .whl,
# made here once with pip download (README: "A first GPU check"); the repository itself is
# put on PYTHONPATH, nothing is installed into the image.
#   bash benchmarks/gpu_check.sh [--size 1b|3b] [--tokens 64] [--compile both|on|off]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/qspec-site .whl/*.whl
    export PYTHONPATH="/tmp/qspec-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-/tmp}/gpu_check.txt"
timeout 480 python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$out"
