#!/usr/bin/env bash
# Runs N processes of the trainer on this machine, the way the hosts of a multi-host job run:
# one coordinator, USFM_PROCESS_ID 0..N-1, K fake CPU devices per process.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/.. source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local/run.sh [options] -- TRAINER ARGS

Runs N processes of `python -m usfm_jax.train TRAINER ARGS` on this machine, as the hosts of a
multi-host job. Process I gets USFM_COORDINATOR=127.0.0.1:PORT, USFM_NUM_PROCESSES=N,
USFM_PROCESS_ID=I, JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K,
and writes its output to WORKDIR/logs/process_I.log (process 0's is also shown here).

If a process exits non-zero, the others are stopped (SIGTERM, SIGKILL after 10 s) and the
script exits 1, naming the process and showing the end of its log. Ctrl-C or SIGTERM sends
SIGTERM to every process (the trainer checkpoints the current step and exits 0); a second one
sends SIGKILL.

Options:
  --processes N            number of processes (default 2)
  --devices-per-process K  fake CPU devices per process (default 1)
  --port PORT              coordinator port (default: a free one)
  --log-dir DIR            where process_I.log are written (default WORKDIR/logs)
  --quiet                  do not show process 0's output here
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               show this help

Environment: PYTHON (default .venv/bin/python if present, else python3). XLA_FLAGS is kept,
with any device count replaced by K. The processes run in the repository root: relative
paths in TRAINER ARGS are relative to it.

Example:
  launch/local/run.sh --processes 2 --devices-per-process 4 -- \
      --config configs/pretrain/demo.py --workdir runs/demo_2x4
EOF
}

GRACE_SECONDS=10

# Set by main.
NUM_PROCESSES=2
DEVICES=1
COORDINATOR=""
LOG_DIR=""
PYTHON_BIN=""
TRAINER_ARGS=()

# Process bookkeeping: PIDS[i] is "" once process i has been waited for.
PIDS=()
STATUS=()
FAILED=()
STOPPING=0  # 1 once we have sent SIGTERM to everyone (a failure or a signal to this script)
STREAM_PID=""
STREAM_ENDS_ITSELF=0

log_path() {
  printf '%s/process_%s.log\n' "$LOG_DIR" "$1"
}

# XLA_FLAGS of the environment with its device count (if any) replaced by $1.
xla_flags_with_devices() {
  local -a words kept=()
  local word
  read -ra words <<<"${XLA_FLAGS:-}"
  for word in "${words[@]}"; do
    [[ $word == --xla_force_host_platform_device_count=* ]] || kept+=("$word")
  done
  kept+=("--xla_force_host_platform_device_count=$1")
  printf '%s\n' "${kept[*]}"
}

free_port() {
  "$PYTHON_BIN" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Whether something already listens on port $1 of this host (bash's /dev/tcp connects).
port_in_use() {
  (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The command of process $1, in the array PROCESS_CMD.
process_command() {
  PROCESS_CMD=(env
    "USFM_COORDINATOR=$COORDINATOR"
    "USFM_NUM_PROCESSES=$NUM_PROCESSES"
    "USFM_PROCESS_ID=$1"
    "JAX_PLATFORMS=cpu"
    "XLA_FLAGS=$(xla_flags_with_devices "$DEVICES")"
    "PYTHONUNBUFFERED=1"
    "$PYTHON_BIN" -m usfm_jax.train "${TRAINER_ARGS[@]}")
}

print_commands() {
  local i
  print_cmd cd "$USFM_REPO_ROOT"
  print_cmd mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_command "$i"
    printf '%s > %q 2>&1 &\n' "$(quote_words "${PROCESS_CMD[@]}")" "$(log_path "$i")"
  done
  printf 'wait\n'
}

signal_running() {
  local pid
  for pid in "${PIDS[@]}"; do
    if [[ -n $pid ]]; then
      kill "-$1" "$pid" 2>/dev/null || true
    fi
  done
}

on_signal() {
  if ((STOPPING)); then
    info "launch/local: second signal: SIGKILL to every process"
    signal_running KILL
  else
    STOPPING=1
    info "launch/local: SIGTERM to every process (the trainer checkpoints and exits)"
    signal_running TERM
  fi
}

on_exit() {
  local status=$?
  signal_running KILL
  if [[ -n $STREAM_PID ]]; then
    kill "$STREAM_PID" 2>/dev/null || true
  fi
  exit "$status"
}

# Shows process 0's log as it grows (GNU tail stops by itself after the process ends).
start_stream() {
  local log=$1 pid=$2
  if tail --pid="$$" -n 0 /dev/null >/dev/null 2>&1; then
    tail -n +1 -s 0.2 -f --pid="$pid" "$log" &
    STREAM_ENDS_ITSELF=1
  else
    tail -n +1 -f "$log" &
    STREAM_ENDS_ITSELF=0
  fi
  STREAM_PID=$!
}

stop_stream() {
  [[ -n $STREAM_PID ]] || return 0
  local i
  if ((STREAM_ENDS_ITSELF)); then
    # tail prints the rest of the log and exits once process 0 has ended: wait for that
    # (a kill could cut its last output), up to 10 s
    for ((i = 0; i < 100; i++)); do
      kill -0 "$STREAM_PID" 2>/dev/null || break
      sleep 0.1 || true # Ctrl-C also reaches sleep (the foreground process group)
    done
  else
    sleep 1 || true # let tail print the last lines
  fi
  kill "$STREAM_PID" 2>/dev/null || true
  wait "$STREAM_PID" 2>/dev/null || true
  STREAM_PID=""
}

start_processes() {
  local i
  mkdir -p "$LOG_DIR" 2>/dev/null || die "cannot create the log directory $LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    # The log exists before the process starts, so that the stream (tail -f, which gives up
    # on a missing file) never races the background process's redirection.
    : >"$(log_path "$i")"
    process_command "$i"
    "${PROCESS_CMD[@]}" >>"$(log_path "$i")" 2>&1 &
    PIDS[i]=$!
  done
  info "launch/local: $NUM_PROCESSES processes x $DEVICES devices, coordinator $COORDINATOR," \
    "logs in $LOG_DIR/process_*.log"
}

# Waits for every process; on the first failure stops the others.
monitor() {
  local running=$NUM_PROCESSES i pid status kill_at=-1
  while ((running > 0)); do
    for i in "${!PIDS[@]}"; do
      pid=${PIDS[i]}
      [[ -n $pid ]] || continue
      kill -0 "$pid" 2>/dev/null && continue
      status=0
      wait "$pid" || status=$?
      PIDS[i]=""
      STATUS[i]=$status
      running=$((running - 1))
      if ((status != 0 && kill_at < 0)); then
        FAILED+=("$i")
      fi
    done
    if ((${#FAILED[@]} > 0 && kill_at < 0 && running > 0)); then
      info "launch/local: process ${FAILED[0]} failed: stopping the others"
      STOPPING=1
      signal_running TERM
      kill_at=$((SECONDS + GRACE_SECONDS))
    elif ((kill_at >= 0 && SECONDS >= kill_at && running > 0)); then
      signal_running KILL
    fi
    if ((running > 0)); then
      # Ctrl-C sends SIGINT to the whole foreground group, this sleep included: its failure
      # must not end the script (set -e), whose exit trap would SIGKILL the trainers before
      # they checkpoint
      sleep 0.2 || true
    fi
  done
}

report() {
  local i log
  if ((${#FAILED[@]} == 0)); then
    info "launch/local: all $NUM_PROCESSES processes exited with status 0 (logs in $LOG_DIR)"
    return 0
  fi
  for i in "${FAILED[@]}"; do
    log=$(log_path "$i")
    info "launch/local: process $i exited with status ${STATUS[i]}; the end of $log:"
    tail -n 20 "$log" | sed 's/^/  | /' >&2
  done
  info "launch/local: FAILED: process ${FAILED[*]} of $NUM_PROCESSES (exit status ${STATUS[${FAILED[0]}]})"
  return 1
}

main() {
  local port="" quiet=0 workdir
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      --processes) need_value "$@"; NUM_PROCESSES=$2; shift 2 ;;
      --devices-per-process) need_value "$@"; DEVICES=$2; shift 2 ;;
      --port) need_value "$@"; port=$2; shift 2 ;;
      --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
      --quiet) quiet=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
    esac
  done
  (($# > 0)) || die "no trainer arguments: give them after -- (see --help)"
  TRAINER_ARGS=("$@")
  need_uint --processes "$NUM_PROCESSES" 1
  need_uint --devices-per-process "$DEVICES" 1

  cd "$USFM_REPO_ROOT"
  PYTHON_BIN=$(default_python)
  workdir=$(trainer_workdir "$@") || die "the trainer arguments need --workdir DIR"
  LOG_DIR=${LOG_DIR:-$workdir/logs}
  [[ $LOG_DIR != *://* ]] || die "the workdir $workdir is not local: give --log-dir DIR"
  if [[ -z $port ]]; then
    port=$(free_port) || die "could not find a free port with $PYTHON_BIN: give --port"
  fi
  need_uint --port "$port" 1
  ((port <= 65535)) || die "--port must be at most 65535, got $port"
  COORDINATOR=127.0.0.1:$port

  if ((DRY_RUN)); then
    print_commands
    return 0
  fi
  ! port_in_use "$port" || die "--port $port is in use on this host: choose another, or leave" \
    "--port out for a free one"
  trap on_signal INT TERM
  trap on_exit EXIT
  start_processes
  if ((!quiet)); then
    start_stream "$(log_path 0)" "${PIDS[0]}"
  fi
  monitor
  stop_stream
  report
}

main "$@"
