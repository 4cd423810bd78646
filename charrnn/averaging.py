"""Weight averaging (`train.ema`): a moving average of the weights, evaluated and saved in their place.

After optimizer step t = 1, 2, ...:

    average_t = d_t · average_{t-1} + (1 - d_t) · params_t,   d_t = min(ema, (1 + t) / (10 + t)),

from average_0 = params_0. The average follows the last ~1 / (1 - ema) steps; the
smaller decay of the first steps forgets the random initial weights at once
rather than over those 1 / (1 - ema) steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decay(ema: float, step: jax.Array) -> jax.Array:
    """d_t of step `step` (t, counted from 1)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema, (1.0 + step) / (10.0 + step))


def update(average: dict, params: dict, ema: float, step: jax.Array) -> dict:
    """average_t from average_{t-1} and the params after step `step` (t)."""
    d = decay(ema, step)
    return jax.tree.map(lambda mean, param: d * mean + (1.0 - d) * param, average, params)
