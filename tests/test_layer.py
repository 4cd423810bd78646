"""The hand-written backward pass of a layer equals differentiating the plain scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.cells import CELLS
from charrnn.layer import run_layer, scan_layer

T, B, H = 7, 3, 8


def problem(cell_name, dtype):
    cell = CELLS[cell_name]
    keys = jax.random.split(jax.random.key(0), 6)
    params = cell.init(keys[0], 5, H)
    params = {name: value for name, value in params.items() if name not in ("w_x", "b")}
    if "b_hn" in params:
        params["b_hn"] = jax.random.normal(keys[1], (H,))
    params["w_h"] = params["w_h"].astype(dtype)
    carry = jax.tree.map(lambda leaf: jax.random.normal(keys[2], leaf.shape), cell.initial_carry(B, H))
    x_proj = jax.random.normal(keys[3], (T, B, cell.num_gates * H))
    weights = jax.random.normal(keys[4], (T, B, H)), jax.random.normal(keys[5], (B, H))
    return cell, params, carry, x_proj, weights


def objective(layer_function, cell, weights, params, carry, x_proj):
    """A scalar that depends on every output and on the final carry."""
    final, hidden = layer_function(cell, params, carry, x_proj)
    return jnp.sum(hidden * weights[0]) + jnp.sum(final.h * weights[1]) + sum(jnp.sum(leaf**2) for leaf in final)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_custom_backward_equals_scan_autodiff(cell_name, dtype, tolerance):
    cell, params, carry, x_proj, weights = problem(cell_name, dtype)
    plain = functools.partial(objective, lambda *args: scan_layer(*args), cell, weights)
    custom = functools.partial(objective, lambda *args: run_layer(*args, 2), cell, weights)
    assert np.allclose(plain(params, carry, x_proj), custom(params, carry, x_proj), rtol=1e-6)
    expected = jax.grad(plain, argnums=(0, 1, 2))(params, carry, x_proj)
    got = jax.jit(jax.grad(custom, argnums=(0, 1, 2)))(params, carry, x_proj)
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        assert want.dtype == have.dtype, path
        want, have = np.asarray(want, np.float32), np.asarray(have, np.float32)
        assert np.abs(want).max() > 0, path
        assert np.allclose(have, want, rtol=tolerance, atol=tolerance * np.abs(want).max()), path
