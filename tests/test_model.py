"""The model: gradients, carried state, the projection table, bfloat16 and resets (dropout: test_dropout.py)."""

import math

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from charrnn import model, runtime
from charrnn.cells import CELLS, cell_of
from charrnn.config import NORMS, ModelConfig

VOCAB, BATCH, STEPS = 9, 2, 6
CELL_NAMES = sorted(CELLS)


def make_config(cell: str, **overrides) -> ModelConfig:
    settings = {"cell": cell, "num_layers": 2, "hidden_size": 8, "embedding_size": 5, "dropout": 0.0, "norm": "none",
                "dtype": "float32", **overrides}
    return ModelConfig(**settings)


def random_params(config: ModelConfig, seed: int, dtype=jnp.float32) -> dict:
    """Initialised params plus noise, so that biases and learned initial states are not zero."""
    rng = np.random.default_rng(seed)
    params = model.init_params(jax.random.key(seed), config, VOCAB)
    return jax.tree.map(lambda leaf: (leaf + rng.normal(0.0, 0.3, leaf.shape)).astype(dtype), params)


def random_carry(config: ModelConfig, seed: int) -> tuple:
    """A non-zero state of every layer, shaped like the model's carry."""
    rng = np.random.default_rng(seed)
    cell = CELLS[config.cell]
    carry = tuple(cell.initial_carry(BATCH, config.hidden_size) for _ in range(config.num_layers))
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), jnp.float32), carry)


def random_ids(seed: int, length: int = STEPS) -> jax.Array:
    """Ids [T, B] in which every character of the vocabulary occurs (when T*B allows)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.permutation(np.resize(np.arange(VOCAB), length * BATCH)).reshape(length, BATCH), jnp.int32)


def assert_trees_close(actual, expected, atol: float) -> None:
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=atol), actual, expected)


# ---------------------------------------------------------------- gradients


def gradient_problem(cell: str):
    """Return (flat float64 params, jitted loss of them, its gradient, [(leaf name, slice)]).

    The loss starts from the params' own learned initial state, so "initial"
    gets a gradient; residual connections and two layers are on. Call under x64.
    """
    config = make_config(cell, learn_initial_state=True, residual=True)
    params = random_params(config, seed=3, dtype=jnp.float64)
    flat, unravel = ravel_pytree(params)
    inputs, targets = random_ids(4), random_ids(5)

    def flat_loss(flat_params):
        params = unravel(flat_params)
        carry = model.initial_carry(params, config, BATCH)
        return model.loss(params, config, carry, inputs, targets)[0]

    flat_loss = jax.jit(flat_loss)
    leaves, offset = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaves.append((jax.tree_util.keystr(path), slice(offset, offset + leaf.size)))
        offset += leaf.size
    return np.asarray(flat), flat_loss, np.asarray(jax.grad(flat_loss)(flat)), leaves


def test_gradient_problem_covers_every_leaf():
    with jax.enable_x64(True):
        flat, _, gradient, leaves = gradient_problem("gru")
    names = [name for name, _ in leaves]
    assert "['embedding']" in names and "['output']['w']" in names and "['output']['b']" in names
    assert {f"['layers'][{layer}]['{weight}']" for layer in (0, 1) for weight in ("w_x", "w_h", "b", "b_hn")} <= set(names)
    assert {"['initial'][0].h", "['initial'][1].h"} <= set(names)
    assert flat.dtype == np.float64 and leaves[-1][1].stop == flat.size
    for name, part in leaves:
        assert np.abs(gradient[part]).max() > 1e-4, name  # every leaf is on the loss's path


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_gradient_matches_central_differences_per_coordinate(cell):
    epsilon = 1e-6
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        flat, flat_loss, gradient, leaves = gradient_problem(cell)
        for name, part in leaves:
            for index in rng.choice(np.arange(part.start, part.stop), size=min(3, part.stop - part.start), replace=False):
                step = np.zeros_like(flat)
                step[index] = epsilon
                difference = (float(flat_loss(flat + step)) - float(flat_loss(flat - step))) / (2 * epsilon)
                scale = max(abs(difference), abs(gradient[index]), 1e-6)
                assert abs(difference - gradient[index]) / scale < 1e-5, (name, index, difference, gradient[index])


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("norm", NORMS)
def test_fan_in_input_init_rescales_each_w_x_to_its_input_width_and_nothing_else(norm):
    """input_init = fan_in: a layer's W_x is the hidden draw times sqrt(H / input width), so it spans
    ±1/sqrt(input width): wider in layer 1 (the embedding), unchanged above (H wide). The rest is as drawn."""
    hidden, embedding = 64, 4
    drawn = {init: model.init_params(jax.random.key(0), make_config("lstm", hidden_size=hidden, embedding_size=embedding,
                                                                    norm=norm, input_init=init), VOCAB)
             for init in ("hidden", "fan_in")}
    for index, (plain, scaled) in enumerate(zip(drawn["hidden"]["layers"], drawn["fan_in"]["layers"], strict=True)):
        fan_in = embedding if index == 0 else hidden
        np.testing.assert_allclose(scaled["w_x"], np.asarray(plain["w_x"]) * math.sqrt(hidden / fan_in), rtol=1e-6)
        assert 0.9 * fan_in**-0.5 < np.abs(scaled["w_x"]).max() <= fan_in**-0.5 * (1 + 1e-6)
        for key in plain.keys() - {"w_x"}:
            np.testing.assert_array_equal(scaled[key], plain[key])
    for key in ("embedding", "output"):
        assert_trees_close(drawn["fan_in"][key], drawn["hidden"][key], atol=0)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_two_chunks_with_carry_equal_one_long_chunk(cell):
    config = make_config(cell)
    params, carry = random_params(config, seed=8), random_carry(config, seed=9)
    inputs = random_ids(10, length=2 * STEPS)

    carry_first, logits_first = model.forward(params, config, carry, inputs[:STEPS])
    carry_second, logits_second = model.forward(params, config, carry_first, inputs[STEPS:])
    carry_whole, logits_whole = model.forward(params, config, carry, inputs)

    np.testing.assert_allclose(jnp.concatenate([logits_first, logits_second]), logits_whole, rtol=0, atol=1e-5)
    assert_trees_close(carry_second, carry_whole, atol=1e-6)
    assert not np.allclose(carry_first[0][0], carry_second[0][0])  # the state moved between chunks


@pytest.mark.parametrize("overrides", [
    {},
    {"residual": True},
    {"residual": True, "num_layers": 3},  # a residual sum feeding another residual layer
    {"learn_initial_state": True},
    {"residual": True, "learn_initial_state": True},
], ids=["plain", "residual", "residual-3-layers", "learned-initial", "residual-learned-initial"])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_generation_step_by_step_equals_one_forward_pass(cell, overrides):
    """`step`, generation's per-character body, is the same model as the chunked `forward` training runs."""
    config = make_config(cell, **overrides)
    params, inputs = random_params(config, seed=51), random_ids(52)  # inputs [T, B]
    carry = model.initial_carry(params, config, BATCH)  # the learned state, where there is one

    carry_whole, logits_whole = model.forward(params, config, carry, inputs)  # logits [T, B, V]

    step = jax.jit(lambda carry, ids: model.step(model.prepare(params, config), config, carry, ids))
    for time, ids in enumerate(inputs):  # ids [B]
        carry, logits = step(carry, ids)  # logits [B, V]
        np.testing.assert_allclose(logits, logits_whole[time], rtol=0, atol=1e-5, err_msg=f"step {time}")
    assert_trees_close(carry, carry_whole, atol=1e-5)


def explicit_forward(params: dict, config: ModelConfig, carry: tuple, inputs):
    """Embedding lookup, then x @ w_x + b per layer, then cell steps one time step at a time."""
    cell = cell_of(config.cell, config.norm)  # its equations: test_cells.py
    layer_input = np.asarray(params["embedding"])[np.asarray(inputs)]  # [T, B, E]
    new_carry = []
    for index, (layer, layer_carry) in enumerate(zip(params["layers"], carry, strict=True)):
        x_proj = layer_input @ np.asarray(layer["w_x"]) + np.asarray(layer["b"])  # [T, B, G*H]
        hidden = []
        for x_proj_t in x_proj:
            layer_carry, h = cell.step(layer, layer_carry, jnp.asarray(x_proj_t))
            hidden.append(np.asarray(h))
        hidden = np.stack(hidden)  # [T, B, H]
        if config.residual and index > 0:
            hidden = hidden + layer_input
        new_carry.append(layer_carry)
        layer_input = hidden
    logits = layer_input @ np.asarray(params["output"]["w"]) + np.asarray(params["output"]["b"])  # [T, B, V]
    return tuple(new_carry), logits


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_projection_table_equals_embedding_then_projection(cell, residual, norm):
    layers = 3 if residual else 2  # with a third layer, each residual must join its own layer's input
    config = make_config(cell, residual=residual, norm=norm, num_layers=layers)
    params, carry = random_params(config, seed=11), random_carry(config, seed=12)
    inputs = random_ids(13)

    carry_model, logits_model = model.forward(params, config, carry, inputs)
    carry_explicit, logits_explicit = explicit_forward(params, config, carry, inputs)

    np.testing.assert_allclose(logits_model, logits_explicit, rtol=0, atol=1e-5)
    assert_trees_close(carry_model, carry_explicit, atol=1e-5)
    if residual:  # the residual really changed the result
        _, logits_plain = explicit_forward(params, make_config(cell, norm=norm, num_layers=layers), carry, inputs)
        assert not np.allclose(logits_plain, logits_explicit, atol=1e-2)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_loss_is_the_mean_nats_per_character_of_the_targets(cell, norm):
    """model.loss against -log softmax(logits)[target] in float64, averaged over every [T, B] position."""
    config = make_config(cell, norm=norm)
    params, carry = random_params(config, seed=21), random_carry(config, seed=22)
    inputs, targets = random_ids(23), np.asarray(random_ids(24))

    loss, carry_after = model.loss(params, config, carry, inputs, targets)

    explicit_carry, logits = explicit_forward(params, config, carry, inputs)
    logits = np.asarray(logits, np.float64)  # [T, B, V]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nats = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [T, B]
    assert nats.shape == (STEPS, BATCH)
    np.testing.assert_allclose(float(loss), nats.mean(), rtol=1e-5)
    assert_trees_close(carry_after, explicit_carry, atol=1e-5)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_projecting_inside_or_before_the_time_loop_gives_the_same_loss_and_gradients(cell, monkeypatch):
    """CPUs with AVX-512 project each step's input inside the loop, others before it; both are the same function."""
    config = make_config(cell, residual=True, learn_initial_state=True)
    params, inputs, targets = random_params(config, seed=31), random_ids(32), random_ids(33)

    def loss_and_gradient(per_step: bool):
        monkeypatch.setattr(model, "projects_per_step", lambda: per_step)
        def loss(params):
            return model.loss(params, config, model.initial_carry(params, config, BATCH), inputs, targets)[0]
        return jax.jit(jax.value_and_grad(loss))(params)

    (inside_loss, inside_gradient), (before_loss, before_gradient) = loss_and_gradient(True), loss_and_gradient(False)
    np.testing.assert_allclose(inside_loss, before_loss, rtol=1e-6)
    assert_trees_close(inside_gradient, before_gradient, atol=1e-5)


def traced_matmul_flops(jaxpr) -> int:
    """2 × multiply-adds of every dot_general a jaxpr runs, a scan's body counted once per step."""
    total = 0
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        assert name not in ("while", "cond"), f"cannot count through {name}"
        if name == "dot_general":
            (lhs_contracting, _), _ = equation.params["dimension_numbers"]
            lhs_shape, output_shape = equation.invars[0].aval.shape, equation.outvars[0].aval.shape
            total += 2 * math.prod(output_shape) * math.prod(lhs_shape[axis] for axis in lhs_contracting)
        repeats = equation.params["length"] if name == "scan" else 1
        total += repeats * sum(traced_matmul_flops(getattr(inner, "jaxpr", inner))
                               for inner in jax_core.jaxprs_in_params(equation.params))
    return total


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("cell,layers,residual", [("lstm", 2, False), ("gru", 3, True), ("rnn", 1, False)])
def test_matmul_flop_counts_equal_the_traced_training_step_and_generation_step(cell, layers, residual, per_step,
                                                                                monkeypatch):
    """The counts `charrnn bench` divides by are those of the dot_generals the gradient really runs."""
    monkeypatch.setattr(model, "projects_per_step", lambda: per_step)
    config = make_config(cell, num_layers=layers, residual=residual, learn_initial_state=True)
    params, inputs, targets = random_params(config, seed=41), random_ids(42), random_ids(43)

    def loss(params):
        return model.loss(params, config, model.initial_carry(params, config, BATCH), inputs, targets)[0]

    traced = traced_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    waiting = 0  # the wavefront's L - 1 iterations at either end run every layer's products, kept where a layer runs
    if model.stacks_layers(config):
        products = 2 * layers - 1  # each layer's by W_h, and by W_x above the first, forward and backward
        waiting = 2 * 2 * (layers - 1) * products * model.recurrent_step_macs(config, BATCH)
    assert model.training_matmul_flops(config, VOCAB, BATCH, STEPS) + waiting == traced

    prepared = model.prepare(params, config)
    one_character = jax.make_jaxpr(lambda carry, ids: model.step(prepared, config, carry, ids))(
        model.initial_carry(params, config, 1), jnp.zeros((1,), jnp.int32))
    assert model.generation_matmul_flops_per_char(config, VOCAB) == traced_matmul_flops(one_character.jaxpr)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bfloat16_forward_stays_close_to_float32(cell):
    config = make_config(cell)
    params, carry = random_params(config, seed=14), random_carry(config, seed=15)
    inputs = random_ids(16)

    carry_full, logits_full = model.forward(params, config, carry, inputs)
    carry_half, logits_half = model.forward(params, make_config(cell, dtype="bfloat16"), carry, inputs)

    assert logits_half.dtype == jnp.float32
    np.testing.assert_allclose(logits_half, logits_full, rtol=0, atol=5e-2)
    assert not np.array_equal(logits_half, logits_full)  # bfloat16 was really used
    for leaf_half, leaf_full in zip(jax.tree.leaves(carry_half), jax.tree.leaves(carry_full), strict=True):
        assert leaf_half.dtype == jnp.float32  # the state stays float32
        np.testing.assert_allclose(leaf_half, leaf_full, rtol=0, atol=3e-2)


def test_reset_where_scalar_and_per_stream():
    config = make_config("lstm")
    fresh, carried = random_carry(config, seed=17), random_carry(config, seed=18)

    assert_trees_close(model.reset_where(jnp.array(True), fresh, carried), fresh, atol=0)
    assert_trees_close(model.reset_where(jnp.array(False), fresh, carried), carried, atol=0)

    flags = jnp.array([True, False])  # [B]: stream 0 restarts, stream 1 carries on
    chosen = model.reset_where(flags, fresh, carried)
    for leaf_chosen, leaf_fresh, leaf_carried in zip(*map(jax.tree.leaves, (chosen, fresh, carried)), strict=True):
        np.testing.assert_array_equal(leaf_chosen[0], leaf_fresh[0])
        np.testing.assert_array_equal(leaf_chosen[1], leaf_carried[1])


def test_initial_carry_is_learned_state_broadcast_over_batch():
    config = make_config("lstm", learn_initial_state=True)
    params = random_params(config, seed=19)
    carry = model.initial_carry(params, config, BATCH)
    for layer_carry, layer_initial in zip(carry, params["initial"], strict=True):
        for field, initial in zip(layer_carry, layer_initial, strict=True):
            assert field.shape == (BATCH, config.hidden_size)
            np.testing.assert_array_equal(field, np.broadcast_to(initial, field.shape))
    zeros = model.initial_carry(params, make_config("lstm"), BATCH)
    assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(zeros))


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_device_multiplies_it_natively(native, monkeypatch):
    monkeypatch.setattr(runtime, "multiplies_bfloat16_natively", lambda: native)
    expected = "bfloat16" if native else "float32"
    config = make_config("lstm", dtype="auto")
    params, carry, inputs = random_params(config, seed=80), random_carry(config, seed=81), random_ids(82)

    assert model.matmul_dtype(config) == expected
    assert model.prepare(params, config)["layers"][1]["w_h"].dtype == expected
    _, auto = model.forward(params, config, carry, inputs)
    _, explicit = model.forward(params, make_config("lstm", dtype=expected), carry, inputs)
    np.testing.assert_array_equal(auto, explicit)


def test_cpu_bfloat16_support_is_read_from_the_cpu_flags():
    assert runtime.cpu_multiplies_bfloat16("flags\t\t: fpu sse avx512f avx512_bf16 avx512vl\n")
    assert runtime.cpu_multiplies_bfloat16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not runtime.cpu_multiplies_bfloat16("flags\t\t: fpu sse avx512f avx512_vnni\n")
    assert not runtime.cpu_multiplies_bfloat16("flags\t\t: avx512_bf16x\n")


def test_avx512_is_read_from_the_cpu_flags():
    assert runtime.cpu_has_avx512("flags\t\t: fpu sse avx2 avx512f avx512vl\n")
    assert not runtime.cpu_has_avx512("flags\t\t: fpu sse avx2 fma\n")
    assert not runtime.cpu_has_avx512("flags\t\t: avx512fx avx512_vnni\n")


@pytest.mark.parametrize("flags,per_step", [("fpu avx2 avx512f", True), ("fpu avx2 fma", False)])
def test_a_cpu_projects_inside_the_time_loop_only_with_avx512(flags, per_step, monkeypatch):
    monkeypatch.setattr(runtime, "read_cpuinfo", lambda: f"flags\t\t: {flags}\n")
    assert model.projects_per_step() == per_step


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_smoothed_token_losses_are_cross_entropy_against_smoothed_labels(smoothing):
    logits = jax.random.normal(jax.random.key(40), (4, 3, VOCAB)) * 3.0
    targets = jax.random.randint(jax.random.key(41), (4, 3), 0, VOCAB)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, VOCAB), smoothing)  # 1 - ε on the target, ε / V on each
    np.testing.assert_allclose(model.token_losses(logits, targets, smoothing),
                               optax.softmax_cross_entropy(logits, labels), rtol=1e-5)
