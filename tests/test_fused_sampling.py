"""Generation in one Pallas launch writes what XLA's loop writes: run in Pallas's interpreter here, lowered for a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fused_layer import programs_of

from charrnn import fused_layer, fused_sampling, model, runtime, sample
from charrnn.config import ADDITIVE_CELLS, PALLAS_UNIT, ModelConfig

H, VOCAB = 2 * PALLAS_UNIT, 9  # two unit blocks; the vocabulary is padded to 16 columns


def make_config(cell: str, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(cell=cell, num_layers=2, hidden_size=H, embedding_size=8, norm="none", dtype=dtype,
                       kernel="pallas")


def trained_looking_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params, biases too, with weights large enough that the logits, and so the text, vary from step to step."""
    leaves, tree = jax.tree.flatten(model.init_params(jax.random.key(seed), config, VOCAB))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [3.0 * leaf + 0.3 * jax.random.normal(key, leaf.shape)
                                     for leaf, key in zip(leaves, keys, strict=True)])


def generated(config: ModelConfig, params: dict, batch: int, length: int, temperature: float) -> np.ndarray:
    """`length` ids per stream, [length, batch], after a prime of three."""
    return np.concatenate(list(sample.generate((params,), (config,), np.array([1, 4, 2]), length, batch, seed=5,
                                               temperature=temperature)))


@pytest.mark.parametrize("cell_name, batch, temperature", [("lstm", 1, 0.8), ("rnn", PALLAS_UNIT + 3, 1.0),
                                                            ("lstm", 2, 0.0)])
def test_generation_writes_what_the_xla_loop_writes(pallas_interpreted, cell_name, batch, temperature):
    """Across a block boundary (150 characters are 2 blocks), for one stream and for two blocks of streams."""
    config = make_config(cell_name)
    params = trained_looking_params(config)
    fused = generated(config, params, batch, 150, temperature)
    reference = generated(dataclasses.replace(config, kernel="xla"), params, batch, 150, temperature)
    assert fused.shape == reference.shape == (150, batch)
    assert len(np.unique(reference)) > 3  # the text is not one repeated character
    np.testing.assert_array_equal(fused, reference)


def block_inputs(config: ModelConfig, batch: int, seed: int = 1):
    params = trained_looking_params(config, seed)
    keys = jax.random.split(jax.random.key(seed), 3)
    carry = jax.tree.map(lambda leaf: jax.random.normal(keys[0], leaf.shape), model.initial_carry(params, config, batch))
    last_ids = jax.random.randint(keys[1], (batch,), 0, VOCAB)
    return model.prepare(params, config), carry, last_ids, keys[2]


def xla_block(prepared, config, carry, last_ids, key, length, temperature):
    config = dataclasses.replace(config, kernel="xla")
    return sample.generate_block((prepared,), (config,), (carry,), last_ids, key, jnp.int32(0),
                                 jnp.float32(temperature), None, length, 0)


@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
def test_a_block_carries_the_state_the_xla_loop_carries(pallas_interpreted, cell_name):
    config = make_config(cell_name)
    prepared, carry, last_ids, key = block_inputs(config, batch=3)
    output = prepared["output"]  # every logit below 0, the padded columns' value were they not -inf
    prepared = {**prepared, "output": {**output, "b": output["b"] - 100.0}}
    got = sample.generate_block((prepared,), (config,), (carry,), last_ids, key, jnp.int32(0), jnp.float32(0.7),
                                None, 20, 0)
    want = xla_block(prepared, config, carry, last_ids, key, 20, 0.7)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[1], want[1])
    for have, expected in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        np.testing.assert_allclose(have, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_write_what_the_xla_loop_writes(pallas_interpreted):
    config = make_config("lstm", dtype="bfloat16")
    prepared, carry, last_ids, key = block_inputs(config, batch=2, seed=2)
    assert prepared["layers"][1]["w_h"].dtype == jnp.bfloat16
    got = sample.generate_block((prepared,), (config,), (carry,), last_ids, key, jnp.int32(0), jnp.float32(0.7),
                                None, 20, 0)
    want = xla_block(prepared, config, carry, last_ids, key, 20, 0.7)
    np.testing.assert_array_equal(got[2], want[2])
    for have, expected in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        np.testing.assert_allclose(have, expected, rtol=1e-3, atol=1e-3)


def test_the_kernel_runs_only_for_the_blocks_it_takes(pallas_interpreted):
    config = make_config("lstm")
    prepared, carry, last_ids, key = block_inputs(config, batch=2)

    def launches(config, top_k=0, top_p=None):
        trace = jax.make_jaxpr(lambda prepared: sample.generate_block(
            (prepared,), (config,), (carry,), last_ids, key, jnp.int32(0), jnp.float32(1.0), top_p, 4, top_k))(prepared)
        return "pallas_call" in str(trace)

    assert launches(config)
    assert not launches(dataclasses.replace(config, kernel="xla"))
    assert not launches(config, top_k=3)
    assert not launches(config, top_p=jnp.float32(0.9))
    assert not launches(dataclasses.replace(config, residual=True))
    assert fused_sampling.choose_blocks(config, 2, fused_sampling.MAX_VOCAB, filtered=False) is not None
    assert fused_sampling.choose_blocks(config, 2, fused_sampling.MAX_VOCAB + 1, filtered=False) is None


def test_the_blocks_fit_the_device_for_the_streams_asked_and_hold_whole_units_of_vocabulary(monkeypatch):
    monkeypatch.setattr(runtime, "resident_programs", lambda: 2)  # a device that holds two programs at once
    blocks = fused_sampling.choose_blocks(make_config("lstm"), 64, VOCAB, filtered=False)
    assert programs_of(blocks, 64, H) <= 2
    sizes = [1, 9, PALLAS_UNIT, PALLAS_UNIT + 1, fused_sampling.MAX_VOCAB]
    assert [fused_sampling.padded_vocab(size) for size in sizes] == [PALLAS_UNIT] * 3 + [2 * PALLAS_UNIT,
                                                                                        fused_sampling.MAX_VOCAB]


@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gpu_kernel_lowers_to_triton(cell_name, dtype):
    """Without a GPU the kernel cannot run as it would there; lowering checks every operation has a Triton form."""
    config = make_config(cell_name, dtype)
    prepared, carry, last_ids, _ = block_inputs(config, batch=1)
    blocks = fused_layer.choose_blocks(1, H, programs=132)
    assert blocks.parallel
    noise = jnp.zeros((8, 1, VOCAB))

    def block(prepared, carry, last_ids, noise):
        return fused_sampling.generate_block(prepared, config, carry, last_ids, noise, sample.pick_unfiltered, blocks)

    lowered = jax.jit(block).trace(prepared, carry, last_ids, noise).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the parallel kernel runs on a GPU (benchmarks/gpu.sh)")
@pytest.mark.parametrize("cell_name", ADDITIVE_CELLS)
@pytest.mark.parametrize("batch", [1, 64])
def test_on_a_gpu_generation_follows_the_xla_loop(cell_name, batch):
    """The GPU's matmuls may round differently from XLA's, so a long text may part from the reference: its start may not."""
    config = make_config(cell_name)
    assert fused_sampling.choose_blocks(config, batch, VOCAB, filtered=False) is not None
    assert runtime.resident_programs() is not None
    params = trained_looking_params(config)
    fused = generated(config, params, batch, 32, 0.0)
    reference = generated(dataclasses.replace(config, kernel="xla"), params, batch, 32, 0.0)
    np.testing.assert_array_equal(fused[:16], reference[:16])
