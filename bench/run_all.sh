#!/usr/bin/env bash
# The DPO step benchmark of issue 4, every framework side by side in one run (~10 min on 2 cores):
#
#   bash bench/run_all.sh              # tcmalloc for every worker when installed, else glibc malloc
#   ALLOC=glibc bash bench/run_all.sh  # force glibc malloc
#   bash bench/run_all.sh --quick      # anchor rows only, fewer steps (~3 min)
#
# Extra arguments go to bench/bench_dpo.py --all (see --help). tcmalloc: apt-get install -y
# libtcmalloc-minimal4; it is LD_PRELOADed into every worker alike (pdpo_jax, torch, trl, GEMM).
# Results: bench/results/dpo-<stamp>.{json,md} and peaks-<stamp>.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
ALLOC="${ALLOC:-auto}"
args=()
if [[ "$ALLOC" == tcmalloc || ( "$ALLOC" == auto && -n "$(ldconfig -p | grep libtcmalloc_minimal.so.4 || true)" ) ]]; then
  args+=(--tcmalloc)
elif [[ "$ALLOC" == auto ]]; then
  echo "note: libtcmalloc_minimal.so.4 not installed -> glibc malloc (apt-get install -y libtcmalloc-minimal4)" >&2
fi
exec "$PY" bench/bench_dpo.py --all "${args[@]}" "$@"
