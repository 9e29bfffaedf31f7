#!/usr/bin/env bash
# The accelerator check on a device machine that already has JAX with CUDA (bench/gpu_check.py
# says what it runs; all steps may not fit one 10-minute call: pick some with --steps). Wheels
# the machine lacks (grain, tensorboardX, …) come from a carried folder .whl/ (see the device
# tool's notes), installed into /tmp/site.
#   bash bench/gpu_check.sh [--smoke] [--skip-parity] [--steps engine,static,hf_generate,dnli,ratios]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
exec timeout 560 python3 bench/gpu_check.py --out "${OUT:-bench/results}" "$@"
