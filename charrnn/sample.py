"""Text generation: priming, temperature / top-k / top-p choice, and blocks of steps under jit.

`generate` and `generate_text` take one or more models (`params` and `configs`, tuples of the same
length) that write together: each carries its own state over the same text, and each character is
chosen from the mean of their distributions (an ensemble). One model is an ensemble of one.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import distributed, model
from charrnn.config import ModelConfig
from charrnn.data import Vocab

BLOCK = 128  # characters generated per compiled call; each block is streamed out as it ends
# Beyond this temperature every draw is uniform already; capping it keeps it, and T * noise, finite in float32.
MAX_TEMPERATURE = 1e30


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Tempered logits [B, V] with everything outside the top-k and the top-p nucleus set to -inf.

    Logits are shifted so the largest is 0 before dividing by the temperature, so
    a tiny positive temperature gives -inf for the others, never inf - inf = nan.
    The top k are chosen before the division: a huge temperature would round the
    tempered logits to one value, and the k largest of equal values are all of them.
    """
    logits = logits.astype(jnp.float32)
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    # Capped, because XLA may multiply by 1/T, and past 1e38 that rounds to 0: -inf * 0 = nan.
    logits = logits / jnp.where(temperature > 0, jnp.minimum(temperature, MAX_TEMPERATURE), 1.0)
    if top_p is None:  # no nucleus: skip the sort
        return logits
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    # Keep a character while the probability before it is below top_p: the smallest
    # set reaching top_p. The most likely is always kept, even where top_p rounds to 0.
    most_likely = jax.lax.broadcasted_iota(jnp.int32, sorted_probs.shape, sorted_probs.ndim - 1) == 0
    keep_sorted = ((jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p) | most_likely
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits: jax.Array, noise: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Next character ids [B]: argmax at temperature 0, else a draw from the filtered distribution.

    The draw is the Gumbel-max trick, argmax(filtered + noise) with standard Gumbel
    `noise` [B, V] (what `jax.random.categorical` does), so the noise of a whole block
    can be made before the block's sequential loop. At temperature 0 the noise is
    left out: the filtering keeps the most likely character, so that is the argmax.
    With nothing to filter, argmax(logits / T + noise) is taken as the equal
    argmax(logits + T * noise): two fewer operations in every character's step.
    """
    if not top_k and top_p is None:  # nothing to filter: argmax(logits / T + noise) = argmax(logits + T * noise)
        return pick_unfiltered(logits, noise_scale(temperature) * noise)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return first_argmax(filtered + jnp.where(temperature > 0, noise, 0.0))


def noise_scale(temperature: jax.Array) -> jax.Array:
    """What the noise is multiplied by where nothing is filtered: the temperature, clipped so T * noise stays finite."""
    return jnp.clip(temperature, 0.0, MAX_TEMPERATURE)


def pick_unfiltered(logits: jax.Array, scaled_noise: jax.Array) -> jax.Array:
    """`choose` with nothing to filter, given the noise times `noise_scale(temperature)`."""
    return first_argmax(logits.astype(jnp.float32) + scaled_noise)


def capped_temperature(temperature: float) -> jax.Array:
    """The temperature as the compiled choice takes it: float32, at most MAX_TEMPERATURE."""
    return jnp.float32(min(temperature, MAX_TEMPERATURE))


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the largest value), as int32.

    Written as a max, then the smallest index holding it: two plain reductions,
    several times faster on a CPU than the (value, index) reduction of jnp.argmax.
    """
    largest = jnp.max(x, axis=-1, keepdims=True)
    indices = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == largest, indices, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # NaN logits: the last index rather than one out of range


def block_length(length: int) -> int:
    """Characters per compiled call for `length` in all: as few blocks as BLOCK allows, all one length.

    One length means one compiled block serves every call, and the last block
    computes at most one character per block past `length` (800 characters are 7
    blocks of 115, not 7 of 128 with 96 thrown away).
    """
    blocks = max(1, -(-length // BLOCK))
    return max(1, -(-length // blocks))


@functools.partial(jax.jit, static_argnames=("config", "one_stream"))
def generation_params(params: dict, config: ModelConfig, one_stream: bool) -> dict:
    """The params as the generation loop multiplies with them (`model.prepare`), made once per `generate`.

    One stream's matmuls are matrix-vector products, which stream transposed
    weights row by row on a CPU.
    """
    prepared = model.prepare(params, config)
    return model.transpose_weights(prepared) if one_stream else prepared


def _fuses_alone(configs: tuple[ModelConfig, ...]) -> bool:
    """Whether one model writes alone with the fused kernel (`model.kernel = "pallas"`); several step in XLA."""
    return len(configs) == 1 and model.fuses_layers(configs[0])


def _step(prepared: tuple[dict, ...], configs: tuple[ModelConfig, ...], carry: tuple, ids: jax.Array):
    """Every model reads ids [B]: (their carries, logits [B, V] to choose from): the log of their mean distribution.

    One model's logits go to `choose` as they are: a log_softmax would round them and change a seed's text.
    """
    stepped = [model.step(ready, config, member_carry, ids)
               for ready, config, member_carry in zip(prepared, configs, carry, strict=True)]
    carry = tuple(member_carry for member_carry, _ in stepped)
    if len(stepped) == 1:
        return carry, stepped[0][1]
    return carry, model.log_mean_softmax([logits for _, logits in stepped])


@functools.partial(jax.jit, static_argnames=("configs", "length", "top_k"))
def generate_block(prepared: tuple[dict, ...], configs: tuple[ModelConfig, ...], carry: tuple, last_ids: jax.Array,
                   key: jax.Array, position: jax.Array, temperature: jax.Array, top_p: jax.Array, length: int,
                   top_k: int):
    """Generate `length` characters per stream from each model's carry after `last_ids` [B], with `prepare`d params.

    The key of each character is fold_in(key, its position), so the text for a
    seed does not depend on how generation is cut into blocks.
    """
    noise_shape = (last_ids.shape[0], prepared[0]["output"]["b"].shape[0])  # [B, V]
    noise = jax.vmap(lambda offset: jax.random.gumbel(jax.random.fold_in(key, position + offset), noise_shape))(
        jnp.arange(length))  # [length, B, V], all at once: the loop below only does the model
    if _fuses_alone(configs):  # the whole loop in one launch, where the kernel takes the block
        from charrnn import fused_sampling  # Pallas loads only for the runs that use it

        blocks = fused_sampling.choose_blocks(configs[0], *noise_shape, filtered=bool(top_k) or top_p is not None)
        if blocks is not None:
            member_carry, ids = fused_sampling.generate_block(prepared[0], configs[0], carry[0], last_ids,
                                                              noise_scale(temperature) * noise, pick_unfiltered, blocks)
            return (member_carry,), ids[-1], ids

    def one_character(state, noise_t):
        carry, ids = state
        carry, logits = _step(prepared, configs, carry, ids)  # logits [B, V]
        next_ids = choose(logits, noise_t, temperature, top_k, top_p)
        return (carry, next_ids), next_ids

    (carry, last_ids), ids = jax.lax.scan(one_character, (carry, last_ids), noise)
    return carry, last_ids, ids  # ids [length, B]


@functools.partial(jax.jit, static_argnames=("config",))
def prime(prepared: dict, config: ModelConfig, carry: tuple, inputs: jax.Array) -> tuple:
    """Run the model with `prepare`d params over priming ids [T, B] and return the state after them."""
    carry, _, _ = model.run_layers(prepared, config, carry, inputs)
    return carry


def generate(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], prime_ids: np.ndarray, length: int,
             num_samples: int, seed: int, temperature: float, top_k: int = 0,
             top_p: float = 1.0) -> Iterator[np.ndarray]:
    """Yield blocks of generated ids [n, B] until `length` characters per stream are out.

    `prime_ids` (at least one id) conditions the models; generation continues after its last character.
    """
    prime_ids = np.asarray(prime_ids, np.int32)
    carry = tuple(model.initial_carry(member, config, num_samples)
                  for member, config in zip(params, configs, strict=True))
    last_ids = jnp.full((num_samples,), prime_ids[-1], jnp.int32)
    # Each model's matmuls are their own: the largest decides whether splitting the streams pays.
    split = distributed.local_split(num_samples, max(model.recurrent_step_macs(config, num_samples)
                                                     for config in configs))
    if split is not None:  # each CPU core runs its share of the streams, as in training
        params = distributed.put(jax.device_get(params), split.replicated)
        carry, last_ids = distributed.put_streams(jax.device_get((carry, last_ids)), split, num_samples)
    # The fused kernel multiplies the weights as they are; XLA's one-stream loop on a CPU, transposed.
    one_stream = (num_samples == 1 and jax.default_backend() == "cpu"
                  and not any(model.fuses_layers(config) for config in configs))  # priming runs the kernel
    prepared = tuple(generation_params(member, config, one_stream)
                     for member, config in zip(params, configs, strict=True))
    if len(prime_ids) > 1:
        inputs = jnp.asarray(np.repeat(prime_ids[:-1, None], num_samples, axis=1))
        carry = tuple(prime(ready, config, member_carry, inputs)
                      for ready, config, member_carry in zip(prepared, configs, carry, strict=True))
    key = jax.random.key(seed)
    top_k = top_k if 0 < top_k < len(params[0]["output"]["b"]) else 0
    nucleus = jnp.float32(top_p) if top_p < 1.0 else None  # static: top-p 1 compiles without the sort
    temperature = capped_temperature(temperature)
    block = block_length(length)

    def on_host(position: int, ids: jax.Array) -> np.ndarray:  # waits for the block
        return np.asarray(ids)[: length - position]

    queued = None  # (position, ids) of the block before this one, still on the device
    for position in range(0, length, block):
        carry, last_ids, ids = generate_block(prepared, configs, carry, last_ids, key, jnp.int32(position),
                                              temperature, nucleus, block, top_k)
        if queued is not None:  # the next block is queued before waiting on this one, so the device never idles
            yield on_host(*queued)
        queued = (position, ids)
    if queued is not None:
        yield on_host(*queued)


def prime_ids(vocab: Vocab, prime: str) -> np.ndarray:
    """The ids generation starts from: the prime's, or with no prime a newline (else the first character)."""
    return vocab.encode(prime or ("\n" if "\n" in vocab.index else vocab.chars[0]))


def generate_text(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], vocab: Vocab, prime: str, length: int,
                  num_samples: int, seed: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  stop: str | None = None) -> Iterator[list[str]]:
    """Yield each sample's new text block by block, the prime first; a sample ends after `stop` ("" once ended).

    The text of every sample, joined, is the prime and then at most `length`
    characters, cut just after the first `stop` the generated text completes.
    """
    texts = [prime] * num_samples
    yield texts[:]
    done = [False] * num_samples
    for ids in generate(params, configs, prime_ids(vocab, prime), length, num_samples, seed, temperature, top_k,
                        top_p):
        pieces = []
        for index in range(num_samples):
            piece = "" if done[index] else vocab.decode(ids[:, index])
            if stop and not done[index]:
                searched_from = max(len(texts[index]) - len(stop) + 1, 0)  # a stop ending in the new text
                found = (texts[index] + piece).find(stop, searched_from)
                if found >= 0:
                    piece = piece[: found + len(stop) - len(texts[index])]
                    done[index] = True
            texts[index] += piece
            pieces.append(piece)
        yield pieces
        if all(done):
            return
