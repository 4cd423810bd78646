"""The hand-written backward pass of a layer equals differentiating the plain scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.cells import CELLS, LAYER_NORMALIZED_CELLS, cell_of
from charrnn.layer import run_layer, scan_layer

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


def objective(layer_function, cell, weights, params, carry, inputs):
    """A scalar that depends on every output and on the final carry."""
    final, hidden = layer_function(cell, params, carry, inputs)
    return jnp.sum(hidden * weights[0]) + jnp.sum(final.h * weights[1]) + sum(jnp.sum(leaf**2) for leaf in final)


@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("cell_name, norm", VARIANTS)
def test_custom_backward_equals_scan_autodiff(cell_name, norm, dtype, tolerance, input_kind):
    cell, params, carry, inputs, weights = problem(cell_name, norm, dtype, input_kind)
    plain = functools.partial(objective, lambda *args: scan_layer(*args), cell, weights)
    custom = functools.partial(objective, lambda *args: run_layer(*args, 2), cell, weights)
    assert np.allclose(plain(params, carry, inputs), custom(params, carry, inputs), rtol=1e-6)
    argnums = (0, 1) if input_kind == "table" else (0, 1, 2)  # character ids have no gradient
    expected = jax.grad(plain, argnums=argnums)(params, carry, inputs)
    got = jax.jit(jax.grad(custom, argnums=argnums))(params, carry, inputs)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        assert want.dtype == have.dtype, path
        want, have = np.asarray(want, np.float32), np.asarray(have, np.float32)
        assert np.abs(want).max() > 0, path
        assert np.allclose(have, want, rtol=tolerance, atol=tolerance * np.abs(want).max()), path
