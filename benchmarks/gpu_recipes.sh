#!/usr/bin/env bash
# The GPU recipes on one GPU, in one command of under 10 minutes, for README's GPU goals:
#   bash benchmarks/gpu_recipes.sh [MODELS] [OUT] [MINUTES]   # needs jax with CUDA; data/g2p from examples/cmudict_pairs.py
# Tiny Shakespeare: MODELS (default 4) runs of configs/shakespeare-gpu.toml, one seed each, started at once and
# sharing the GPU, each ending at its five passes or MINUTES, then scored alone and together on the validation
# split (charrnn eval -c ... -c ...) while the g2p run goes on.
# Grapheme-to-phoneme: configs/g2p-gpu.toml for MINUTES (default 7, so that the whole command ends within
# 10 minutes) beside them, then scored greedily and at beam 5.
# Every job shares the GPU with the others, so each figure is a lower bound on what it would do alone.
# Runs from a checkout without installing; PYTHON picks the interpreter (benchmarks/gpu_checkout.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_checkout.sh"
models=${1:-4}
out=${2:-runs/gpu-recipes}
minutes=${3:-7}
[ -f data/g2p/train.tsv ] || { echo "data/g2p/train.tsv is missing: $py examples/cmudict_pairs.py data/g2p"; exit 1; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$py" -c 'import jax; print(f"jax {jax.__version__}")'
date -u '+%F %T'
# Each process takes its share of the GPU's memory rather than JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=$("$py" -c "print(round(0.9 / ($models + 1), 3))")
"$py" benchmarks/g2p.py data/g2p --config configs/g2p-gpu.toml --minutes "$minutes" --out "$out/g2p" \
    > "$out/g2p.log" 2>&1 &
g2p=$!
runs=()
for seed in $(seq 0 $((models - 1))); do
    "$py" -m charrnn train --config configs/shakespeare-gpu.toml --seed "$seed" --set train.max_minutes="$minutes" \
        --out "$out/shakespeare-$seed" --quiet > "$out/shakespeare-$seed.log" 2>&1 &
    runs+=($!)
done
for pid in "${runs[@]}"; do wait "$pid"; done
date -u '+%F %T'
tail -c 111539 data/tinyshakespeare.txt > "$out/val.txt"  # the validation split: the last 10%, a byte a character
checkpoints=()
for seed in $(seq 0 $((models - 1))); do
    checkpoints+=(-c "$out/shakespeare-$seed")
    echo "shakespeare seed $seed: $(tail -n 1 "$out/shakespeare-$seed.log")"
done
echo "shakespeare, $models together: $("$py" -m charrnn eval "$out/val.txt" "${checkpoints[@]}" --json)"
wait "$g2p"
date -u '+%F %T'
tail -n 8 "$out/g2p.log"
