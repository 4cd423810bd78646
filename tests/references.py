"""NumPy references of the textbook functions the cell tests build their equations from, in float64."""

from __future__ import annotations

import numpy as np

from charrnn.cells import LAYER_NORM_EPSILON


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def layer_norm(x: np.ndarray, gain: np.ndarray, shift: np.ndarray, groups: int) -> np.ndarray:
    """Each of `groups` equal blocks of x's last axis to mean 0 and variance 1 on its own, then ⊙ gain + shift."""
    out = np.empty_like(x)
    width = x.shape[-1] // groups
    for group in range(groups):
        block = x[..., group * width : (group + 1) * width]
        mean = block.mean(axis=-1, keepdims=True)
        variance = ((block - mean) ** 2).mean(axis=-1, keepdims=True)
        out[..., group * width : (group + 1) * width] = (block - mean) / np.sqrt(variance + LAYER_NORM_EPSILON)
    return out * gain + shift
