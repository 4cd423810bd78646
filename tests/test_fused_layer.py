"""The fused Pallas layer equals charrnn/layer.py: run in Pallas's interpreter here, lowered for a GPU without one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import fused_layer, model, runtime
from charrnn.cells import CELLS
from charrnn.config import ADDITIVE_CELLS, PALLAS_UNIT, ModelConfig
from charrnn.layer import run_layer

T, H = 5, 2 * PALLAS_UNIT  # two unit blocks, so a block's gate columns are not simply the first ones


def problem(cell_name: str, batch: int, dtype=jnp.float32, seed: int = 0):
    cell = CELLS[cell_name]
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {"w_h": (jax.random.normal(keys[0], (H, cell.num_gates * H)) * H**-0.5).astype(dtype)}
    projections = jax.random.normal(keys[1], (T, batch, cell.num_gates * H))
    carry = jax.tree.map(lambda leaf: jax.random.normal(keys[2], leaf.shape), cell.initial_carry(batch, H))
    weights = jax.random.normal(keys[3], (T, batch, H))
    return cell, params, carry, projections, weights


def objective(run, cell, weights, params, carry, projections):
    """A scalar that depends on every output and on every field of the final carry."""
    final, hidden = run(cell, params, carry, projections)
    return jnp.sum(hidden * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in final)


def interpreted(cell, params, carry, projections):
    blocks = fused_layer.choose_blocks(projections.shape[1], H, programs=None)
    return fused_layer.run_layer(cell, params, carry, projections, blocks)


def assert_close(got, want, tolerance):
    for have, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        have, expected = np.asarray(have, np.float32), np.asarray(expected, np.float32)
        assert have.shape == expected.shape
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(have, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
def test_outputs_and_gradients_equal_the_xla_layer(cell_name):
    batch = 2 * PALLAS_UNIT + 1  # padded to three blocks of rows, the last holding one real row
    cell, params, carry, projections, weights = problem(cell_name, batch)
    reference = functools.partial(objective, run_layer, cell, weights)
    fused = functools.partial(objective, interpreted, cell, weights)
    want = jax.value_and_grad(reference, argnums=(0, 1, 2))(params, carry, projections)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(params, carry, projections)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert_close(got, want, 1e-5)


def test_bfloat16_weights_match_the_xla_layer_in_bfloat16():
    cell, params, carry, projections, weights = problem("lstm", batch=4, dtype=jnp.bfloat16, seed=1)
    projections = projections.astype(jnp.bfloat16)  # as a bfloat16 model's projection table gives them
    reference = functools.partial(objective, run_layer, cell, weights)
    fused = functools.partial(objective, interpreted, cell, weights)
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(params, carry, projections)
    assert got[0]["w_h"].dtype == got[2].dtype == jnp.bfloat16
    assert_close(got, jax.grad(reference, argnums=(0, 1, 2))(params, carry, projections), 2e-2)


def test_a_language_model_trains_the_same_with_either_kernel(pallas_interpreted):
    """Two layers (the first from the projection table), weight drop and dropout: loss and every gradient."""
    config = ModelConfig(cell="lstm", num_layers=2, hidden_size=H, embedding_size=5, dropout=0.2, weight_drop=0.3,
                         norm="none", dtype="float32")
    params = model.init_params(jax.random.key(3), config, 9)
    inputs, targets = (jax.random.randint(jax.random.key(seed), (T, 3), 0, 9) for seed in (4, 5))
    dropout_key = jax.random.key(6)

    def loss_and_gradient(kernel: str):
        chosen = ModelConfig(**{**config.__dict__, "kernel": kernel})
        def loss(params):
            carry = model.initial_carry(params, chosen, 3)
            return model.loss(params, chosen, carry, inputs, targets, dropout_key)[0]
        assert ("pallas_call" in str(jax.make_jaxpr(loss)(params))) == (kernel == "pallas")
        return jax.jit(jax.value_and_grad(loss))(params)

    assert_close(loss_and_gradient("pallas"), loss_and_gradient("xla"), 1e-5)


@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_gpu_kernels_lower_to_triton(cell_name, dtype):
    """Without a GPU the kernels cannot run as they would there; lowering checks every operation has a Triton form."""
    cell, params, carry, projections, weights = problem(cell_name, batch=40, dtype=dtype)
    blocks = fused_layer.choose_blocks(40, H, programs=132)
    assert blocks.parallel

    def gradients(params, carry, projections):
        run = lambda *args: fused_layer.run_layer(*args, blocks)
        return jax.grad(functools.partial(objective, run, cell, weights), argnums=(0, 1, 2))(params, carry, projections)

    lowered = jax.jit(gradients).trace(params, carry, projections).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2  # the forward kernel and the backward one


def programs_of(blocks: fused_layer.Blocks, batch: int, hidden: int) -> int:
    """How many programs `blocks` launch for a [batch, hidden] layer: every one must be resident at once."""
    return -(-batch // blocks.rows) * (hidden // blocks.units)


@pytest.mark.parametrize("batch, hidden, programs", [(64, 512, 132), (128, 1024, 132), (256, 1024, 132),
                                                     (1, 512, 132), (100, 48, 20), (256, 4096, 8),
                                                     (64, 48, 3), (PALLAS_UNIT, PALLAS_UNIT, 1)])  # exact fits
def test_blocks_fit_the_resident_programs_and_tile_the_layer(batch, hidden, programs):
    blocks = fused_layer.choose_blocks(batch, hidden, programs)
    assert blocks is not None
    assert programs_of(blocks, batch, hidden) <= programs
    for size in (blocks.rows, blocks.units, blocks.depth):
        assert size >= PALLAS_UNIT and size & (size - 1) == 0  # Triton's blocks are powers of two
    assert hidden % blocks.units == 0 and hidden % blocks.depth == 0


def test_a_layer_too_large_for_the_device_gets_no_blocks():
    assert fused_layer.choose_blocks(256, 48, programs=2) is None  # 48 units split only as 3 × 16: 12 programs at least


def test_only_gpus_run_the_kernel():
    on_gpu = jax.default_backend() == "gpu"
    assert (runtime.resident_programs() is None) == (not on_gpu)
    assert model.fuses_layers(ModelConfig(kernel="pallas")) == on_gpu
    assert not model.fuses_layers(ModelConfig(kernel="xla"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the parallel kernels run on a GPU (benchmarks/gpu.sh)")
@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
@pytest.mark.parametrize("batch, dtype, tolerance", [(40, jnp.float32, 2e-3), (128, jnp.bfloat16, 3e-2)])
def test_on_a_gpu_the_kernels_equal_the_xla_layer(cell_name, batch, dtype, tolerance):
    cell, params, carry, projections, weights = problem(cell_name, batch, dtype)
    blocks = fused_layer.choose_blocks(batch, H, runtime.resident_programs())
    fused = functools.partial(objective, lambda *args: fused_layer.run_layer(*args, blocks), cell, weights)
    reference = functools.partial(objective, run_layer, cell, weights)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(params, carry, projections)
    assert_close(got, jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(params, carry, projections), tolerance)


def test_every_pallas_cell_gates_block_by_block():
    for name in ADDITIVE_CELLS:
        assert CELLS[name].update is not None
    assert all(CELLS[name].update is None for name in CELLS if name not in ADDITIVE_CELLS)
