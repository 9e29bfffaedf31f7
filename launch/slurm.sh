#!/usr/bin/env bash
# Multi-host GPU run under SLURM: writes an sbatch script (one task per host) and submits it.
#
#   launch/slurm.sh --nodes 2 --gpus_per_node 8 [--partition P] [--account A] [--time 04:00:00]
#       [--workdir DIR] [--script FILE] [--dry_run] -- --config configs/X.yaml [section.key=value ...]
#
# Each task runs `python -m pdpo_jax.train --distributed ARGS`: jax.distributed.initialize()
# reads the coordinator (first node of the job), the process count (SLURM_NTASKS) and this
# task's id (SLURM_PROCID) from SLURM. JAX would also restrict each task to the GPU numbered
# SLURM_LOCALID (it assumes one task per GPU), so the script sets JAX_LOCAL_DEVICE_IDS to all
# of the node's GPUs. run.out_dir must be on a filesystem every node shares.
# --dry_run prints the sbatch script and the command, and submits nothing.
set -euo pipefail

source "$(dirname "$0")/args.sh"

nodes="" gpus="" partition="" account="" time_limit="04:00:00" workdir="$PWD" script=""
own_option() {
  consumed=2
  case "$1" in
    --nodes) need "$@"; nodes=$2 ;;
    --gpus_per_node) need "$@"; gpus=$2 ;;
    --partition) need "$@"; partition=$2 ;;
    --account) need "$@"; account=$2 ;;
    --time) need "$@"; time_limit=$2 ;;
    --script) need "$@"; script=$2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$nodes': expected a positive integer"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node '$gpus': expected a positive integer"
[[ "$time_limit" =~ ^[0-9:-]+$ ]] || die "--time '$time_limit': expected e.g. 04:00:00"

train="$(train_command)"
device_ids="$(seq -s, 0 $((gpus - 1)))"

body="#!/bin/bash
#SBATCH --job-name=pdpo_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}#SBATCH --output=slurm-%j.out
set -euo pipefail
cd $(printf '%q' "$workdir")
export JAX_LOCAL_DEVICE_IDS=$device_ids
srun --kill-on-bad-exit=1 $train
"

if ((dry_run)); then
  printf '%s' "$body"
  echo "# would run: sbatch ${script:-<temporary file>}"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
if [[ -z "$script" ]]; then
  script="$(mktemp "${TMPDIR:-/tmp}/pdpo_jax.XXXXXX.sbatch")"
fi
printf '%s' "$body" > "$script"
echo "launch/slurm.sh: wrote $script"
exec sbatch "$script"
