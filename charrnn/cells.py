"""Recurrent cells (RNN, LSTM, GRU) behind one contract, and a registry of them.

`step(params, carry, x_proj) -> (carry, h)` follows `lax.scan`'s order; `x_proj` is
the step's input projection (`x @ w_x + b`, or a row of the first layer's [V, G*H]
table). A step is the recurrent matmul `h @ w_h` then `gates(params, carry, x_proj,
recurrent)`, kept apart so that charrnn/layer.py can compute each weight gradient of
all steps as one matmul. Weights are [in, G*H]: the G gate blocks side by side, in
the order the equations below name them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class HiddenCarry(NamedTuple):
    h: jax.Array  # [B, H]


class LSTMCarry(NamedTuple):
    h: jax.Array  # [B, H]
    c: jax.Array  # [B, H] memory cell


class Cell(NamedTuple):
    num_gates: int
    carry_type: type
    init: Callable
    gates: Callable
    # For cells whose gates see only z = x_proj + recurrent (RNN, LSTM): activate(params, carry, z).
    # Their backward pass keeps one [T, B, G*H] array (z, then dz) instead of three.
    activate: Callable | None = None

    def step(self, params: dict, carry, x_proj: jax.Array):
        """One time step: the recurrent matmul, then the gate arithmetic."""
        return self.gates(params, carry, x_proj, matmul(carry.h, params["w_h"]))

    def initial_carry(self, batch_size: int, hidden_size: int):
        # One array per field: a carry is donated to the train step, and XLA
        # refuses to donate one buffer twice.
        return self.carry_type(*(jnp.zeros((batch_size, hidden_size), jnp.float32) for _ in self.carry_type._fields))


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 sums for bfloat16/float32 weights; float64 stays float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rows"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TransposedWeight:
    """A weight matrix w [I, O] held as its transpose [O, I]: each output's weights one contiguous row.

    `matmul` then computes x @ w as a dot product of x with each row. For one row
    of x (generating one sample) the product is bound by how fast the weights
    stream from cache, and a CPU streams rows faster than w's columns.
    """

    rows: jax.Array  # [O, I]


def matmul(x: jax.Array, w: jax.Array | TransposedWeight) -> jax.Array:
    """x @ w in the weights' dtype (bfloat16 or float32), accumulated in float32."""
    if isinstance(w, TransposedWeight):
        contract_last_axes = (((x.ndim - 1,), (1,)), ((), ()))
        return jax.lax.dot_general(x.astype(w.rows.dtype), w.rows, contract_last_axes,
                                   preferred_element_type=accumulation_dtype(w.rows.dtype))
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=accumulation_dtype(w.dtype))


def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w + b over the last axis (see `matmul`)."""
    y = matmul(x, w)
    return y + jnp.expand_dims(b, tuple(range(y.ndim - 1)))


def _uniform_init(key, input_size: int, hidden_size: int, num_gates: int) -> dict:
    """U(-1/sqrt(H), 1/sqrt(H)) weights and zero biases, as in torch-rnn and PyTorch."""
    bound = hidden_size**-0.5
    key_x, key_h = jax.random.split(key)
    width = num_gates * hidden_size
    return {
        "w_x": jax.random.uniform(key_x, (input_size, width), jnp.float32, -bound, bound),
        "w_h": jax.random.uniform(key_h, (hidden_size, width), jnp.float32, -bound, bound),
        "b": jnp.zeros((width,), jnp.float32),
    }


def rnn_init(key, input_size: int, hidden_size: int) -> dict:
    return _uniform_init(key, input_size, hidden_size, 1)


def rnn_activate(params: dict, carry: HiddenCarry, z: jax.Array):
    """h' = tanh(z), z = W_x x + b + W_h h."""
    h = jnp.tanh(z)
    return HiddenCarry(h), h


def lstm_init(key, input_size: int, hidden_size: int) -> dict:
    return _uniform_init(key, input_size, hidden_size, 4)


def lstm_activate(params: dict, carry: LSTMCarry, z: jax.Array):
    """Hochreiter & Schmidhuber with forget gate (Gers et al.), gates i, f, g, o.

    z = W_x x + b + W_h h  [B, 4H];  i = σ(z_i), f = σ(z_f), g = tanh(z_g), o = σ(z_o)
    c' = f ⊙ c + i ⊙ g;  h' = o ⊙ tanh(c')

    The four nonlinearities are one tanh over the whole contiguous [B, 4H] row,
    using σ(x) = (1 + tanh(x/2)) / 2: gates = tanh(z ⊙ s) ⊙ s + t with s = ½ and
    t = ½ for i, f, o and s = 1, t = 0 for g. On a CPU one vectorised tanh over
    contiguous memory is several times faster than four over column slices.
    """
    scale, shift = _lstm_gate_affine(carry.c.shape[-1], z.dtype, z.ndim)
    i, f, g, o = jnp.split(jnp.tanh(z * scale) * scale + shift, 4, axis=-1)
    c = f * carry.c + i * g
    h = o * jnp.tanh(c)
    return LSTMCarry(h, c), h


def _lstm_gate_affine(hidden_size: int, dtype, ndim: int) -> tuple[jax.Array, jax.Array]:
    """The [..., 4H] scale and shift that turn tanh into σ for gates i, f, o and leave g as tanh."""
    half, one, zero = (jnp.full((1,) * (ndim - 1) + (hidden_size,), value, dtype) for value in (0.5, 1.0, 0.0))
    return jnp.concatenate([half, half, one, half], axis=-1), jnp.concatenate([half, half, zero, half], axis=-1)


def gru_init(key, input_size: int, hidden_size: int) -> dict:
    params = _uniform_init(key, input_size, hidden_size, 3)
    params["b_hn"] = jnp.zeros((hidden_size,), jnp.float32)
    return params


def gru_gates(params: dict, carry: HiddenCarry, x_proj: jax.Array, recurrent: jax.Array):
    """Cho et al. GRU with the reset gate applied after the recurrent matmul (as cuDNN).

    Gates r, u (update), n (candidate):
    r = σ(x_r + W_hr h);  u = σ(x_u + W_hu h);  n = tanh(x_n + r ⊙ (W_hn h + b_hn))
    h' = (1 - u) ⊙ n + u ⊙ h
    Resetting after the matmul lets all three recurrent products be one matmul.
    """
    x_r, x_u, x_n = jnp.split(x_proj, 3, axis=-1)
    h_r, h_u, h_n = jnp.split(recurrent, 3, axis=-1)  # [B, H] each
    reset = jax.nn.sigmoid(x_r + h_r)
    update = jax.nn.sigmoid(x_u + h_u)
    candidate = jnp.tanh(x_n + reset * (h_n + params["b_hn"][None, :]))
    h = (1.0 - update) * candidate + update * carry.h
    return HiddenCarry(h), h


def _additive(activate: Callable) -> Callable:
    """The gates of a cell that only sees z = x_proj + recurrent."""
    return lambda params, carry, x_proj, recurrent: activate(params, carry, x_proj + recurrent)


CELLS: dict[str, Cell] = {
    "rnn": Cell(1, HiddenCarry, rnn_init, _additive(rnn_activate), rnn_activate),
    "lstm": Cell(4, LSTMCarry, lstm_init, _additive(lstm_activate), lstm_activate),
    "gru": Cell(3, HiddenCarry, gru_init, gru_gates),
}
