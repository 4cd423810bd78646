"""Writing targets for sources: character by character (greedy or sampled), or beam search; each one compiled call.

Every function takes one or more models (`params` and `configs`, tuples of the same length) that write
together: at each symbol they all read the same history and the choice is made from the mean of their
distributions (an ensemble). One model is an ensemble of one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from charrnn import model
from charrnn.config import ModelConfig
from charrnn.sample import choose
from charrnn.seq2seq import attention, model as seq2seq_model
from charrnn.seq2seq.pairs import BOUNDARY


def _decoders(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], source: jax.Array):
    """Each model's (decoder's prepared params, its initial state, memory) for sources [S, B], as three tuples."""
    prepared = tuple(seq2seq_model.prepare(member, config) for member, config in zip(params, configs, strict=True))
    started = [seq2seq_model.start(member, ready, config, source) for member, ready, config in
               zip(params, prepared, configs)]
    return prepared, tuple(state for state, _ in started), tuple(memory for _, memory in started)


def _step(prepared: tuple, configs: tuple[ModelConfig, ...], states: tuple, ids: jax.Array, memories: tuple):
    """Every model reads ids [B]: (their states, log-probabilities [B, Vt] of their mean distribution, the first
    model's attention weights [B, S] or None)."""
    stepped = [seq2seq_model.decoder_step(ready, config, state, ids, memory)
               for ready, config, state, memory in zip(prepared, configs, states, memories)]
    log_probs = model.log_mean_softmax([logits for _, logits, _ in stepped])
    return tuple(state for state, _, _ in stepped), log_probs, stepped[0][2]


def until_all_ended(step, state: tuple, ended_of, length: int) -> tuple:
    """Run `step(t, state) -> state` for t = 0, 1, ... until `length` steps or until `ended_of(state)` is all true.

    Outputs are written into arrays sized for `length` steps; steps not taken leave them as they were.
    """
    def unfinished(loop):
        t, state = loop
        return (t < length) & ~jnp.all(ended_of(state))

    return jax.lax.while_loop(unfinished, lambda loop: (loop[0] + 1, step(*loop)), (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=("configs", "length", "top_k"))
def sample(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], source: jax.Array, key: jax.Array,
           temperature: jax.Array, top_p: jax.Array | None, length: int,
           top_k: int = 0) -> tuple[jax.Array, jax.Array]:
    """Targets for sources [S, B], one character at a time: (ids [B, length], attention weights [length, B, S]).

    Each character is chosen as `charrnn sample` chooses (temperature 0 = the most
    likely), with the noise of fold_in(key, t) at step t; after a target's end
    symbol its ids are all BOUNDARY. The weights are the first model's; without
    attention they are 0.
    """
    prepared, carry, memory = _decoders(params, configs, source)
    batch_size, vocab_size = source.shape[1], prepared[0]["output"]["b"].shape[0]

    def one_character(t, state):
        carry, ids, ended, all_ids, all_weights = state
        carry, log_probs, weights = _step(prepared, configs, carry, ids, memory)
        noise = jax.random.gumbel(jax.random.fold_in(key, t), (batch_size, vocab_size))
        chosen = jnp.where(ended, BOUNDARY, choose(log_probs, noise, temperature, top_k, top_p))
        if weights is not None:
            all_weights = all_weights.at[t].set(weights)
        return carry, chosen, ended | (chosen == BOUNDARY), all_ids.at[t].set(chosen), all_weights

    start = (carry, jnp.full((batch_size,), BOUNDARY, jnp.int32), jnp.zeros((batch_size,), bool),
             jnp.full((length, batch_size), BOUNDARY, jnp.int32), jnp.zeros((length, batch_size, source.shape[0])))
    _, _, _, ids, weights = until_all_ended(one_character, start, lambda state: state[2], length)
    return ids.T, weights


@functools.partial(jax.jit, static_argnames=("configs", "length", "beam"))
def beam_search(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], source: jax.Array, length: int,
                beam: int) -> tuple[jax.Array, jax.Array]:
    """The `beam` most likely targets found for each source [S, B]: (ids [B, beam, length], log-probabilities [B, beam]).

    Best first. A hypothesis is a target ended by the end symbol within `length`
    characters, or `length` characters cut there; its score is the sum of the
    log-probabilities of its characters (the end symbol's included) under the
    models' mean distribution, with no length penalty. A finished hypothesis
    continues only with end symbols, at no cost, so it keeps its place among the
    unfinished ones.
    """
    prepared, carry, memory = _decoders(params, configs, source)
    batch_size, vocab_size = source.shape[1], prepared[0]["output"]["b"].shape[0]
    carry = jax.tree.map(lambda leaf: jnp.repeat(leaf, beam, axis=0), carry)  # [B*K, H]: pair b's beams side by side
    memory = tuple(attention.Memory(*(None if part is None else jnp.repeat(part, beam, axis=1) for part in one))
                   for one in memory)
    ended_row = jnp.where(jnp.arange(vocab_size) == BOUNDARY, 0.0, -jnp.inf)[None, None]  # [1, 1, V]

    def one_character(t, state):
        carry, ids, scores, tokens, ended = state
        carry, log_probs, _ = _step(prepared, configs, carry, ids, memory)
        log_probs = log_probs.reshape(batch_size, beam, vocab_size)
        log_probs = jnp.where(ended[..., None], ended_row, log_probs)
        scores, flat = jax.lax.top_k((scores[..., None] + log_probs).reshape(batch_size, beam * vocab_size), beam)
        parent, chosen = flat // vocab_size, flat % vocab_size  # [B, K]
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t].set(chosen)
        ended = jnp.take_along_axis(ended, parent, axis=1) | (chosen == BOUNDARY)
        rows = (jnp.arange(batch_size)[:, None] * beam + parent).reshape(-1)
        carry = jax.tree.map(lambda leaf: leaf[rows], carry)
        return carry, chosen.reshape(-1), scores, tokens, ended

    # Only the first beam is live at the start, so the first step's choices are distinct.
    scores = jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf), (batch_size, 1))
    start = (carry, jnp.full((batch_size * beam,), BOUNDARY, jnp.int32), scores,
             jnp.zeros((batch_size, beam, length), jnp.int32), jnp.zeros((batch_size, beam), bool))
    _, _, scores, tokens, _ = until_all_ended(one_character, start, lambda state: state[4], length)
    return tokens, scores

