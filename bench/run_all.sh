#!/usr/bin/env bash
# Every benchmark, one command: the DPO step of issue 4 (every framework side by side, ~25 min
# on 2 cores), then the sampler vs transformers.generate of issue 5 (anchor + SmolLM2-135M,
# ~8 min), then SmolLM2-135M SFT and DPO training steps on real persona-chat batches, packed
# vs padded buckets, bf16 vs fp32, against a hand-written PyTorch step (bench_train.py, one
# round, ~32 min on 2 shared cores; --quick: SFT only, 1 + 3 steps). Each
# writes JSON + markdown to bench/results/ (dpo-<stamp>.*, peaks-<stamp>.json, sampler-<stamp>.*,
# train-<stamp>.*).
#
#   bash bench/run_all.sh              # tcmalloc for every worker when installed, else glibc malloc
#   ALLOC=glibc bash bench/run_all.sh  # force glibc malloc
#   bash bench/run_all.sh --quick      # DPO anchor rows only, fewer steps; sampler 1 round, fewer reps
#   BENCHES=sampler bash bench/run_all.sh            # only the sampler bench (or BENCHES=dpo, =train)
#   BENCHES="dpo train" bash bench/run_all.sh        # several
#   SAMPLER_ARGS="--model anchor" bash bench/run_all.sh   # extra arguments for bench_sampler.py only
#   TRAIN_ARGS="--steps 8 --peers torch-bf16,torch-fp32" bash bench/run_all.sh   # bench_train.py only
#
# Arguments go to bench/bench_dpo.py --all (see --help); --quick, --wait-quiet S, --retries N,
# --results DIR and --timeout S also go to bench/bench_sampler.py and bench/bench_train.py.
# tcmalloc: apt-get install -y libtcmalloc-minimal4; it is LD_PRELOADed into every worker of
# every bench alike.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
ALLOC="${ALLOC:-auto}"
BENCHES="${BENCHES:-dpo sampler train}"
dpo_args=()
sampler_args=(--alloc glibc)
train_args=(--alloc glibc)
if [[ "$ALLOC" == tcmalloc || ( "$ALLOC" == auto && -n "$(ldconfig -p | grep libtcmalloc_minimal.so.4 || true)" ) ]]; then
  dpo_args+=(--tcmalloc)
  sampler_args=(--alloc tcmalloc)
  train_args=(--alloc tcmalloc)
elif [[ "$ALLOC" == auto ]]; then
  echo "note: libtcmalloc_minimal.so.4 not installed -> glibc malloc (apt-get install -y libtcmalloc-minimal4)" >&2
fi
# the flags every bench understands
while (($#)); do
  case "$1" in
    --wait-quiet|--retries|--results|--timeout)
      (($# >= 2)) || { echo "bench/run_all.sh: $1 needs a value" >&2; exit 2; }
      sampler_args+=("$1" "$2"); dpo_args+=("$1" "$2"); train_args+=("$1" "$2"); shift 2; continue ;;
    --quick|--wait-quiet=*|--retries=*|--results=*|--timeout=*) sampler_args+=("$1"); train_args+=("$1") ;;
  esac
  dpo_args+=("$1")
  shift
done
status=0
if [[ " $BENCHES " == *" dpo "* ]]; then
  "$PY" bench/bench_dpo.py --all "${dpo_args[@]}" || status=$?
fi
if [[ " $BENCHES " == *" sampler "* ]]; then
  # shellcheck disable=SC2086  # SAMPLER_ARGS is a word list
  "$PY" bench/bench_sampler.py "${sampler_args[@]}" ${SAMPLER_ARGS:-} || status=$((status ? status : $?))
fi
if [[ " $BENCHES " == *" train "* ]]; then
  # shellcheck disable=SC2086  # TRAIN_ARGS is a word list
  "$PY" bench/bench_train.py "${train_args[@]}" ${TRAIN_ARGS:-} || status=$((status ? status : $?))
fi
exit "$status"
