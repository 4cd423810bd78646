"""Dropout in training: on layers' outputs (a mask per character or per chunk), on embedding rows, on W_h.

Every mask is drawn from the training step's key, so a resumed run draws the
same masks, and every one is inverted (kept values scaled by 1 / (1 - rate), the
keep probability rounded to a multiple of 2⁻¹⁶) so evaluation, which has no key,
runs the weights as they are.

- Output dropout (`model.dropout`): each layer's output, the top one's too. With
  `model.locked_dropout` one mask per stream holds for every step of the chunk
  (variational dropout, Gal & Ghahramani 2016); otherwise each step draws its own.
- Embedding dropout (`model.embedding_dropout`): whole rows of the embedding,
  one mask per chunk, so a dropped character is dropped at every position.
- Weight drop (`model.weight_drop`): DropConnect on every recurrent matrix W_h,
  one mask per chunk shared by all streams and steps (AWD-LSTM, Merity et al. 2017).
- Late dropout (`train.dropout_from_epoch`): none of these until that many epochs
  of training data have passed. A first pass meets only new text, so there is
  nothing to overfit yet (late dropout, Liu et al. 2023); `charrnn.loop` switches
  from a compiled step without dropout to one with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from charrnn.config import Config, ModelConfig, steps_in

# Folded into the step's key for the weight masks; output dropout folds in the layer index.
_WEIGHTS_STREAM = 2**31 - 1
# A mask's probabilities are multiples of 2⁻¹⁶: two elements to a 32-bit word halves the words a mask draws.
MASK_LEVELS = 1 << 16


def any_rate(config: ModelConfig) -> bool:
    """Whether training drops anything: outputs, embedding rows or recurrent weights."""
    return bool(config.dropout or config.embedding_dropout or config.weight_drop)


def first_step(config: Config, steps_per_epoch: int) -> int:
    """The first optimizer step that drops anything: `train.dropout_from_epoch` epochs in (0 where nothing drops)."""
    return steps_in(config.train.dropout_from_epoch, steps_per_epoch) if any_rate(config.model) else 0


def kept_levels(rate: float) -> int:
    """The keep probability 1 - `rate` in units of 2⁻¹⁶ (at least 1, below 2¹⁶), the resolution masks draw at."""
    return min(MASK_LEVELS - 1, max(1, round((1.0 - rate) * MASK_LEVELS)))


def _lowbias32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash in which every output bit depends on every input bit (Wellons' lowbias32); a bijection."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_index(first: jax.Array, second: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 words of `shape`: each element's row-major index, XOR `first`, hashed, XOR `second`, hashed again.

    Two keys' words sharing an index offset under one hash (i ^ a = j ^ a') no longer
    coincide after the second, where their second words differ. The index is built
    along each axis, so under jit a mask split over devices is drawn where its part lies.
    """
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return _lowbias32(_lowbias32(index ^ first) ^ second)


def random_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint32 words of `shape`: `hashed_index` under two words drawn from `key`.

    Drawing every word through jax.random's threefry (20 rounds a pair) made a CPU
    training step with dropout slower (benchmarks/README, "Dropout masks from a hash").
    """
    first, second = jax.random.bits(key, (2,), jnp.uint32)
    return hashed_index(first, second, shape)


def keep_mask(key: jax.Array, levels: int, mask_shape: tuple[int, ...]) -> jax.Array:
    """Booleans of `mask_shape`, each true with probability `levels` / 2¹⁶: 16 random bits to an element."""
    *leading, last = mask_shape
    words = random_words(key, (*leading, (last + 1) // 2))
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*leading, -1)[..., :last]
    return halves < jnp.uint16(levels)


def inverse_keep(rate: float, key: jax.Array, mask_shape: tuple[int, ...]) -> jax.Array:
    """float32 factors of `mask_shape`: 0 where a Bernoulli(1 - rate) mask drops, elsewhere the inverse of the keep
    probability as drawn (`kept_levels`), so that x times them has the expected value x."""
    levels = kept_levels(rate)
    return jnp.where(keep_mask(key, levels, mask_shape), jnp.float32(MASK_LEVELS / levels), jnp.float32(0))


def inverted(x: jax.Array, rate: float, key: jax.Array, mask_shape: tuple[int, ...]) -> jax.Array:
    """`x` times `inverse_keep` factors of `mask_shape` (as many axes as x, each x's size or 1)."""
    return x * inverse_keep(rate, key, mask_shape).astype(x.dtype)


def output_factors(shape: tuple[int, ...], rate: float, key: jax.Array | None, index: int,
                   locked: bool = False) -> jax.Array | None:
    """What output dropout multiplies an output of `shape` [T, B, ...] by, from the mask of fold_in(key, index):
    [T, B, ...], or [1, B, ...] for all T steps where `locked`. None without a key or a rate (evaluation)."""
    if key is None or rate == 0:
        return None
    key = jax.random.fold_in(key, index)
    return inverse_keep(rate, key, shape[1:])[None] if locked else inverse_keep(rate, key, shape)


def outputs(x: jax.Array, rate: float, key: jax.Array | None, index: int, locked: bool = False) -> jax.Array:
    """Output dropout of `x` [T, B, ...] (`output_factors`); `x` itself without a key (evaluation)."""
    factors = output_factors(x.shape, rate, key, index, locked)
    return x if factors is None else x * factors.astype(x.dtype)


def weights(params: dict, config: ModelConfig, key: jax.Array | None) -> dict:
    """Params with embedding dropout and weight drop applied (`params` itself without a key, or with both rates 0).

    Every leaf named "embedding" loses whole rows, every "w_h" single entries, each
    with its own mask: a model's several embeddings and layers (an encoder's and a
    decoder's, both directions) are all covered.
    """
    rates = {"embedding": config.embedding_dropout, "w_h": config.weight_drop}
    if key is None or not any(rates.values()):
        return params
    key = jax.random.fold_in(key, _WEIGHTS_STREAM)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    dropped = []
    for index, (path, leaf) in enumerate(leaves):
        name = getattr(path[-1], "key", None)
        rate = rates.get(name, 0.0)
        if rate:
            rows = leaf.shape[:1] + (1,) * (leaf.ndim - 1) if name == "embedding" else leaf.shape
            leaf = inverted(leaf, rate, jax.random.fold_in(key, index), rows)
        dropped.append(leaf)
    return jax.tree.unflatten(tree, dropped)
