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
    # The same cells gate by gate: each gate's block of z through its nonlinearity, then
    # update(carry, gate values) -> (carry, h). `activate` is both over one contiguous row.
    nonlinearities: tuple[tuple[float, float], ...] | None = None
    update: Callable | None = None

    def step(self, params: dict, carry, x_proj: jax.Array):
        """One time step: the recurrent matmul, then the gate arithmetic."""
        return self.gates(params, carry, x_proj, matmul(carry.h, params["w_h"]))

    def activate_blocks(self, carry, z_blocks: tuple):
        """`activate` with z given as its G gate blocks [..., H] (for kernels that cannot slice a row)."""
        return self.update(carry, tuple(gate_value(z, nonlinearity)
                                        for z, nonlinearity in zip(z_blocks, self.nonlinearities, strict=True)))

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
    stream from cache, and a CPU streams rows faster than w's columns. Wrapping
    a matrix w itself, `TransposedWeight(w)` multiplies by wᵀ without a copy
    (the backward pass through time).
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


# A gate's nonlinearity as tanh(z * scale) * scale + shift: σ(z) = (1 + tanh(z/2)) / 2.
SIGMOID = (0.5, 0.5)
TANH = (1.0, 0.0)


def gate_value(z: jax.Array, nonlinearity: tuple[float, float]) -> jax.Array:
    scale, shift = nonlinearity
    return jnp.tanh(z * scale) * scale + shift


def rnn_update(carry: HiddenCarry, gates: tuple):
    """h' = tanh(z), z = W_x x + b + W_h h."""
    (h,) = gates
    return HiddenCarry(h), h


def lstm_init(key, input_size: int, hidden_size: int) -> dict:
    return _uniform_init(key, input_size, hidden_size, 4)


def lstm_update(carry: LSTMCarry, gates: tuple, squash: Callable = jnp.tanh):
    """Hochreiter & Schmidhuber with forget gate (Gers et al.), gates i, f, g, o.

    z = W_x x + b + W_h h  [B, 4H];  i = σ(z_i), f = σ(z_f), g = tanh(z_g), o = σ(z_o)
    c' = f ⊙ c + i ⊙ g;  h' = o ⊙ squash(c'), squash = tanh (layer-normalised first in `layer_normalized`)
    """
    i, f, g, o = gates
    c = f * carry.c + i * g
    h = o * squash(c)
    return LSTMCarry(h, c), h


def _broadcast_row(vector: jax.Array, ndim: int) -> jax.Array:
    # tests run with rank promotion off: no implicit broadcasting
    return jnp.reshape(vector, (1,) * (ndim - 1) + vector.shape)


def _gate_values(nonlinearities: tuple, z: jax.Array) -> tuple:
    """Every gate's nonlinearity as one tanh over the whole row z [..., G*H], split into the G gates' values.

    gates = tanh(z ⊙ s) ⊙ s + t, with each gate's (s, t) repeated over its H
    columns. On a CPU one vectorised tanh over contiguous memory is several times
    faster than G over column slices.
    """
    hidden = z.shape[-1] // len(nonlinearities)
    if len(set(nonlinearities)) == 1:
        scale, shift = nonlinearities[0]
    else:
        scale, shift = (_broadcast_row(jnp.concatenate([jnp.full((hidden,), nonlinearity[part], z.dtype)
                                                        for nonlinearity in nonlinearities]), z.ndim)
                        for part in (0, 1))
    return tuple(jnp.split(gate_value(z, (scale, shift)), len(nonlinearities), axis=-1))


def _additive_cell(carry_type: type, init: Callable, nonlinearities: tuple, update: Callable) -> Cell:
    """A cell whose gates see only z = x_proj + recurrent."""
    def activate(params: dict, carry, z: jax.Array):
        return update(carry, _gate_values(nonlinearities, z))

    return Cell(len(nonlinearities), carry_type, init, _gates_of_sum(activate), activate, nonlinearities, update)


def _gates_of_sum(activate: Callable) -> Callable:
    return lambda params, carry, x_proj, recurrent: activate(params, carry, x_proj + recurrent)


LAYER_NORM_EPSILON = 1e-5


def layer_norm(x: jax.Array, gain: jax.Array, shift: jax.Array, groups: int = 1) -> jax.Array:
    """Layer normalisation (Ba et al. 2016) of each of `groups` equal blocks of x's last axis on its own:
    (x - mean) / sqrt(variance + ε) over the block's entries, then ⊙ gain + shift ([groups * block] each)."""
    blocks = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    centred = blocks - jnp.mean(blocks, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    normalized = (centred * jax.lax.rsqrt(variance + LAYER_NORM_EPSILON)).reshape(x.shape)
    return normalized * _broadcast_row(gain, x.ndim) + _broadcast_row(shift, x.ndim)


def layer_normalized(cell: Cell) -> Cell:
    """`cell` with layer normalisation of its summed inputs (Ba et al. 2016).

    Cells whose gates see only z = W_x x + b + W_h h (RNN, LSTM): each gate's block
    of z is normalised over its H units on its own, times `norm_gain` plus
    `norm_shift` [G*H] (the paper's gain and bias), before the gates'
    nonlinearities. The LSTM also normalises its memory cell before the output's
    tanh: h' = o ⊙ tanh(LN(c') ⊙ cell_gain + cell_shift). The GRU, whose candidate
    scales its recurrent product by the reset gate, normalises its input products
    (with norm_gain, norm_shift) and its recurrent products (recurrent_gain,
    recurrent_shift) apart, each gate's block on its own. The gains start at 1 and
    the shifts at 0.
    """
    lstm = cell.carry_type is LSTMCarry
    additive = cell.activate is not None

    def init(key, input_size: int, hidden_size: int) -> dict:
        params = cell.init(key, input_size, hidden_size)
        width = cell.num_gates * hidden_size
        params.update(norm_gain=jnp.ones((width,), jnp.float32), norm_shift=jnp.zeros((width,), jnp.float32))
        if lstm:
            params.update(cell_gain=jnp.ones((hidden_size,), jnp.float32),
                          cell_shift=jnp.zeros((hidden_size,), jnp.float32))
        if not additive:
            params.update(recurrent_gain=jnp.ones((width,), jnp.float32),
                          recurrent_shift=jnp.zeros((width,), jnp.float32))
        return params

    if not additive:
        def gates(params: dict, carry, x_proj: jax.Array, recurrent: jax.Array):
            return cell.gates(params, carry,
                              layer_norm(x_proj, params["norm_gain"], params["norm_shift"], cell.num_gates),
                              layer_norm(recurrent, params["recurrent_gain"], params["recurrent_shift"], cell.num_gates))

        return Cell(cell.num_gates, cell.carry_type, init, gates)

    def activate(params: dict, carry, z: jax.Array):
        gates = _gate_values(cell.nonlinearities, layer_norm(z, params["norm_gain"], params["norm_shift"], cell.num_gates))
        if not lstm:
            return cell.update(carry, gates)
        return lstm_update(carry, gates, lambda c: jnp.tanh(layer_norm(c, params["cell_gain"], params["cell_shift"])))

    return Cell(cell.num_gates, cell.carry_type, init, _gates_of_sum(activate), activate)


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


CELLS: dict[str, Cell] = {
    "rnn": _additive_cell(HiddenCarry, rnn_init, (TANH,), rnn_update),
    "lstm": _additive_cell(LSTMCarry, lstm_init, (SIGMOID, SIGMOID, TANH, SIGMOID), lstm_update),
    "gru": Cell(3, HiddenCarry, gru_init, gru_gates),
}
LAYER_NORMALIZED_CELLS: dict[str, Cell] = {name: layer_normalized(cell) for name, cell in CELLS.items()}


def cell_of(name: str, norm: str = "none") -> Cell:
    """The cell `name` (rnn, gru, lstm), layer-normalised when `norm` is "layer"."""
    return LAYER_NORMALIZED_CELLS[name] if norm == "layer" else CELLS[name]
