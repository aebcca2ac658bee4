#!/usr/bin/env bash
# Pre-training on the GPUs of one machine: one process that sees all of them (no distributed
# initialisation; the mesh spans the local GPUs).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/.. source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu/single_node.sh [--gpus LIST] [--dry-run] -- TRAINER ARGS

Runs `python -m usfm_jax.train --distributed=off TRAINER ARGS` in one process on this machine's
GPUs, with XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true (plus your XLA_FLAGS) and
XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 (unless set), e.g.

  launch/gpu/single_node.sh -- --config configs/pretrain/usfm_vitb16.py --workdir runs/vitb16

Options:
  --gpus LIST   CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs)
  --dry-run     print the commands, one per line, and run nothing
  -h, --help    show this help

The GPU build of JAX is needed: .venv/bin/pip install "jax[cuda12]==<the jax pin>".
EOF_USAGE
}

main() {
  local gpus=""
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      --gpus) need_value "$@"; gpus=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
    esac
  done
  (($# > 0)) || die "no trainer arguments: give them after -- (see --help)"
  [[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be like 0,1,2,3, got '$gpus'"

  cd "$USFM_REPO_ROOT"
  local env_vars=()
  [[ -z $gpus ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
  env_vars+=("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}")
  local cmd=(env "${env_vars[@]}" "$(default_python)" -m usfm_jax.train --distributed=off "$@")
  if ((DRY_RUN)); then
    print_cmd cd "$USFM_REPO_ROOT"
    print_cmd "${cmd[@]}"
    return 0
  fi
  exec "${cmd[@]}"
}

main "$@"
