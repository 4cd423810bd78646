"""`train.larger_model`: a new run times the larger model and trains it only where its run fits the budget."""

import json
import math
import re
from pathlib import Path

import pytest
from clihelp import TINY

import charrnn
from charrnn import config as config_lib, sizing, steps
from charrnn.errors import UsageError

LARGER = "model.num_layers=3 model.hidden_size=24"
RECIPE = Path(__file__).parent.parent / "configs" / "shakespeare.toml"


def first_larger(config):
    """`config` training its first `train.larger_model` alternative."""
    return config_lib.larger_models(config)[0].config


def recipe(**train):
    """The tiny config with a larger model to choose: 100 steps in a 60-second budget unless `train` says otherwise."""
    return config_lib.resolve(TINY, [], {"train": {"larger_model": LARGER, "steps": 100, "max_minutes": 1.0, **train}})


class Timer:
    """A `time_step` that reports a step time, fixed or `seconds_per_step(config)`, and remembers the configs it was
    asked to time."""

    def __init__(self, seconds_per_step):
        self.seconds_per_step, self.timed = seconds_per_step, []

    def __call__(self, config):
        self.timed.append(config)
        return self.seconds_per_step(config) if callable(self.seconds_per_step) else self.seconds_per_step


def test_a_run_that_fits_trains_the_larger_model_and_one_that_does_not_the_model_as_given():
    config = recipe()
    # 100 steps of 0.5 s with 5% for evaluations are 52.6 s of the 60; of 0.6 s, 63.2 s.
    fitting, too_slow = Timer(0.5), Timer(0.6)
    chosen = sizing.choose(config, steps_per_epoch=1000, time_step=fitting)
    assert (chosen.config.model.num_layers, chosen.config.model.hidden_size) == (3, 24)
    assert chosen.config.train.larger_model == ""  # the run's saved config says what it trained
    assert "training it" in chosen.note and "about 53 s of the 60 s" in chosen.note
    kept = sizing.choose(config, steps_per_epoch=1000, time_step=too_slow)
    assert (kept.config.model.num_layers, kept.config.model.hidden_size) == (2, 32)
    assert kept.config.train.larger_model == "" and "the model as given" in kept.note
    # What is timed is the larger model, not the one given.
    assert [(timed.model.num_layers, timed.model.hidden_size) for timed in fitting.timed + too_slow.timed] == [(3, 24)] * 2


def test_the_run_that_must_fit_ends_at_the_epoch_cap_when_that_comes_first():
    # 5 epochs of 10 steps are 50 steps: at 1 s each, 52.6 s of the 60; train.steps (100) would be 105 s.
    capped = sizing.choose(recipe(max_epochs=5.0), steps_per_epoch=10, time_step=Timer(1.0))
    assert capped.config.model.num_layers == 3 and "50 steps" in capped.note
    uncapped = sizing.choose(recipe(), steps_per_epoch=10, time_step=Timer(1.0))
    assert uncapped.config.model.num_layers == 2


def test_the_prediction_adds_the_overhead_of_evaluating_and_saving_to_the_steps():
    assert sizing.predicted_s(10.0, 100, 0.5) == pytest.approx(10.0 + 50.0 / (1 - sizing.OVERHEAD))
    assert sizing.predicted_s(10.0, 100, 0.5) > 60.0  # the timing's own seconds count


def test_the_seconds_spent_timing_count_against_the_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sizing.time, "monotonic", lambda: now[0])

    class TenSeconds(Timer):
        def __call__(self, config):
            now[0] += 10.0
            return super().__call__(config)

    # 100 steps of 0.5 s end at 52.6 s: within the 60 s alone, past them after 10 s of timing.
    kept = sizing.choose(recipe(), steps_per_epoch=1000, time_step=TenSeconds(0.5))
    assert kept.config.model.num_layers == 2 and kept.elapsed_s == 10.0 and "about 63 s" in kept.note


def test_nothing_is_timed_where_there_is_nothing_to_choose():
    timer = Timer(1e9)
    no_budget = sizing.choose(recipe(max_minutes=0.0), 10, timer)
    assert no_budget.config.model.num_layers == 3 and "no wall-clock budget" in no_budget.note
    same = sizing.choose(recipe(larger_model="model.num_layers=2"), 10, timer)
    assert same == sizing.Choice(config_lib.resolve(TINY, [], {"train": {"steps": 100, "max_minutes": 1.0}}), 0.0, "")
    assert sizing.choose(config_lib.resolve(TINY, [], {}), 10, timer).note == ""
    assert timer.timed == []


def test_a_resume_given_the_recipe_again_finds_the_model_it_chose():
    wanted = recipe()
    larger = first_larger(wanted)
    assert sizing.as_resumed(larger, wanted) == larger
    given = config_lib.apply_overrides(wanted, {"train": {"larger_model": ""}})
    assert sizing.as_resumed(given, wanted) == wanted
    # A key free to change on resume does not hide the choice.
    assert sizing.as_resumed(config_lib.apply_overrides(larger, {"model": {"dtype": "bfloat16"}}), wanted) == larger


@pytest.mark.parametrize("value, message", [
    ("train.steps=10", "model keys and train.members, train.max_epochs, train.fit_epochs only"),
    ("model.num_layers=3; train.lr=1", "model keys and train.members, train.max_epochs, train.fit_epochs only"),
    (";", "it names no settings"),
    ("model.num_layers=3; train.members=0", "train.members must be at least 1"),
    ("model.bogus=1", "unknown config key model.bogus"),
    ("model.num_layers=0", "model.num_layers must be at least 1"),
    ("train.members=2 train.fit_epochs=-1", "train.fit_epochs must be a finite number >= 0"),
    ("num_layers=3", "--set wants section.key=value"),
])
def test_a_larger_model_that_cannot_work_is_refused_when_the_config_is_read(value, message):
    """The error names the key the user wrote and its value, then what is wrong inside it."""
    with pytest.raises(UsageError, match=re.escape(f"train.larger_model ({value!r}): ") + ".*" + message):
        config_lib.resolve(TINY, [f"train.larger_model={value}"], {})


def test_an_encoder_decoder_has_no_larger_model():
    with pytest.raises(UsageError, match="for language models"):
        config_lib.resolve(TINY, ["model.kind=seq2seq", "train.larger_model=model.num_layers=3"], {})


def test_bad_larger_model_on_the_command_line_is_one_line_and_exit_code_2(cli, small_corpus, tmp_path):
    result = cli("train", small_corpus, "--config", TINY, "--out", "run", "--set", "train.larger_model=train.lr=1")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "train.larger_model ('train.lr=1'): it sets model keys and train.members" in result.err
    assert not (tmp_path / "run").exists()


def test_a_step_is_timed_from_compiled_calls_of_the_model():
    step_s = sizing.seconds_per_step(config_lib.resolve(TINY, [], {}), devices=1)
    assert math.isfinite(step_s) and step_s > 0


def test_a_run_trains_the_model_chosen_and_resumes_without_timing_again(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "seconds_per_step", lambda config, devices: 1e-6)
    run = tmp_path / "run"
    keys = {"larger_model": LARGER, "max_minutes": 60.0, "eval_every": 10, "log_every": 10}
    charrnn.train(small_corpus, run, TINY, steps=10, **keys)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["model"]["num_layers"], saved["model"]["hidden_size"], saved["train"]["larger_model"]) == (3, 24, "")
    assert charrnn.load(run).config.model.num_layers == 3  # the checkpoint alone says which model it holds

    def no_timer(config, devices):
        raise AssertionError("a resumed run has its model already")

    monkeypatch.setattr(sizing, "seconds_per_step", no_timer)
    summary = charrnn.train(small_corpus, resume=run, config=TINY, steps=20, **keys)
    assert summary.steps == 20 and charrnn.load(run).config.model.num_layers == 3


def test_the_seconds_the_choice_took_are_the_runs_first(small_corpus, tmp_path, monkeypatch):
    def choose(config, steps_per_epoch, time_step, runs_here):
        return sizing.Choice(first_larger(config), 1e4, "timed for a long while")

    monkeypatch.setattr(sizing, "choose", choose)
    run = tmp_path / "run"
    charrnn.train(small_corpus, run, TINY, steps=10, larger_model=LARGER, max_minutes=0.0, eval_every=10, log_every=10)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(record["elapsed_s"] >= 1e4 for record in records)
    assert charrnn.load(run).config.model.num_layers == 3


def test_a_run_too_slow_for_the_larger_model_trains_the_model_as_given(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "seconds_per_step", lambda config, devices: 1e3)
    run = tmp_path / "run"
    charrnn.train(small_corpus, run, TINY, steps=10, larger_model=LARGER, max_minutes=60.0, eval_every=10)
    assert charrnn.load(run).config.model.num_layers == 2


TWO_ALTERNATIVES = f"train.members=2 train.max_epochs=1; {LARGER}"


def members_or_layers(config):
    """Two members step in 1 s, the three-layer model in 0.5 s."""
    return 1.0 if config.train.members == 2 else 0.5


def test_alternatives_are_timed_in_turn_and_the_first_that_fits_is_trained():
    config = recipe(larger_model=TWO_ALTERNATIVES)
    # One epoch of 10 steps: two members' 10 s fit the 60 s, and the three layers are not timed.
    first = Timer(members_or_layers)
    chosen = sizing.choose(config, steps_per_epoch=10, time_step=first)
    assert (chosen.config.train.members, chosen.config.train.max_epochs, chosen.config.model.num_layers) == (2, 1.0, 2)
    assert chosen.config.train.larger_model == "" and len(first.timed) == 1
    assert "'train.members=2 train.max_epochs=1': 10 steps at 1000 ms" in chosen.note and "training it" in chosen.note
    # One epoch of 1000 steps: train.steps (100) ends the run, 105 s for the members; the three layers' 53 s fit.
    second = Timer(members_or_layers)
    chosen = sizing.choose(config, steps_per_epoch=1000, time_step=second)
    assert (chosen.config.train.members, chosen.config.train.max_epochs, chosen.config.model.num_layers) == (1, 0.0, 3)
    assert [timed.train.members for timed in second.timed] == [2, 1]
    assert "about 105 s of the 60 s" in chosen.note and f"'{LARGER}': 100 steps at 500 ms" in chosen.note
    # Neither fits: the model as given.
    neither = sizing.choose(config, steps_per_epoch=1000, time_step=Timer(lambda config: 1.0))
    assert (neither.config.train.members, neither.config.model.num_layers) == (1, 2)
    assert neither.note.endswith("so training the model as given")


def members_refused(config):
    if config.train.members > 1:
        raise UsageError("train.members > 1 trains its models on one device")


@pytest.mark.parametrize("max_minutes", [1.0, 0.0])
def test_an_alternative_that_cannot_run_here_is_passed_over_with_a_budget_or_without(max_minutes):
    timer = Timer(0.5)
    chosen = sizing.choose(recipe(larger_model=TWO_ALTERNATIVES, max_minutes=max_minutes), 1000, timer, members_refused)
    assert chosen.config.model.num_layers == 3 and chosen.config.train.members == 1
    assert "cannot run here (train.members > 1 trains its models on one device)" in chosen.note
    assert all(timed.train.members == 1 for timed in timer.timed)


def test_a_run_of_several_processes_trains_the_model_as_given_even_without_a_budget(monkeypatch):
    monkeypatch.setattr(sizing.jax, "process_count", lambda: 2)
    for max_minutes in (1.0, 0.0):
        chosen = sizing.choose(recipe(larger_model=TWO_ALTERNATIVES, max_minutes=max_minutes), 10, Timer(1e-9))
        assert (chosen.config.train.members, chosen.config.model.num_layers) == (1, 2)


def test_a_setting_the_user_gives_stands_over_the_alternatives_that_set_it():
    recipe_file = {"train": {"larger_model": TWO_ALTERNATIVES}}
    kept = lambda *sets, **options: config_lib.resolve(  # noqa: E731
        config_lib.apply_overrides(config_lib.resolve(TINY, [], {}), recipe_file), list(sets),
        config_lib.options_from_names(options)).train.larger_model
    assert kept() == TWO_ALTERNATIVES
    assert kept("train.members=3") == LARGER and kept(max_epochs=2.0) == LARGER
    assert kept("model.num_layers=4") == "train.members=2 train.max_epochs=1"
    assert kept("model.dropout=0.1", "train.lr=0.1") == TWO_ALTERNATIVES  # keys no alternative sets


def test_a_resume_that_sets_the_passes_again_keeps_the_members_the_run_chose():
    wanted = recipe(larger_model=TWO_ALTERNATIVES)
    saved = config_lib.larger_models(wanted)[0].config  # two members, one epoch
    # As `charrnn train --resume RUN --config FILE --set train.max_epochs=3` resolves it: FILE does not set members.
    again = config_lib.resolve(None, [f"train.larger_model={TWO_ALTERNATIVES}", "train.max_epochs=3"], {}, base=saved)
    resumed = sizing.as_resumed(saved, again)
    assert (resumed.train.members, resumed.train.max_epochs) == (2, 3.0)


def test_a_resume_finds_whichever_alternative_the_run_chose():
    wanted = recipe(larger_model=TWO_ALTERNATIVES)
    members, layers = (larger.config for larger in config_lib.larger_models(wanted))
    assert sizing.as_resumed(members, wanted) == members
    assert sizing.as_resumed(layers, wanted) == layers
    assert sizing.as_resumed(config_lib.apply_overrides(wanted, {"train": {"larger_model": ""}}), wanted) == wanted


def test_a_run_that_chose_members_trains_and_resumes_them(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "seconds_per_step", lambda config, devices: 1e-6)
    run = tmp_path / "run"
    keys = {"larger_model": "train.members=2", "max_minutes": 60.0, "eval_every": 10, "log_every": 10}
    charrnn.train(small_corpus, run, TINY, steps=10, **keys)
    assert json.loads((run / "config.json").read_text())["train"]["members"] == 2
    monkeypatch.setattr(sizing, "seconds_per_step", lambda config, devices: pytest.fail("timed on resume"))
    summary = charrnn.train(small_corpus, resume=run, config=TINY, steps=20, **keys)
    assert summary.steps == 20 and charrnn.load(run).config.train.members == 2


def test_alternatives_that_differ_only_in_passes_are_timed_once():
    timer = Timer(lambda config: 1.0)
    config = recipe(larger_model="train.members=2 train.max_epochs=9; train.members=2 train.max_epochs=9 "
                                 "train.fit_epochs=7; train.members=2 train.max_epochs=4")
    # 90 steps of 1 s do not fit the 60 s, nor 70; 40 steps do, at the step time already measured.
    chosen = sizing.choose(config, steps_per_epoch=10, time_step=timer)
    assert (chosen.config.train.members, chosen.config.train.max_epochs) == (2, 4.0) and len(timer.timed) == 1


def test_an_alternative_whose_first_fit_epochs_fit_is_trained_on_to_its_own_end():
    # Nine passes of 10 steps at 1 s take 95 s of the 60; the first four take 42 s, the first six 63 s.
    config = recipe(max_epochs=9.0, larger_model="train.members=2 train.fit_epochs=4")
    chosen = sizing.choose(config, steps_per_epoch=10, time_step=Timer(1.0))
    assert (chosen.config.train.members, chosen.config.train.max_epochs, chosen.config.train.fit_epochs) == (2, 9.0, 4.0)
    assert "its first 4 passes, 40 steps at 1000 ms each would end at about 42 s of the 60 s" in chosen.note
    too_many = recipe(max_epochs=9.0, larger_model="train.members=2 train.fit_epochs=6")
    kept = sizing.choose(too_many, steps_per_epoch=10, time_step=Timer(1.0))
    assert kept.config.train.members == 1 and "its first 6 passes, 60 steps" in kept.note
    # train.steps ends a run sooner than its passes to fit: the whole run must fit, as without the key.
    assert sizing.steps_to_fit(recipe(fit_epochs=20.0).train, steps_per_epoch=10) == (100, "its first 20 passes, ")
    assert sizing.steps_to_fit(recipe(max_epochs=9.0).train, steps_per_epoch=10) == (90, "")
    # A run of fewer passes than those to fit (`--epochs 3` on the recipe) must fit whole.
    assert sizing.steps_to_fit(recipe(max_epochs=3.0, fit_epochs=4.0).train, steps_per_epoch=10) == (30, "")
    assert sizing.steps_to_fit(recipe(max_epochs=4.0, fit_epochs=4.0).train, steps_per_epoch=10) == (40, "")


def test_fit_epochs_set_for_the_run_applies_to_every_alternative():
    config = config_lib.apply_overrides(recipe(), {"train": {  # as a config file sets them
        "max_epochs": 9.0, "fit_epochs": 2.0, "larger_model": TWO_ALTERNATIVES.replace("max_epochs=1", "max_epochs=3")}})
    members, layers = (larger.config.train for larger in config_lib.larger_models(config))
    assert (members.max_epochs, members.fit_epochs, layers.max_epochs, layers.fit_epochs) == (3.0, 2.0, 9.0, 2.0)


def test_the_recipe_members_train_on_to_their_own_cap():
    """The recipe's members, 2x512 or else 2x384 (dropping out less), are chosen where 3.5 passes fit and train on to
    six passes or the clock; one model keeps the run's five."""
    config = config_lib.resolve(RECIPE, [], {})
    assert config.train.max_epochs == 5.0
    wide, narrow = (larger.config for larger in config_lib.larger_models(config))
    for members, hidden, dropout in ((wide, 512, 0.2), (narrow, 384, 0.15)):
        assert (members.train.members, members.train.fit_epochs, members.train.max_epochs) == (2, 3.5, 6.0)
        assert (members.model.hidden_size, members.model.num_layers, members.model.dropout) == (hidden, 2, dropout)
    chosen = sizing.choose(config, steps_per_epoch=10, time_step=Timer(1.0))
    assert chosen.config.model.hidden_size == 512 and "its first 3.5 passes, 35 steps at 1000 ms" in chosen.note
    assert steps.last_step(chosen.config.train, steps_per_epoch=10) == 60
    # At `filling` seconds a step, 3.5 passes (35 steps) and the overhead fill the budget exactly.
    filling = config.train.max_minutes * 60.0 * (1.0 - sizing.OVERHEAD) / 35
    by_width = Timer(lambda timed: filling * (1.5 if timed.model.hidden_size == 512 else 0.5))
    narrow_chosen = sizing.choose(config, steps_per_epoch=10, time_step=by_width)
    assert (narrow_chosen.config.model.hidden_size, narrow_chosen.config.train.members) == (384, 2)
    assert [timed.model.hidden_size for timed in by_width.timed] == [512, 384]
    neither = sizing.choose(config, steps_per_epoch=10, time_step=Timer(filling * 1.5))
    assert (neither.config.model.hidden_size, neither.config.train.members) == (512, 1)


def test_passes_given_drop_the_members_that_set_their_own():
    """`charrnn train --config configs/shakespeare.toml --epochs 3`: the members' alternatives set their own passes,
    so the passes given stand over them (as any key given does), and the run trains the model as given."""
    config = config_lib.resolve(RECIPE, [], {"train": {"max_epochs": 3.0}})
    assert config_lib.larger_models(config) == []
    chosen = sizing.choose(config, steps_per_epoch=10, time_step=Timer(1.0))
    assert (chosen.config.model.hidden_size, chosen.config.train.members, chosen.config.train.max_epochs) == (512, 1, 3.0)
    assert chosen.note == ""


def test_a_run_that_ends_exactly_at_the_budget_fits(monkeypatch):
    monkeypatch.setattr(sizing.time, "monotonic", lambda: 0.0)
    # 100 steps of 0.5 s end at 52.6 s: a budget of exactly that many seconds is met, not missed.
    ends_s = sizing.predicted_s(0.0, 100, 0.5)
    assert (ends_s / 60.0) * 60.0 == ends_s
    chosen = sizing.choose(recipe(max_minutes=ends_s / 60.0), steps_per_epoch=1000, time_step=Timer(0.5))
    assert chosen.config.model.num_layers == 3 and "so training it" in chosen.note
    kept = sizing.choose(recipe(max_minutes=ends_s / 60.0), steps_per_epoch=1000, time_step=Timer(0.5 * (1 + 1e-9)))
    assert kept.config.model.num_layers == 2


def test_the_seconds_spent_timing_a_model_chosen_are_the_runs_first(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sizing.time, "monotonic", lambda: now[0])

    def ten_seconds(config):
        now[0] += 10.0
        return 0.4

    # 100 steps of 0.4 s with 5% for evaluations, after 10 s of timing, end at 52.1 s of the 60.
    chosen = sizing.choose(recipe(), steps_per_epoch=1000, time_step=ten_seconds)
    assert chosen.config.model.num_layers == 3 and chosen.elapsed_s == 10.0 and "about 52 s" in chosen.note


def test_a_step_is_the_time_of_a_call_over_its_steps(monkeypatch):
    """`seconds_per_step`: a compiled call of `steps_per_call` steps, timed for PROBE_SECONDS on the devices given."""
    seen = []

    class Probe:
        chars_per_call = 6000

        def __init__(self, config, devices):
            seen.append(("made", config, devices))

        def compile(self):
            seen.append("compiled")

        def chars_per_second(self, seconds):
            seen.append(("timed", seconds))
            return 2000.0

    monkeypatch.setattr(sizing.bench, "TrainingBench", Probe)
    config = config_lib.resolve(TINY, ["train.steps_per_call=4"], {})
    # 6000 characters a call at 2000 a second: 3 s a call of 4 steps.
    assert sizing.seconds_per_step(config, devices=3) == pytest.approx(0.75)
    assert seen == [("made", config, 3), "compiled", ("timed", sizing.PROBE_SECONDS)]


def test_a_saved_model_that_shares_only_some_of_an_alternatives_settings_is_not_that_alternative():
    wanted = recipe()
    given = config_lib.apply_overrides(wanted, {"train": {"larger_model": ""}})
    three_layers = config_lib.apply_overrides(given, {"model": {"num_layers": 3}})  # hidden_size 32, not 24
    assert sizing.as_resumed(three_layers, wanted) == wanted
