"""The encoder–decoder's mathematics: against a NumPy reference, padding, bidirectionality, attention, search."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from charrnn import dropout
from charrnn.config import Config, ModelConfig, TrainConfig
from charrnn.errors import CorpusError, UsageError
from charrnn.seq2seq import attention, generate, model as s2s, pairs as pairs_lib, rescoring, task as task_lib
from references import layer_norm, sigmoid

SOURCE_VOCAB, TARGET_VOCAB = 7, 5  # id 0 included on both sides
SMALL = ModelConfig(kind="seq2seq", hidden_size=8, embedding_size=4, num_layers=2, encoder_layers=2, dropout=0.0,
                    norm="none", dtype="float32")
# Every attention weight in use, in bfloat16: w_k [2H, H], w_q [H, H], w_c [3H, H], w_f [H, 4H].
BFLOAT16_FEEDING = dataclasses.replace(SMALL, dtype="bfloat16", input_feeding=True, encoder_layers=1)


def random_pairs(seed: int, count: int, max_source: int = 6, max_target: int = 5):
    rng = np.random.default_rng(seed)
    sources = [rng.integers(1, SOURCE_VOCAB, rng.integers(1, max_source + 1)).astype(np.int32) for _ in range(count)]
    targets = [rng.integers(1, TARGET_VOCAB, rng.integers(1, max_target + 1)).astype(np.int32) for _ in range(count)]
    return sources, targets


def params_for(config: ModelConfig, seed: int = 0) -> dict:
    params = s2s.init_params(jax.random.key(seed), config, SOURCE_VOCAB, TARGET_VOCAB)
    # Larger output weights than the initialisation's, so that the distributions are far from uniform.
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64) * 3.0, params)


def test_fan_in_input_init_scales_every_encoder_and_decoder_layer_by_its_input_width():
    """Encoder layer 1 reads the embedding, layer 2 both directions' states (2H); the decoder's layer 1 the embedding."""
    config = dataclasses.replace(SMALL, hidden_size=16)
    drawn = {init: s2s.init_params(jax.random.key(0), dataclasses.replace(config, input_init=init), SOURCE_VOCAB,
                                   TARGET_VOCAB) for init in ("hidden", "fan_in")}
    widths = {("encoder", "forward", 0): 4, ("encoder", "backward", 0): 4, ("encoder", "forward", 1): 32,
              ("encoder", "backward", 1): 32, ("decoder", "layers", 0): 4, ("decoder", "layers", 1): 16}
    for (part, stack, index), width in widths.items():
        plain, scaled = (drawn[init][part][stack][index] for init in ("hidden", "fan_in"))
        np.testing.assert_allclose(scaled["w_x"], np.asarray(plain["w_x"]) * np.sqrt(16 / width), rtol=1e-6)
        np.testing.assert_array_equal(scaled["w_h"], plain["w_h"])


# --- an independent reference: the textbook equations, one pair at a time, in float64 NumPy ---

def cell_step(cell: str, p: dict, carry: tuple, x: np.ndarray) -> tuple:
    h = carry[0]
    if cell == "lstm":
        z = x @ p["w_x"] + p["b"] + h @ p["w_h"]
        if "norm_gain" in p:  # model.norm = "layer": each gate's sum normalised on its own, and the memory cell
            z = layer_norm(z, p["norm_gain"], p["norm_shift"], 4)
        i, f, g, o = np.split(z, 4)
        c = sigmoid(f) * carry[1] + sigmoid(i) * np.tanh(g)
        shown = layer_norm(c, p["cell_gain"], p["cell_shift"], 1) if "cell_gain" in p else c
        return (sigmoid(o) * np.tanh(shown), c)
    if cell == "gru":
        x_r, x_u, x_n = np.split(x @ p["w_x"] + p["b"], 3)
        h_r, h_u, h_n = np.split(h @ p["w_h"], 3)
        r, u = sigmoid(x_r + h_r), sigmoid(x_u + h_u)
        return ((1 - u) * np.tanh(x_n + r * (h_n + p["b_hn"])) + u * h,)
    return (np.tanh(x @ p["w_x"] + p["b"] + h @ p["w_h"]),)


def run_layer(cell: str, p: dict, inputs: np.ndarray, hidden: int) -> np.ndarray:
    carry = tuple(np.zeros(hidden) for _ in range(2 if cell == "lstm" else 1))
    outputs = []
    for x in inputs:
        carry = cell_step(cell, p, carry, x)
        outputs.append(carry[0])
    return np.array(outputs)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_nats(params: dict, config: ModelConfig, source: np.ndarray, target: np.ndarray) -> float:
    """Summed nats of one unpadded pair, target's end symbol included."""
    return -float(np.sum(np.log(reference_probabilities(params, config, source, target))))


def reference_probabilities(params: dict, config: ModelConfig, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The probability of each of one unpadded pair's target symbols, its end symbol included, teacher-forced."""
    hidden, cell = config.hidden_size, config.cell
    encoder = params["encoder"]
    layer_input = encoder["embedding"][source]  # [S, E]
    for index in range(config.encoder_layers):
        forward = run_layer(cell, encoder["forward"][index], layer_input, hidden)
        outputs, final = [forward], [forward[-1]]
        if config.bidirectional:
            backward = run_layer(cell, encoder["backward"][index], layer_input[::-1], hidden)[::-1]
            outputs.append(backward)
            final.append(backward[0])
        layer_input = np.concatenate(outputs, axis=-1)
    values, final = layer_input, np.concatenate(final)
    fields = 2 if cell == "lstm" else 1
    state = np.tanh(final @ params["bridge"]["w"] + params["bridge"]["b"]).reshape(config.num_layers, fields, hidden)
    carries = [tuple(state[layer]) for layer in range(config.num_layers)]
    decoder, attention = params["decoder"], params.get("attention")
    probabilities, feed = [], np.zeros(hidden)
    for previous, wanted in zip([0, *target], [*target, 0]):
        x = decoder["embedding"][previous]
        for layer in range(config.num_layers):
            p = decoder["layers"][layer]
            if layer == 0 and config.input_feeding:  # the first layer reads [symbol; last features]
                p, x = {**p, "w_x": np.concatenate([p["w_x"], attention["w_f"]])}, np.concatenate([x, feed])
            carries[layer] = cell_step(cell, p, carries[layer], x)
            x = carries[layer][0]
        if config.attention != "none":
            keys = values @ attention["w_k"]  # [S, H]
            if config.attention == "dot":
                scores = keys @ x
            else:
                scores = np.tanh(x @ attention["w_q"] + keys) @ attention["v"]
            context = softmax(scores) @ values
            x = feed = np.tanh(np.concatenate([x, context]) @ attention["w_c"] + attention["b_c"])
        logits = x @ decoder["output"]["w"] + decoder["output"]["b"]
        probabilities.append(softmax(logits)[wanted])
    return np.array(probabilities)


VARIANTS = [
    dict(cell="lstm", attention="additive", bidirectional=True),
    dict(cell="gru", attention="dot", bidirectional=True),
    dict(cell="rnn", attention="none", bidirectional=False),
    dict(cell="lstm", attention="dot", bidirectional=False, encoder_layers=1, num_layers=1),
    dict(cell="lstm", attention="additive", bidirectional=True, input_feeding=True),
    dict(cell="lstm", attention="additive", bidirectional=True, norm="layer"),
    dict(cell="lstm", attention="additive", bidirectional=True, attention_size=3),  # W_q [H, 3], W_k [2H, 3], v [3]
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(value) for value in v.values()))
def test_teacher_forced_loss_matches_numpy_reference(variant):
    config = dataclasses.replace(SMALL, **variant)
    params = params_for(config)
    sources, targets = random_pairs(1, 6)
    batch = pairs_lib.make_batch(sources, targets)
    total, count = s2s.summed_loss(jax.tree.map(jnp.float32, params), config, batch)
    expected = sum(reference_nats(params, config, s, t) for s, t in zip(sources, targets))
    assert int(count) == sum(len(t) + 1 for t in targets)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_an_ensembles_loss_is_that_of_the_mean_distribution():
    """Two models writing together: nats of (p1 + p2) / 2 at every real target symbol, against NumPy; one model
    alone is its own loss."""
    configs = (dataclasses.replace(SMALL, **VARIANTS[0]), dataclasses.replace(SMALL, **VARIANTS[1]))
    params = (params_for(configs[0], seed=1), params_for(configs[1], seed=2))
    sources, targets = random_pairs(4, 6)
    batch = pairs_lib.make_batch(sources, targets, source_len=8, target_len=8)
    float32 = tuple(jax.tree.map(jnp.float32, member) for member in params)
    summed = jax.jit(s2s.ensemble_summed_loss, static_argnums=1)
    total, count = summed(float32, configs, batch)
    expected = -sum(np.sum(np.log((reference_probabilities(params[0], configs[0], s, t)
                                   + reference_probabilities(params[1], configs[1], s, t)) / 2))
                    for s, t in zip(sources, targets))
    assert int(count) == sum(len(t) + 1 for t in targets)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    alone = summed(float32[:1], configs[:1], batch)[0]
    assert float(alone) == float(jax.jit(s2s.summed_loss, static_argnums=1)(float32[0], configs[0], batch)[0])


def test_attention_size_is_the_width_of_the_additive_scores_layer_alone():
    """W_q [H, A], W_k [2H, A], v [A]; W_c, which reads the context, keeps its [H + 2H, H]."""
    config = dataclasses.replace(SMALL, attention="additive", attention_size=3)
    weights = s2s.init_params(jax.random.key(0), config, SOURCE_VOCAB, TARGET_VOCAB)["attention"]
    assert {name: weights[name].shape for name in ("w_q", "w_k", "v", "w_c")} == {
        "w_q": (8, 3), "w_k": (16, 3), "v": (3,), "w_c": (24, 8)}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_changes_neither_loss_nor_gradients(cell):
    config = dataclasses.replace(SMALL, cell=cell)
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(2, 5, max_source=9, max_target=10)
    grad = jax.jit(jax.value_and_grad(lambda p, b: s2s.summed_loss(p, config, b)[0]))
    # The batch pads everything to 16; one pair alone pads less, to 12 (one shape: one compilation).
    total, grads = grad(params, pairs_lib.make_batch(sources, targets, source_len=16, target_len=16))
    alone = [grad(params, pairs_lib.make_batch([s], [t], source_len=12, target_len=12)) for s, t in zip(sources, targets)]
    np.testing.assert_allclose(float(total), sum(float(value) for value, _ in alone), rtol=1e-5)
    summed = jax.tree.map(lambda *leaves: sum(leaves), *[g for _, g in alone])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(summed)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)


def test_label_smoothing_counts_real_target_symbols_only():
    params = jax.tree.map(jnp.float32, params_for(SMALL))
    sources, targets = random_pairs(4, 5)
    batch = pairs_lib.make_batch(sources, targets, source_len=8, target_len=8)
    logits, _ = s2s.forward(params, SMALL, batch)
    labels = optax.smooth_labels(jax.nn.one_hot(batch.target_out, TARGET_VOCAB), 0.2)
    mask = np.asarray(batch.target_mask, bool)
    expected = np.asarray(optax.softmax_cross_entropy(logits, labels))[mask].mean()
    np.testing.assert_allclose(float(s2s.loss(params, SMALL, batch, smoothing=0.2)), expected, rtol=1e-5)


def test_backward_direction_is_forward_direction_on_the_reversed_source():
    config = dataclasses.replace(SMALL, encoder_layers=1, bidirectional=True)
    params = jax.tree.map(jnp.float32, params_for(config))
    params["encoder"]["backward"] = params["encoder"]["forward"]  # the same weights both ways
    sources, _ = random_pairs(3, 4, max_source=7)
    batch = pairs_lib.make_batch(sources, [np.ones(1, np.int32)] * 4)
    reversed_batch = pairs_lib.make_batch([s[::-1] for s in sources], [np.ones(1, np.int32)] * 4)
    outputs, final = s2s.encode(params, config, batch.source)
    reversed_outputs, _ = s2s.encode(params, config, reversed_batch.source)
    hidden = config.hidden_size
    for column, source in enumerate(sources):
        n = len(source)
        backward = np.asarray(outputs[:n, column, hidden:])
        forward_of_reversed = np.asarray(reversed_outputs[:n, column, :hidden])[::-1]
        np.testing.assert_allclose(backward, forward_of_reversed, rtol=1e-5, atol=1e-6)
        # The final state: the forward direction at the last real character, the backward one at the first.
        np.testing.assert_allclose(final[column, :hidden], outputs[n - 1, column, :hidden], rtol=1e-6)
        np.testing.assert_allclose(final[column, hidden:], outputs[0, column, hidden:], rtol=1e-6)


def test_reversal_reverses_real_positions_only_and_undoes_itself():
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)  # lengths 3, 2, 1 over 4 steps
    indices = np.asarray(s2s.reversal(jnp.asarray(mask)))
    np.testing.assert_array_equal(indices.T, [[2, 1, 0, 3], [1, 0, 2, 3], [0, 1, 2, 3]])
    x = np.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(s2s.take_time(s2s.take_time(jnp.asarray(x), indices), indices), x)


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_attention_weights_sum_to_one_over_real_positions(attention):
    config = dataclasses.replace(SMALL, attention=attention)
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(4, 5, max_source=9)
    batch = pairs_lib.make_batch(sources, targets)
    _, weights = s2s.forward(params, config, batch)  # [T, B, S]
    weights = np.asarray(weights)
    mask = np.asarray(batch.source != 0).T  # [B, S]
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(weights[:, ~mask] == 0.0)
    assert np.all(weights[:, mask] > 0.0)


def test_additive_scores_backward_is_autodiff_of_the_formula():
    """The hand-written backward (tanh recomputed a query at a time) against JAX's derivative of
    v · tanh(q_t + k_s), in float64, for every input and a cotangent with zeros where padding would be."""
    rng = np.random.default_rng(5)
    projected, keys, v = rng.normal(size=(5, 3, 4)), rng.normal(size=(7, 3, 4)), rng.normal(size=4)
    cotangent = rng.normal(size=(5, 3, 7)) * (np.arange(7) < 6)
    formula = lambda q, k, w: jnp.einsum("tsba,a->tbs", jnp.tanh(q[:, None] + k[None]), w)  # noqa: E731
    with jax.enable_x64(True):
        scores, backward = jax.vjp(attention.additive_scores, projected, keys, v)
        want_scores, want_backward = jax.vjp(formula, projected, keys, v)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-12)
        for got, want in zip(backward(cotangent), want_backward(cotangent), strict=True):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_attention_and_bridge_multiply_in_the_models_matmul_dtype():
    config = BFLOAT16_FEEDING
    params = s2s.init_params(jax.random.key(0), config, SOURCE_VOCAB, TARGET_VOCAB)
    weights = s2s.prepare(params, config)["attention"]
    assert {name for name, leaf in weights.items() if leaf.dtype == jnp.bfloat16} == {"w_k", "w_q", "w_c", "w_f"}
    assert weights["v"].dtype == weights["b_c"].dtype == jnp.float32
    start = lambda p: s2s.start(p, s2s.prepare(p, config), config, jnp.ones((3, 2), jnp.int32))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(start)(params))
    assert "bf16[16,32]" in jaxpr  # the bridge's w [2H, L*2*H]: no encoder weight has its shape


@pytest.mark.parametrize("path", ["train", "generate"])
def test_attention_weights_are_cast_once_per_compiled_call(path):
    """Not again at every decoder step: the teacher-forced loop with input feeding and the generation loop
    each cast w_k [2H, H], w_q [H, H] and w_c [3H, H] a single time (no other weight has their shapes)."""
    config = BFLOAT16_FEEDING
    params = s2s.init_params(jax.random.key(0), config, SOURCE_VOCAB, TARGET_VOCAB)
    batch = pairs_lib.make_batch(*random_pairs(2, 3))
    if path == "train":
        jaxpr = jax.make_jaxpr(lambda p: s2s.loss(p, config, batch))(params)
    else:
        jaxpr = jax.make_jaxpr(lambda p: generate.sample((p,), (config,), batch.source, jax.random.key(0), jnp.float32(1.0),
                                                         None, 6))(params)
    for shape in ("[16,8]", "[8,8]", "[24,8]"):
        assert str(jaxpr).count(f"bf16{shape} = convert_element_type") == 1, shape


def test_scheduled_sampling_reads_the_decoders_own_most_likely_symbols():
    """Rate 1 feeds, after the start symbol, the argmax of a teacher-forced pass; rate 0 the true symbols;
    between them each symbol is one or the other, both occurring. Nothing else of the batch changes."""
    params = jax.tree.map(jnp.float32, params_for(SMALL))
    batch = pairs_lib.make_batch(*random_pairs(8, 16))
    own = np.argmax(np.asarray(s2s.forward(params, SMALL, batch)[0]), axis=-1)[:-1]  # [T-1, B]
    true = np.asarray(batch.target_in)
    key = jax.random.key(1)
    mixed = {rate: s2s.with_own_choices(params, SMALL, batch, rate, key) for rate in (0.0, 0.5, 1.0)}
    for rate, fed in mixed.items():
        np.testing.assert_array_equal(fed.target_in[0], true[0])  # the start symbol
        for field in ("source", "target_out", "target_mask"):
            np.testing.assert_array_equal(getattr(fed, field), getattr(batch, field))
    np.testing.assert_array_equal(mixed[0.0].target_in, true)
    np.testing.assert_array_equal(mixed[1.0].target_in[1:], own)
    half, differ = np.asarray(mixed[0.5].target_in[1:]), own != true[1:]
    assert np.all((half == own) | (half == true[1:]))
    assert 0 < np.mean(half[differ] == own[differ]) < 1


def test_training_reads_own_choices_only_when_scheduled():
    sources, targets = random_pairs(9, 6)
    batch = pairs_lib.make_batch(sources, targets)
    params = jax.tree.map(jnp.float32, params_for(SMALL))
    key = jax.random.key(2)
    corpus = task_lib.PairsCorpus(None, None, (sources, targets), (sources, targets), "", 0)
    losses = {rate: float(task_lib.PairsTask(Config(SMALL, TrainConfig(batch_size=6, scheduled_sampling=rate)), corpus)
                          .batch_loss(params, (), batch, key)[0]) for rate in (0.0, 1.0)}
    np.testing.assert_allclose(losses[0.0], s2s.loss(params, SMALL, batch), rtol=1e-6)
    np.testing.assert_allclose(losses[1.0], s2s.loss(params, SMALL, s2s.with_own_choices(params, SMALL, batch, 1.0, key)),
                               rtol=1e-6)
    assert not np.isclose(losses[0.0], losses[1.0], rtol=1e-3)


def test_a_runs_pad_multiple_shapes_its_batches_and_leaves_its_losses_alone(monkeypatch):
    """`train.pad_multiple` pads training and validation batches to its multiples; padding is masked, so the
    validation loss is the same whatever the multiple."""
    sources, targets = random_pairs(4, 40, max_source=11, max_target=9)
    corpus = task_lib.PairsCorpus(None, None, (sources, targets), (sources, targets), "", 0)
    params = jax.tree.map(jnp.float32, params_for(SMALL))
    shapes, make_batch = [], pairs_lib.make_batch

    def recorded(*args, **kwargs):
        batch = make_batch(*args, **kwargs)
        shapes.append((batch.source.shape[0], batch.target_in.shape[0]))
        return batch

    monkeypatch.setattr(pairs_lib, "make_batch", recorded)
    losses = []
    for multiple in (1, 4, 16):
        task = task_lib.PairsTask(Config(SMALL, TrainConfig(batch_size=8, pad_multiple=multiple)), corpus)
        shapes.clear()
        batch = task.batches(0, 3, slice(None))
        losses.append(task.validation_loss(params, None))
        assert len(shapes) > 3 and all(length % multiple == 0 for shape in shapes for length in shape), shapes
        assert (batch.source.shape[1] == 16) if multiple == 16 else (batch.source.shape[1] <= 12)  # sources ≤ 11
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


def test_each_epoch_of_training_batches_takes_every_pair_once_and_streams_pick_their_pairs():
    """Consecutive steps' batches of one call, over two epochs: every pair once per epoch, in another order each
    epoch, a step's target symbols `chars_per_step` on average; a slice of streams is those columns of the full
    batches."""
    count = 24
    sources = [np.array([index + 1], np.int32) for index in range(count)]  # each pair named by its source id
    targets = random_pairs(3, count)[1]
    corpus = task_lib.PairsCorpus(None, None, (sources, targets), (sources[:2], targets[:2]), "", 0)
    task = task_lib.PairsTask(Config(SMALL, TrainConfig(batch_size=6, pad_multiple=1)), corpus)
    assert task.steps_per_epoch == 4
    batches = task.batches(0, 8, slice(None))  # [8 steps, S, 6]
    epochs = [np.asarray(batches.source[:4, 0]).ravel() - 1, np.asarray(batches.source[4:, 0]).ravel() - 1]
    for taken in epochs:
        np.testing.assert_array_equal(np.sort(taken), np.arange(count))
    assert np.any(epochs[0] != epochs[1])
    assert task.chars_per_step == round(np.asarray(batches.target_mask[:4]).sum() / 4)  # end symbols included
    np.testing.assert_array_equal(task.batches(5, 1, slice(None)).source[0, 0], batches.source[5, 0])
    part = task.batches(4, 3, slice(2, 5))
    np.testing.assert_array_equal(part.source[:, 0], batches.source[4:7, 0, 2:5])


def test_scheduled_samplings_coins_leave_the_dropout_masks_those_of_a_run_without_it():
    """A training batch's loss draws its coins from fold_in(key, SAMPLING_STREAM) and its dropout masks from the key
    itself, as a run without scheduled sampling does."""
    config = dataclasses.replace(SMALL, dropout=0.3, encoder_layers=1, num_layers=1)
    sources, targets = random_pairs(9, 6)
    batch = pairs_lib.make_batch(sources, targets)
    params = jax.tree.map(jnp.float32, params_for(config))
    key = jax.random.key(2)
    corpus = task_lib.PairsCorpus(None, None, (sources, targets), (sources, targets), "", 0)
    task = task_lib.PairsTask(Config(config, TrainConfig(batch_size=6, scheduled_sampling=0.5)), corpus)
    own = s2s.with_own_choices(params, config, batch, 0.5, jax.random.fold_in(key, task_lib.SAMPLING_STREAM))
    assert np.any(np.asarray(own.target_in) != np.asarray(batch.target_in))
    got, want = jax.jit(lambda key: (task.batch_loss(params, (), batch, key)[0], s2s.loss(params, config, own, key)))(key)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_validation_loss_is_over_all_pairs_not_a_mean_of_batch_means(monkeypatch):
    """Nats summed over every real target symbol of every pair, over their count, however many batches of up to
    EVAL_BATCH_SIZE pairs they take."""
    sources, targets = random_pairs(6, 21, max_target=9)
    params = jax.tree.map(jnp.float32, params_for(SMALL))
    corpus = task_lib.PairsCorpus(None, None, (sources, targets), (sources, targets), "", 0)
    task = task_lib.PairsTask(Config(SMALL, TrainConfig(batch_size=3, pad_multiple=16)), corpus)  # one shape
    total, symbols = jax.jit(s2s.summed_loss, static_argnums=1)(params, SMALL,
                                                                pairs_lib.make_batch(sources, targets, 16, 16))
    monkeypatch.setattr(task_lib, "EVAL_BATCH_SIZE", 3)
    assert [len(rows) for rows, _ in task_lib.batches_of(sources, targets, 3)] == [3] * 7
    assert [len(rows) for rows, _ in task_lib.batches_of(sources[:20], targets[:20], 3)] == [3] * 6 + [2]
    np.testing.assert_allclose(task.validation_loss(params, None), total / symbols, rtol=1e-5)


def test_loading_pairs_stores_targets_in_writing_order_and_refuses_another_file_or_no_validation(tmp_path):
    """A decoder writing right to left reads its training and validation targets last symbol first; resuming on a
    file of another checksum, or a split that holds nothing out, is refused."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdef"), rng.integers(2, 7))) for _ in range(200)]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{word}\t{word.upper()}z\n" for word in words), encoding="utf-8")
    config = Config(dataclasses.replace(SMALL, reverse_target=True), TrainConfig(max_length=8, val_fraction=0.2))
    corpus = task_lib.load_pairs(path, config)
    expected = pairs_lib.split(pairs_lib.Pairs(words, [f"{word.upper()}z" for word in words]), 0.2)
    for encoded, pairs in zip((corpus.train, corpus.val), expected, strict=True):
        assert [corpus.target_vocab.decode(ids[::-1] - 1) for ids in encoded[1]] == pairs.targets
        assert [corpus.source_vocab.decode(ids - 1) for ids in encoded[0]] == pairs.sources
    assert task_lib.load_pairs(path, config, checksum=corpus.checksum).checksum == corpus.checksum
    with pytest.raises(UsageError, match="cannot resume on another pairs file"):
        task_lib.load_pairs(path, config, checksum="0" * 64)
    with pytest.raises(CorpusError, match="no pair falls in the validation split"):
        task_lib.load_pairs(path, dataclasses.replace(config, train=TrainConfig(max_length=8, val_fraction=0.0)))


def test_input_feeding_with_zero_feed_weights_is_the_plain_decoder():
    """The feeding path (attention inside a step-by-step loop) against the plain one (whole layers, then
    attention): with W_f = 0 they compute the same, locked dropout masks and gradients included."""
    plain = dataclasses.replace(SMALL, cell="gru", encoder_layers=1, bidirectional=False, dropout=0.3,
                                locked_dropout=True)
    feeding = dataclasses.replace(plain, input_feeding=True)
    params = jax.tree.map(jnp.float32, params_for(feeding))
    params["attention"]["w_f"] = jnp.zeros_like(params["attention"]["w_f"])
    without = {**params, "attention": {k: v for k, v in params["attention"].items() if k != "w_f"}}
    batch = pairs_lib.make_batch(*random_pairs(7, 5))
    key = jax.random.key(3)
    loss_and_grads = jax.jit(jax.value_and_grad(s2s.loss), static_argnums=1)
    loss, grads = loss_and_grads(params, feeding, batch, key)
    want_loss, want_grads = loss_and_grads(without, plain, batch, key)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert np.any(np.asarray(grads["attention"].pop("w_f")) != 0)  # the features do reach W_f
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.isclose(float(loss), float(loss_and_grads(params, feeding, batch, jax.random.key(4))[0]),
                          rtol=1e-3)  # dropout applied: another key, another loss


@pytest.mark.parametrize("locked", [False, True])
def test_each_encoder_layer_drops_its_outputs_with_a_mask_of_its_own(locked):
    """Output dropout of encoder layer i draws the mask of fold_in(key, i), one for all steps where locked: the top
    layer's, index 1 here, is what the decoder reads (not layer 0's mask again)."""
    config = dataclasses.replace(SMALL, dropout=0.5, locked_dropout=locked)
    params = jax.tree.map(jnp.float32, params_for(config))
    source = pairs_lib.make_batch(*random_pairs(5, 4)).source
    key = jax.random.key(8)
    outputs = np.asarray(s2s.encode(params, config, source, key)[0])  # [S, B, 2H]
    factors = dropout.output_factors(outputs.shape, 0.5, key, config.encoder_layers - 1, locked)
    np.testing.assert_array_equal(outputs != 0, np.broadcast_to(np.asarray(factors) != 0, outputs.shape))


def test_input_feeding_drops_step_ts_outputs_with_the_mask_of_fold_in_key_t():
    """Unlocked output dropout with input feeding: the teacher-forced logits are those of decoder steps taken one at a
    time, step t with the key fold_in(decoder's key, t), the encoder and decoder keys split from the one given."""
    config = dataclasses.replace(SMALL, input_feeding=True, dropout=0.5, encoder_layers=1, num_layers=1)
    params = jax.tree.map(jnp.float32, params_for(config))
    batch = pairs_lib.make_batch(*random_pairs(7, 5))
    key = jax.random.key(3)
    logits = np.asarray(jax.jit(s2s.forward, static_argnums=1)(params, config, batch, key)[0])
    encoder_key, decoder_key = jax.random.split(key)
    prepared = s2s.prepare(params, config)
    state, memory = s2s.start(params, prepared, config, batch.source, encoder_key)
    step = jax.jit(s2s._features_step, static_argnums=1)
    for t, ids in enumerate(batch.target_in):
        state, features, _ = step(prepared, config, state, ids, memory, jax.random.fold_in(decoder_key, t))
        want = features @ prepared["output"]["w"] + prepared["output"]["b"][None]
        np.testing.assert_allclose(logits[t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_feeding", [False, True], ids=["plain", "feeding"])
def test_decoder_steps_taken_one_at_a_time_give_the_teacher_forced_logits_and_attention(input_feeding):
    """`decoder_step`, which generation runs, against `forward`'s teacher-forced pass, with an output bias that is
    not the initialisation's zeros."""
    config = dataclasses.replace(SMALL, attention="additive", input_feeding=input_feeding)
    params = jax.tree.map(jnp.float32, params_for(config))
    params["decoder"]["output"]["b"] = jnp.asarray(np.random.default_rng(0).normal(size=TARGET_VOCAB), jnp.float32)
    batch = pairs_lib.make_batch(*random_pairs(7, 5))
    logits, weights = jax.jit(s2s.forward, static_argnums=1)(params, config, batch)
    prepared = s2s.prepare(params, config)
    state, memory = s2s.start(params, prepared, config, batch.source)
    step = jax.jit(s2s.decoder_step, static_argnums=1)
    for t, ids in enumerate(batch.target_in):
        state, step_logits, step_weights = step(prepared, config, state, ids, memory)
        np.testing.assert_allclose(step_logits, logits[t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step_weights, weights[t], rtol=1e-5, atol=1e-6)


def test_beam_of_one_is_greedy():
    config = dataclasses.replace(SMALL, attention="additive")
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(5, 8)
    source = pairs_lib.make_batch(sources, targets).source
    greedy, _ = generate.sample((params,), (config,), source, jax.random.key(0), jnp.float32(0.0), None, 7)
    tokens, _ = generate.beam_search((params,), (config,), source, 7, 1)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], np.asarray(greedy))


def test_a_batch_of_sources_searches_as_each_source_searches_alone():
    """Pairs' beams side by side in one search: each source keeps its own decoder state, memory and hypotheses."""
    config = dataclasses.replace(SMALL, attention="additive")
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(9, 3)
    source = pairs_lib.make_batch(sources, targets).source
    tokens, scores = generate.beam_search((params,), (config,), source, 5, 3)
    for column in range(source.shape[1]):
        alone, alone_scores = generate.beam_search((params,), (config,), source[:, column : column + 1], 5, 3)
        np.testing.assert_array_equal(np.asarray(tokens)[column], np.asarray(alone)[0])
        np.testing.assert_allclose(np.asarray(scores)[column], np.asarray(alone_scores)[0], rtol=1e-5)


def hypothesis_scores(params: tuple, configs: tuple, source: np.ndarray, length: int) -> dict[tuple, float]:
    """Every target the search can end with, and its log-probability, by teacher forcing each one: with several
    models, the sum over its symbols of the log of their mean probability."""
    characters = range(1, TARGET_VOCAB)
    ended = [(*prefix, 0) for n in range(length) for prefix in itertools.product(characters, repeat=n)]
    cut = list(itertools.product(characters, repeat=length))
    scores = {}
    forward = jax.jit(s2s.forward, static_argnums=1)
    for hypothesis in ended + cut:
        target_in = np.array([0, *hypothesis[:-1]], np.int32)[:, None]
        target_out = np.array(hypothesis, np.int32)[:, None]
        batch = pairs_lib.PairBatch(source[:, None], target_in, target_out, np.ones_like(target_out, bool))
        probabilities = 0.0
        for member, config in zip(params, configs):
            logits = np.asarray(forward(member, config, batch)[0], np.float64)[:, 0]
            probabilities += np.take_along_axis(np.asarray(jax.nn.softmax(logits)), target_out, axis=1)
        scores[hypothesis] = float(np.sum(np.log(probabilities / len(params))))
    return scores


@pytest.mark.parametrize("models", [[dict(input_feeding=False)], [dict(input_feeding=True)],
                                    [dict(input_feeding=False), dict(attention="additive", cell="gru")]],
                         ids=["one", "one-feeding", "ensemble"])
def test_beam_as_wide_as_every_hypothesis_is_exhaustive_search(models):
    base = dataclasses.replace(SMALL, attention="dot", num_layers=1, encoder_layers=1)
    configs = tuple(dataclasses.replace(base, **model) for model in models)
    params = tuple(jax.tree.map(jnp.float32, params_for(config, seed=3 + index)) for index, config in enumerate(configs))
    length = 3
    source = np.array([3, 1, 4], np.int32)
    scores = hypothesis_scores(params, configs, source, length)
    beam = len(scores)  # 1 + 4 + 16 ended, 64 cut
    tokens, beam_scores = generate.beam_search(params, configs, source[:, None], length, beam)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    found = [tuple(row[: list(row).index(0) + 1] if 0 in row else row) for row in np.asarray(tokens)[0]]
    assert found[0] == ranked[0][0]
    np.testing.assert_allclose(np.asarray(beam_scores)[0], [score for _, score in ranked], rtol=1e-4, atol=1e-5)
    assert sorted(found) == sorted(scores)
    # A narrower beam finds hypotheses no better than the best.
    _, narrow = generate.beam_search(params, configs, source[:, None], length, 2)
    assert float(narrow[0, 0]) <= ranked[0][1] + 1e-5


def test_a_model_writing_with_itself_writes_as_it_does_alone():
    """The mean of two equal distributions is that distribution: the same greedy targets, the same draws."""
    config = dataclasses.replace(SMALL, attention="additive")
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(5, 8)
    source = pairs_lib.make_batch(sources, targets).source
    for temperature in (0.0, 1.0):
        alone, _ = generate.sample((params,), (config,), source, jax.random.key(2), jnp.float32(temperature), None, 7)
        twice, _ = generate.sample((params, params), (config, config), source, jax.random.key(2),
                                   jnp.float32(temperature), None, 7)
        np.testing.assert_array_equal(np.asarray(twice), np.asarray(alone))


def test_sampling_stops_each_target_at_its_end_symbol():
    config = SMALL
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(6, 16)
    source = pairs_lib.make_batch(sources, targets).source
    ids, _ = generate.sample((params,), (config,), source, jax.random.key(1), jnp.float32(1.5), None, 12)
    for row in np.asarray(ids):
        ends = np.flatnonzero(row == 0)
        if len(ends):
            assert np.all(row[ends[0]:] == 0)


def test_sampling_draws_step_t_with_the_noise_of_fold_in_key_t():
    """Each symbol drawn at temperature 1 is argmax(log-probabilities + Gumbel noise of fold_in(key, t)), the
    log-probabilities by teacher forcing the symbols drawn before it."""
    config = SMALL
    params = jax.tree.map(jnp.float32, params_for(config))
    sources, targets = random_pairs(6, 16)
    source = pairs_lib.make_batch(sources, targets).source
    key, length = jax.random.key(3), 6
    ids = np.asarray(generate.sample((params,), (config,), source, key, jnp.float32(1.0), None, length)[0])  # [B, T]
    target_in = np.concatenate([np.zeros((1, len(ids)), np.int32), ids[:, :-1].T])  # [T, B]
    batch = pairs_lib.PairBatch(source, target_in, ids.T, np.ones_like(target_in, bool))
    log_probs = np.asarray(jax.nn.log_softmax(s2s.forward(params, config, batch)[0]))  # [T, B, V]
    for t in range(length):
        live = ~np.any(ids[:, :t] == 0, axis=1)  # not ended before step t
        assert live.sum() >= 2
        noise = np.asarray(jax.random.gumbel(jax.random.fold_in(key, t), (len(ids), TARGET_VOCAB)))
        np.testing.assert_array_equal(ids[live, t], np.argmax(log_probs[t] + noise, axis=-1)[live])


def test_models_are_grouped_by_the_direction_they_write_forwards_first_and_no_group_is_empty():
    backwards = dataclasses.replace(SMALL, reverse_target=True)
    assert rescoring.directions((SMALL, SMALL)) == [[0, 1]]
    assert rescoring.directions((backwards,)) == [[0]]
    assert rescoring.directions((backwards, SMALL, backwards)) == [[1], [0, 2]]


def test_rescoring_gives_a_right_to_left_models_proposals_first_symbol_first():
    """Alone, with a beam of one, a model writing right to left chooses its own greedy target, turned around."""
    config = dataclasses.replace(SMALL, attention="additive", num_layers=1, encoder_layers=1, reverse_target=True)
    params = jax.tree.map(jnp.float32, params_for(config, seed=8))
    source = pairs_lib.make_batch(*random_pairs(10, 6)).source
    ids, _ = generate.sample((params,), (config,), source, jax.random.key(0), jnp.float32(0.0), None, 5)
    greedy = [pairs_lib.written(row[:4])[::-1] for row in np.asarray(ids)]
    assert any(np.any(target != target[::-1]) for target in greedy)  # not all palindromes
    for got, want in zip(rescoring.choose((params,), (config,), source, 4, beam=1), greedy, strict=True):
        np.testing.assert_array_equal(got, want)


def test_rescoring_scores_each_pair_as_its_own_teacher_forced_batch_whatever_order_batches_take():
    """`log_probs` batches pairs sorted by length; each score still lands on its own pair, written in each model's
    direction, against one pair at a time."""
    configs = (SMALL, dataclasses.replace(SMALL, cell="gru", reverse_target=True))
    params = tuple(jax.tree.map(jnp.float32, params_for(config, seed=4 + index)) for index, config in enumerate(configs))
    sources, targets = random_pairs(11, 8, max_source=9, max_target=9)
    assert len({len(target) for target in targets}) > 2  # lengths that sorting reorders
    got = rescoring.log_probs(params, configs, sources, targets)
    one = jax.jit(s2s.pair_log_probs, static_argnums=1)
    for member, config, row in zip(params, configs, got, strict=True):
        want = [float(one(member, config, pairs_lib.make_batch(
            [source], [pairs_lib.written_order(target, config.reverse_target)], 12, 12))[0])
            for source, target in zip(sources, targets)]
        np.testing.assert_allclose(row, want, rtol=1e-5)


def every_target(length: int) -> list[np.ndarray]:
    """Every target of at most `length` symbols, ids from 1 as pairs hold them."""
    return [np.array(t, np.int32) for n in range(length + 1)
            for t in itertools.product(range(1, TARGET_VOCAB), repeat=n)]


def every_hypothesis(length: int) -> int:
    """A beam as wide as every hypothesis a search's length + 1 steps can hold (those cut at length + 1 symbols too)."""
    return sum((TARGET_VOCAB - 1) ** n for n in range(length + 2))


def test_rescoring_one_model_with_a_beam_over_every_hypothesis_chooses_its_most_likely_target():
    """Against teacher forcing every target of up to `length` symbols, for weights that make some of them better
    than the empty target."""
    config = dataclasses.replace(SMALL, attention="additive", num_layers=1, encoder_layers=1)
    params = jax.tree.map(jnp.float32, params_for(config, seed=11))
    length = 3
    targets = every_target(length)
    sources = [np.array(ids, np.int32) for ids in ([3, 6, 5], [4, 2, 4, 5], [5, 1, 3, 6, 4], [1, 2])]
    source = pairs_lib.make_batch(sources, [np.array([1], np.int32)] * 4).source
    chosen = rescoring.choose((params,), (config,), source, length, beam=every_hypothesis(length))
    log_probs = jax.jit(s2s.pair_log_probs, static_argnums=1)
    best = [targets[int(np.argmax(log_probs(params, config, pairs_lib.make_batch([s] * len(targets), targets, 8, 4))))]
            for s in sources]
    assert sum(len(target) > 0 for target in best) >= 2
    for got, want in zip(chosen, best, strict=True):
        np.testing.assert_array_equal(got + 1, want)


def test_models_writing_both_ways_choose_the_target_their_product_ranks_first():
    """A model writing left to right and one writing right to left: with beams as wide as every hypothesis, each
    source's choice is the target of at most `length` symbols that maximises the product of the two models' NumPy
    probabilities of the whole target (the right-to-left one's of the target reversed); with beams of one, the
    better of the two greedy targets by that product. The loss is that of the mean of the two distributions."""
    base = dataclasses.replace(SMALL, attention="additive", num_layers=1, encoder_layers=1)
    configs = (base, dataclasses.replace(base, cell="gru", reverse_target=True))
    params = tuple(params_for(config, seed=7 + index) for index, config in enumerate(configs))
    float32 = tuple(jax.tree.map(jnp.float32, member) for member in params)
    sources = [np.array(ids, np.int32) for ids in ([3, 6, 5], [4, 2, 4, 5], [5, 1, 3, 6, 4])]
    source = pairs_lib.make_batch(sources, [np.array([1], np.int32)] * 3).source  # padded to 8 source positions
    length = 3
    targets = every_target(length)

    def probabilities(s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.array([np.prod(reference_probabilities(params[0], configs[0], s, t)),
                         np.prod(reference_probabilities(params[1], configs[1], s, t[::-1]))])

    chosen = rescoring.choose(float32, configs, source, length, beam=every_hypothesis(length))
    by_mean = []
    for s, got in zip(sources, chosen, strict=True):
        each = np.array([probabilities(s, t) for t in targets])
        np.testing.assert_array_equal(got + 1, targets[int(np.argmax(each.prod(axis=1)))])
        by_mean.append(int(np.argmax(each.sum(axis=1))) != int(np.argmax(each.prod(axis=1))))
    assert any(by_mean)  # the mean of the probabilities would choose otherwise

    greedy = [[pairs_lib.written(ids[:length]) + 1 for ids in np.asarray(generate.sample(
        (member,), (config,), source, jax.random.key(0), jnp.float32(0.0), None, length + 1)[0])]
        for member, config in zip(float32, configs)]
    chosen = rescoring.choose(float32, configs, source, length, beam=1)
    backward_chosen = False
    for s, forward, backward, got in zip(sources, *greedy, chosen, strict=True):
        proposals = [forward, backward[::-1]]
        best = proposals[int(np.argmax([probabilities(s, t).prod() for t in proposals]))]
        np.testing.assert_array_equal(got + 1, best)
        backward_chosen |= len(forward) != len(best) or bool(np.any(forward != best))
    assert backward_chosen  # the right-to-left model's proposal counted

    pairs = random_pairs(8, 4)
    expected = -sum(np.log(probabilities(s, t).mean()) for s, t in zip(*pairs))
    got = rescoring.mean_nats(float32, configs, *pairs)
    np.testing.assert_allclose(got, expected / sum(len(t) + 1 for t in pairs[1]), rtol=1e-5)
