#!/usr/bin/env bash
# The fused Pallas layer and generation loop on one GPU, in about 6 minutes: checked against XLA's loops
# there, then timed against cuDNN on configs B, D and E (bf16; E in fp32 too; sampling on B), by vs_pytorch.py.
#   bash benchmarks/gpu.sh        # needs jax with CUDA and torch with CUDA on the machine
# Runs from a checkout without installing; PYTHON picks the interpreter (benchmarks/gpu_checkout.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_checkout.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$py" -c 'import jax, torch; print(f"jax {jax.__version__}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")'
date -u +%F
# A kernel whose programs wait for each other can hang where they are not all resident: bounded here.
if timeout 150 "$py" -m pytest -q -x tests/test_fused_layer.py tests/test_fused_sampling.py -k gpu; then
    pallas=--pallas
else
    echo "the fused kernel failed or hung on this GPU: timing the XLA layer only"
    pallas=
fi
common=(--device cuda --embedding 64 --unroll 8 --repeats 1 --seconds 2 $pallas)
timeout 150 "$py" benchmarks/vs_pytorch.py "${common[@]}" --configs B --dtypes bfloat16 --sample  # sampling's goals are on B
timeout 180 "$py" benchmarks/vs_pytorch.py "${common[@]}" --configs D,E --dtypes bfloat16
timeout 90 "$py" benchmarks/vs_pytorch.py "${common[@]}" --configs E --dtypes float32
