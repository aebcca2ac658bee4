#!/usr/bin/env bash
# The worker side of launch/tpu/tpu.sh: runs on each TPU VM worker, in its copy of the
# repository (tpu.sh calls it there over `gcloud ... ssh --worker=all`). Works on any Linux host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/.. source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/worker.sh COMMAND [options] [-- TRAINER ARGS]

The part of launch/tpu/tpu.sh that runs on every TPU VM worker, in the repository copy.

Commands:
  setup   create .venv with requirements-gcs.txt and jax[tpu] (installs python3.11 with apt-get
          if no python >= 3.11 is found)
  start   start `python -m usfm_jax.train TRAINER ARGS` in the background (nohup, own
          session), appending its output to logs/JOB.log; refuses if JOB is running
  stop    send SIGTERM to the trainer (it checkpoints the current step and exits 0) and wait
          for it to exit
  wait    wait for the trainer to exit; exit with its status
  status  say whether JOB is running, or how it ended
  logs    show the end of logs/JOB.log (and follow it with --follow)

Options:
  --job NAME        the run's name: logs/NAME.log, logs/NAME.pid, logs/NAME.status
                    (default train)
  --log-dir DIR     where those files go (default logs, in the repository copy)
  --env KEY=VALUE   (start) set in the trainer's environment; repeatable
  --python PY       (setup) the python that creates .venv (default: python3.12, python3.11 or
                    python3, the first that is >= 3.11)
  --jax-spec SPEC   (setup) default "jax[tpu]==<the jax pin in requirements.txt>"
  --timeout S       (stop) seconds to wait for the exit (default 600)
  --lines N         (logs) lines to show (default 100)
  --follow          (logs) keep showing new lines (tail -F)
  --dry-run         print the commands, one per line, and run nothing
  -h, --help        show this help

Environment: PYTHON, the trainer's python (default .venv/bin/python).
EOF
}

JOB=train
ENV_VARS=()
SETUP_PYTHON=""
JAX_SPEC=""
TIMEOUT=600
LINES=100
FOLLOW=0

LOG_DIR=logs

log_file() { printf '%s/%s.log\n' "$LOG_DIR" "$JOB"; }
pid_file() { printf '%s/%s.pid\n' "$LOG_DIR" "$JOB"; }
status_file() { printf '%s/%s.status\n' "$LOG_DIR" "$JOB"; }

absolute() {
  if [[ $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi
}

# Prints the pid of JOB's trainer if it is running.
running_pid() {
  local pid
  [[ -f $(pid_file) ]] || return 1
  pid=$(<"$(pid_file)")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # After a reboot the pid may belong to another program.
  if [[ -r /proc/$pid/cmdline ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q usfm_jax.train; then
    return 1
  fi
  printf '%s\n' "$pid"
}

python_is_recent() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

find_python() {
  local candidate
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && python_is_recent "$candidate"; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

cmd_setup() {
  local python=$SETUP_PYTHON
  local apt=(sudo apt-get -o DPkg::Lock::Timeout=600 -q)
  if [[ -z $python ]] && ! python=$(find_python); then
    info "worker: no python >= 3.11: installing python3.11 with apt-get"
    run_or_print "${apt[@]}" update
    run_or_print "${apt[@]}" install -y python3.11 python3.11-venv
    python=python3.11
  fi
  run_or_print "$python" -m venv .venv
  run_or_print .venv/bin/python -m pip install -q --upgrade pip
  # requirements-gcs.txt = requirements.txt + gs:// support for logs and data (gcsfs, GCS client)
  run_or_print .venv/bin/python -m pip install -q -r requirements-gcs.txt \
    "${JAX_SPEC:-jax[tpu]==$(pinned_jax_version)}"
  run_or_print .venv/bin/python -c 'import jax, sys; print(sys.version.split()[0], "jax", jax.__version__)'
}

# The background process: records the trainer's pid, waits for it, records its exit status.
# shellcheck disable=SC2016  # expanded by the inner bash
WRAPPER='"${@:3}" & echo "$!" >"$1"; wait "$!"; echo "$?" >"$2"'

cmd_start() {
  local python pid i
  python=$(default_python)
  (($# > 0)) || die "start needs trainer arguments after --"
  if pid=$(running_pid); then
    die "job '$JOB' is already running (pid $pid): stop it first (tpu.sh stop)"
  fi
  local cmd=(env "${ENV_VARS[@]}" PYTHONUNBUFFERED=1 "$python" -m usfm_jax.train "$@")
  local detach=(nohup)
  if command -v setsid >/dev/null; then
    detach+=(setsid)
  fi
  local background=("${detach[@]}" bash -c "$WRAPPER" usfm-worker "$(pid_file)" "$(status_file)"
    "${cmd[@]}")
  if ((DRY_RUN)); then
    print_cmd mkdir -p "$LOG_DIR"
    print_cmd rm -f "$(pid_file)" "$(status_file)"
    printf '%s >> %q 2>&1 < /dev/null &\n' "$(quote_words "${background[@]}")" "$(log_file)"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  rm -f "$(pid_file)" "$(status_file)"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(quote_words "${cmd[@]}")" \
    >>"$(log_file)"
  "${background[@]}" >>"$(log_file)" 2>&1 </dev/null &
  for ((i = 0; i < 100; i++)); do
    [[ -s $(pid_file) ]] && break
    sleep 0.1
  done
  [[ -s $(pid_file) ]] || die "the trainer did not start: see $(log_file)"
  info "$(hostname): started job '$JOB' (pid $(<"$(pid_file)")), output in $(absolute "$(log_file)")"
}

cmd_stop() {
  local pid waited
  if ! pid=$(running_pid); then
    info "$(hostname): job '$JOB' is not running"
    return 0
  fi
  run_or_print kill -TERM "$pid"
  if ((DRY_RUN)); then
    return 0
  fi
  info "$(hostname): SIGTERM sent to job '$JOB' (pid $pid); waiting up to ${TIMEOUT}s for it to exit"
  for ((waited = 0; waited < TIMEOUT; waited++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    die "job '$JOB' (pid $pid) still runs after ${TIMEOUT}s; kill -KILL $pid forces it"
  fi
  cmd_status
}

cmd_wait() {
  local pid
  if ((DRY_RUN)); then
    cmd_status
    return 0
  fi
  if pid=$(running_pid); then
    while kill -0 "$pid" 2>/dev/null; do
      sleep 5
    done
  fi
  [[ -s $(status_file) ]] || die "job '$JOB' has no exit status ($(status_file))"
  cmd_status
  return "$(<"$(status_file)")"
}

cmd_status() {
  local pid
  if pid=$(running_pid); then
    info "$(hostname): job '$JOB' is running (pid $pid)"
  elif [[ -s $(status_file) ]]; then
    info "$(hostname): job '$JOB' exited with status $(<"$(status_file)")"
  else
    info "$(hostname): job '$JOB' is not running and left no exit status"
  fi
}

cmd_logs() {
  local args=(-n "$LINES")
  if ((FOLLOW)); then
    args+=(-F)
  fi
  run_or_print tail "${args[@]}" "$(log_file)"
}

main() {
  (($# > 0)) || { usage >&2; exit 2; }
  local command=$1
  shift
  case $command in
    -h | --help) usage; exit 0 ;;
    setup | start | stop | wait | status | logs) ;;
    *) die "unknown command '$command' (see --help)" ;;
  esac
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      --job) need_value "$@"; JOB=$2; shift 2 ;;
      --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
      --env)
        need_value "$@"
        [[ $2 == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$2'"
        ENV_VARS+=("$2")
        shift 2
        ;;
      --python) need_value "$@"; SETUP_PYTHON=$2; shift 2 ;;
      --jax-spec) need_value "$@"; JAX_SPEC=$2; shift 2 ;;
      --timeout) need_value "$@"; need_uint --timeout "$2" 1; TIMEOUT=$2; shift 2 ;;
      --lines) need_value "$@"; need_uint --lines "$2"; LINES=$2; shift 2 ;;
      --follow) FOLLOW=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done
  [[ $JOB =~ ^[A-Za-z0-9._=-]+$ ]] || die "--job must be a plain name, got '$JOB'"
  if [[ $command != start ]] && (($# > 0)); then
    die "$command takes no arguments after --"
  fi
  cd "$USFM_REPO_ROOT"
  "cmd_$command" "$@"
}

main "$@"
