#!/usr/bin/env bash
# Run on the GPU box from the repo root (device tool, carry [".gpu"]):
#   bash scripts/gpu_check.sh "<pytest args>" "<bench command 1>" "<bench command 2>" ...
# Logs go to $OUT (or ./out); a short summary is printed last.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
source scripts/gpu_env.sh > "$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
tail -3 "$OUT/env.log"
summary=()
if [ -n "${1:-}" ]; then
  eval python3 -m pytest -q -p no:cacheprovider "$1" > "$OUT/pytest.log" 2>&1; rc=$?
  summary+=("pytest [$1] rc=$rc: $(tail -1 "$OUT/pytest.log")")
  grep -E "FAILED|Error" "$OUT/pytest.log" | head -20
fi
shift || true
i=0
for cmd in "$@"; do
  i=$((i+1))
  bash -c "$cmd" > "$OUT/bench$i.log" 2>&1; rc=$?
  summary+=("bench$i rc=$rc: $cmd")
  tail -40 "$OUT/bench$i.log"
done
echo "==== summary"; printf '%s\n' "${summary[@]}"
