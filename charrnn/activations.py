"""Look inside a trained network: per-character activations, text features, and the units that track them.

`record` reads a text as one stream from the initial state and keeps one layer's
state after every character (h, and c for an LSTM) with the model's top guesses for
the next one. A feature's value at character i describes the text up to and
including i, as the state does: an opening quote is inside its quotation, a closing
one outside, and "(" already has depth 1.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import model
from charrnn.config import ModelConfig

CHUNK = 512  # characters per compiled call: memory stays bounded, the state is carried between calls
TOP_K = 5  # next-character predictions kept per position


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _record_chunk(params: dict, config: ModelConfig, layer: int, carry: tuple, inputs: jax.Array):
    """Run ids `inputs` [T, 1] from `carry`: (carry, {field: [T, H]}, top ids [T, K], top probs [T, K]).

    One character per scan step, so the carry of every step (the LSTM's c too)
    comes out of the model's own forward pass.
    """
    prepared = model.prepare(params, config)

    def one_character(carry, ids):
        carry, logits = model.forward_prepared(prepared, config, carry, ids[None, :])  # logits [1, 1, V]
        probs = jax.nn.softmax(logits[0, 0].astype(jnp.float32))  # [V]
        top_probs, top_ids = jax.lax.top_k(probs, min(TOP_K, probs.shape[0]))
        state = {name: value[0] for name, value in carry[layer]._asdict().items()}  # [H] each
        return carry, (state, top_ids, top_probs)

    carry, (states, top_ids, top_probs) = jax.lax.scan(one_character, carry, inputs)
    return carry, states, top_ids, top_probs


def record(params: dict, model_config: ModelConfig, ids: np.ndarray, layer: int,
           chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Activations of layer `layer` (0-based) after each character of `ids`, read as one stream.

    Returns "h" [N, H] (and "c" [N, H] for an LSTM): the cell's own state, before
    any residual connection adds the layer's input; "top_ids" and "top_probs"
    [N, 5]: the most likely next characters after each position, most likely first.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    if not 0 <= layer < model_config.num_layers:
        raise ValueError(f"layer {layer} outside 0..{model_config.num_layers - 1}")
    if len(ids) == 0:
        raise ValueError("no characters to record")
    chunk = min(chunk, len(ids))  # one compilation: the last chunk is padded to this length
    carry = model.initial_carry(params, model_config, 1)
    pieces = []
    for start in range(0, len(ids), chunk):
        real = ids[start : start + chunk]
        inputs = np.zeros((chunk, 1), np.int32)  # [T, 1]
        inputs[: len(real), 0] = real
        carry, states, top_ids, top_probs = _record_chunk(params, model_config, layer, carry, jnp.asarray(inputs))
        piece = {**states, "top_ids": top_ids, "top_probs": top_probs}
        pieces.append({name: np.asarray(value)[: len(real)] for name, value in piece.items()})
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [N]


def inside_quotes(text: str) -> np.ndarray:
    """1.0 between an opening '"' (included) and its closing '"' (excluded), else 0.0."""
    return (np.cumsum(_code_points(text) == ord('"')) % 2).astype(np.float64)


def bracket_depth(text: str) -> np.ndarray:
    """Open ( [ { after each character; a closing bracket with none open stays at 0."""
    points = _code_points(text)
    steps = np.isin(points, [ord(c) for c in "([{"]).astype(np.int64) - np.isin(points, [ord(c) for c in ")]}"])
    running = np.cumsum(steps)
    # Depth clamped at zero: subtract how far below zero the running sum has ever gone.
    return (running - np.minimum(np.minimum.accumulate(running), 0)).astype(np.float64)


def position_in_line(text: str) -> np.ndarray:
    """Characters read since the last newline: 0 on a newline, 1 on the first character of a line."""
    positions = np.arange(len(text))
    newlines = np.where(_code_points(text) == ord("\n"), positions, -1)
    return (positions - np.maximum.accumulate(newlines)).astype(np.float64)


def line_start(text: str) -> np.ndarray:
    """1.0 on the first character of each line (the text's first character included)."""
    return (position_in_line(text) == 1).astype(np.float64)


FEATURES: dict[str, Callable[[str], np.ndarray]] = {
    "quotes": inside_quotes,
    "brackets": bracket_depth,
    "line_position": position_in_line,
    "line_start": line_start,
}


def correlations(activations: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson correlation of each unit [N, H] with the feature [N]: [H], 0 where either is constant."""
    activations = np.asarray(activations, np.float64)
    feature = np.asarray(feature, np.float64)
    centred = activations - activations.mean(axis=0, keepdims=True)  # [N, H]
    feature_centred = feature - feature.mean()  # [N]
    covariance = feature_centred @ centred  # [H], sums (the 1/N cancels)
    scale = np.sqrt(np.sum(centred**2, axis=0) * np.sum(feature_centred**2))  # [H]
    return np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 0)


def top_units(activations: np.ndarray, text: str, n: int, feature: str | None = None) -> list[tuple[int, float]]:
    """The n units most correlated with `feature` (unit, correlation), or of highest variance (unit, variance)."""
    activations = np.asarray(activations, np.float64)  # [N, H]
    if feature is None:
        scores = activations.var(axis=0)  # [H]
        order = np.argsort(-scores, kind="stable")
    else:
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; one of {', '.join(FEATURES)}")
        if len(text) != len(activations):
            raise ValueError(f"text has {len(text)} characters, activations {len(activations)} rows")
        scores = correlations(activations, FEATURES[feature](text))
        order = np.argsort(-np.abs(scores), kind="stable")
    return [(int(unit), float(scores[unit])) for unit in order[:n]]
