"""Attention over the encoder's outputs: the scores (dot, additive), their softmax, the attentional features.

Params: params["attention"] = {w_k [D, A], (w_q [H, A], v [A] additive), w_c [H + D, H], b_c,
(w_f [H, G*H] input feeding)}, with D the encoder's width and A the additive score's
`model.attention_size` (H for dot). The functions here take them as `seq2seq.model.prepare`
casts them once per compiled call: weight matrices in the model's matmul dtype, as the
recurrent layers' are.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from charrnn.cells import dense, matmul
from charrnn.config import ModelConfig
from charrnn.seq2seq.pairs import PAD


class Memory(NamedTuple):
    """What the decoder reads of the encoder: its outputs, their padding, and the attention's keys."""

    values: jax.Array  # [S, B, D] the top encoder layer's output at each source position
    mask: jax.Array  # [S, B] bool: True at real positions
    keys: jax.Array | None  # [S, B, A] values projected for the attention score (None without attention)


def memory(weights: dict | None, outputs: jax.Array, source: jax.Array) -> Memory:
    """The encoder's outputs as the decoder attends to them; the keys are projected once per source."""
    keys = None if weights is None else matmul(outputs, weights["w_k"])
    return Memory(outputs, source != PAD, keys)


@jax.custom_vjp
def additive_scores(projected: jax.Array, keys: jax.Array, v: jax.Array) -> jax.Array:
    """Bahdanau's scores [T, B, S]: v · tanh(q_t + k_s) for projected queries q [T, B, A] and keys k [S, B, A].

    The backward pass recomputes tanh one query at a time instead of keeping the
    [T, S, B, A] activations: they are written once and read several times, and at
    g2p's sizes that traffic costs more than the arithmetic.
    """
    return jnp.einsum("tsba,a->tbs", jnp.tanh(projected[:, None] + keys[None]), v)


def _additive_scores_forward(projected, keys, v):
    return additive_scores(projected, keys, v), (projected, keys, v)


def _additive_scores_backward(residuals, d_scores):
    """d score / d(q_t + k_s) = v (1 - tanh²); each query's slab [S, B, A] adds to the keys' and v's gradients."""
    projected, keys, v = residuals

    def one_query(sums, query_and_grad):
        d_keys, d_v = sums
        query, d_score = query_and_grad  # [B, A], [B, S]
        activation = jnp.tanh(query[None] + keys)  # [S, B, A]
        d_score = d_score.T[:, :, None]  # [S, B, 1]
        d_sum = d_score * (1.0 - activation * activation) * v[None, None]  # [S, B, A]
        d_v = d_v + jnp.sum(d_score * activation, axis=(0, 1))
        return (d_keys + d_sum, d_v), jnp.sum(d_sum, axis=0)

    (d_keys, d_v), d_projected = jax.lax.scan(one_query, (jnp.zeros_like(keys), jnp.zeros_like(v)),
                                              (projected, d_scores))
    return d_projected, d_keys, d_v


additive_scores.defvjp(_additive_scores_forward, _additive_scores_backward)


def attention_weights(weights: dict, config: ModelConfig, query: jax.Array, memory: Memory) -> jax.Array:
    """Weights [T, B, S] of each decoder output `query` [T, B, H] over the source positions.

    dot (Luong's general score): q · (W_k e_s). additive (Bahdanau's score):
    v · tanh(W_q q + W_k e_s). A softmax over the real positions; padding gets 0.
    """
    if config.attention == "dot":
        scores = jnp.einsum("tbh,sbh->tbs", query, memory.keys)
    else:
        scores = additive_scores(matmul(query, weights["w_q"]), memory.keys, weights["v"])
    scores = jnp.where(memory.mask.T[None], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def attend(weights: dict | None, config: ModelConfig, query: jax.Array,
           memory: Memory) -> tuple[jax.Array, jax.Array | None]:
    """(features [T, B, H] the output layer reads, attention weights [T, B, S] or None).

    With attention, the features are tanh(W_c [q; c] + b_c), c = Σ_s a_s e_s
    (Luong et al. 2015); without, the decoder's output q itself.
    """
    if weights is None:
        return query, None
    over_source = attention_weights(weights, config, query, memory)
    context = jnp.einsum("tbs,sbd->tbd", over_source, memory.values)
    features = jnp.tanh(dense(jnp.concatenate([query, context], axis=-1), weights["w_c"], weights["b_c"]))
    return features, over_source
