#!/usr/bin/env bash
# Cloud TPU VM workflow with gcloud: create, setup, run, logs, stop, status, delete.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/.. source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/tpu.sh COMMAND [options] [-- ARGS]

Commands:
  create   create the TPU: a TPU VM, or a queued resource (--queued, --slices N > 1);
           ARGS after -- are extra gcloud flags (e.g. --network=NET, --reserved)
  setup    put this repository on every worker (copy of the working tree, or git clone with
           --repo-url), create .venv there and install requirements-gcs.txt + jax[tpu]
  run      start the trainer on every worker with --distributed=on, under nohup; ARGS after
           -- are the trainer's (--config ... --workdir gs://...); --wait waits for the end
  logs     show (and follow) a worker's log
  stop     SIGTERM the trainer on every worker: it checkpoints the current step and exits 0
  status   describe the TPU and say whether the trainer runs on each worker
  delete   delete the TPU (queued resources with --force: their TPU VMs too)

Options (default from the environment variable in brackets):
  --name NAME               TPU (or queued resource) name [TPU_NAME]; required
  --zone ZONE               [TPU_ZONE]; default: gcloud's compute/zone property
  --project PROJECT         [TPU_PROJECT]; default: gcloud's project property
  --queued                  the TPU is a queued resource [TPU_QUEUED=1]
  --slices N                number of slices; N > 1 is a multi-slice queued resource
                            [TPU_SLICES, default 1]
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                show this help
create:
  --accelerator-type TYPE   e.g. v5p-64, v4-32, v5litepod-16, v6e-8 [TPU_ACCELERATOR]
  --version VERSION         TPU software version [TPU_VERSION]; default by type: v4, v3, v2:
                            tpu-ubuntu2204-base; v5litepod: v2-alpha-tpuv5-lite;
                            v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e
  --spot                    Spot TPU (can be pre-empted at any time; cheaper)
setup:
  --remote-dir DIR          the repository copy on the workers, relative to the home
                            directory [TPU_REMOTE_DIR, default usfm_jax]; also for run, logs,
                            stop and status
  --repo-url URL            git clone URL on the workers instead of copying this working tree
  --ref REF                 with --repo-url: the commit to check out (default: this
                            checkout's HEAD commit, which must be pushed)
  --python PY               python that creates the venv on the workers (default: the first
                            of python3.12, python3.11, python3 that is >= 3.11; else
                            python3.11 is installed with apt-get)
run, logs, stop, status:
  --job NAME                the run's name: the workers' log is DIR/logs/NAME.log (default
                            train; one job at a time per name)
  --env KEY=VALUE           (run) set in the trainer's environment; repeatable
  --wait                    (run) wait for the trainer to exit (watching worker 0) and exit
                            with its status
  --worker W                (logs) worker index (default 0)
  --node N                  (logs, multi-slice) slice index (default 0)
  --lines N                 (logs) lines to show (default 100)
  --no-follow               (logs) show the lines and return
  --timeout S               (stop) seconds to wait for the trainer to exit (default 600)
  --yes                     (delete) do not ask for confirmation

Example (a v5p-64 pod slice, 8 workers):
  export TPU_NAME=usfm-v5p TPU_ZONE=us-east5-a
  launch/tpu/tpu.sh create --accelerator-type v5p-64
  launch/tpu/tpu.sh setup
  launch/tpu/tpu.sh run -- --config configs/pretrain/usfm_vitb16.py \
      --workdir gs://BUCKET/usfm/vitb16
  launch/tpu/tpu.sh logs
  launch/tpu/tpu.sh stop
  launch/tpu/tpu.sh delete
EOF
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
QUEUED=${TPU_QUEUED:-0}
SLICES=${TPU_SLICES:-1}
ACCELERATOR=${TPU_ACCELERATOR:-}
VERSION=${TPU_VERSION:-}
SPOT=0
REMOTE_DIR=${TPU_REMOTE_DIR:-usfm_jax}
REPO_URL=""
REF=""
REMOTE_PYTHON=""
JOB=train
ENV_VARS=()
WAIT=0
WORKER=0
NODE=0
LINES=100
FOLLOW=1
TIMEOUT=600
YES=0

multislice() { ((SLICES > 1)); }
queued() { ((QUEUED)) || multislice; }

# --zone / --project, when set (otherwise gcloud's configured defaults apply).
scope_flags() {
  SCOPE=()
  [[ -z $ZONE ]] || SCOPE+=("--zone=$ZONE")
  [[ -z $PROJECT ]] || SCOPE+=("--project=$PROJECT")
}

# gcloud ssh running the shell command $3 on worker(s) $1 of node(s)/slice(s) $2.
tpu_ssh() {
  local workers=$1 nodes=$2 command=$3
  scope_flags
  if multislice; then
    run_or_print gcloud compute tpus queued-resources ssh "$NAME" "${SCOPE[@]}" \
      "--node=$nodes" "--worker=$workers" "--command=$command"
  else
    run_or_print gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" \
      "--worker=$workers" "--command=$command"
  fi
}

# A shell command for the workers: cd to the repository copy, then worker.sh with arguments.
worker_command() {
  printf 'cd %q && bash launch/tpu/worker.sh %s' "$REMOTE_DIR" "$(quote_words "$@")"
}

default_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator type '$1': give --version" ;;
  esac
}

cmd_create() {
  [[ -n $ACCELERATOR ]] || die "create needs --accelerator-type (or TPU_ACCELERATOR)"
  local version=$VERSION cmd
  if [[ -z $version ]]; then
    version=$(default_version "$ACCELERATOR") || exit # its error is printed already
  fi
  scope_flags
  if queued; then
    cmd=(gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}"
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$version")
    if multislice; then
      cmd+=("--node-count=$SLICES")
    else
      cmd+=("--node-id=$NAME")
    fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}"
      "--accelerator-type=$ACCELERATOR" "--version=$version")
  fi
  ((SPOT)) && cmd+=(--spot)
  run_or_print "${cmd[@]}" "$@"
  if queued && ((!DRY_RUN)); then
    info "tpu: the queued resource waits for capacity; 'launch/tpu/tpu.sh status' shows its" \
      "state (setup once it is ACTIVE)"
  fi
}

REMOTE_TARBALL=usfm_jax-src.tar.gz

# Copies this working tree (tracked and untracked files, not ignored ones) to every worker's
# home directory as $REMOTE_TARBALL.
copy_tree() {
  local tarball=${TMPDIR:-/tmp}/usfm_jax-src-$$.tar.gz
  local list=(git -C "$USFM_REPO_ROOT" ls-files -z --cached --others --exclude-standard)
  # a tracked file deleted in the working tree is left out (with tar's warning), as it is gone
  local pack=(tar -C "$USFM_REPO_ROOT" --ignore-failed-read --null -T - -czf "$tarball")
  if ((DRY_RUN)); then
    printf '%s | %s\n' "$(quote_words "${list[@]}")" "$(quote_words "${pack[@]}")"
  else
    git -C "$USFM_REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$USFM_REPO_ROOT is not a git checkout: use --repo-url"
    "${list[@]}" | "${pack[@]}"
  fi
  scope_flags
  if multislice; then
    run_or_print gcloud compute tpus queued-resources scp "$tarball" "$NAME:$REMOTE_TARBALL" \
      "${SCOPE[@]}" --node=all --worker=all
  else
    run_or_print gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" \
      "${SCOPE[@]}" --worker=all
  fi
  run_or_print rm -f "$tarball"
}

# A shell command that unpacks the copied tree on a worker.
untar_command() {
  printf 'mkdir -p %q && tar -xzf %q -C %q && rm -f %q' \
    "$REMOTE_DIR" "$REMOTE_TARBALL" "$REMOTE_DIR" "$REMOTE_TARBALL"
}

# A shell command that clones (or fetches) --repo-url on a worker and checks out the ref.
clone_command() {
  local ref=$REF
  if [[ -z $ref ]]; then
    ref=$(git -C "$USFM_REPO_ROOT" rev-parse HEAD 2>/dev/null) ||
      die "give --ref (this is not a git checkout)"
  fi
  printf 'if [ -d %q/.git ]; then git -C %q fetch -q origin; else git clone -q %q %q; fi' \
    "$REMOTE_DIR" "$REMOTE_DIR" "$REPO_URL" "$REMOTE_DIR"
  printf ' && git -C %q checkout -q %q' "$REMOTE_DIR" "$ref"
}

cmd_setup() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    fetch=$(clone_command)
  else
    copy_tree
    fetch=$(untar_command)
  fi
  local setup_args=(setup)
  [[ -z $REMOTE_PYTHON ]] || setup_args+=(--python "$REMOTE_PYTHON")
  tpu_ssh all all "$fetch && $(worker_command "${setup_args[@]}")"
}

cmd_run() {
  (($# > 0)) || die "run needs trainer arguments after -- (--config ... --workdir ...)"
  local workdir
  workdir=$(trainer_workdir "$@") || die "the trainer arguments need --workdir (gs://...)"
  if [[ $workdir != gs://* ]]; then
    info "tpu: warning: --workdir $workdir is not on gs://: on a pod slice every worker" \
      "must see the same workdir"
  fi
  if multislice && ! has_flag --config.mesh.dcn "$@"; then
    info "tpu: note: with $SLICES slices, --config.mesh.dcn=$SLICES puts data parallelism" \
      "across slices on the mesh's dcn axis"
  fi
  local args=(start --job "$JOB")
  local kv
  for kv in "${ENV_VARS[@]}"; do
    args+=(--env "$kv")
  done
  tpu_ssh all all "$(worker_command "${args[@]}" -- --distributed=on "$@")"
  if ((WAIT)); then
    tpu_ssh 0 0 "$(worker_command wait --job "$JOB")"
  elif ((!DRY_RUN)); then
    info "tpu: started; follow it with: launch/tpu/tpu.sh logs --name $NAME --job $JOB"
  fi
}

cmd_logs() {
  local args=(logs --job "$JOB" --lines "$LINES")
  ((FOLLOW)) && args+=(--follow)
  tpu_ssh "$WORKER" "$NODE" "$(worker_command "${args[@]}")"
}

cmd_stop() {
  tpu_ssh all all "$(worker_command stop --job "$JOB" --timeout "$TIMEOUT")"
}

cmd_status() {
  scope_flags
  if queued; then
    run_or_print gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}"
  fi
  if ! multislice; then
    run_or_print gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}"
  fi
  tpu_ssh all all "$(worker_command status --job "$JOB")"
}

cmd_delete() {
  local quiet=()
  ((YES)) && quiet=(--quiet)
  scope_flags
  if queued; then
    run_or_print gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force \
      "${quiet[@]}"
  else
    run_or_print gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" "${quiet[@]}"
  fi
}

main() {
  (($# > 0)) || { usage >&2; exit 2; }
  local command=$1
  shift
  case $command in
    -h | --help) usage; exit 0 ;;
    create | setup | run | logs | stop | status | delete) ;;
    *) die "unknown command '$command' (see --help)" ;;
  esac
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      --name) need_value "$@"; NAME=$2; shift 2 ;;
      --zone) need_value "$@"; ZONE=$2; shift 2 ;;
      --project) need_value "$@"; PROJECT=$2; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --slices) need_value "$@"; SLICES=$2; shift 2 ;;
      --accelerator-type) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
      --version) need_value "$@"; VERSION=$2; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
      --repo-url) need_value "$@"; REPO_URL=$2; shift 2 ;;
      --ref) need_value "$@"; REF=$2; shift 2 ;;
      --python) need_value "$@"; REMOTE_PYTHON=$2; shift 2 ;;
      --job) need_value "$@"; JOB=$2; shift 2 ;;
      --env)
        need_value "$@"
        [[ $2 == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$2'"
        ENV_VARS+=("$2")
        shift 2
        ;;
      --wait) WAIT=1; shift ;;
      --worker) need_value "$@"; WORKER=$2; shift 2 ;;
      --node) need_value "$@"; NODE=$2; shift 2 ;;
      --lines) need_value "$@"; LINES=$2; shift 2 ;;
      --no-follow) FOLLOW=0; shift ;;
      --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
      --yes) YES=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done
  [[ -n $NAME ]] || die "give --name NAME (or set TPU_NAME)"
  need_uint --slices "$SLICES" 1
  need_uint --lines "$LINES"
  need_uint --timeout "$TIMEOUT" 1
  need_uint --worker "$WORKER"
  need_uint --node "$NODE"
  [[ $JOB =~ ^[A-Za-z0-9._=-]+$ ]] || die "--job must be a plain name, got '$JOB'"
  [[ $QUEUED == 0 || $QUEUED == 1 ]] || die "TPU_QUEUED must be 0 or 1, got '$QUEUED'"
  case $command in
    create | run) ;;
    *) (($# == 0)) || die "$command takes no arguments after --" ;;
  esac
  if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
  fi
  "cmd_$command" "$@"
}

main "$@"
