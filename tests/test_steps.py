"""Training: the schedule, the compiled K-step call, truncated BPTT, skipped steps, overfitting, evaluation."""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from charrnn import data, dropout, members, model, steps
from charrnn.config import Config, ModelConfig, TrainConfig

MODEL = ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8, dropout=0.0)
TRAIN = TrainConfig(batch_size=2, seq_len=8, lr=1e-2, schedule="constant", warmup_steps=0, seed=3, random_offset=False)


@pytest.fixture
def corpus(small_corpus):
    """(ids, vocabulary size) of the shared small corpus."""
    text = small_corpus.read_text(encoding="utf-8")
    vocab = data.Vocab.from_text(text)
    return vocab.encode(text), len(vocab)


def batches(ids, train_config: TrainConfig, first_step: int, count: int) -> list[data.Batch]:
    layout = data.stream_layout(len(ids), train_config.batch_size, train_config.seq_len)
    return [
        data.training_batch(ids, layout, step, train_config.seed, train_config.random_offset)
        for step in range(first_step, first_step + count)
    ]


def fresh_start(model_config: ModelConfig, train_config: TrainConfig, vocab_size: int, seed: int = 0):
    """Return (optimizer, state, carry), all new buffers (the train call donates them)."""
    optimizer = steps.make_optimizer(train_config)
    state = steps.initial_state(model.init_params(jax.random.key(seed), model_config, vocab_size), optimizer)
    return optimizer, state, model.initial_carry(state.params, model_config, train_config.batch_size)


def run_steps(call, state, carry, step_batches, lr):
    """Run `step_batches` as one compiled call at a constant learning rate."""
    return call(state, carry, data.stack_batches(step_batches), jnp.full((len(step_batches),), lr, jnp.float32))


def host_copy(tree):
    return jax.tree.map(np.array, tree)


def assert_trees_close(actual, expected, atol: float) -> None:
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=atol), actual, expected)


# ---------------------------------------------------------------- learning rate


def test_warmup_is_linear_up_to_lr():
    config = TrainConfig(lr=0.5, warmup_steps=4, schedule="constant")
    rates = [steps.learning_rate(config, step, progress=0.0) for step in range(6)]
    np.testing.assert_allclose(rates, [0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_goes_from_lr_to_final_fraction(final):
    config = TrainConfig(lr=2.0, warmup_steps=3, schedule="cosine", final_lr_fraction=final)
    after_warmup = 10
    assert steps.learning_rate(config, after_warmup, 0.0) == pytest.approx(2.0)
    assert steps.learning_rate(config, after_warmup, 0.5) == pytest.approx(2.0 * (1.0 + final) / 2)
    assert steps.learning_rate(config, after_warmup, 1.0) == pytest.approx(2.0 * final, abs=1e-12)
    assert steps.learning_rate(config, after_warmup, 0.25) == pytest.approx(2.0 * (final + (1 - final) * (2 + 2**0.5) / 4))
    assert steps.learning_rate(config, after_warmup, 1.7) == steps.learning_rate(config, after_warmup, 1.0)
    assert steps.learning_rate(config, 0, 0.0) == pytest.approx(2.0 / 3)  # warm-up multiplies the schedule


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_linear_goes_from_lr_to_final_fraction_in_a_straight_line(final):
    config = TrainConfig(lr=2.0, warmup_steps=3, schedule="linear", final_lr_fraction=final)
    after_warmup = 10
    for progress in (0.0, 0.25, 0.5, 0.8, 1.0):
        assert steps.learning_rate(config, after_warmup, progress) == pytest.approx(
            2.0 * (final + (1 - final) * (1 - progress)), abs=1e-12)
    assert steps.learning_rate(config, after_warmup, 1.7) == steps.learning_rate(config, after_warmup, 1.0)
    assert steps.learning_rate(config, after_warmup, -0.5) == pytest.approx(2.0)
    assert steps.learning_rate(config, 0, 0.5) == pytest.approx(2.0 / 3 * (1 + final) / 2)  # warm-up multiplies it


def test_exponential_reaches_final_fraction():
    config = TrainConfig(lr=1.0, warmup_steps=0, schedule="exponential", final_lr_fraction=0.01)
    assert steps.learning_rate(config, 0, 0.0) == pytest.approx(1.0)
    assert steps.learning_rate(config, 0, 0.5) == pytest.approx(0.1)
    assert steps.learning_rate(config, 0, 1.0) == pytest.approx(0.01)
    assert steps.learning_rate(config, 0, -1.0) == pytest.approx(1.0)


def test_constant_stays_constant():
    config = TrainConfig(lr=0.3, warmup_steps=0, schedule="constant", final_lr_fraction=0.1)
    assert {steps.learning_rate(config, step, progress) for step, progress in [(0, 0.0), (7, 0.4), (99, 1.0)]} == {0.3}


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])  # 0 disables clipping
def test_optimizer_is_global_clipping_then_adam_then_decoupled_decay(clip_norm):
    """Against the formulas over several steps (one step of Adam is the same whatever its betas), with gradients
    below and above the clip."""
    config = TrainConfig(clip_norm=clip_norm, beta1=0.8, beta2=0.95, weight_decay=0.1)
    optimizer = steps.make_optimizer(config)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    state = optimizer.init(jax.tree.map(jnp.asarray, params))
    m = {name: np.zeros_like(value) for name, value in params.items()}
    v = {name: np.zeros_like(value) for name, value in params.items()}
    for t, scale in enumerate([0.2, 3.0, 0.5, 10.0], start=1):
        grads = {name: scale * rng.normal(size=value.shape) for name, value in params.items()}
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))  # one norm over every leaf
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads), state, jax.tree.map(jnp.asarray, params))
        for name in params:
            g = grads[name] * (min(1.0, config.clip_norm / norm) if config.clip_norm else 1.0)
            m[name] = config.beta1 * m[name] + (1 - config.beta1) * g
            v[name] = config.beta2 * v[name] + (1 - config.beta2) * g**2
            m_hat, v_hat = m[name] / (1 - config.beta1**t), v[name] / (1 - config.beta2**t)
            expected = m_hat / (np.sqrt(v_hat) + 1e-8) + config.weight_decay * params[name]
            np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {t}")


@pytest.mark.parametrize("seed", [0, 2**32 - 1])  # the largest seed a run takes: no 32-bit signed argument
def test_a_fresh_state_is_the_tasks_initialisation_from_the_seed(seed):
    """The parameters `init_params` gives for the seed's key, bit for bit; the optimizer's and the average's
    start, and the carry, from them."""
    config = Config(model=MODEL, train=dataclasses.replace(TRAIN, seed=seed, ema=0.9))
    optimizer = steps.make_optimizer(config.train)

    def init_params(key):
        return model.init_params(key, MODEL, 11)

    state, carry = steps.fresh_state(config, optimizer, init_params,
                                     lambda params, batch_size: model.initial_carry(params, MODEL, batch_size))
    expected = init_params(jax.random.fold_in(jax.random.key(seed), 0))
    jax.tree.map(np.testing.assert_array_equal, state.params, expected)
    jax.tree.map(np.testing.assert_array_equal, state.average, expected)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, optimizer.init(expected))
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, carry, model.initial_carry(expected, MODEL, TRAIN.batch_size))


# ---------------------------------------------------------------- the train call


def test_k_steps_in_one_call_equal_k_calls_of_one_step(corpus):
    ids, vocab_size = corpus
    model_config = dataclasses.replace(MODEL, dropout=0.2)  # dropout keys follow the step counter
    step_batches = batches(ids, TRAIN, first_step=0, count=3)
    lrs = [1e-2, 5e-3, 2e-3]

    optimizer, state_one_call, carry_one_call = fresh_start(model_config, TRAIN, vocab_size)
    call = steps.make_train_call(model_config, TRAIN, optimizer)
    state_one_call, carry_one_call, metrics = call(
        state_one_call, carry_one_call, data.stack_batches(step_batches), jnp.asarray(lrs, jnp.float32)
    )

    _, state, carry = fresh_start(model_config, TRAIN, vocab_size)
    losses = []
    for batch, lr in zip(step_batches, lrs, strict=True):
        state, carry, step_metrics = run_steps(call, state, carry, [batch], lr)
        losses.append(float(step_metrics.loss[0]))

    assert int(state_one_call.step) == int(state.step) == 3
    np.testing.assert_allclose(metrics.loss, losses, rtol=1e-6)
    assert_trees_close(state_one_call.params, state.params, atol=1e-6)
    assert_trees_close(state_one_call.opt_state, state.opt_state, atol=1e-6)
    assert_trees_close(carry_one_call, carry, atol=1e-6)


@pytest.mark.parametrize("setting", [{"dropout": 0.3}, {"weight_drop": 0.3}, {"embedding_dropout": 0.3}, {}])
def test_each_step_draws_its_own_dropout_masks(corpus, setting):
    """The masks follow the step counter: the same params, carry and batch lose otherwise at the next step
    (and the same without dropout)."""
    ids, vocab_size = corpus
    model_config = dataclasses.replace(MODEL, **setting)
    losses = []
    for step in (0, 1):
        optimizer, state, carry = fresh_start(model_config, TRAIN, vocab_size)
        call = steps.make_train_call(model_config, TRAIN, optimizer)
        state = state._replace(step=jnp.asarray(step, state.step.dtype))
        losses.append(float(run_steps(call, state, carry, batches(ids, TRAIN, 0, 1), 0.0)[2].loss[0]))
    assert (losses[0] != losses[1]) == bool(setting)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_every_parameter_changes_after_one_step(corpus, cell):
    ids, vocab_size = corpus
    model_config = dataclasses.replace(MODEL, cell=cell, residual=True)
    optimizer, state, carry = fresh_start(model_config, TRAIN, vocab_size)
    before = host_copy(state.params)

    state, _, metrics = run_steps(steps.make_train_call(model_config, TRAIN, optimizer), state, carry,
                                  batches(ids, TRAIN, 0, 1), TRAIN.lr)

    assert bool(metrics.finite[0])
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(state.params)):
        assert not np.array_equal(old, new), jax.tree_util.keystr(path)


def test_learned_initial_state_changes_after_one_step(corpus):
    ids, vocab_size = corpus
    model_config = dataclasses.replace(MODEL, learn_initial_state=True)
    optimizer, state, carry = fresh_start(model_config, TRAIN, vocab_size)
    before = host_copy(state.params["initial"])

    state, _, _ = run_steps(steps.make_train_call(model_config, TRAIN, optimizer), state, carry,
                            batches(ids, TRAIN, 0, 1), TRAIN.lr)  # step 0 starts an epoch: reset

    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.params["initial"]), strict=True):
        assert not np.array_equal(old, new)


def test_non_finite_step_changes_nothing(corpus):
    ids, vocab_size = corpus
    optimizer, state, carry = fresh_start(MODEL, TRAIN, vocab_size)
    poisoned = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), carry)
    bad, good = batches(ids, TRAIN, first_step=1, count=1)[0], batches(ids, TRAIN, first_step=0, count=1)[0]
    assert not bad.reset and good.reset  # the NaN state is used by the first step, reset by the second
    before = host_copy(state)
    call = steps.make_train_call(MODEL, TRAIN, optimizer)

    state_after_bad, carry_after_bad, metrics = run_steps(call, state, poisoned, [bad], TRAIN.lr)
    assert not bool(metrics.finite[0]) and np.isnan(metrics.loss[0])
    assert_trees_close(state_after_bad.params, before.params, atol=0)
    assert_trees_close(state_after_bad.opt_state, before.opt_state, atol=0)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state_after_bad.params))
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(carry_after_bad))

    # The skipped step leaves no trace: bad-then-good equals good alone.
    state_bad_good, _, metrics = run_steps(call, state_after_bad, carry_after_bad, [good], TRAIN.lr)
    _, state_good, carry_good = fresh_start(MODEL, TRAIN, vocab_size)
    state_good, _, _ = run_steps(call, state_good, carry_good, [good], TRAIN.lr)
    assert bool(metrics.finite[0])
    assert_trees_close(state_bad_good.params, state_good.params, atol=0)
    assert_trees_close(state_bad_good.opt_state, state_good.opt_state, atol=0)


def test_metrics_report_the_loss_and_the_gradient_norm_before_clipping():
    """sum((w - target)²) over two leaves: the gradient 2 (w - target), its norm over both, taken before the clip."""
    train_config = TrainConfig(clip_norm=1e-3)
    optimizer = steps.make_optimizer(train_config)
    call = steps.compile_train_call(lambda params, carry, batch, dropout_key: (
        sum(jnp.sum((leaf - batch) ** 2) for leaf in jax.tree.leaves(params)), carry), train_config, optimizer)
    params = {"a": np.array([1.0, -2.0]), "b": np.array([[3.0]])}
    state, _, metrics = call(steps.initial_state(jax.tree.map(jnp.asarray, params), optimizer), (jnp.zeros(1),),
                             jnp.full((1,), 0.5), jnp.zeros((1,), jnp.float32))
    differences = np.array([0.5, -2.5, 2.5])
    assert float(metrics.loss[0]) == pytest.approx(np.sum(differences**2))
    assert float(metrics.grad_norm[0]) == pytest.approx(np.linalg.norm(2 * differences))


def test_each_step_moves_the_weights_by_its_own_learning_rate_times_the_optimizers_update():
    train_config = TrainConfig(clip_norm=0.0, weight_decay=0.0)
    optimizer = steps.make_optimizer(train_config)

    def batch_loss(params, carry, batch, dropout_key):
        return jnp.sum((params["w"] - batch) ** 2), carry

    params, targets, lrs = {"w": np.array([1.0, -2.0, 0.5], np.float32)}, jnp.array([[0.0], [3.0]]), [0.5, 0.25]
    call = steps.compile_train_call(batch_loss, train_config, optimizer)
    state, _, _ = call(steps.initial_state(jax.tree.map(jnp.asarray, params), optimizer), (jnp.zeros(1),), targets,
                       jnp.asarray(lrs, jnp.float32))  # donates its state

    expected, opt_state = params, optimizer.init(params)
    for target, lr in zip(targets, lrs, strict=True):
        grads = jax.grad(lambda p: batch_loss(p, None, target, None)[0])(expected)
        updates, opt_state = optimizer.update(grads, opt_state, expected)
        expected = jax.tree.map(lambda param, update: param - lr * update, expected, updates)
    np.testing.assert_allclose(state.params["w"], expected["w"], rtol=1e-6)


def sqrt_loss(params, carry, batch, dropout_key):
    """A finite loss whose gradient is not finite where a weight is 0 (d sqrt(w) / dw = inf); the carry moves."""
    return jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch))), (carry[0] + 1.0,)


def test_a_step_with_a_finite_loss_and_a_non_finite_gradient_changes_nothing():
    """Weights, optimizer state, the weights' average and the carry all stay as they were; the step still counts."""
    train_config = TrainConfig(ema=0.9)
    optimizer = steps.make_optimizer(train_config)
    call = steps.compile_train_call(sqrt_loss, train_config, optimizer)

    def start():
        params = {"w": jnp.array([0.0, 1.0])}
        state = steps.initial_state(params, optimizer, averaged=True)
        return state._replace(average={"w": jnp.array([0.5, 0.5])}), (jnp.zeros(2),)  # an average apart from w

    lrs = jnp.full((1,), 0.1, jnp.float32)
    before, before_carry = host_copy(start())
    state, carry, metrics = call(*start(), jnp.zeros((1, 2)), lrs)  # targets [K, 2]: w[0] - 0 = 0
    assert np.isfinite(metrics.loss[0]) and not np.isfinite(metrics.grad_norm[0]) and not bool(metrics.finite[0])
    assert_trees_close((state.params, state.opt_state, state.average, carry),
                       (before.params, before.opt_state, before.average, before_carry), atol=0)
    assert int(state.step) == 1
    # A finite step from the same start moves all of them.
    state, carry, metrics = call(*start(), jnp.full((1, 2), 2.0), lrs)
    assert bool(metrics.finite[0])
    for moved, old in [(state.params["w"], before.params["w"]), (state.average["w"], before.average["w"]),
                       (carry[0], before_carry[0])]:
        assert not np.allclose(moved, old)


def test_members_metrics_are_their_mean_loss_finite_only_where_every_member_was():
    """Two members, the second's first step with a non-finite gradient: a step's loss is the members' mean, the step
    is finite for the run only where both members' were, and only the member whose gradient was not skips it."""
    train_config = TrainConfig(members=2)
    optimizer = steps.make_optimizer(train_config)
    call = steps.compile_train_call(sqrt_loss, train_config, optimizer)
    starts = [{"w": jnp.array([3.0, 1.0])}, {"w": jnp.array([0.0, 2.0])}]
    state = members.combine([steps.initial_state(params, optimizer) for params in starts])
    state = state._replace(step=jnp.zeros((), jnp.int32))
    carry = (jnp.zeros((2, 2)),)
    targets = jnp.zeros((2, 2, 2)).at[1, 1].set(5.0)  # [members, K, 2]: the second member's first step at w - 0 = 0
    state, carry, metrics = call(state, carry, targets, jnp.full((2,), 0.1, jnp.float32))

    first_losses = [float(sqrt_loss(params, (0.0,), 0.0, None)[0]) for params in starts]
    assert float(metrics.loss[0]) == pytest.approx(np.mean(first_losses), rel=1e-6)
    assert list(np.asarray(metrics.finite)) == [False, True]
    assert int(state.step) == 2
    adam = state.opt_state[1]  # the chain's clip, Adam, decay
    np.testing.assert_array_equal(adam.count, [2, 1])  # the second member's first step skipped, its second taken


def test_step_gradient_treats_incoming_carry_as_constant(corpus):
    """Step 2 of a call updates with the gradient of model.loss at the carried state, cut at the chunk edge."""
    ids, vocab_size = corpus
    first, second = batches(ids, TRAIN, first_step=0, count=2)
    assert not second.reset
    optimizer, state, carry = fresh_start(MODEL, TRAIN, vocab_size)
    params, opt_state, initial = host_copy(state.params), host_copy(state.opt_state), host_copy(carry)

    state, carry_after, _ = run_steps(steps.make_train_call(MODEL, TRAIN, optimizer), state, carry, [first, second], TRAIN.lr)

    @jax.jit
    def adam_step(params, opt_state, carry, batch):
        grads, carry = jax.grad(model.loss, has_aux=True)(params, MODEL, carry, batch.inputs, batch.targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, jax.tree.map(lambda u: -TRAIN.lr * u, updates)), opt_state, carry

    params_1, opt_state_1, carry_1 = adam_step(params, opt_state, initial, first)
    params_2, _, carry_2 = adam_step(params_1, opt_state_1, carry_1, second)
    assert_trees_close(state.params, params_2, atol=1e-6)
    assert_trees_close(carry_after, carry_2, atol=1e-6)
    # The carried state matters: restarting the second chunk from zeros would update differently.
    params_restarted, _, _ = adam_step(params_1, opt_state_1, initial, second)
    assert not np.allclose(state.params["layers"][0]["w_h"], params_restarted["layers"][0]["w_h"], atol=1e-6)


# ---------------------------------------------------------------- learning and evaluation


def test_tiny_corpus_is_overfit():
    text = "hello world! " * 40
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    model_config = ModelConfig(cell="lstm", num_layers=1, hidden_size=32, embedding_size=8, dropout=0.0)
    train_config = TrainConfig(batch_size=4, seq_len=16, lr=1e-2, schedule="constant", warmup_steps=0, seed=0)
    optimizer, state, carry = fresh_start(model_config, train_config, len(vocab))
    untrained = steps.evaluate(state.params, model_config, ids, num_streams=1, seq_len=64)

    call = steps.make_train_call(model_config, train_config, optimizer)
    steps_per_call = 50
    for first_step in range(0, 200, steps_per_call):
        state, carry, metrics = run_steps(call, state, carry, batches(ids, train_config, first_step, steps_per_call),
                                          train_config.lr)
        assert bool(np.all(metrics.finite))

    trained = steps.evaluate(state.params, model_config, ids, num_streams=1, seq_len=64)
    assert untrained > 0.8 * math.log(len(vocab))
    assert trained < 0.05  # only the first character, from a cold start, is unpredictable


def test_evaluate_one_stream_equals_one_forward_pass():
    rng = np.random.default_rng(29)
    ids = rng.integers(0, 7, 38).astype(np.uint8)  # 37 predictions: the last chunk is padded
    params = model.init_params(jax.random.key(30), MODEL, 7)

    mean = steps.evaluate(params, MODEL, ids, num_streams=1, seq_len=5)

    _, logits = model.forward(params, MODEL, model.initial_carry(params, MODEL, 1), jnp.asarray(ids[:-1, None]))
    losses = model.token_losses(logits, jnp.asarray(ids[1:, None]))  # [T, 1]
    assert mean == pytest.approx(float(jnp.sum(losses)) / (len(ids) - 1), rel=1e-5)


def test_models_evaluated_together_score_the_mean_of_their_probabilities():
    """Each target's loss is -log of the mean of the models' probabilities of it, not the mean of their losses."""
    rng = np.random.default_rng(33)
    ids = rng.integers(0, 7, 30).astype(np.uint8)  # 29 predictions: the last chunk is padded
    params = tuple(jax.tree.map(lambda leaf: 4.0 * leaf, model.init_params(jax.random.key(seed), MODEL, 7))
                   for seed in (34, 35))  # confident models that disagree

    mean = steps.evaluate_together(params, (MODEL, MODEL), ids, num_streams=1, seq_len=8)

    losses = []  # [models, T]
    for member in params:
        _, logits = model.forward(member, MODEL, model.initial_carry(member, MODEL, 1), jnp.asarray(ids[:-1, None]))
        losses.append(np.asarray(model.token_losses(logits, jnp.asarray(ids[1:, None])), np.float64)[:, 0])
    mixture = -np.log(np.mean(np.exp(-np.array(losses)), axis=0))
    assert mean == pytest.approx(mixture.mean(), rel=1e-5)
    assert abs(mixture.mean() - np.mean(losses)) > 0.05  # the two would differ


def test_evaluate_several_streams_equals_forward_per_stream():
    rng = np.random.default_rng(31)
    ids = rng.integers(0, 7, 45).astype(np.uint8)
    params = model.init_params(jax.random.key(32), MODEL, 7)
    num_streams, seq_len = 3, 4

    mean = steps.evaluate(params, MODEL, ids, num_streams, seq_len)

    chunks = data.evaluation_chunks(ids, num_streams, seq_len)
    mask = np.concatenate([chunk.mask for chunk in chunks]) == 1.0  # [T, B]
    inputs = np.concatenate([chunk.inputs for chunk in chunks])
    targets = np.concatenate([chunk.targets for chunk in chunks])
    total = 0.0
    for stream in range(num_streams):  # each stream in one forward pass from the initial state
        stream_inputs = jnp.asarray(inputs[mask[:, stream], stream][:, None])  # [T_s, 1]
        _, logits = model.forward(params, MODEL, model.initial_carry(params, MODEL, 1), stream_inputs)
        total += float(jnp.sum(model.token_losses(logits, jnp.asarray(targets[mask[:, stream], stream][:, None]))))
    assert mask.sum() == len(ids) - 1
    assert mean == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_passes_are_counted_in_steps_without_the_products_rounding():
    """A cap of E passes ends at the first step at or past E x steps an epoch, computed exactly (1.1 x 100 is 110, though
    the float product is 110.00000000000001); a positive cap is one step at least; late dropout counts alike."""
    for tenths in range(1, 100):
        for steps_per_epoch in range(1, 200):
            exact = math.ceil(Fraction(tenths, 10) * steps_per_epoch)
            assert steps.last_step(TrainConfig(steps=10**6, max_epochs=tenths / 10), steps_per_epoch) == exact
    assert steps.last_step(TrainConfig(steps=10**6, max_epochs=1e-12), 100) == 1
    assert steps.last_step(TrainConfig(steps=50, max_epochs=1.1), 100) == 50
    assert steps.last_step(TrainConfig(steps=50, max_epochs=0.0), 100) == 50  # no cap
    late = Config(model=ModelConfig(dropout=0.2), train=TrainConfig(dropout_from_epoch=1.1))
    assert dropout.first_step(late, 100) == 110
