"""Calibrated predictions (`train.calibration_fraction`): each model's softmax temperature, fitted on held-out text.

A network trained with dropout and scored without it predicts more sharply than
the text warrants. One number per model mends most of that (temperature
scaling, Guo et al. 2017): the temperature T that minimises the model's loss on
a slice of text it never trained on, so that it predicts softmax(z / T) from
its logits z. T is folded into the output layer (w / T, b / T), so a saved
model samples, scores and predicts with it and nothing downstream knows; the
training state keeps the unscaled layer, so a resumed run goes on exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import jax
import numpy as np

from charrnn import data, members, model, steps
from charrnn.config import ModelConfig

# Temperatures are kept within these bounds: a model right about every held-out
# character would otherwise be pushed towards T = 0, one with flat logits to T = ∞.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """The T minimising the mean over masked positions of -log softmax(z / T)[target], logits z [..., V].

    Newton's method on β = 1/T, kept inside a shrinking bracket of the minimum:
    the loss mean(logsumexp(β z) - β z_target) is convex in β, its derivative
    mean(E_p[z] - z_target) and its second derivative mean(Var_p[z]) under
    p = softmax(β z).
    """
    real = np.asarray(mask, bool)
    z = np.asarray(logits, np.float64)[real]
    z_target = np.take_along_axis(z, np.asarray(targets)[real][:, None], axis=-1)[:, 0]
    low, high = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
    beta = 1.0
    for _ in range(100):
        scaled = beta * z
        p = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        expected = (p * z).sum(axis=-1)
        slope = np.mean(expected - z_target)
        curvature = np.mean((p * z * z).sum(axis=-1) - expected**2)
        if slope > 0:  # the minimum is at a smaller β
            high = beta
        else:
            low = beta
        following = beta - slope / curvature if curvature > 0 else math.nan
        if not low < following < high:  # a step out of the bracket: halve it instead
            following = (low + high) / 2
        if abs(following - beta) < 1e-10 * beta:
            break
        beta = following
    return float(1 / beta)


@functools.partial(jax.jit, static_argnames=("model_config",))
def _logits(params: dict, carry: tuple, inputs: jax.Array, model_config: ModelConfig):
    return model.forward(params, model_config, carry, inputs)


def fit_on_chunks(chunks: Sequence[data.EvalChunk], logits: Iterable) -> float:
    """One model's temperature from its `logits` [..., V] of each of `chunks` in turn (`data.evaluation_chunks`)."""
    targets, mask = (np.concatenate([getattr(chunk, name).reshape(-1) for chunk in chunks])
                     for name in ("targets", "mask"))
    return fit_temperature(np.concatenate([np.asarray(one, np.float32).reshape(-1, one.shape[-1]) for one in logits]),
                           targets, mask)


def fit(params: dict, model_config: ModelConfig, ids: np.ndarray, num_streams: int,
        num_members: int = 1) -> list[float]:
    """Each model's temperature on the text `ids`, state carried along `num_streams` streams as validation is
    scored; `params` holds `num_members` models stacked (`charrnn.members`)."""
    chunks = data.evaluation_chunks(ids, num_streams, steps.EVAL_SEQ_LEN)

    def member_logits(member_params: dict):
        carry = model.initial_carry(member_params, model_config, chunks[0].inputs.shape[1])
        for chunk in chunks:
            carry, chunk_logits = _logits(member_params, carry, chunk.inputs, model_config)
            yield chunk_logits

    return [fit_on_chunks(chunks, member_logits(member_params)) for member_params in members.split(params, num_members)]


def checked(temperatures: object, num_models: int) -> list[float] | None:
    """Temperatures read from a checkpoint: None, or one number within the bounds for each of its `num_models`
    models; ValueError for anything else."""
    if temperatures is None:
        return None
    if (not isinstance(temperatures, list) or len(temperatures) != num_models
            or not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                       and MIN_TEMPERATURE <= value <= MAX_TEMPERATURE for value in temperatures)):
        raise ValueError(f"temperatures {temperatures!r} are not {num_models} numbers within "
                         f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    return [float(value) for value in temperatures]


def apply(params: dict, temperatures: Sequence[float] | None) -> dict:
    """`params` predicting at `temperatures` (one per model; the models stacked on axis 0 where several): the output
    layer divided by each; None or empty leaves them as they are."""
    if not temperatures:
        return params
    scale = 1 / np.asarray(temperatures, np.float32)
    # [M] -> [M, 1, ...]: each model's own; one model's [1, 1, ...] broadcasts over its unstacked leaves.
    output = {name: leaf * scale.reshape(scale.shape + (1,) * (leaf.ndim - 1)) for name, leaf in params["output"].items()}
    return {**params, "output": output}
