"""Cells against the textbook equations, written out again in NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.cells import CELLS, LAYER_NORMALIZED_CELLS, TransposedWeight, cell_of, matmul
from references import layer_norm, sigmoid

BATCH, INPUT, HIDDEN, STEPS = 3, 5, 8, 6


def gate(z, index):
    """Return the index-th H-wide gate block of [B, G*H] pre-activations."""
    return z[:, index * HIDDEN : (index + 1) * HIDDEN]


def rnn_reference(params, carry, x_proj):
    (h,) = carry
    h = np.tanh(x_proj + h @ params["w_h"])
    return (h,), h


def lstm_reference(params, carry, x_proj):
    h, c = carry
    z = x_proj + h @ params["w_h"]  # [B, 4H], gates i, f, g, o
    c = sigmoid(gate(z, 1)) * c + sigmoid(gate(z, 0)) * np.tanh(gate(z, 2))
    h = sigmoid(gate(z, 3)) * np.tanh(c)
    return (h, c), h


def gru_equations(params, h, x_proj, recurrent):
    """x_proj, recurrent [B, 3H], gates r, u, n."""
    reset = sigmoid(gate(x_proj, 0) + gate(recurrent, 0))
    update = sigmoid(gate(x_proj, 1) + gate(recurrent, 1))
    candidate = np.tanh(gate(x_proj, 2) + reset * (gate(recurrent, 2) + params["b_hn"]))
    h = (1.0 - update) * candidate + update * h
    return (h,), h


def gru_reference(params, carry, x_proj):
    (h,) = carry
    return gru_equations(params, h, x_proj, h @ params["w_h"])


def layer_normalized_rnn_reference(params, carry, x_proj):
    """Ba et al. 2016, section 3.1: h' = tanh(LN(W_x x + b + W_h h))."""
    (h,) = carry
    h = np.tanh(layer_norm(x_proj + h @ params["w_h"], params["norm_gain"], params["norm_shift"], 1))
    return (h,), h


def layer_normalized_lstm_reference(params, carry, x_proj):
    """Each gate's summed inputs normalised on their own; h' = o ⊙ tanh(LN(c'))."""
    h, c = carry
    z = layer_norm(x_proj + h @ params["w_h"], params["norm_gain"], params["norm_shift"], 4)
    c = sigmoid(gate(z, 1)) * c + sigmoid(gate(z, 0)) * np.tanh(gate(z, 2))
    h = sigmoid(gate(z, 3)) * np.tanh(layer_norm(c, params["cell_gain"], params["cell_shift"], 1))
    return (h, c), h


def layer_normalized_gru_reference(params, carry, x_proj):
    """The input and the recurrent products normalised apart, each gate's block on its own."""
    (h,) = carry
    return gru_equations(params, h, layer_norm(x_proj, params["norm_gain"], params["norm_shift"], 3),
                         layer_norm(h @ params["w_h"], params["recurrent_gain"], params["recurrent_shift"], 3))


REFERENCES = {("rnn", "none"): rnn_reference, ("lstm", "none"): lstm_reference, ("gru", "none"): gru_reference,
              ("rnn", "layer"): layer_normalized_rnn_reference, ("lstm", "layer"): layer_normalized_lstm_reference,
              ("gru", "layer"): layer_normalized_gru_reference}
VARIANTS = sorted(REFERENCES)
assert set(VARIANTS) == {(name, "none") for name in CELLS} | {(name, "layer") for name in LAYER_NORMALIZED_CELLS}


def random_problem(cell, seed):
    """Return float32 params with non-zero biases, a random carry and inputs [T, B, In]."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(jnp.shape, cell.init(jax.random.key(seed), INPUT, HIDDEN))
    params = {name: rng.normal(0.0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()}
    carry = tuple(rng.normal(0.0, 0.5, (BATCH, HIDDEN)).astype(np.float32) for _ in cell.carry_type._fields)
    inputs = rng.normal(0.0, 1.0, (STEPS, BATCH, INPUT)).astype(np.float32)
    return params, carry, inputs


def run_cell(cell, params, carry, x_proj):
    """Chain `cell.step` over the leading time axis of x_proj; return (carry, [T, B, H])."""
    carry = cell.carry_type(*(jnp.asarray(field) for field in carry))
    outputs = []
    for x_proj_t in x_proj:
        carry, h = cell.step(params, carry, jnp.asarray(x_proj_t))
        outputs.append(h)
    return carry, jnp.stack(outputs)


@pytest.mark.parametrize("name, norm", VARIANTS)
def test_step_matches_numpy_reference(name, norm):
    cell = cell_of(name, norm)
    params, carry, inputs = random_problem(cell, seed=1)
    params64 = {key: value.astype(np.float64) for key, value in params.items()}
    x_proj = inputs.astype(np.float64) @ params64["w_x"] + params64["b"]  # [T, B, G*H]

    final_carry, outputs = run_cell(cell, params, carry, x_proj.astype(np.float32))

    expected_carry = tuple(field.astype(np.float64) for field in carry)
    for t in range(STEPS):
        expected_carry, expected_h = REFERENCES[name, norm](params64, expected_carry, x_proj[t])
        np.testing.assert_allclose(outputs[t], expected_h, rtol=0, atol=1e-5, err_msg=f"step {t}")
    assert type(final_carry) is cell.carry_type
    for field, expected in zip(final_carry, expected_carry, strict=True):
        np.testing.assert_allclose(field, expected, rtol=0, atol=1e-5)
    # Guard against a vacuous comparison: the state moved and is not saturated.
    assert 0.05 < np.abs(np.asarray(outputs)).mean() < 0.9


@pytest.mark.parametrize("name", sorted(CELLS))
def test_init_shapes_and_bounds(name):
    cell = CELLS[name]
    params = cell.init(jax.random.key(0), INPUT, HIDDEN)
    width = cell.num_gates * HIDDEN
    assert params["w_x"].shape == (INPUT, width)
    assert params["w_h"].shape == (HIDDEN, width)
    assert params["b"].shape == (width,)
    for name_w in ("w_x", "w_h"):
        weights = np.asarray(params[name_w])
        assert np.abs(weights).max() <= HIDDEN**-0.5
        assert np.unique(weights).size == weights.size  # random, not constant
    np.testing.assert_array_equal(params["b"], 0.0)
    assert np.intersect1d(params["w_x"], params["w_h"]).size == 0  # drawn from keys of their own
    if name == "gru":
        assert params["b_hn"].shape == (HIDDEN,)
        np.testing.assert_array_equal(params["b_hn"], 0.0)


@pytest.mark.parametrize("name", sorted(LAYER_NORMALIZED_CELLS))
def test_layer_norm_gains_start_at_one_and_shifts_at_zero(name):
    plain, normalized = (cell_of(name, norm).init(jax.random.key(0), INPUT, HIDDEN) for norm in ("none", "layer"))
    width = CELLS[name].num_gates * HIDDEN
    added = {key: np.asarray(value) for key, value in normalized.items() if key not in plain}
    expected = {"norm_gain": (width, 1.0), "norm_shift": (width, 0.0)}
    if name == "lstm":
        expected |= {"cell_gain": (HIDDEN, 1.0), "cell_shift": (HIDDEN, 0.0)}
    if name == "gru":
        expected |= {"recurrent_gain": (width, 1.0), "recurrent_shift": (width, 0.0)}
    assert {key: (value.shape[0], value[0]) for key, value in added.items()} == expected
    assert all(np.all(value == value[0]) for value in added.values())
    for key, value in plain.items():  # the cell's own params are drawn as they are without the norm
        np.testing.assert_array_equal(normalized[key], value)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_initial_carry_is_zeros_in_separate_arrays(name):
    cell = CELLS[name]
    carry = cell.initial_carry(BATCH, HIDDEN)
    assert type(carry) is cell.carry_type
    assert len(carry) == (2 if name == "lstm" else 1)
    for field in carry:
        assert field.shape == (BATCH, HIDDEN) and field.dtype == jnp.float32
        np.testing.assert_array_equal(field, 0.0)
    # One buffer per field, so the whole carry can be donated.
    assert len({field.unsafe_buffer_pointer() for field in carry}) == len(carry)
    donated = jax.jit(lambda state: jax.tree.map(lambda leaf: leaf + 1.0, state), donate_argnums=0)(carry)
    np.testing.assert_array_equal(donated[0], 1.0)


@pytest.mark.parametrize("name, norm", VARIANTS)
def test_bfloat16_weights_stay_close_to_float32(name, norm):
    cell = cell_of(name, norm)
    params, carry, inputs = random_problem(cell, seed=2)
    half = {key: value.astype(jnp.bfloat16) if key.startswith("w") else jnp.asarray(value) for key, value in params.items()}
    x_proj = inputs @ params["w_x"] + params["b"]  # [T, B, G*H]
    x_proj_half = jnp.dot(jnp.asarray(inputs, jnp.bfloat16), half["w_x"], preferred_element_type=jnp.float32) + half["b"][None, None, :]

    carry_full, outputs_full = run_cell(cell, params, carry, x_proj)
    carry_half, outputs_half = run_cell(cell, half, carry, x_proj_half)

    np.testing.assert_allclose(outputs_half, outputs_full, rtol=0, atol=2e-2)
    assert not np.array_equal(outputs_half, outputs_full)  # the weights really were rounded
    for field_half, field_full in zip(carry_half, carry_full, strict=True):
        assert field_half.dtype == jnp.float32  # the state stays float32
        np.testing.assert_allclose(field_half, field_full, rtol=0, atol=2e-2)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, INPUT), (BATCH, INPUT), (STEPS, BATCH, INPUT)])
def test_matmul_sums_in_float32_to_the_product_of_its_inputs(shape, dtype, transposed):
    """Weights as they lie or held transposed, in either dtype: the float32 sum of the rounded inputs' products."""
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=shape), rng.normal(size=(INPUT, 4 * HIDDEN))
    weight = TransposedWeight(jnp.asarray(w.T, dtype)) if transposed else jnp.asarray(w, dtype)
    product = matmul(jnp.asarray(x, jnp.float32), weight)
    assert product.shape == shape[:-1] + (4 * HIDDEN,) and product.dtype == jnp.float32
    exact = np.asarray(jnp.asarray(x, dtype), np.float64) @ np.asarray(jnp.asarray(w, dtype), np.float64)
    np.testing.assert_allclose(product, exact, rtol=1e-5, atol=1e-5)
