#!/usr/bin/env bash
# Submits launch/gpu/slurm.sbatch with the job's shape given as flags.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/.. source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu/submit.sh [options] -- TRAINER ARGS

Submits launch/gpu/slurm.sbatch (from the repository root) as a job of N nodes with G GPUs
each, one trainer process per GPU (or per node with --per-node), e.g.

  launch/gpu/submit.sh --nodes 4 --gpus-per-node 8 --time 48:00:00 -- \
      --config configs/pretrain/usfm_vitb16.py --workdir /shared/runs/vitb16

Options:
  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs per node (default 8)
  --per-node           one process per node that drives all its GPUs (default: one per GPU)
  --time T             time limit, e.g. 24:00:00 (default: the script's, 24:00:00)
  --partition P        SLURM partition
  --account A          SLURM account
  --job-name NAME      default usfm-<the workdir's last component>
  --sbatch-arg ARG     any other sbatch option, e.g. --sbatch-arg=--qos=high; repeatable
  --dry-run            print the commands, one per line, and run nothing
  -h, --help           show this help

The environment (PYTHON, XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION, NCCL_*) goes with the job:
see `bash launch/gpu/slurm.sbatch --help`.
EOF_USAGE
}

main() {
  local nodes=1 gpus=8 per_node=0 time="" partition="" account="" job_name=""
  local extra=()
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      --nodes) need_value "$@"; nodes=$2; shift 2 ;;
      --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
      --per-node) per_node=1; shift ;;
      --time) need_value "$@"; time=$2; shift 2 ;;
      --partition) need_value "$@"; partition=$2; shift 2 ;;
      --account) need_value "$@"; account=$2; shift 2 ;;
      --job-name) need_value "$@"; job_name=$2; shift 2 ;;
      --sbatch-arg) need_value "$@"; extra+=("$2"); shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
    esac
  done
  (($# > 0)) || die "no trainer arguments: give them after -- (see --help)"
  need_uint --nodes "$nodes" 1
  need_uint --gpus-per-node "$gpus" 1
  local workdir
  workdir=$(trainer_workdir "$@") || die "the trainer arguments need --workdir DIR"
  job_name=${job_name:-usfm-$(slugify "$(basename "$workdir")")}

  local tasks=$gpus
  ((per_node)) && tasks=1
  local cmd=(sbatch "--job-name=$job_name" "--nodes=$nodes" "--gpus-per-node=$gpus"
    "--ntasks-per-node=$tasks")
  [[ -z $time ]] || cmd+=("--time=$time")
  [[ -z $partition ]] || cmd+=("--partition=$partition")
  [[ -z $account ]] || cmd+=("--account=$account")
  cmd+=("${extra[@]}" launch/gpu/slurm.sbatch -- "$@")

  cd "$USFM_REPO_ROOT"
  if ((DRY_RUN)); then
    print_cmd cd "$USFM_REPO_ROOT"
    print_cmd "${cmd[@]}"
    return 0
  fi
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
  "${cmd[@]}"
}

main "$@"
