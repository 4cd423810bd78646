"""Weight averaging (`train.ema`): the average is its formula, costs the training nothing, and is what a run saves."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clihelp import TINY
from test_steps import MODEL, TRAIN, assert_trees_close, batches, host_copy, run_steps

import charrnn
from charrnn import checkpoint, data, model, rundir, steps, training

EMA = 0.3  # d_t = (1 + t) / (10 + t) for t = 1, 2, then 0.3: both branches of the formula in a few steps


def start(train_config, vocab_size):
    optimizer = steps.make_optimizer(train_config)
    params = model.init_params(jax.random.key(0), MODEL, vocab_size)
    state = steps.initial_state(params, optimizer, averaged=train_config.ema > 0)
    return optimizer, state, model.initial_carry(params, MODEL, train_config.batch_size)


@pytest.fixture
def corpus(small_corpus):
    text = small_corpus.read_text(encoding="utf-8")
    vocab = data.Vocab.from_text(text)
    return vocab.encode(text), len(vocab)


def test_the_average_is_its_formula_and_leaves_training_alone(corpus):
    ids, vocab_size = corpus
    averaged_config = dataclasses.replace(TRAIN, ema=EMA)
    step_batches = batches(ids, TRAIN, first_step=0, count=6)

    optimizer, state, carry = start(averaged_config, vocab_size)
    call = steps.make_train_call(MODEL, averaged_config, optimizer)
    visited = [host_copy(state.params)]
    for batch in step_batches:
        state, carry, _ = run_steps(call, state, carry, [batch], TRAIN.lr)
        visited.append(host_copy(state.params))

    expected = visited[0]
    for t, params in enumerate(visited[1:], start=1):
        d = min(EMA, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda mean, param: d * mean + (1 - d) * param, expected, params)
    assert_trees_close(state.average, expected, atol=1e-6)
    assert state.model_params is state.average

    # The same six steps without averaging reach the same weights: the average only watches.
    plain_optimizer, plain, plain_carry = start(TRAIN, vocab_size)
    plain, _, _ = run_steps(steps.make_train_call(MODEL, TRAIN, plain_optimizer), plain, plain_carry, step_batches,
                            TRAIN.lr)
    assert plain.average is None and plain.model_params is plain.params
    assert_trees_close(plain.params, state.params, atol=0)


def test_a_skipped_step_leaves_the_average_alone(corpus):
    ids, vocab_size = corpus
    averaged_config = dataclasses.replace(TRAIN, ema=EMA)
    optimizer, state, carry = start(averaged_config, vocab_size)
    call = steps.make_train_call(MODEL, averaged_config, optimizer)
    state, carry, _ = run_steps(call, state, carry, batches(ids, TRAIN, first_step=0, count=1), TRAIN.lr)
    before = host_copy(state.average)  # no longer equal to the params: a step moved them apart
    assert not np.array_equal(before["output"]["w"], state.params["output"]["w"])
    poisoned = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), carry)

    state, _, metrics = run_steps(call, state, poisoned, batches(ids, TRAIN, first_step=1, count=1), TRAIN.lr)

    assert not bool(metrics.finite[0])
    assert_trees_close(state.average, before, atol=0)


NEW_OPTIONS = ["train.ema=0.9", "model.weight_drop=0.3", "model.locked_dropout=true", "model.embedding_dropout=0.1",
               "model.dropout=0.2", "model.norm=layer"]


def test_a_run_saves_the_average_and_its_model_needs_no_option_named(cli, small_corpus, tmp_path):
    sets = [item for option in NEW_OPTIONS for item in ("--set", option)]
    result = cli("train", small_corpus, "--config", TINY, "--steps", "30", "--set", "train.eval_every=10",
                 "--set", "train.schedule=constant", *sets, "--out", "run", "--quiet")
    assert result.code == 0, result.err

    best = tmp_path / "run" / "checkpoints" / rundir.BEST_FILE
    arrays, metadata = checkpoint.read(best)
    names = [name for name in arrays if name.startswith("params/")]
    assert names and all(f"iterate/{name.removeprefix('params/')}" in arrays for name in names)
    assert any(not np.array_equal(arrays[name], arrays["iterate/" + name.removeprefix("params/")]) for name in names)

    # The run's validation score is the saved params' (the average's), not the optimizer's weights'.
    loaded = charrnn.load(best)
    corpus = training.load_corpus(small_corpus, loaded.config.train.val_fraction)
    streams = loaded.config.train.eval_batch_size
    assert steps.evaluate(loaded.params, loaded.config.model, corpus.val_ids, streams) == pytest.approx(
        metadata["best_val_loss"], rel=1e-6)
    iterate = checkpoint.unflatten(loaded.params, "iterate", arrays)
    assert steps.evaluate(iterate, loaded.config.model, corpus.val_ids, streams) != pytest.approx(
        metadata["best_val_loss"], rel=1e-4)

    sampled = cli("sample", "-c", "run", "--length", "40", "--seed", "1")
    assert sampled.code == 0, sampled.err
    assert len(sampled.out.rstrip("\n")) >= 40
    assert cli("eval", small_corpus, "-c", "run").code == 0


def test_averaging_cannot_be_switched_on_resume(cli, small_corpus, tmp_path):
    assert cli("train", small_corpus, "--config", TINY, "--steps", "10", "--out", "run", "--quiet").code == 0
    switched = cli("train", "--resume", "run", "--steps", "20", "--set", "train.ema=0.9")
    assert switched.code == 2 and "train.ema" in switched.err
