"""Calibrated predictions (`train.calibration_fraction`): each model's temperature, fitted on text held out from
training, is the minimum of its loss there, and the saved model predicts with it."""

import dataclasses

import jax
import numpy as np
import pytest
from clihelp import TINY, final_arrays
from conftest import SAMPLE_TEXT

import charrnn
from charrnn import calibration, checkpoint, config as config_lib, data, members, model, rundir, steps, training
from charrnn.errors import UsageError
from charrnn.training import load_corpus

# Members with dropout, cut at step 6 and resumed; a constant schedule makes the cut run a 12-step run.
SETTINGS = dict(max_minutes=0, batch_size=8, seq_len=16, eval_every=6, steps_per_call=2, dropout=0.2, seed=3,
                sets=["train.calibration_fraction=0.1", "train.schedule=constant", "train.log_every=3"])


def mean_loss(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """NumPy's mean -log softmax(z / T)[target]."""
    scaled = logits.astype(np.float64) / temperature
    log_probs = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - scaled.max(-1, keepdims=True)
    return float(-np.take_along_axis(log_probs, targets[:, None], -1).mean())


def drawn_at(logits: np.ndarray, temperature: float, generator) -> np.ndarray:
    """A target for each row of `logits`, drawn from softmax(z / temperature)."""
    probs = np.exp(logits / temperature - (logits / temperature).max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs.cumsum(-1) < generator.random((len(logits), 1))).sum(-1)


def test_the_temperature_is_the_minimum_of_the_held_out_loss():
    generator = np.random.default_rng(0)
    logits = generator.normal(size=(500, 12)) * 4
    targets = drawn_at(logits, 1.6, generator)
    fitted = calibration.fit_temperature(logits, targets, np.ones(500, bool))
    grid = np.linspace(0.5, 20, 3901)
    best = grid[np.argmin([mean_loss(logits, targets, temperature) for temperature in grid])]
    assert fitted == pytest.approx(best, abs=0.01)
    at_fit = mean_loss(logits, targets, fitted)
    assert at_fit < mean_loss(logits, targets, fitted * 1.01) and at_fit < mean_loss(logits, targets, fitted / 1.01)


def test_the_temperature_the_targets_were_drawn_at_is_found_and_padding_is_ignored():
    generator = np.random.default_rng(1)
    logits = generator.normal(size=(40_000, 8)) * 3
    targets = drawn_at(logits, 2.0, generator)
    mask = np.ones(40_000, bool)
    assert calibration.fit_temperature(logits, targets, mask) == pytest.approx(2.0, rel=0.03)
    padded_logits = np.concatenate([logits, np.full((500, 8), 9.0) * np.eye(8)[np.zeros(500, int)]])
    padded_targets = np.concatenate([targets, np.zeros(500, int)])  # padding the model "gets right" at any T
    padded = calibration.fit_temperature(padded_logits, padded_targets, np.concatenate([mask, np.zeros(500, bool)]))
    assert padded == calibration.fit_temperature(logits, targets, mask)


def test_the_temperature_stays_within_its_bounds():
    generator = np.random.default_rng(2)
    logits, mask = generator.normal(size=(2000, 8)) * 3, np.ones(2000, bool)
    right = logits.argmax(-1)  # right about every character: the loss falls all the way to T = 0
    assert calibration.fit_temperature(logits, right, mask) == pytest.approx(calibration.MIN_TEMPERATURE)
    unrelated = generator.integers(0, 8, 2000)  # logits that say nothing of the targets: flat is best, T = ∞
    assert calibration.fit_temperature(logits, unrelated, mask) == pytest.approx(calibration.MAX_TEMPERATURE)


def test_the_temperature_of_large_logits_is_that_of_the_same_logits_shifted():
    """Softmax ignores a constant added to every logit; so does the fit, where exp of the logits would overflow."""
    generator = np.random.default_rng(3)
    logits = generator.normal(size=(2000, 8)) * 4
    targets, mask = drawn_at(logits, 1.3, generator), np.ones(2000, bool)
    fitted = calibration.fit_temperature(logits, targets, mask)
    assert calibration.fit_temperature(logits + 1000.0, targets, mask) == pytest.approx(fitted, rel=1e-9)


def test_each_models_temperature_is_fitted_on_the_text_with_its_state_carried_along_each_stream():
    """`fit` on 3 streams of 300 characters (two 256-step chunks each, the second padded): each member's fit on its
    logits of each whole stream run from the initial state, as validation scores them."""
    config = config_lib.ModelConfig(num_layers=1, hidden_size=16, embedding_size=8, dtype="float32")
    params = calibration.apply(model.init_params(jax.random.key(2), config, 11), [0.25])  # sharper, so T is not a bound

    def sample_step(state, key):  # the text is params' own, drawn at T = 1.5
        carry, previous = state
        carry, logits = model.forward(params, config, carry, previous[None, None])
        following = jax.random.categorical(key, logits[0, 0] / 1.5)
        return (carry, following), following

    start = (model.initial_carry(params, config, 1), jax.numpy.int32(0))
    _, drawn = jax.lax.scan(sample_step, start, jax.random.split(jax.random.key(4), 900))
    ids = np.concatenate([[0], np.asarray(drawn)])
    inputs, targets = ids[:-1].reshape(3, 300).T, ids[1:].reshape(3, 300).T  # [T, B]
    _, logits = model.forward(params, config, model.initial_carry(params, config, 3), inputs)
    expected = calibration.fit_temperature(np.asarray(logits), targets, np.ones(targets.shape, bool))
    assert 1.2 < expected < 1.8
    # A second member predicting with twice the logits wants twice the temperature.
    fitted = calibration.fit(members.combine([params, calibration.apply(params, [0.5])]), config, ids, 3, 2)
    assert fitted == pytest.approx([expected, 2 * expected], rel=1e-5)


def test_applied_temperatures_divide_each_models_logits():
    config = config_lib.ModelConfig(num_layers=2, hidden_size=16, embedding_size=8, dtype="float32")
    params = [model.init_params(jax.random.key(seed), config, 11) for seed in (0, 1)]
    # The output bias starts at zero; a drawn one shows that it is divided too.
    params = [{**one, "output": {**one["output"], "b": jax.random.normal(jax.random.key(seed + 2), (11,))}}
              for seed, one in enumerate(params)]
    inputs = np.arange(24).reshape(6, 4) % 11
    carry = model.initial_carry(params[0], config, 4)
    logits = [np.asarray(model.forward(one, config, carry, inputs)[1]) for one in params]
    _, one = model.forward(calibration.apply(params[0], [1.25]), config, carry, inputs)
    np.testing.assert_allclose(one, logits[0] / 1.25, rtol=1e-5, atol=1e-6)
    stacked = calibration.apply(members.combine(params), [0.8, 1.5])
    for index, (temperature, member) in enumerate(zip((0.8, 1.5), members.split(stacked, 2), strict=True)):
        np.testing.assert_allclose(model.forward(member, config, carry, inputs)[1], logits[index] / temperature,
                                   rtol=1e-5, atol=1e-6)
    assert calibration.apply(params[0], None) is params[0]


@pytest.mark.parametrize("length", [100, 1001, 12345])
def test_calibration_text_is_held_out_from_the_start(length):
    ids = np.arange(length)
    train, val, held = data.split(ids, 0.1, 0.05)
    np.testing.assert_array_equal(np.concatenate([held, train, val]), ids)
    np.testing.assert_array_equal(val, data.split(ids, 0.1)[1])  # validation is the same with or without it
    assert abs(len(held) - 0.05 * length) <= 1 and len(data.split(ids, 0.1)[2]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two members fitting temperatures, the same cut at step 6 and resumed, and the members without them."""
    root = tmp_path_factory.mktemp("calibration")
    small = root / "corpus.txt"
    small.write_text(SAMPLE_TEXT * 40, encoding="utf-8")  # the `small_corpus` text, for the whole module
    charrnn.train(small, root / "whole", TINY, members=2, steps=12, **SETTINGS)
    charrnn.train(small, root / "cut", TINY, members=2, steps=6, **SETTINGS)
    charrnn.train(resume=root / "cut", steps=12)
    plain = {**SETTINGS, "sets": SETTINGS["sets"][1:]}
    charrnn.train(small, root / "plain", TINY, members=2, steps=12, **plain)
    return root


def saved(run):
    """The final checkpoint's raw arrays and metadata."""
    return checkpoint.read(checkpoint.step_files(rundir.checkpoints_dir(run))[-1])


def test_the_saved_temperatures_are_fitted_on_the_held_out_text_and_the_model_predicts_with_them(runs):
    arrays, metadata = saved(runs / "whole")
    loaded = checkpoint.load(runs / "whole")
    train = loaded.config.train
    corpus = load_corpus(runs / "corpus.txt", train.val_fraction, calibration_fraction=train.calibration_fraction)
    raw = checkpoint.unflatten(jax.eval_shape(lambda: loaded.params), "params", arrays)
    temperatures = metadata["temperatures"]
    assert temperatures == pytest.approx(calibration.fit(raw, loaded.config.model, corpus.calibration_ids,
                                                         train.eval_batch_size, 2))
    assert len(temperatures) == 2 and temperatures[0] != temperatures[1]
    for member, temperature in zip(members.split(raw, 2), temperatures, strict=True):  # scored as validation is
        held_out = [steps.evaluate_models((calibration.apply(member, [temperature * factor]),), (loaded.config.model,),
                                          corpus.calibration_ids, train.eval_batch_size) for factor in (1, 1.02, 1 / 1.02)]
        assert held_out[0] < min(held_out[1:])
    for name in ("w", "b"):
        raw_output = arrays[f"params/output/{name}"]
        expected = raw_output / np.asarray(temperatures, np.float32).reshape((2,) + (1,) * (raw_output.ndim - 1))
        np.testing.assert_allclose(loaded.params["output"][name], expected, rtol=1e-6)
    # The run's validation loss is the calibrated models', not the raw ones'.
    calibrated = steps.evaluate_models(members.split(loaded.params, 2), (loaded.config.model,) * 2, corpus.val_ids,
                                       train.eval_batch_size)
    uncalibrated = steps.evaluate_models(members.split(raw, 2), (loaded.config.model,) * 2, corpus.val_ids,
                                         train.eval_batch_size)
    assert metadata["val_loss"] == pytest.approx(calibrated, rel=1e-5)
    assert abs(calibrated - uncalibrated) > 1e-4
    assert charrnn.load(runs / "whole").describe()["temperatures"] == temperatures


def test_a_run_fits_its_temperatures_on_the_held_out_text_not_the_validation_text(runs, tmp_path):
    """The module's corpus repeats one passage a whole number of times: its held-out start and validation end are the
    same text. Here the validation end is another text, so fitting there would give other temperatures."""
    loaded = checkpoint.load(runs / "whole")
    raw = checkpoint.unflatten(jax.eval_shape(lambda: loaded.params), "params", saved(runs / "whole")[0])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 36 + (SAMPLE_TEXT * 4)[::-1], encoding="utf-8")
    task = training.load_task(corpus, loaded.config)
    held_out = task.corpus.calibration_ids
    np.testing.assert_array_equal(held_out, task.corpus.vocab.encode((SAMPLE_TEXT * 4)[:len(held_out)]))

    def fitted_on(ids):
        return calibration.fit(raw, loaded.config.model, ids, loaded.config.train.eval_batch_size, 2)

    assert task.temperatures(raw) == pytest.approx(fitted_on(held_out))
    assert fitted_on(held_out) != pytest.approx(fitted_on(task.corpus.val_ids), rel=1e-3)


def test_a_calibrated_run_trains_on_less_text_and_resumes_exactly(runs):
    whole, cut, plain = (final_arrays(runs / name) for name in ("whole", "cut", "plain"))
    for name in whole:
        np.testing.assert_array_equal(whole[name], cut[name], err_msg=name)
    assert saved(runs / "cut")[1]["temperatures"] == saved(runs / "whole")[1]["temperatures"]
    assert not np.array_equal(whole["params/output/w"], plain["params/output/w"])  # the held-out text is not trained on
    assert "temperatures" not in saved(runs / "plain")[1]


def test_calibration_settings_are_checked_and_fixed_on_resume(runs):
    config = config_lib.Config()
    for fraction in (-0.1, 0.9):
        with pytest.raises(UsageError, match="calibration_fraction"):
            config_lib.validate(dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                      calibration_fraction=fraction)))
    assert config_lib.from_dict({"train": {"lr": 0.5}}).train.calibration_fraction == 0  # saved before it was a key
    with pytest.raises(UsageError, match="calibration_fraction"):
        charrnn.train(resume=runs / "plain", steps=14, sets=["train.calibration_fraction=0.1"])


def test_a_text_too_short_to_spare_two_characters_trains_on_all_of_it(tmp_path):
    short, longer = tmp_path / "short.txt", tmp_path / "longer.txt"
    short.write_text((SAMPLE_TEXT * 2)[:150], encoding="utf-8")
    longer.write_text((SAMPLE_TEXT * 2)[:210], encoding="utf-8")
    corpus = load_corpus(short, 0.1, calibration_fraction=0.01)  # 1 character at 1%
    assert corpus.calibration_ids is None and len(corpus.train_ids) + len(corpus.val_ids) == 150
    held = load_corpus(longer, 0.1, calibration_fraction=0.01)
    assert len(held.calibration_ids) == 2 and len(held.train_ids) + len(held.val_ids) == 208


def test_temperatures_read_from_a_checkpoint_are_one_number_within_the_bounds_for_each_model():
    assert calibration.checked(None, 2) is None
    assert calibration.checked([1, 0.05, 20.0], 3) == [1.0, 0.05, 20.0]
    for temperatures in ([1.0], [1.0, 2.0, 3.0], (1.0, 2.0), [1.0, True], [1.0, "2"], [1.0, 0.049], [1.0, 20.5], 1.0):
        with pytest.raises(ValueError, match="temperatures"):
            calibration.checked(temperatures, 2)
