#!/usr/bin/env bash
# A small sweep: every cell at every hidden size, then one table and one figure of them all.
#
#   bash examples/sweep.sh                                  # 3 cells x 2 sizes, 10 minutes each
#   CELLS="gru lstm" SIZES="256 512" MINUTES=5 bash examples/sweep.sh
#   CONFIG=configs/tiny.toml STEPS=20 OUT=/tmp/sweep bash examples/sweep.sh   # seconds, for a check
#
# Settings (environment variables):
#   CONFIG   TOML config every run starts from       [configs/shakespeare.toml]
#   CORPUS   text to train on                        [data/tinyshakespeare.txt]
#   OUT      directory that receives one run per combination   [runs/sweep]
#   CELLS    cells to try                            ["rnn gru lstm"]
#   SIZES    hidden sizes to try                     ["128 256"]
#   STEPS    train.steps of each run                 [the config's]
#   MINUTES  train.max_minutes of each run           [the config's]
#   PLOT     figure to write; empty: no figure       [$OUT/curves.png]
#   CHARRNN  the command to run                      [charrnn]
#
# Run it again and finished runs are kept, stopped ones resumed: a killed sweep picks up where it was.
# A run that fails (diverges, say) does not stop the others; the script then exits 1 after the table.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$repo/configs/shakespeare.toml}"
CORPUS="${CORPUS:-$repo/data/tinyshakespeare.txt}"
OUT="${OUT:-runs/sweep}"
CELLS="${CELLS:-rnn gru lstm}"
SIZES="${SIZES:-128 256}"
STEPS="${STEPS:-}"
MINUTES="${MINUTES:-}"
PLOT="${PLOT-$OUT/curves.png}"
read -r -a charrnn <<< "${CHARRNN:-charrnn}"

budget=()
[[ -n "$STEPS" ]] && budget+=(--steps "$STEPS")
[[ -n "$MINUTES" ]] && budget+=(--minutes "$MINUTES")

mkdir -p "$OUT"
failed=()
for cell in $CELLS; do
  for size in $SIZES; do
    run="$OUT/$cell-$size"
    if [[ -f "$run/status.json" ]] && grep -q '"status": "finished"' "$run/status.json"; then
      echo "sweep: $run finished before, kept" >&2
      continue
    elif [[ -d "$run" ]]; then
      echo "sweep: resuming $run" >&2
      where=(--resume "$run")
    else
      echo "sweep: training $run" >&2
      where=(--out "$run")
    fi
    # The JSON summary goes to stderr with the rest: stdout holds only the table.
    code=0
    "${charrnn[@]}" train "$CORPUS" --config "$CONFIG" --set "model.cell=$cell" --set "model.hidden_size=$size" \
      "${budget[@]}" "${where[@]}" --quiet >&2 || code=$?
    if (( code == 130 || code == 143 )); then
      echo "sweep: stopped; run the script again to resume" >&2
      exit "$code"
    elif (( code != 0 )); then
      failed+=("$run (exit $code)")
    fi
  done
done

"${charrnn[@]}" runs "$OUT"
if [[ -n "$PLOT" ]]; then
  "${charrnn[@]}" plot "$OUT" -o "$PLOT"
fi
if (( ${#failed[@]} )); then
  printf 'sweep: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
