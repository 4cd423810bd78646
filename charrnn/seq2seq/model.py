"""The encoder–decoder: a (bidirectional) recurrent encoder, a bridge, a recurrent decoder, attention.

The recurrent layers are the language model's (`charrnn.model`, `charrnn.layer`).
Params are a plain dict pytree:
    encoder: {embedding [Vs, E], forward: [layers], backward: [layers] (bidirectional)}
    bridge: {w [D, L*F*H], b}: the encoder's final state -> every decoder layer's initial carry
    decoder: a language model's params (embedding [Vt, E], layers, output {w [H, Vt], b})
    attention: `charrnn.seq2seq.attention`'s (none: absent)
with D = H, or 2H for a bidirectional encoder.

Source id 0 is padding; target id 0 is the boundary: the decoder's first input
(start) and its last output (end). Sequences are time-major: [S, B] and [T, B].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from charrnn import dropout, model
from charrnn.cells import dense, matmul
from charrnn.config import ModelConfig
from charrnn.seq2seq.attention import Memory, attend, memory
from charrnn.seq2seq.pairs import PAD, PairBatch


class DecoderState(NamedTuple):
    """The decoder's state between target symbols."""

    layers: tuple  # each decoder layer's carry
    feed: jax.Array | None  # [B, H] the last symbol's attentional features (model.input_feeding), else None


def directions(config: ModelConfig) -> tuple[str, ...]:
    return ("forward", "backward") if config.bidirectional else ("forward",)


def encoder_width(config: ModelConfig) -> int:
    return len(directions(config)) * config.hidden_size


def init_params(key: jax.Array, config: ModelConfig, source_vocab_size: int, target_vocab_size: int) -> dict:
    """Freshly initialised parameters over source and target vocabularies (each counting its id 0)."""
    cell = model.recurrent_cell(config)
    hidden, width = config.hidden_size, encoder_width(config)
    key_embedding, key_bridge, key_decoder, key_attention, key_layers = jax.random.split(key, 5)
    encoder = {"embedding": jax.random.normal(key_embedding, (source_vocab_size, config.embedding_size), jnp.float32)}
    for direction, direction_key in zip(directions(config), jax.random.split(key_layers, 2)):
        layer_keys = jax.random.split(direction_key, config.encoder_layers)
        encoder[direction] = [model.init_layer(layer_key, config, config.embedding_size if index == 0 else width)
                              for index, layer_key in enumerate(layer_keys)]
    carry_width = config.num_layers * len(cell.carry_type._fields) * hidden
    params = {
        "encoder": encoder,
        "bridge": {"w": _uniform(key_bridge, (width, carry_width)), "b": jnp.zeros((carry_width,), jnp.float32)},
        "decoder": model.init_params(key_decoder, config, target_vocab_size),
    }
    if config.attention != "none":
        key_k, key_q, key_v, key_c = jax.random.split(key_attention, 4)
        scored = config.attention_size or hidden  # dot scores q · W_k e_s, so its keys are H wide
        attention = {"w_k": _uniform(key_k, (width, scored)),
                     "w_c": _uniform(key_c, (hidden + width, hidden)), "b_c": jnp.zeros((hidden,), jnp.float32)}
        if config.attention == "additive":
            attention |= {"w_q": _uniform(key_q, (hidden, scored)), "v": _uniform(key_v, (scored,))}
        if config.input_feeding:
            attention["w_f"] = _uniform(jax.random.fold_in(key_attention, 4), (hidden, cell.num_gates * hidden))
        params["attention"] = attention
    return params


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the recurrent layers are initialised."""
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def reversal(mask: jax.Array) -> jax.Array:
    """[S, B] time indices that reverse each sequence's real positions and leave its padding in place.

    Gathering with them twice gives the sequence back.
    """
    lengths = jnp.sum(mask, axis=0)  # [B]
    positions = jnp.arange(mask.shape[0])[:, None]  # [S, 1]
    return jnp.where(positions < lengths[None, :], lengths[None, :] - 1 - positions, positions)


def take_time(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [S, B, ...] gathered along time at `indices` [S, B]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=0)


def encode(params: dict, config: ModelConfig, source: jax.Array, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """Run the encoder over source ids [S, B]: (outputs [S, B, D], final state [B, D]).

    The backward direction reads each source's real characters last to first: the
    forward direction's layer over the sequence reversed within its length, its
    outputs put back in source order. Padding comes after the real positions in
    both directions, so it never reaches them. Each layer's input is both
    directions' outputs of the layer below. The final state joins the forward
    direction's output at the last character and the backward one's at the first.
    """
    mask = source != PAD
    back = reversal(mask)
    run = model.over_time(config)
    encoder = params["encoder"]
    prepared = {direction: model.prepare_layers(encoder["embedding"], encoder[direction], config)
                for direction in directions(config)}
    batch_size, last = source.shape[1], jnp.sum(mask, axis=0) - 1  # [B]
    layer_input = source
    for index in range(config.encoder_layers):
        outputs, finals = [], []
        for direction in directions(config):
            reverse = direction == "backward"
            carry = model.recurrent_cell(config).initial_carry(batch_size, config.hidden_size)
            _, hidden = run(model.layer_params(prepared[direction], index), carry,
                            take_time(layer_input, back) if reverse else layer_input)  # [S, B, H]
            finals.append(hidden[last, jnp.arange(batch_size)])  # the direction's last real step
            outputs.append(take_time(hidden, back) if reverse else hidden)
        layer_input = dropout.outputs(jnp.concatenate(outputs, axis=-1), config.dropout, dropout_key, index,
                                      config.locked_dropout)
    return layer_input, jnp.concatenate(finals, axis=-1)


def bridge(params: dict, config: ModelConfig, final: jax.Array) -> tuple:
    """Every decoder layer's initial carry from the encoder's final state: tanh(final W + b), cut per layer."""
    cell = model.recurrent_cell(config)
    fields = len(cell.carry_type._fields)
    weights = model.cast_weights(params["bridge"], config)
    state = jnp.tanh(dense(final, weights["w"], weights["b"]))  # [B, L*F*H]
    state = state.reshape(final.shape[0], config.num_layers, fields, config.hidden_size)
    return tuple(cell.carry_type(*(state[:, layer, field] for field in range(fields)))
                 for layer in range(config.num_layers))


def prepare(params: dict, config: ModelConfig) -> dict:
    """The decoder's and the attention's params as the decoder multiplies with them, once per compiled call:
    `model.prepare`'s, with the attention's weight matrices cast to the matmul dtype under "attention"."""
    prepared = model.prepare(params["decoder"], config)
    if "attention" in params:
        prepared["attention"] = model.cast_weights(params["attention"], config)
    return prepared


def start(params: dict, prepared: dict, config: ModelConfig, source: jax.Array,
          dropout_key=None) -> tuple[DecoderState, Memory]:
    """Encode `source` [S, B]: (the decoder's initial state, the memory it attends to through `prepared`).

    With input feeding the first symbol is fed zeros for the features before it.
    """
    outputs, final = encode(params, config, source, dropout_key)
    feed = jnp.zeros((source.shape[1], config.hidden_size), jnp.float32) if config.input_feeding else None
    return DecoderState(bridge(params, config, final), feed), memory(prepared.get("attention"), outputs, source)


def forward(params: dict, config: ModelConfig, batch: PairBatch, dropout_key=None):
    """Teacher-forced logits [T, B, Vt] and attention weights [T, B, S] (or None) of a batch of pairs."""
    params = dropout.weights(params, config, dropout_key)
    encoder_key, decoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    prepared = prepare(params, config)
    state, memory = start(params, prepared, config, batch.source, encoder_key)
    if config.input_feeding:
        features, weights = _fed_features(prepared, config, state, batch.target_in, memory, decoder_key)
    else:  # the decoder's layers read only symbols: each runs its whole loop before attention
        _, _, top = model.run_layers(prepared, config, state.layers, batch.target_in, decoder_key)  # [T, B, H]
        features, weights = attend(prepared.get("attention"), config, top, memory)
    return dense(features, prepared["output"]["w"], prepared["output"]["b"]), weights


def _fed_features(prepared: dict, config: ModelConfig, state: DecoderState, target_in: jax.Array,
                  memory: Memory, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced features [T, B, H] and attention weights [T, B, S], a symbol at a time: with input
    feeding each step reads the features of the step before, so attention runs inside the time loop.

    Output dropout draws step t's mask from fold_in(key, t), or the key's own at every step when locked.
    """
    def one_symbol(state, inputs):
        ids, t = inputs
        key = dropout_key if dropout_key is None or config.locked_dropout else jax.random.fold_in(dropout_key, t)
        state, features, weights = _features_step(prepared, config, state, ids, memory, key)
        return state, (features, weights)

    steps = jnp.arange(target_in.shape[0])
    _, (features, weights) = jax.lax.scan(one_symbol, state, (target_in, steps))
    return features, weights


def with_own_choices(params: dict, config: ModelConfig, batch: PairBatch, rate: float, key: jax.Array) -> PairBatch:
    """`batch` with each symbol the decoder reads after the first replaced, with probability `rate`, by the one
    it would have chosen there itself (scheduled sampling done in parallel, Duckworth et al. 2019).

    Its choices are the most likely symbols of one teacher-forced pass without dropout: what greedy
    decoding writes wherever the symbols before were right. Targets and mask are unchanged, so the
    decoder learns to go on correctly after its own mistakes, as it must when it generates.
    """
    logits, _ = forward(jax.lax.stop_gradient(params), config, batch)
    true = jnp.asarray(batch.target_in)
    chosen = jnp.argmax(logits[:-1], axis=-1).astype(true.dtype)  # [T-1, B]: its choice for the step after
    replace = jax.random.bernoulli(key, rate, chosen.shape)
    return batch._replace(target_in=true.at[1:].set(jnp.where(replace, chosen, true[1:])))


def summed_loss(params: dict, config: ModelConfig, batch: PairBatch, dropout_key=None,
                smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(nats summed over every real target symbol, end included; how many there are). `model.token_losses`: smoothing."""
    logits, _ = forward(params, config, batch, dropout_key)
    return model.masked_sums(model.token_losses(logits, batch.target_out, smoothing), batch.target_mask)


def pair_log_probs(params: dict, config: ModelConfig, batch: PairBatch) -> jax.Array:
    """Each pair's teacher-forced log-probability of its whole target, the end symbol's included: [B]."""
    logits, _ = forward(params, config, batch)
    return -jnp.sum(model.token_losses(logits, batch.target_out) * batch.target_mask, axis=0)


def ensemble_summed_loss(params: tuple[dict, ...], configs: tuple[ModelConfig, ...],
                         batch: PairBatch) -> tuple[jax.Array, jax.Array]:
    """`summed_loss` under the models' mean distribution, teacher-forced (for one model, its own loss)."""
    losses = jnp.stack([model.token_losses(forward(member, config, batch)[0], batch.target_out)
                        for member, config in zip(params, configs, strict=True)])
    return model.masked_sums(-model.mixture(-losses), batch.target_mask)


def loss(params: dict, config: ModelConfig, batch: PairBatch, dropout_key=None, smoothing: float = 0.0) -> jax.Array:
    """Mean nats per real target symbol (character or token) of a batch; padding contributes nothing."""
    total, count = summed_loss(params, config, batch, dropout_key, smoothing)
    return total / jnp.maximum(count, 1.0)


def _features_step(prepared: dict, config: ModelConfig, state: DecoderState, ids: jax.Array, memory: Memory,
                   dropout_key=None):
    """One target symbol per pair, ids [B] -> (state, features [B, H], attention weights [B, S] or None).

    With input feeding the first layer's input adds feed W_f to the symbol's projection.
    """
    feed = None if state.feed is None else matmul(state.feed, prepared["attention"]["w_f"])
    layers, top = model.step_top(prepared, config, state.layers, ids, feed, dropout_key)
    features, weights = attend(prepared.get("attention"), config, top[None], memory)
    features = features[0]
    return (DecoderState(layers, None if state.feed is None else features), features,
            None if weights is None else weights[0])


def decoder_step(prepared: dict, config: ModelConfig, state: DecoderState, ids: jax.Array, memory: Memory):
    """One target symbol per pair, ids [B] -> (state, logits [B, Vt], attention weights [B, S] or None)."""
    state, features, weights = _features_step(prepared, config, state, ids, memory)
    return state, dense(features, prepared["output"]["w"], prepared["output"]["b"]), weights

