"""The hand-written backward pass of a layer equals differentiating the plain scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.cells import CELLS, LAYER_NORMALIZED_CELLS, cell_of
from charrnn.layer import run_layer, run_stack, scan_layer, scan_stack

T, B, H, I, V = 7, 3, 8, 5, 11
INPUT_KINDS = ("table", "dense", "projected")  # character ids, the layer below's outputs, projections


VARIANTS = [(name, "none") for name in sorted(CELLS)] + [(name, "layer") for name in sorted(LAYER_NORMALIZED_CELLS)]


def problem(cell_name, norm, dtype, input_kind):
    cell = cell_of(cell_name, norm)
    width = cell.num_gates * H
    keys = jax.random.split(jax.random.key(0), 8)
    initial = cell.init(keys[0], I, H)
    params = {"w_h": initial["w_h"].astype(dtype)}
    if cell_name == "gru":
        params["b_hn"] = jax.random.normal(keys[1], (H,))
    for index, name in enumerate(sorted(set(initial) - set(CELLS[cell_name].init(keys[0], I, H)))):
        params[name] = 1.0 + 0.5 * jax.random.normal(jax.random.fold_in(keys[1], index), initial[name].shape)  # gains, shifts
    if input_kind == "table":
        params["table"] = jax.random.normal(keys[2], (V, width))
        inputs = jax.random.randint(keys[3], (T, B), 0, V)
    elif input_kind == "dense":
        params["w_x"] = (jax.random.normal(keys[2], (I, width)) * I**-0.5).astype(dtype)
        params["b"] = jax.random.normal(keys[6], (width,))
        inputs = jax.random.normal(keys[3], (T, B, I))
    else:
        inputs = jax.random.normal(keys[3], (T, B, width))
    carry = jax.tree.map(lambda leaf: jax.random.normal(keys[4], leaf.shape), cell.initial_carry(B, H))
    weights = jax.random.normal(keys[5], (T, B, H)), jax.random.normal(keys[7], (B, H))
    return cell, params, carry, inputs, weights


def assert_same_gradients(expected, got, tolerance: float):
    """`got` has `expected`'s structure and dtypes, and each leaf is within `tolerance` of it (relative to its largest)."""
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        assert want.dtype == have.dtype, path
        want, have = np.asarray(want, np.float32), np.asarray(have, np.float32)
        assert np.abs(want).max() > 0, path
        assert np.allclose(have, want, rtol=tolerance, atol=tolerance * np.abs(want).max()), path


def objective(layer_function, cell, weights, params, carry, inputs):
    """A scalar that depends on every output and on the final carry."""
    final, hidden = layer_function(cell, params, carry, inputs)
    return jnp.sum(hidden * weights[0]) + jnp.sum(final.h * weights[1]) + sum(jnp.sum(leaf**2) for leaf in final)


DTYPES = [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]  # with the tolerance of each
# Every cell variant with every input kind, each variant and each input kind in both dtypes:
# every pair of the three choices, not every triple.
BACKWARD_CASES = [(*variant, *DTYPES[(row + column) % 2], input_kind)
                  for row, variant in enumerate(VARIANTS) for column, input_kind in enumerate(INPUT_KINDS)]


@pytest.mark.parametrize("cell_name, norm, dtype, tolerance, input_kind", BACKWARD_CASES)
def test_custom_backward_equals_scan_autodiff(cell_name, norm, dtype, tolerance, input_kind):
    cell, params, carry, inputs, weights = problem(cell_name, norm, dtype, input_kind)
    plain = functools.partial(objective, lambda *args: scan_layer(*args), cell, weights)
    custom = functools.partial(objective, lambda *args: run_layer(*args, 2), cell, weights)
    assert np.allclose(plain(params, carry, inputs), custom(params, carry, inputs), rtol=1e-6)
    argnums = (0, 1) if input_kind == "table" else (0, 1, 2)  # character ids have no gradient
    expected = jax.grad(plain, argnums=argnums)(params, carry, inputs)
    got = jax.jit(jax.grad(custom, argnums=argnums))(params, carry, inputs)
    assert_same_gradients(expected, got, tolerance)


def stack_problem(cell_name, norm, dtype, input_kind, num_layers, num_steps, factor_steps):
    """`problem`'s first layer with `num_layers - 1` dense layers above it, and dropout-like factors between them."""
    cell, first, carry, inputs, _ = problem(cell_name, norm, dtype, input_kind)
    keys = jax.random.split(jax.random.key(1), 4 * num_layers)
    layers, carries = [first], [carry]
    for index in range(1, num_layers):
        _, above, above_carry, _, _ = problem(cell_name, norm, dtype, "dense")
        above = {name: value + 0.1 * jax.random.normal(keys[4 * index], value.shape).astype(value.dtype)
                 for name, value in above.items()}
        above["w_x"] = (jax.random.normal(keys[4 * index + 1], (H, cell.num_gates * H)) * H**-0.5).astype(dtype)
        layers.append(above)
        carries.append(jax.tree.map(lambda leaf: leaf * (index + 1.0), above_carry))
    inputs = inputs[:num_steps]
    factors = None
    if factor_steps is not None:  # 0 or 4/3, as dropout at a rate of 1/4 multiplies
        factors = tuple(jnp.where(jax.random.bernoulli(keys[4 * index + 2], 0.75, (factor_steps or num_steps, B, H)),
                                  4.0 / 3.0, 0.0) for index in range(num_layers - 1))
    weights = tuple((jax.random.normal(keys[4 * index + 3], (num_steps, B, H)), jax.random.normal(keys[index], (B, H)))
                    for index in range(num_layers))
    return cell, tuple(layers), tuple(carries), inputs, factors, weights


def stack_objective(stack_function, cell, weights, factors, layers, carries, inputs):
    """A scalar that depends on every layer's outputs and final carry."""
    finals, hiddens = stack_function(cell, layers, carries, inputs, factors)
    return sum(jnp.sum(hidden * weight[0]) + jnp.sum(final.h * weight[1]) + sum(jnp.sum(leaf**2) for leaf in final)
               for final, hidden, weight in zip(finals, hiddens, weights, strict=True))


# Every cell variant once, with depths, chunk lengths (shorter than the stack is deep too), factors per step,
# one factor for all steps (locked dropout) or none, and each kind of first-layer input among them.
@pytest.mark.parametrize("cell_name, norm, num_layers, num_steps, factor_steps, input_kind", [
    ("lstm", "layer", 2, T, 0, "table"), ("lstm", "none", 3, T, 1, "dense"), ("gru", "layer", 3, T, 0, "projected"),
    ("gru", "none", 2, T, None, "table"), ("rnn", "layer", 3, 2, 0, "table"), ("rnn", "none", 4, 3, 1, "dense"),
    ("lstm", "layer", 3, 1, None, "table"),
])
def test_wavefront_stack_equals_layers_one_after_another(cell_name, norm, num_layers, num_steps, factor_steps,
                                                         input_kind):
    """The wavefront's outputs, final carries and gradients against `scan_layer`s one above the other, differentiated,
    with factors per step or one for all steps (locked), and chunks shorter than the stack is deep."""
    cell, layers, carries, inputs, factors, weights = stack_problem(cell_name, norm, jnp.float32, input_kind, num_layers,
                                                                    num_steps, factor_steps)
    plain = functools.partial(stack_objective, lambda *args: scan_stack(*args), cell, weights, factors)
    custom = functools.partial(stack_objective, lambda *args: run_stack(*args, 2), cell, weights, factors)
    want_finals, want_hiddens = scan_stack(cell, layers, carries, inputs, factors)
    have_finals, have_hiddens = jax.jit(functools.partial(run_stack, cell), static_argnums=4)(
        layers, carries, inputs, factors, 1)
    for want, have in zip(jax.tree.leaves((want_finals, want_hiddens)), jax.tree.leaves((have_finals, have_hiddens))):
        assert np.allclose(have, want, rtol=1e-5, atol=1e-6)
    argnums = (0, 1) if input_kind == "table" else (0, 1, 2)
    expected = jax.grad(plain, argnums=argnums)(layers, carries, inputs)
    got = jax.jit(jax.grad(custom, argnums=argnums))(layers, carries, inputs)
    assert_same_gradients(expected, got, 1e-5)
