#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU pod slice: the same command on all hosts.
#
#   launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b [--project P] [--workdir ~/pdpo_jax] \
#       [--dry_run] -- --config configs/X.yaml [section.key=value ...]
#
# Each worker runs `cd WORKDIR && .venv/bin/python -m pdpo_jax.train --distributed ARGS`;
# `--distributed` makes jax.distributed.initialize() find the coordinator, the process count
# and this worker's id from the TPU metadata, so nothing else is passed. Expects the repo and
# its venv (`make setup`, plus `pip install jax[tpu]` of the pinned version) at WORKDIR on
# every worker, and run.out_dir on a filesystem all workers share (orbax writes one
# checkpoint from all hosts; process 0 exports models).
# --dry_run prints the gcloud command and runs nothing.
set -euo pipefail

source "$(dirname "$0")/args.sh"

name="" zone="" project="" workdir="~/pdpo_jax"
own_option() {
  consumed=2
  case "$1" in
    --name) need "$@"; name=$2 ;;
    --zone) need "$@"; zone=$2 ;;
    --project) need "$@"; project=$2 ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
[[ -n "$name" ]] || die "--name: the TPU VM name is required"
[[ -n "$zone" ]] || die "--zone: the TPU's zone is required (e.g. us-central2-b)"

remote="cd $workdir && $(train_command)"
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone")
[[ -z "$project" ]] || cmd+=(--project "$project")
cmd+=(--worker=all --command)

if ((dry_run)); then  # the remote command single-quoted, as one would type it
  printf '%q ' "${cmd[@]}"
  printf "'%s'\n" "${remote//\'/\'\\\'\'}"
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
exec "${cmd[@]}" "$remote"
