#!/usr/bin/env bash
# Runs a list of configs and/or override sets, each into its own workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/sweep.sh --workdir-root ROOT RUNS [WHERE] [--dry-run] [-- EXTRA TRAINER ARGS]

One training run per config file (x per line of an overrides file), each in its own workdir:
ROOT/<config file name without .py>, or ROOT/<name>__<overrides slug> with overrides.
EXTRA TRAINER ARGS go to every run.

RUNS:
  --configs GLOB         config files matching GLOB (quote it); __init__.py and files starting
                         with _ are skipped; repeatable
  --config FILE          one config file; repeatable
  --arg ARG              config argument for every file (FILE:ARG), e.g. demo
  --overrides-file FILE  one run per line (per config): trainer flags in shell quoting, e.g.
                         --config.spatial.ratio=0.4 --config.model.depth=2
                         Blank lines and lines starting with # are skipped.
WHERE (default --local):
  --local                on this machine, one after another; the output of run NAME is
                         appended to ROOT/sweep_logs/NAME.log (or --log-dir). A failed run
                         does not stop the sweep: the failures are listed at the end (exit
                         status 1). Ctrl-C stops the sweep.
  --processes N          like --local, each run as N processes (launch/local/run.sh)
  --devices-per-process K  with --processes: fake CPU devices per process (default 1)
  --tpu NAME             on the TPU NAME, one after another (launch/tpu/tpu.sh run --wait,
                         job name = run name); TPU_ZONE, TPU_PROJECT, TPU_SLICES from the
                         environment
  --slurm                one SLURM job per run, all submitted at once (launch/gpu/submit.sh)
  --nodes N, --gpus-per-node G   with --slurm (defaults: submit.sh's)
Other:
  --log-dir DIR          (--local, --processes) where NAME.log go (default ROOT/sweep_logs)
  --dry-run              print the commands, one per line, and run nothing
  -h, --help             show this help

A run whose workdir already holds its last step ends at once ("nothing to do"): re-running a
sweep finishes what is left.

Example (the ablations at demo scale, on this machine):
  launch/sweep.sh --workdir-root runs/ablations --configs 'configs/ablations/*.py' --arg demo
EOF
}

ROOT=""
CONFIGS=()
CONFIG_ARG=""
OVERRIDES_FILE=""
WHERE=local
WHERE_FLAG=""  # the flag that chose WHERE, if any
PROCESSES=1
DEVICES=1
TPU_NAME_ARG=""
SLURM_NODES=""
SLURM_GPUS=""
LOG_DIR=""
EXTRA_ARGS=()

# The runs: name (= workdir under ROOT), config file[:arg], override words joined by the
# unit separator \037 (empty: none).
RUN_NAMES=()
RUN_CONFIGS=()
RUN_OVERRIDES=()
OVERRIDE_SETS=()

# Usage: set_where WHERE FLAG (one of --local, --processes, --tpu, --slurm, at most once)
set_where() {
  [[ -z $WHERE_FLAG || $WHERE_FLAG == "$2" ]] || die "$WHERE_FLAG and $2 exclude each other"
  WHERE=$1
  WHERE_FLAG=$2
}

add_glob() {
  local pattern=$1 file found=0
  local -a files
  # Expand the pattern relative to the repository root, in sorted order.
  mapfile -t files < <(compgen -G "$pattern" | LC_ALL=C sort)
  for file in "${files[@]}"; do
    case $(basename "$file") in
      _*) continue ;;
    esac
    [[ -f $file ]] || continue
    CONFIGS+=("$file")
    found=1
  done
  ((found)) || die "no config files match '$pattern'"
}

# The lines of the overrides file, each as words (xargs's quoting) joined by \037.
read_overrides() {
  local line words parsed
  OVERRIDE_SETS=()
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    words=$(printf '%s\n' "$line" | xargs printf '%s\037') ||
      die "cannot parse this line of $OVERRIDES_FILE (unbalanced quotes?): $line"
    IFS=$'\037' read -ra parsed <<<"$words"
    ! has_flag --workdir "${parsed[@]}" ||
      die "$OVERRIDES_FILE: --workdir is set per run (use --workdir-root): $line"
    OVERRIDE_SETS+=("$words")
  done <"$OVERRIDES_FILE"
  ((${#OVERRIDE_SETS[@]} > 0)) || die "$OVERRIDES_FILE has no override lines"
}

# A name not yet in RUN_NAMES: $1, or $1_2, $1_3, ...
unique_name() {
  local name=$1 candidate=$1 n=1 existing taken
  while true; do
    taken=0
    for existing in "${RUN_NAMES[@]}"; do
      [[ $existing == "$candidate" ]] && taken=1 && break
    done
    ((taken)) || break
    n=$((n + 1))
    candidate=${name}_$n
  done
  printf '%s\n' "$candidate"
}

build_runs() {
  local config stem words slug spec
  local -a override_words
  for config in "${CONFIGS[@]}"; do
    spec=$config
    [[ -z $CONFIG_ARG || $config == *:* ]] || spec=$config:$CONFIG_ARG
    stem=$(basename "${config%%:*}" .py)
    if [[ -z $OVERRIDES_FILE ]]; then
      RUN_NAMES+=("$(unique_name "$(slugify "$stem")")")
      RUN_CONFIGS+=("$spec")
      RUN_OVERRIDES+=("")
      continue
    fi
    for words in "${OVERRIDE_SETS[@]}"; do
      IFS=$'\037' read -ra override_words <<<"$words"
      slug=$(slugify "$(printf '%s ' "${override_words[@]}" | sed 's/--config\.//g')")
      RUN_NAMES+=("$(unique_name "$(slugify "$stem")__$slug")")
      RUN_CONFIGS+=("$spec")
      RUN_OVERRIDES+=("$words")
    done
  done
}

# The trainer arguments of run $1, in the array TRAINER_ARGS.
trainer_args() {
  local i=$1
  local -a override_words=()
  [[ -z ${RUN_OVERRIDES[i]} ]] || IFS=$'\037' read -ra override_words <<<"${RUN_OVERRIDES[i]}"
  TRAINER_ARGS=(--config "${RUN_CONFIGS[i]}" --workdir "$ROOT/${RUN_NAMES[i]}"
    "${override_words[@]}" "${EXTRA_ARGS[@]}")
}

# The command of run $1, in the array RUN_CMD.
run_command() {
  local i=$1
  trainer_args "$i"
  case $WHERE in
    local) RUN_CMD=("$(default_python)" -m usfm_jax.train "${TRAINER_ARGS[@]}") ;;
    processes)
      RUN_CMD=(launch/local/run.sh --processes "$PROCESSES" --devices-per-process "$DEVICES"
        --quiet -- "${TRAINER_ARGS[@]}")
      ;;
    tpu)
      RUN_CMD=(launch/tpu/tpu.sh run --name "$TPU_NAME_ARG" --job "${RUN_NAMES[i]}" --wait
        -- "${TRAINER_ARGS[@]}")
      ;;
    slurm)
      RUN_CMD=(launch/gpu/submit.sh)
      [[ -z $SLURM_NODES ]] || RUN_CMD+=(--nodes "$SLURM_NODES")
      [[ -z $SLURM_GPUS ]] || RUN_CMD+=(--gpus-per-node "$SLURM_GPUS")
      RUN_CMD+=(--job-name "usfm-${RUN_NAMES[i]}" -- "${TRAINER_ARGS[@]}")
      ;;
  esac
}

logs_locally() {
  [[ $WHERE == local || $WHERE == processes ]]
}

INTERRUPTED=0

execute_runs() {
  local total=${#RUN_NAMES[@]} i status start log
  local -a failed=()
  if ((DRY_RUN)); then
    print_cmd cd "$USFM_REPO_ROOT"
    logs_locally && print_cmd mkdir -p "$LOG_DIR"
    for ((i = 0; i < total; i++)); do
      run_command "$i"
      if logs_locally; then
        printf '%s >> %s 2>&1\n' "$(quote_words "${RUN_CMD[@]}")" \
          "$(shell_quote "$LOG_DIR/${RUN_NAMES[i]}.log")"
      else
        print_cmd "${RUN_CMD[@]}"
      fi
    done
    return 0
  fi
  logs_locally && mkdir -p "$LOG_DIR"
  trap 'INTERRUPTED=1' INT
  for ((i = 0; i < total; i++)); do
    run_command "$i"
    start=$SECONDS
    status=0
    if logs_locally; then
      log=$LOG_DIR/${RUN_NAMES[i]}.log
      info "sweep: [$((i + 1))/$total] ${RUN_NAMES[i]} (output in $log)"
      "${RUN_CMD[@]}" >>"$log" 2>&1 || status=$?
    else
      info "sweep: [$((i + 1))/$total] ${RUN_NAMES[i]}"
      "${RUN_CMD[@]}" || status=$?
    fi
    if ((INTERRUPTED)); then
      info "sweep: interrupted during ${RUN_NAMES[i]}; runs left: $((total - i - 1))"
      break
    fi
    if ((status == 0)); then
      info "sweep: [$((i + 1))/$total] ${RUN_NAMES[i]}: ok ($((SECONDS - start)) s)"
    else
      info "sweep: [$((i + 1))/$total] ${RUN_NAMES[i]}: FAILED with status $status"
      failed+=("${RUN_NAMES[i]}")
    fi
  done
  trap - INT
  if ((${#failed[@]} > 0)); then
    info "sweep: ${#failed[@]} of $total runs failed: ${failed[*]}"
    logs_locally && info "sweep: their output is in $LOG_DIR/<name>.log"
    return 1
  fi
  ((INTERRUPTED)) && return 130
  info "sweep: all runs ok ($total)"
}

main() {
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  local sources=() entry file
  while (($#)); do
    case $1 in
      --workdir-root) need_value "$@"; ROOT=${2%/}; shift 2 ;;
      --configs) need_value "$@"; sources+=("glob:$2"); shift 2 ;;
      --config) need_value "$@"; sources+=("file:$2"); shift 2 ;;
      --arg) need_value "$@"; CONFIG_ARG=$2; shift 2 ;;
      --overrides-file) need_value "$@"; OVERRIDES_FILE=$2; shift 2 ;;
      --local) set_where local "$1"; shift ;;
      --processes) need_value "$@"; set_where processes "$1"; PROCESSES=$2; shift 2 ;;
      --devices-per-process) need_value "$@"; DEVICES=$2; shift 2 ;;
      --tpu) need_value "$@"; set_where tpu "$1"; TPU_NAME_ARG=$2; shift 2 ;;
      --slurm) set_where slurm "$1"; shift ;;
      --nodes) need_value "$@"; SLURM_NODES=$2; shift 2 ;;
      --gpus-per-node) need_value "$@"; SLURM_GPUS=$2; shift 2 ;;
      --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
    esac
  done
  EXTRA_ARGS=("$@")
  [[ -n $ROOT ]] || die "give --workdir-root DIR"
  need_uint --processes "$PROCESSES" 1
  need_uint --devices-per-process "$DEVICES" 1
  ! has_flag --workdir "${EXTRA_ARGS[@]}" || die "--workdir is set per run: use --workdir-root"
  ! has_flag --config "${EXTRA_ARGS[@]}" || die "give config files with --config/--configs"

  cd "$USFM_REPO_ROOT"
  if [[ -n $OVERRIDES_FILE ]]; then
    [[ -f $OVERRIDES_FILE ]] || die "no such overrides file: $OVERRIDES_FILE"
    read_overrides
  fi
  for entry in "${sources[@]}"; do
    case $entry in
      glob:*) add_glob "${entry#glob:}" ;;
      file:*)
        file=${entry#file:}
        [[ -f ${file%%:*} ]] || die "no such config file: ${file%%:*}"
        CONFIGS+=("$file")
        ;;
    esac
  done
  ((${#CONFIGS[@]} > 0)) || die "give config files with --configs GLOB or --config FILE"
  build_runs
  if logs_locally; then
    LOG_DIR=${LOG_DIR:-$ROOT/sweep_logs}
    [[ $LOG_DIR != *://* ]] || die "the workdir root is not local: give --log-dir DIR"
  fi
  execute_runs
}

main "$@"
