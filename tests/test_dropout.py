"""Dropout: on outputs (per character or locked over a chunk), on embedding rows, on W_h; never without a key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clihelp import TINY, assert_identical_arrays, checkpoint_arrays
from test_model import make_config, random_carry, random_ids, random_params

import charrnn
from charrnn import checkpoint, config as config_lib, dropout, model, rundir, training


def test_dropout_zeroes_and_rescales_top_output():
    config = make_config("gru", num_layers=1, hidden_size=16, dropout=0.5)
    params, carry = random_params(config, seed=20), random_carry(config, seed=21)
    prepared = model.prepare(params, config)
    inputs = random_ids(22, length=8)

    _, outputs, top = model.run_layers(prepared, config, carry, inputs, jax.random.key(23))

    hidden, top = np.asarray(outputs[-1]), np.asarray(top)  # [T, B, H]
    dropped = top == 0.0
    np.testing.assert_allclose(top[~dropped], hidden[~dropped] / (1.0 - config.dropout), rtol=1e-6)
    assert 0.35 < dropped.mean() < 0.65


@pytest.mark.parametrize("rate", [0.2, 0.25, 0.6])
def test_a_mask_keeps_its_drawn_probability_and_scales_by_its_inverse(rate):
    """Masks draw at 16 bits: the keep probability is 1 - rate to within 2⁻¹⁷, the kept fraction matches it, and kept
    values are scaled by its inverse exactly, so the mean is unchanged."""
    shape = (300, 1001)  # an odd last axis: its last 32-bit word gives one element, not two
    levels = dropout.kept_levels(rate)
    assert abs(levels / dropout.MASK_LEVELS - (1.0 - rate)) <= 2.0**-17
    out = np.asarray(dropout.inverted(jnp.ones(shape), rate, jax.random.key(3), shape))

    kept = out != 0.0
    p, n = levels / dropout.MASK_LEVELS, kept.size
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(out[kept], dropout.MASK_LEVELS / levels, rtol=1e-7)
    assert abs(out.mean() - 1.0) < 5 * np.sqrt((1 - p) / (p * n))
    # The two halves of a word, neighbours along the last axis, are independent draws.
    agree = np.mean(kept[:, 0:-1:2] == kept[:, 1::2])
    assert abs(agree - (p**2 + (1 - p) ** 2)) < 0.01
    assert not np.array_equal(kept[0], kept[1])


def test_keep_probabilities_at_the_ends_of_the_range_are_drawable():
    """A rate near 0 still drops 1 in 2¹⁶ (2¹⁶ levels would not fit 16 bits); one near 1 still keeps 1 in 2¹⁶."""
    shape = (64, 1024)
    assert dropout.kept_levels(1e-6) == dropout.MASK_LEVELS - 1
    assert dropout.kept_levels(1 - 1e-7) == 1
    almost_all = np.asarray(dropout.inverted(jnp.ones(shape), 1e-6, jax.random.key(7), shape))
    kept = almost_all != 0.0
    assert kept.mean() > 0.999
    np.testing.assert_allclose(almost_all[kept], dropout.MASK_LEVELS / (dropout.MASK_LEVELS - 1), rtol=1e-7)
    almost_none = np.asarray(dropout.inverted(jnp.ones(shape), 1 - 1e-7, jax.random.key(7), shape))
    assert np.all(np.isin(almost_none, [0.0, dropout.MASK_LEVELS]))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 in NumPy's wrapping uint32 arithmetic."""
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_masks_are_the_hashed_indices_halves_below_the_keep_level():
    """The exact words and masks, from a NumPy reference: each row-major index XOR the key's first word, hashed, XOR
    its second, hashed again; a mask keeps where a word's 16-bit half, low half first, is below `levels`."""
    key, levels = jax.random.key(8), 30000
    first, second = np.asarray(jax.random.bits(key, (2,), jnp.uint32))

    def expected_words(shape):
        index = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
        return _lowbias32(_lowbias32(index ^ first) ^ second)

    np.testing.assert_array_equal(dropout.hashed_index(jnp.uint32(first), jnp.uint32(second), (3, 5, 7)),
                                  expected_words((3, 5, 7)))
    np.testing.assert_array_equal(dropout.random_words(key, (3, 5, 7)), expected_words((3, 5, 7)))
    # 4 words to a row of 8 elements, or of 7 (an odd last axis: the last word's high half unused).
    words = expected_words((3, 5, 4))
    halves = np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=-1).reshape(3, 5, 8)
    for last in (8, 7):
        np.testing.assert_array_equal(dropout.keep_mask(key, levels, (3, 5, last)), halves[..., :last] < levels)
    first_half = int(halves[0, 0, 0])  # kept at one level above it, dropped at its own
    assert dropout.keep_mask(key, first_half + 1, (3, 5, 7))[0, 0, 0]
    assert not dropout.keep_mask(key, first_half, (3, 5, 7))[0, 0, 0]


def test_each_layers_output_mask_is_its_own():
    """Output dropout draws layer `index`'s mask from fold_in(key, index): the same for the same layer and key,
    unrelated between layers; locked, one [1, B, H] mask for every step."""
    shape, key = (6, 4, 64), jax.random.key(9)
    factors = [np.asarray(dropout.output_factors(shape, 0.5, key, index)) for index in (0, 1, 1)]
    assert factors[0].shape == shape
    np.testing.assert_array_equal(factors[1], factors[2])
    assert abs(np.mean((factors[0] == 0) == (factors[1] == 0)) - 0.5) < 0.05  # agreeing by chance alone
    locked = np.asarray(dropout.output_factors(shape, 0.5, key, 1, locked=True))
    layer_1 = dropout.inverse_keep(0.5, jax.random.fold_in(key, 1), shape[1:])  # [B, H]
    np.testing.assert_array_equal(locked, np.asarray(layer_1)[None])
    assert dropout.output_factors(shape, 0.5, None, 0) is None and dropout.output_factors(shape, 0.0, key, 0) is None


def test_weight_masks_are_drawn_apart_from_output_masks():
    """Embedding rows and W_h entries draw from their own stream of the step's key: leaf 0's rows are not layer 0's
    outputs, which a shared fold_in(key, 0) would make the very same draws."""
    key, rows = jax.random.key(10), 4096
    config = make_config("lstm", embedding_dropout=0.5)
    embedding = np.asarray(dropout.weights({"embedding": jnp.ones((rows, 1))}, config, key)["embedding"])[:, 0]
    outputs = np.asarray(dropout.output_factors((1, rows, 1), 0.5, key, 0))[0, :, 0]
    assert abs(np.mean((embedding == 0) == (outputs == 0)) - 0.5) < 0.05  # agreeing by chance alone


def _bits(words: np.ndarray) -> np.ndarray:
    return (words.reshape(-1, 1) >> np.arange(32, dtype=np.uint32)) & 1  # [words, 32]


def test_random_words_are_uniform_distinct_and_unrelated():
    """Each element's index hashed under the key's two words: every bit is a fair coin, neither a word's neighbours
    nor another key's words, shifted or not, agree with it beyond chance, and the words of one draw are all distinct
    (distinct indices through bijections: the index is built without collisions; independent words would repeat a
    few times in 409,600)."""
    shape = (64, 50, 128)
    words = np.asarray(dropout.random_words(jax.random.key(5), shape))
    assert words.shape == shape and words.dtype == np.uint32
    flat = words.reshape(-1)
    np.testing.assert_array_equal(flat, np.asarray(dropout.random_words(jax.random.key(5), (flat.size,))))
    assert np.unique(flat).size == flat.size
    bits = _bits(flat)
    assert np.abs(bits.mean(axis=0) - 0.5).max() < 5 * np.sqrt(0.25 / flat.size)
    other = np.asarray(dropout.random_words(jax.random.key(6), (flat.size,)))
    for name, a, b in [("neighbours", flat[1:], flat[:-1]), ("another key", other, flat),
                       ("another key, shifted", other[1:], flat[:-1]), ("shifted far", other[1000:], flat[:-1000])]:
        agree = np.mean(_bits(a) == _bits(b))
        assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / (32 * a.size)), name


def test_words_of_related_first_words_are_unrelated_where_the_second_words_differ():
    """Under one hash, first words a and a ^ d would give the same words at indices i and i ^ d (and one hash of
    index ^ first ^ second the same words outright); the second hash under another second word leaves the two draws
    sharing no more words than unrelated draws would."""
    shape, first, second = (1 << 16,), jnp.uint32(0x12345678), jnp.uint32(0x9ABCDEF0)
    words = np.asarray(dropout.hashed_index(first, second, shape))
    for d in (1, 3, 1 << 10):
        related = np.asarray(dropout.hashed_index(first ^ jnp.uint32(d), second ^ jnp.uint32(d), shape))
        assert np.intersect1d(words, related).size <= 8, d  # about 2 expected by chance
    same_second = np.asarray(dropout.hashed_index(first ^ jnp.uint32(1), second, shape))
    assert np.intersect1d(words, same_second).size == words.size  # the relation the second word breaks


@pytest.mark.parametrize("locked", [True, False])
def test_locked_dropout_keeps_one_mask_across_time(locked):
    config = make_config("lstm", num_layers=2, hidden_size=32, dropout=0.5, locked_dropout=locked)
    params, carry = random_params(config, seed=30), random_carry(config, seed=31)
    inputs = random_ids(32, length=12)

    _, outputs, top = model.run_layers(model.prepare(params, config), config, carry, inputs, jax.random.key(33))

    dropped = np.asarray(top) == 0.0  # [T, B, H]
    assert not np.any(np.asarray(outputs[-1]) == 0.0)
    assert 0.35 < dropped.mean() < 0.65
    same_every_step = np.all(dropped == dropped[:1])
    assert same_every_step == locked
    assert np.mean(dropped[:, 1:] != dropped[:, :-1]) > 0.3  # each stream draws its own mask
    if not locked:  # each step draws its own mask
        assert np.mean(dropped[1:] != dropped[:-1]) > 0.3


@pytest.mark.parametrize("cell, locked", [("gru", False), ("lstm", True)])
def test_layers_as_one_wavefront_are_the_layers_one_after_another(monkeypatch, cell, locked):
    """The layers run together (`layer.run_stack`, on CPUs that project per step) and one after another, with
    dropout between them and on top: the same loss, carry and gradients."""
    config = make_config(cell, num_layers=3, dropout=0.3, locked_dropout=locked, norm="layer")
    params, carry = random_params(config, seed=40), random_carry(config, seed=41)
    inputs, targets, key = random_ids(42), random_ids(43), jax.random.key(44)

    def loss_and_gradient(stacked: bool):
        monkeypatch.setattr(model, "stacks_layers", lambda config: stacked)
        objective = lambda params: model.loss(params, config, carry, inputs, targets, key)
        return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)

    (stacked_loss, stacked_carry), stacked_gradient = loss_and_gradient(True)
    (loss, new_carry), gradient = loss_and_gradient(False)
    np.testing.assert_allclose(stacked_loss, loss, rtol=1e-6)
    for stacked_leaf, leaf in zip(jax.tree.leaves((stacked_carry, stacked_gradient)), jax.tree.leaves((new_carry, gradient)),
                                  strict=True):
        np.testing.assert_allclose(stacked_leaf, leaf, rtol=1e-5, atol=1e-5 * float(np.abs(leaf).max()))
    assert float(np.abs(gradient["layers"][0]["w_h"]).max()) > 0


def test_dropout_needs_a_key_and_a_rate():
    config = make_config("lstm", dropout=0.3)
    no_dropout = make_config("lstm")
    params, carry = random_params(config, seed=24), random_carry(config, seed=25)
    inputs = random_ids(26)
    key = jax.random.key(27)

    _, logits_plain = model.forward(params, no_dropout, carry, inputs)
    _, logits_dropout = model.forward(params, config, carry, inputs, key)
    _, logits_dropout_again = model.forward(params, config, carry, inputs, key)
    _, logits_other_key = model.forward(params, config, carry, inputs, jax.random.key(28))
    _, logits_without_key = model.forward(params, config, carry, inputs, None)
    _, logits_zero_rate = model.forward(params, no_dropout, carry, inputs, key)

    assert not np.allclose(logits_dropout, logits_plain, atol=1e-3)
    np.testing.assert_array_equal(logits_dropout_again, logits_dropout)  # a key fixes the mask
    assert not np.allclose(logits_other_key, logits_dropout, atol=1e-3)
    np.testing.assert_array_equal(logits_without_key, logits_plain)  # no key: evaluation, no dropout
    np.testing.assert_array_equal(logits_zero_rate, logits_plain)


@pytest.mark.parametrize("setting", [{"weight_drop": 0.4}, {"embedding_dropout": 0.4}, {"locked_dropout": True,
                                                                                         "dropout": 0.4}])
def test_no_dropout_of_any_kind_at_evaluation(setting):
    config = make_config("lstm", **setting)
    params, carry = random_params(config, seed=40), random_carry(config, seed=41)
    inputs = random_ids(42)

    _, logits_plain = model.forward(params, make_config("lstm"), carry, inputs)
    _, logits_evaluated = model.forward(params, config, carry, inputs)
    _, logits_trained = model.forward(params, config, carry, inputs, jax.random.key(43))

    np.testing.assert_array_equal(logits_evaluated, logits_plain)
    assert not np.allclose(logits_trained, logits_plain, atol=1e-3)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_weight_drop_masks_each_w_h_once_per_chunk(cell):
    """DropConnect: each W_h entry is dropped (0) or kept and scaled, one mask for every step and stream of
    the chunk; nothing else changes. The masked W_h carries the chunk's gradient (0 where dropped)."""
    rate = 0.5
    config = make_config(cell, hidden_size=16, weight_drop=rate)
    params, carry = random_params(config, seed=50), random_carry(config, seed=51)
    inputs, targets = random_ids(52, length=10), random_ids(53, length=10)
    key = jax.random.key(54)

    dropped = dropout.weights(params, config, key)
    for layer, original in zip(dropped["layers"], params["layers"]):
        w_h, w = np.asarray(layer["w_h"]), np.asarray(original["w_h"])
        zero = w_h == 0.0
        assert 0.4 < zero.mean() < 0.6
        np.testing.assert_allclose(w_h[~zero], w[~zero] / (1.0 - rate), rtol=1e-6)
        for name in original.keys() - {"w_h"}:
            np.testing.assert_array_equal(layer[name], original[name])
    for name in ("embedding", "output"):
        jax.tree.map(np.testing.assert_array_equal, dropped[name], params[name])
    assert not np.array_equal(dropped["layers"][0]["w_h"] == 0, dropped["layers"][1]["w_h"] == 0)

    # The chunk runs with the masked matrices at every step: the same as running them with no dropout at all.
    plain = dataclasses.replace(config, weight_drop=0.0)
    _, with_drop = model.forward(params, config, carry, inputs, key)
    _, with_masked = model.forward(dropped, plain, carry, inputs, key)
    np.testing.assert_allclose(with_drop, with_masked, rtol=1e-6, atol=1e-6)

    grads = jax.grad(lambda p: model.loss(p, config, carry, inputs, targets, key)[0])(params)
    for layer_grad, layer in zip(grads["layers"], dropped["layers"]):
        zero = np.asarray(layer["w_h"]) == 0.0
        assert np.all(np.asarray(layer_grad["w_h"])[zero] == 0.0)
        assert np.all(np.asarray(layer_grad["w_h"])[~zero] != 0.0)

    other = dropout.weights(params, config, jax.random.key(55))  # another step: another mask
    assert not np.array_equal(np.asarray(other["layers"][0]["w_h"]) == 0, np.asarray(dropped["layers"][0]["w_h"]) == 0)


def test_embedding_dropout_drops_whole_characters():
    rate = 0.5
    config = make_config("gru", embedding_size=6, embedding_dropout=rate)
    params = random_params(config, seed=60)

    embedding = np.asarray(dropout.weights(params, config, jax.random.key(61))["embedding"])  # [V, E]
    original = np.asarray(params["embedding"])
    rows_dropped = np.all(embedding == 0.0, axis=1)
    assert 0 < rows_dropped.sum() < len(rows_dropped)
    np.testing.assert_allclose(embedding[~rows_dropped], original[~rows_dropped] / (1.0 - rate), rtol=1e-6)
    assert not np.any(embedding[~rows_dropped] == 0.0)

    # A dropped character's projection is layer 0's bias alone, wherever it occurs in the chunk.
    dropped_params = dropout.weights(params, config, jax.random.key(61))
    table = np.asarray(model.prepare(dropped_params, config)["projection_table"])
    np.testing.assert_allclose(table[rows_dropped], np.broadcast_to(params["layers"][0]["b"], table[rows_dropped].shape),
                               rtol=1e-6)


def test_encoder_decoder_weights_are_all_dropped():
    """Every recurrent matrix of an encoder–decoder (both directions, both sides) and both embeddings, in training."""
    from test_seq2seq_model import SMALL, params_for, random_pairs

    from charrnn.seq2seq import model as seq2seq_model
    from charrnn.seq2seq.pairs import make_batch

    config = dataclasses.replace(SMALL, weight_drop=0.5, embedding_dropout=0.5)
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params_for(config))
    key = jax.random.key(71)
    dropped = dropout.weights(params, config, key)
    names = []
    for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(dropped)):
        name = jax.tree_util.keystr(path)
        if name.endswith("['w_h']") or name.endswith("['embedding']"):
            names.append(name)
            before, after = np.asarray(before), np.asarray(after)
            zero = after == 0.0
            np.testing.assert_allclose(after[~zero], 2.0 * before[~zero], rtol=1e-6, err_msg=name)  # 1 / keep
            if name.endswith("['embedding']"):  # whole rows: a character's vector goes or stays
                assert np.all(zero.all(axis=1) | ~zero.any(axis=1)), name
            else:
                assert abs(zero.mean() - 0.5) < 0.15, name
        else:
            np.testing.assert_array_equal(after, before)
    assert len(names) == 2 * 2 + 2 + 2  # two encoder layers per direction, two decoder layers, two embeddings

    # Training runs the dropped weights; evaluation the weights as they are.
    batch = make_batch(*random_pairs(72, 4))
    plain = dataclasses.replace(config, weight_drop=0.0, embedding_dropout=0.0)
    trained, _ = seq2seq_model.forward(params, config, batch, key)
    np.testing.assert_allclose(trained, seq2seq_model.forward(dropped, plain, batch, key)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(trained, seq2seq_model.forward(params, plain, batch, key)[0], atol=1e-3)
    np.testing.assert_array_equal(seq2seq_model.forward(params, config, batch)[0],
                                  seq2seq_model.forward(params, plain, batch)[0])


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_a_task_told_not_to_drop_drops_nothing(kind, small_corpus, reversal_pairs):
    corpus = small_corpus if kind == "lm" else reversal_pairs
    rates = ["model.dropout=0.5", "model.embedding_dropout=0.3", "model.weight_drop=0.3"]
    task = training.load_task(corpus, config_lib.resolve(TINY, [f"model.kind={kind}", *rates], {}))
    plain = training.load_task(corpus, config_lib.resolve(TINY, [f"model.kind={kind}", "model.dropout=0"], {}))
    params = task.init_params(jax.random.key(0))
    carry = task.initial_carry(params, task.config.train.batch_size)
    batch = jax.tree.map(lambda leaf: leaf[0], task.batches(0, 1, slice(None)))
    key = jax.random.key(1)

    undropped = float(task.batch_loss(params, carry, batch, key, dropout=False)[0])

    assert undropped == float(plain.batch_loss(params, carry, batch, key)[0])
    assert undropped != float(task.batch_loss(params, carry, batch, key)[0])


@pytest.mark.parametrize("setting", [{"dropout": 0.3}, {"embedding_dropout": 0.3}, {"weight_drop": 0.3}])
def test_late_dropout_waits_for_every_kind_of_dropout(setting):
    """train.dropout_from_epoch holds back each kind alone; with nothing to drop, there is nothing to wait for."""
    late = config_lib.resolve(TINY, ["model.dropout=0", "train.dropout_from_epoch=1.5"], {})
    assert dropout.first_step(late, steps_per_epoch=10) == 0
    assert dropout.first_step(dataclasses.replace(late, model=dataclasses.replace(late.model, **setting)), 10) == 15


def test_late_dropout_starts_at_its_epoch(small_corpus, tmp_path):
    """Until train.dropout_from_epoch, a run is one without dropout; from there, one that always had it."""
    base = ["model.dropout=0.5", "model.weight_drop=0.3", "train.schedule=constant", "train.steps_per_call=2",
            "train.eval_every=4", "train.keep=3"]
    steps_per_epoch = training.load_task(small_corpus, config_lib.resolve(TINY, base, {})).steps_per_epoch
    # Step 2.5 rounds up to 3, inside the call of steps 2-3: dropout starts with the next call, at step 4.
    from_step_4 = f"train.dropout_from_epoch={2.5 / steps_per_epoch!r}"

    def train(name, sets, resume=False):
        run = tmp_path / name
        charrnn.train(small_corpus, None if resume else run, TINY, resume=run if resume else None,
                      sets=[*base, *sets])
        return run

    def params_at(run, step):
        arrays = checkpoint_arrays(checkpoint.step_path(rundir.checkpoints_dir(run), step))
        return {name: value for name, value in arrays.items() if name.startswith("params")}

    late = train("late", [from_step_4, "train.steps=8"])
    late_at_4 = params_at(late, 4)
    assert late_at_4
    assert_identical_arrays(late_at_4, params_at(train("never", ["model.dropout=0", "model.weight_drop=0",
                                                                  "train.steps=4"]), 4))
    always = params_at(train("always", ["train.steps=4"]), 4)
    assert any(not np.array_equal(late_at_4[name], always[name]) for name in late_at_4)
    # From epoch 0 (TINY's), the very first call drops out.
    first_call = params_at(train("first-call", ["train.steps=2"]), 2)
    never_2 = params_at(train("never-2", ["model.dropout=0", "model.weight_drop=0", "train.steps=2"]), 2)
    assert any(not np.array_equal(first_call[name], never_2[name]) for name in first_call)

    train("switched", ["train.dropout_from_epoch=1000", "train.steps=4"])
    switched = train("switched", ["train.dropout_from_epoch=0", "train.steps=8"], resume=True)
    assert_identical_arrays(params_at(late, 8), params_at(switched, 8))
