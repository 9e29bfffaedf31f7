# What launch/slurm.sh and launch/tpu_pod.sh share: usage from the calling script's header,
# errors, their common options and the checks on the trainer arguments. Sourced, not run.
#
# A script defines `own_option "$@"`: it handles one of its own options (setting its variables
# and `consumed` to the number of words it took) and returns 0, or returns 1 for anything else;
# then calls `parse_args "$@"`, which leaves the trainer arguments in the array TRAINER_ARGS and
# sets workdir, python and dry_run.

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-2}"; }
die() { echo "$(basename "$0"): $*" >&2; exit 2; }
need() { (($# >= 2)) && [[ -n $2 && $2 != --* ]] || die "$1 needs a value"; }

parse_args() {
  python=".venv/bin/python" dry_run=0 TRAINER_ARGS=()
  while (($#)); do
    if own_option "$@"; then shift "$consumed"; continue; fi
    case "$1" in
      --workdir) need "$@"; workdir=$2; shift 2 ;;
      --python) need "$@"; python=$2; shift 2 ;;
      --dry_run) dry_run=1; shift ;;
      -h|--help) usage 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (trainer arguments go after --)" ;;
    esac
  done
  (($#)) || die "no trainer arguments: pass e.g. -- --config configs/tiny_sft.yaml"
  [[ " $* " == *" --config "* || " $* " == *" --config="* ]] || die "trainer arguments need --config FILE"
  local arg
  for arg in "$@"; do
    [[ "$arg" != "--distributed" ]] || die "leave --distributed out: this script adds it"
  done
  TRAINER_ARGS=("$@")
}

# The trainer command on one host, every argument shell-quoted.
train_command() {
  local cmd arg
  cmd="$(printf '%q' "$python") -m pdpo_jax.train --distributed"
  for arg in "${TRAINER_ARGS[@]}"; do cmd+=" $(printf '%q' "$arg")"; done
  printf '%s' "$cmd"
}
