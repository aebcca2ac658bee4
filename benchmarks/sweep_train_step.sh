#!/usr/bin/env bash
# Runs benchmarks/train_step.py once per line of a variants file (each line: its arguments) and
# collects the table rows, so that one session on an accelerator measures every variant.
#
#   bash benchmarks/sweep_train_step.sh VARIANTS_FILE [LOG_DIR]
#
# Each variant runs in its own process (a clean device), under a time limit of
# SWEEP_TIMEOUT seconds (default 240). Lines starting with '#' are skipped. PYTHON picks the
# interpreter (default python3).
set -uo pipefail

variants=${1:?usage: sweep_train_step.sh VARIANTS_FILE [LOG_DIR]}
log_dir=${2:-sweep_logs}
limit=${SWEEP_TIMEOUT:-240}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$log_dir"
rows="$log_dir/rows.md"
: >"$rows"

n=0
while IFS= read -r line; do
  [[ -z "${line// /}" || "$line" == \#* ]] && continue
  n=$((n + 1))
  echo "== [$n] $line"
  read -ra args <<<"$line"
  if timeout "$limit" "${PYTHON:-python3}" "$here/train_step.py" "${args[@]}" >"$log_dir/$n.log" 2>&1; then
    grep -E 'compile \+ first step|/ PyTorch' "$log_dir/$n.log"
    grep -E '^\| 2[0-9]{3}-' "$log_dir/$n.log" | tee -a "$rows"
  else
    echo "| failed ($?): $line | $(grep -E 'Error|error' "$log_dir/$n.log" | tail -n 1) |" | tee -a "$rows"
  fi
done <"$variants"

echo
echo "== rows"
cat "$rows"
