# Helpers shared by the launch scripts. Sourced, not run: `source launch/common.sh`.
# shellcheck shell=bash

# The repository root (this file lives in <root>/launch/).
USFM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export USFM_REPO_ROOT

# 1 under --dry-run: commands are printed (one per line, copy-pastable) instead of run.
DRY_RUN=0

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

info() {
  printf '%s\n' "$*" >&2
}

# One word quoted for bash, readably: as is if it is plain, else in '...' (or "..." when it
# holds a single quote), else with printf %q.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word != *"'"* && $word =~ ^[[:print:]]*$ ]]; then
    printf "'%s'" "$word"
  elif [[ $word != *[\"\$\`\\!]* && $word =~ ^[[:print:]]*$ ]]; then
    printf '"%s"' "$word"
  else
    printf '%q' "$word"
  fi
}

# The words of a command as one line that bash reads back as the same words.
quote_words() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    shell_quote "$word"
    sep=" "
  done
}

# Prints one command, quoted so that it can be pasted into bash.
print_cmd() {
  quote_words "$@"
  printf '\n'
}

# Runs a command, or prints it under --dry-run.
run_or_print() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    "$@"
  fi
}

# Splits every `--flag=value` before a lone `--` into `--flag value` (the words after `--` are
# passed on untouched). Result in the array NORMALIZED_ARGS.
normalize_args() {
  NORMALIZED_ARGS=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      NORMALIZED_ARGS+=("$@")
      return
    fi
    if [[ $1 == --*=* ]]; then
      NORMALIZED_ARGS+=("${1%%=*}" "${1#*=}")
    else
      NORMALIZED_ARGS+=("$1")
    fi
    shift
  done
}

# Usage: need_value "$@" inside an option loop: the option in $1 must be followed by a value.
need_value() {
  [[ $# -ge 2 && $2 != -- ]] || die "$1 needs a value"
}

# Usage: need_uint NAME VALUE [MIN]
need_uint() {
  [[ $2 =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 must be a whole number (no leading zeros), got '$2'"
  (($2 >= ${3:-0})) || die "$1 must be at least ${3:-0}, got '$2'"
}

# The Python that runs the trainer: $PYTHON, else the repository's .venv, else python3.
# Relative to the repository root (the launchers cd there).
default_python() {
  if [[ -n ${PYTHON:-} ]]; then
    printf '%s\n' "$PYTHON"
  elif [[ -x $USFM_REPO_ROOT/.venv/bin/python ]]; then
    printf '%s\n' .venv/bin/python
  else
    printf '%s\n' python3
  fi
}

# The jax version pinned in requirements.txt (for jax[tpu]==X / jax[cuda12]==X).
pinned_jax_version() {
  local version
  version=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$USFM_REPO_ROOT/requirements.txt")
  [[ -n $version ]] || die "no 'jax==' pin in $USFM_REPO_ROOT/requirements.txt"
  printf '%s\n' "$version"
}

# The value of --workdir in trainer arguments (`--workdir DIR` or `--workdir=DIR`; the last one
# wins, as in absl). Fails if there is none.
trainer_workdir() {
  local found=""
  while (($#)); do
    case $1 in
      --workdir=*) found=${1#*=} ;;
      --workdir)
        if (($# >= 2)); then
          found=$2
          shift
        fi
        ;;
    esac
    shift
  done
  [[ -n $found ]] || return 1
  printf '%s\n' "$found"
}

# Whether trainer arguments set a flag (`--name` or `--name=...`).
has_flag() {
  local name=$1
  shift
  local arg
  for arg in "$@"; do
    [[ $arg == "$name" || $arg == "$name="* ]] && return 0
  done
  return 1
}

# A file-name-safe slug: runs of other characters become "_", at most 100 characters.
slugify() {
  local slug
  slug=$(printf '%s' "$1" | tr -c 'A-Za-z0-9._=-' '_' | tr -s '_')
  slug=${slug#_}
  slug=${slug%_}
  printf '%s\n' "${slug:0:100}"
}
