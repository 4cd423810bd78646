#!/usr/bin/env bash
# The GPU recipes' 10 minutes on one GPU, in about 12 minutes, for README's GPU goals:
#   bash benchmarks/gpu_recipes.sh [MODELS] [OUT]    # needs jax with CUDA; data/g2p from examples/cmudict_pairs.py
# Tiny Shakespeare: MODELS (default 4) runs of configs/shakespeare-gpu.toml, one seed each, started at once and
# sharing the GPU, then scored alone and together on the validation split (charrnn eval -c ... -c ...).
# Grapheme-to-phoneme: configs/g2p-gpu.toml for 10 minutes beside them, then scored greedily and at beam 5.
# Every job shares the GPU with the others, so each figure is a lower bound on what it would do alone.
set -uo pipefail
cd "$(dirname "$0")/.."
models=${1:-4}
out=${2:-runs/gpu-recipes}
python -c 'import jax; assert jax.default_backend() == "gpu", f"no GPU for jax: {jax.devices()}"' || exit 1
[ -f data/g2p/train.tsv ] || { echo "data/g2p/train.tsv is missing: python examples/cmudict_pairs.py data/g2p"; exit 1; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c 'import jax; print(f"jax {jax.__version__}")'
date -u '+%F %T'
# Each process takes its share of the GPU's memory rather than JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python -c "print(round(0.9 / ($models + 1), 3))")
pids=()
for seed in $(seq 0 $((models - 1))); do
    python -m charrnn train --config configs/shakespeare-gpu.toml --seed "$seed" --out "$out/shakespeare-$seed" \
        --quiet > "$out/shakespeare-$seed.log" 2>&1 &
    pids+=($!)
done
python benchmarks/g2p.py data/g2p --config configs/g2p-gpu.toml --minutes 10 --out "$out/g2p" > "$out/g2p.log" 2>&1 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
unset XLA_PYTHON_CLIENT_MEM_FRACTION
tail -c 111539 data/tinyshakespeare.txt > "$out/val.txt"  # the validation split: the last 10%, a byte a character
checkpoints=()
for seed in $(seq 0 $((models - 1))); do
    checkpoints+=(-c "$out/shakespeare-$seed")
    echo "shakespeare seed $seed alone: $(python -m charrnn eval "$out/val.txt" -c "$out/shakespeare-$seed" --json)"
done
echo "shakespeare, $models together: $(python -m charrnn eval "$out/val.txt" "${checkpoints[@]}" --json)"
tail -n 8 "$out/g2p.log"
