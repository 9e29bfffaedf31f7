#!/usr/bin/env bash
# One run on a single GPU host that has JAX with CUDA but no network (a lent device machine, an
# air-gapped box): installs carried wheels, builds the base model's HF folder from its GGUF file
# if it is missing, runs the trainer, and packs the run's results, weights left out, into one
# archive.
#
#   launch/offline_gpu.sh [--gguf FILE | --gguf_parts 'GLOB' --sha256 HEX] [--model_dir DIR]
#       [--wheels DIR] [--out DIR] [--limit SECONDS] [--python PY] [--workdir DIR] [--dry_run]
#       -- --config configs/X.yaml [section.key=value ...]
#
# --wheels DIR (default .whl): *.whl installed with pip --no-index into /tmp/pdpo_site, for the
#   packages the host lacks (grain, tensorboardX, gguf, ...); a later call finds them there.
# --gguf FILE: the GGUF the model folder is built from (python -m pdpo_jax.models.gguf_io convert);
#   --gguf_parts GLOB: the same file split in pieces (a transfer limit), joined in name order and
#   checked against --sha256. Skipped when DIR (default ~/.cache/pdpo-models/smollm2-135m-instruct,
#   where the SmolLM2 configs look) already holds config.json.
# --out DIR (default $OUT, else runs/packed): receives train.log and <run>.tar.gz, the run folder
#   without model weights, optimizer checkpoints or cached reference log-probs. Packed also when
#   the trainer fails or --limit SECONDS stops it, so a partial run is not lost.
# --dry_run prints the commands and runs nothing.
set -euo pipefail

source "$(dirname "$0")/args.sh"

gguf="" gguf_parts="" sha256="" model_dir="$HOME/.cache/pdpo-models/smollm2-135m-instruct"
wheels=".whl" out="${OUT:-runs/packed}" limit="" workdir="$PWD"
own_option() {
  consumed=2
  case "$1" in
    --gguf) need "$@"; gguf=$2 ;;
    --gguf_parts) need "$@"; gguf_parts=$2 ;;
    --sha256) need "$@"; sha256=$2 ;;
    --model_dir) need "$@"; model_dir=$2 ;;
    --wheels) need "$@"; wheels=$2 ;;
    --out) need "$@"; out=$2 ;;
    --limit) need "$@"; limit=$2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
[[ -z "$gguf" || -z "$gguf_parts" ]] || die "give --gguf or --gguf_parts, not both"
[[ -z "$gguf_parts" || "$sha256" =~ ^[0-9a-f]{64}$ ]] \
  || die "--gguf_parts needs --sha256 with the joined file's 64-hex-digit digest"
[[ -z "$limit" || "$limit" =~ ^[1-9][0-9]*$ ]] || die "--limit '$limit': expected whole seconds"
[[ "$python" != ".venv/bin/python" || -x "$workdir/.venv/bin/python" ]] || python=python3

run() {  # prints the command; runs it unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  ((dry_run)) || "$@"
}

cd "$workdir"
if compgen -G "$wheels/*.whl" >/dev/null; then
  run "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/pdpo_site "$wheels"/*.whl
fi
# also when an earlier call on this host installed them and this one carried none
if ((dry_run)) || [[ -d /tmp/pdpo_site ]]; then
  export PYTHONPATH="/tmp/pdpo_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ ! -f "$model_dir/config.json" && -n "$gguf$gguf_parts" ]]; then
  if [[ -n "$gguf_parts" ]]; then
    parts=()
    while IFS= read -r p; do parts+=("$p"); done < <(compgen -G "$gguf_parts" | sort)
    ((${#parts[@]})) || ((dry_run)) || die "--gguf_parts '$gguf_parts' matches no file"
    gguf="${TMPDIR:-/tmp}/pdpo_joined.gguf"
    echo "+ cat ${parts[*]} > $gguf"
    if ((!dry_run)); then
      cat "${parts[@]}" > "$gguf"
      got=$(sha256sum "$gguf" | cut -d' ' -f1)
      [[ "$got" == "$sha256" ]] || die "joined GGUF has sha256 $got, expected $sha256: a part is missing or damaged"
    fi
  fi
  run "$python" -m pdpo_jax.models.gguf_io convert "$gguf" "$model_dir"
fi

run_dir=$("$python" - "${TRAINER_ARGS[@]}" <<'EOF'
import sys
from pdpo_jax.config import load_config
from pdpo_jax.train.__main__ import make_parser
args = make_parser().parse_args(sys.argv[1:])
print(load_config(args.config, tuple(args.overrides)).run.out_dir)
EOF
)
train=("$python" -m pdpo_jax.train "${TRAINER_ARGS[@]}")
[[ -z "$limit" ]] || train=(timeout --signal=TERM --kill-after=20 "$limit" "${train[@]}")
((dry_run)) || mkdir -p "$out"
rc=0
printf '+'; printf ' %q' "${train[@]}"; printf ' 2>&1 | tee %q\n' "$out/train.log"
if ((!dry_run)); then
  set +e; "${train[@]}" 2>&1 | tee "$out/train.log"; rc=${PIPESTATUS[0]}; set -e
fi
archive="$out/$(basename "$run_dir").tar.gz"
((dry_run)) || [[ -d "$run_dir" ]] || die "trainer exit status $rc and no run folder $run_dir to pack"
run tar -czf "$archive" --exclude='*.safetensors' --exclude='*/ckpt' --exclude='*/ref_logps' \
  -C "$(dirname "$run_dir")" "$(basename "$run_dir")"
echo "offline_gpu.sh: trainer exit status $rc; results in $archive"
exit "$rc"
