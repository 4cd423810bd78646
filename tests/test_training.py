"""`charrnn.train` and the events it reports: the same run as `charrnn train`, told to every listener."""

import dataclasses
import json
import math
import time
import types

import jax
import numpy as np
import pytest
from clihelp import TINY, assert_identical_arrays, final_arrays, start_subprocess
from test_tensorboard import needs_tensorboardx, read_scalars

import charrnn
from charrnn import checkpoint, config as config_lib, distributed, events, rundir, runs, steps, training

# 20 steps, two evaluations, four log lines: a few seconds on a CPU.
KEYS = {"steps": 20, "eval_every": 10, "log_every": 5}
CLI_KEYS = ["--steps", "20", "--set", "train.eval_every=10", "--set", "train.log_every=5"]


class Recorder:
    """A callback that keeps every event, and checks each Evaluated's checkpoint while it is still on disk."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if isinstance(event, events.Evaluated):
            assert event.checkpoint.is_file()  # rotation may delete it later (train.keep = 1)
            assert not event.best or (event.checkpoint.parent / rundir.BEST_FILE).is_file()
        self.events.append(event)

    def of(self, *types):
        return [event for event in self.events if isinstance(event, types)]


def test_train_returns_the_summary_the_cli_prints(cli, small_corpus, tmp_path):
    summary = charrnn.train(small_corpus, tmp_path / "api", TINY, **KEYS)
    assert isinstance(summary, charrnn.Summary)
    assert summary.status == "finished" and summary.steps == 20
    assert summary.run_dir == str(tmp_path / "api")
    assert summary.checkpoint.endswith("step-000000020.safetensors")
    assert summary.best_val_loss is not None and summary.final_val_loss is not None

    result = cli("train", small_corpus, "--config", TINY, "--out", "cli", *CLI_KEYS, "--json")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    printed = json.loads(lines[-1])
    assert list(printed) == list(summary.to_dict())
    # One seed, one device, the same compiled steps: the same run, to the last bit.
    for key in ("steps", "best_val_loss", "final_val_loss", "best_val_bpc", "final_val_bpc", "status", "devices"):
        assert printed[key] == summary.to_dict()[key], key

    # --json: every metrics record as it is written, in metrics.jsonl's order, then the summary.
    metrics_lines = (tmp_path / "cli" / rundir.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    assert lines[:-1] == metrics_lines
    assert [json.loads(line)["event"] for line in metrics_lines] == ["train", "train", "eval", "train", "train", "eval"]


def test_callbacks_see_the_events_in_order(small_corpus, tmp_path):
    recorder = Recorder()
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=6, log_every=2,
                            eval_every=3, steps_per_call=1)

    messages = 0
    while isinstance(recorder.events[messages], events.Message):
        messages += 1
    assert messages >= 1 and str(tmp_path / "run") in recorder.events[0].text
    sequence = [(type(event).__name__, getattr(event, "step", getattr(event, "first_step", None)))
                for event in recorder.events[messages:]]
    assert sequence == [("Started", 0), ("Logged", 2), ("Evaluated", 3), ("Logged", 4), ("Logged", 6),
                        ("Evaluated", 6), ("Stopped", 6)]

    started = recorder.of(events.Started)[0]
    assert (started.run_dir, started.first_step, started.total_steps) == (tmp_path / "run", 0, 6)
    first_eval, final_eval = recorder.of(events.Evaluated)
    assert (first_eval.final, final_eval.final) == (False, True)
    assert first_eval.best
    assert final_eval.best == (final_eval.val_loss < first_eval.val_loss)
    assert str(final_eval.checkpoint) == summary.checkpoint
    logged = recorder.of(events.Logged)
    # Each log window carries the latest evaluation's loss.
    assert [event.val_loss for event in logged] == [None, first_eval.val_loss, first_eval.val_loss]
    assert [event.chars_seen for event in logged] == [2 * 8 * 16, 4 * 8 * 16, 6 * 8 * 16]
    stopped = recorder.events[-1]
    assert (stopped.status, stopped.summary) == ("finished", summary)
    assert summary.final_val_loss == final_eval.val_loss
    assert summary.best_val_loss == min(first_eval.val_loss, final_eval.val_loss)

    # metrics.jsonl is one more listener of the same events.
    assert rundir.read_metrics(tmp_path / "run") == [event.record() for event in recorder.of(events.Logged,
                                                                                               events.Evaluated)]


def test_records_give_bits_per_character_and_every_listener_hears_in_order(tmp_path):
    logged = events.Logged(step=5, loss=2.0, lr=0.01, grad_norm=1.5, chars_per_s=None, chars_seen=640, elapsed_s=1.0,
                           val_loss=None)
    assert logged.record()["bpc"] == pytest.approx(2.0 / math.log(2))
    for final in (False, True):
        record = events.Evaluated(step=10, val_loss=1.5, chars_seen=1280, elapsed_s=2.0, final=final,
                                  checkpoint=tmp_path / "step.safetensors", best=True).record()
        assert record["val_bpc"] == pytest.approx(1.5 / math.log(2)) and record["final"] is final
    heard = []
    emit = events.broadcast([lambda event: heard.append(("first", event)),
                             lambda event: heard.append(("second", event))])
    emit(logged)
    assert heard == [("first", logged), ("second", logged)]


def test_an_epoch_cap_ends_the_run_and_its_schedule_where_that_many_steps_would(small_corpus, tmp_path):
    """train.max_epochs stops at ceil(epochs × steps per epoch), with the lr and arrays of that step count."""
    keys = {"schedule": "cosine", "log_every": 1, "eval_every": 1000, "steps_per_call": 4}
    steps_per_epoch = training.load_task(small_corpus, config_lib.resolve(TINY, [], {})).steps_per_epoch
    last = math.ceil(1.25 * steps_per_epoch)
    # The cap rounds up, ends the run before train.steps, and inside a call of steps_per_call steps.
    assert last != 1.25 * steps_per_epoch and last < 1000 and last % 4
    recorder = Recorder()
    capped = charrnn.train(small_corpus, tmp_path / "capped", TINY, callbacks=[recorder], steps=1000,
                           max_epochs=1.25, **keys)
    stepped = charrnn.train(small_corpus, tmp_path / "stepped", TINY, steps=last, **keys)
    assert capped.steps == stepped.steps == last
    assert recorder.of(events.Started)[0].total_steps == last
    assert any(f"ends the run at step {last} " in event.text for event in recorder.of(events.Message))
    # The cosine reaches its end at the cap: the lr of the last step is the schedule's there, not 1000 steps'.
    lrs = [record["lr"] for record in rundir.read_metrics(tmp_path / "capped") if record["event"] == "train"]
    assert lrs == [record["lr"] for record in rundir.read_metrics(tmp_path / "stepped") if record["event"] == "train"]
    lr = config_lib.resolve(TINY, [], {}).train.lr
    assert lrs[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (last - 1) / last)), rel=1e-5)
    assert_identical_arrays(final_arrays(tmp_path / "capped"), final_arrays(tmp_path / "stepped"))


def test_a_diverging_run_tells_its_callbacks_then_raises(small_corpus, tmp_path):
    recorder = Recorder()
    with pytest.raises(charrnn.DivergedError, match="non-finite"):
        charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=30, lr=1e38, clip_norm=0.0,
                      log_every=1, eval_every=100)
    diverged, stopped = recorder.events[-2:]
    assert isinstance(diverged, events.Diverged) and isinstance(stopped, events.Stopped)
    assert (stopped.status, stopped.summary) == ("diverged", None)
    assert 1 <= diverged.step <= stopped.step <= 30
    assert not recorder.of(events.Evaluated)
    assert all(np.isfinite(event.loss) for event in recorder.of(events.Logged))
    assert rundir.read_metrics(tmp_path / "run")[-1] == diverged.record()
    assert rundir.read_status(tmp_path / "run")["status"] == rundir.DIVERGED


def losses(run_dir):
    """{(tag, step): loss} of the run's metrics.jsonl, as TensorBoard stores them (float32)."""
    found = {}
    for record in rundir.read_metrics(run_dir):
        tag, key = ("train/loss", "loss") if record["event"] == "train" else ("val/loss", "val_loss")
        found[(tag, record["step"])] = float(np.float32(record[key]))
    return found


def tensorboard_losses(directory):
    return {(tag, step): value for tag, step, value in read_scalars(directory) if tag in ("train/loss", "val/loss")}


class SameSecond:
    """The `time` module as tensorboardX's event file writer sees it, its clock stopped at one second."""

    def time(self) -> float:
        return 1_700_000_000.0

    def __getattr__(self, name):
        return getattr(time, name)


TENSORBOARD_ARGS = ["--config", TINY, "--set", "train.eval_every=5", "--set", "train.log_every=5"]


@needs_tensorboardx
def test_tensorboard_scalars_are_the_metrics_and_a_resume_adds_to_them(cli, small_corpus, tmp_path, monkeypatch):
    # tensorboardX names an event file by the second it opens it: both sessions here open theirs in
    # the same second, as a quick resume does, whatever the speed of the machine.
    from tensorboardX import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", SameSecond())
    first = cli("train", small_corpus, *TENSORBOARD_ARGS, "--steps", "10", "--out", "run", "--tensorboard")
    assert first.code == 0, first.err
    assert tensorboard_losses(tmp_path / "run" / "tensorboard") == losses(tmp_path / "run")
    assert {step for _, step in losses(tmp_path / "run")} == {5, 10}

    resumed = cli("train", "--resume", "run", "--steps", "20", "--tensorboard")
    assert resumed.code == 0, resumed.err
    assert [path.name for path in (tmp_path / "run").iterdir() if "tensorboard" in path.name] == ["tensorboard"]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_losses(tmp_path / "run" / "tensorboard") == losses(tmp_path / "run")
    assert {step for _, step in losses(tmp_path / "run")} == {5, 10, 15, 20}


@needs_tensorboardx
def test_tensorboard_dir_writes_there(cli, small_corpus, tmp_path):
    result = cli("train", small_corpus, *TENSORBOARD_ARGS, "--steps", "5", "--out", "run",
                 "--tensorboard-dir", "boards")
    assert result.code == 0, result.err
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert tensorboard_losses(tmp_path / "boards") == losses(tmp_path / "run") != {}


def test_unknown_keys_are_usage_errors_that_name_the_key(small_corpus, tmp_path):
    with pytest.raises(charrnn.UsageError, match="hiden_size"):
        charrnn.train(small_corpus, tmp_path / "run", TINY, hiden_size=3)
    with pytest.raises(charrnn.UsageError, match="model.hiden_size"):
        charrnn.train(small_corpus, tmp_path / "run", TINY, sets=["model.hiden_size=3"])
    with pytest.raises(charrnn.UsageError):
        charrnn.train(small_corpus, tmp_path / "run", TINY, resume=tmp_path / "other")
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()


def test_config_then_sets_then_keys(small_corpus, tmp_path):
    tiny = config_lib.resolve(TINY, [], {})
    config = dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, lr=0.02, seed=3, warmup_steps=2,
                                                                 steps=4, eval_every=2))
    summary = charrnn.train(small_corpus, tmp_path / "run", config, sets=["train.seed=4", "train.warmup_steps=1"],
                            seed=5, steps=2)
    saved = json.loads((tmp_path / "run" / rundir.CONFIG_FILE).read_text())
    assert saved["train"]["lr"] == 0.02  # the Config, over the defaults (6e-3)
    assert saved["train"]["warmup_steps"] == 1  # sets, over the Config
    assert saved["train"]["seed"] == 5 and saved["train"]["steps"] == 2  # keys, over sets and the Config
    assert saved["train"]["eval_every"] == 2 and saved["model"]["hidden_size"] == tiny.model.hidden_size == 32
    assert summary.steps == 2
    assert charrnn.load(tmp_path / "run").config == config_lib.from_dict(saved)


def test_a_reader_leaving_json_lines_does_not_stop_the_run(small_corpus, tmp_path):
    """`charrnn train --json | head -1`: the lines stop, the run goes on to its end and its checkpoints."""
    process = start_subprocess("train", small_corpus, "--config", TINY, "--steps", "40", "--json", "--quiet",
                               "--out", "run", cwd=tmp_path)
    first = json.loads(process.stdout.readline())
    process.stdout.close()  # as head does once it has its line
    process.wait(timeout=300)
    assert first["event"] == "train" and process.returncode == 0, process.stderr.read()
    assert rundir.read_status(tmp_path / "run")["status"] == rundir.FINISHED
    assert rundir.read_json(tmp_path / "run" / rundir.STATUS_FILE)["steps"] == 40


def test_both_tasks_train_on_smoothed_labels_and_validate_on_plain_ones(small_corpus, reversal_pairs):
    for corpus, kind in ((small_corpus, "lm"), (reversal_pairs, "seq2seq")):
        losses = {}
        for smoothing in (0.0, 0.3):
            config = config_lib.resolve(TINY, [f"model.kind={kind}", f"train.label_smoothing={smoothing}"], {})
            task = training.load_task(corpus, config)
            params = task.init_params(jax.random.key(0))
            carry = task.initial_carry(params, config.train.batch_size)
            batch = jax.tree.map(lambda leaf: leaf[0], task.batches(0, 1, slice(None)))
            losses[smoothing] = float(task.batch_loss(params, carry, batch, jax.random.key(1))[0])
            losses[smoothing, "validation"] = task.validation_loss(params, None)
        assert losses[0.3] != losses[0.0], kind
        assert losses[0.3, "validation"] == losses[0.0, "validation"], kind


def test_the_pairs_task_scores_the_first_pairs_of_its_validation_split_for_a_part(reversal_pairs):
    from charrnn.seq2seq import task as seq2seq_task

    config = config_lib.resolve(TINY, ["model.kind=seq2seq"], {})
    task = training.load_task(reversal_pairs, config)
    params = task.init_params(jax.random.key(0))
    sources, targets = task.corpus.val
    first = math.ceil(len(sources) * 0.4)
    part = seq2seq_task.mean_loss((params,), (config.model,), sources[:first], targets[:first], config.train.pad_multiple)
    assert task.validation_loss(params, None, 0.4) == pytest.approx(part)
    assert task.validation_loss(params, None) != pytest.approx(part)


def test_the_text_task_gives_consecutive_steps_of_the_streams_asked_for(small_corpus):
    """batches(step, count, streams): `count` steps, each going on from the last; steps_per_epoch make an epoch."""
    task = training.load_task(small_corpus, config_lib.resolve(TINY, [], {}))
    assert task.describe() == "6,300 + 700 characters, 34 symbols"
    assert task.init_params(jax.random.key(0))["embedding"].shape[0] == 34  # a row per symbol
    every = slice(None)
    two = task.batches(3, 2, every)  # [K, T, B]
    for index in range(2):
        np.testing.assert_array_equal(two.inputs[index], task.batches(3 + index, 1, every).inputs[0])
    np.testing.assert_array_equal(two.inputs[1, 0], two.targets[0, -1])  # step 4 goes on where step 3 stopped
    np.testing.assert_array_equal(task.batches(3, 2, slice(2, 5)).targets, two.targets[..., 2:5])
    epoch = task.steps_per_epoch
    resets = [bool(task.batches(step, 1, every).reset[0]) for step in (0, 1, epoch - 1, epoch)]
    assert resets == [True, False, False, True]


def test_the_step_that_diverged_is_the_one_after_the_last_finite_one(small_corpus, tmp_path):
    recorder = Recorder()
    with pytest.raises(charrnn.DivergedError, match="non-finite"):
        charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=30, lr=1e38, clip_norm=0.0,
                      log_every=1, eval_every=100)
    (diverged,) = recorder.of(events.Diverged)
    # TINY: one step per call, a log line each step: every finite step is logged, the next one diverged.
    assert [event.step for event in recorder.of(events.Logged)] == list(range(1, diverged.step))


def test_the_final_loss_is_the_last_evaluation_and_the_best_the_lowest(small_corpus, tmp_path, monkeypatch):
    losses = iter([2.0, 3.0])
    monkeypatch.setattr(steps, "evaluate", lambda *args, **kwargs: next(losses))
    recorder = Recorder()
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=6, eval_every=3,
                            log_every=3)
    assert [(e.step, e.val_loss, e.best) for e in recorder.of(events.Evaluated)] == [(3, 2.0, True), (6, 3.0, False)]
    assert (summary.best_val_loss, summary.final_val_loss) == (2.0, 3.0)


def test_a_score_equal_to_the_best_is_not_a_new_best(small_corpus, tmp_path, monkeypatch):
    losses = iter([2.0, 2.0])
    monkeypatch.setattr(steps, "evaluate", lambda *args, **kwargs: next(losses))
    recorder = Recorder()
    charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=6, eval_every=3, log_every=3)
    assert [(e.step, e.best) for e in recorder.of(events.Evaluated)] == [(3, True), (6, False)]
    _, best = checkpoint.read(tmp_path / "run" / "checkpoints" / rundir.BEST_FILE)
    assert best["step"] == 3  # best.safetensors keeps the first model to reach the score


def test_a_resumed_run_keeps_the_best_it_had(small_corpus, tmp_path, monkeypatch):
    """The best score travels in the checkpoint: after a resume, a worse score of the whole split is no new best."""
    losses = iter([2.0, 3.0])
    monkeypatch.setattr(steps, "evaluate", lambda *args, **kwargs: next(losses))
    run_dir = tmp_path / "run"
    charrnn.train(small_corpus, run_dir, TINY, steps=3, eval_every=3, log_every=3)
    recorder = Recorder()
    summary = charrnn.train(resume=run_dir, callbacks=[recorder], steps=6)
    assert [(e.step, e.val_loss, e.best) for e in recorder.of(events.Evaluated)] == [(6, 3.0, False)]
    assert (summary.best_val_loss, summary.final_val_loss) == (2.0, 3.0)
    _, best = checkpoint.read(run_dir / "checkpoints" / rundir.BEST_FILE)
    assert (best["step"], best["val_loss"]) == (3, 2.0)


def test_a_resumed_run_says_what_share_of_validation_its_last_score_covered(small_corpus, tmp_path, monkeypatch):
    """Stopped after a part's score and resumed, the run's saves between evaluations still say it scored a part."""
    checks = []

    def stop_at_step_4(values):  # the loop asks before each call: the fifth time, at step 4, a signal has come
        checks.append(1)
        return np.array([values[0], len(checks) == 5])

    monkeypatch.setattr(distributed, "agree", stop_at_step_4)
    run_dir = tmp_path / "run"
    keys = {"eval_every": 3, "log_every": 3, "eval_fraction": 0.3, "keep": 10}
    with pytest.raises(charrnn.Interrupted):
        charrnn.train(small_corpus, run_dir, TINY, steps=6, **keys)
    monkeypatch.undo()
    _, part = checkpoint.read(checkpoint.step_path(run_dir / "checkpoints", 3))
    charrnn.train(resume=run_dir, steps=6, save_minutes=1e-9)
    _, saved = checkpoint.read(checkpoint.step_path(run_dir / "checkpoints", 5))  # saved without an evaluation
    assert (saved["val_loss"], saved["val_fraction"]) == (part["val_loss"], 0.3)
    assert part["val_fraction"] == 0.3 and saved["best_val_loss"] is None


def test_evaluations_during_a_run_score_the_first_part_and_only_the_whole_split_makes_a_best(small_corpus, tmp_path):
    recorder = Recorder()
    run_dir = tmp_path / "run"
    summary = charrnn.train(small_corpus, run_dir, TINY, callbacks=[recorder], steps=9, eval_every=3, log_every=3,
                            eval_fraction=0.3, keep=3)
    evaluated = recorder.of(events.Evaluated)
    assert [(e.step, e.fraction, e.best) for e in evaluated] == [(3, 0.3, False), (6, 0.3, False), (9, 1.0, True)]
    # Each loss is its checkpoint's model scoring the first 30% of the validation text, or all of it at the end.
    text = small_corpus.read_text(encoding="utf-8")
    validation = text[len(text) - int(len(text) * 0.1):]
    part = validation[:math.ceil(len(validation) * 0.3)]
    for event, scored in zip(evaluated, (part, part, validation)):
        score = charrnn.load(event.checkpoint).score(scored, streams=4)  # configs/tiny.toml's eval_batch_size
        assert score.nats_per_char == pytest.approx(event.val_loss, rel=1e-5), event.step
    assert evaluated[0].val_loss != pytest.approx(charrnn.load(evaluated[0].checkpoint).score(validation, streams=4)
                                                  .nats_per_char, rel=1e-5)
    assert summary.best_val_loss == summary.final_val_loss == evaluated[-1].val_loss
    _, best = checkpoint.read(run_dir / "checkpoints" / rundir.BEST_FILE)
    assert (best["step"], best["val_fraction"]) == (9, 1.0)
    _, during = checkpoint.read(evaluated[0].checkpoint)
    assert (during["val_loss"], during["val_fraction"], during["best_val_loss"]) == (evaluated[0].val_loss, 0.3, None)

    # The records say which evaluations scored a part; curves and `runs` keep the two apart.
    records = [record for record in rundir.read_metrics(run_dir) if record["event"] == "eval"]
    assert [record["fraction"] for record in records] == [0.3, 0.3, 1.0]
    curve = runs.curves(run_dir)
    assert curve["val_part"]["val_bpc"] == [records[0]["val_bpc"], records[1]["val_bpc"]]
    assert curve["val"]["val_bpc"] == [records[2]["val_bpc"]]
    (row,) = runs.collect([run_dir])
    assert row["best_val_loss"] == summary.best_val_loss


def test_the_command_line_says_which_evaluations_scored_a_part(cli, small_corpus, tmp_path):
    result = cli("train", small_corpus, "--config", TINY, "--out", "run", "--steps", "6", "--set", "train.eval_every=3",
                 "--set", "train.eval_fraction=0.3", "--set", "train.keep=2")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("step ") and "saved" in line]
    assert ["on the first 30% of validation" in line for line in lines] == [True, False]
    during = cli("inspect", tmp_path / "run" / "checkpoints" / "step-000000003.safetensors", "--json")
    final = cli("inspect", tmp_path / "run", "--json")
    assert (json.loads(during.out)["val_fraction"], json.loads(final.out)["val_fraction"]) == (0.3, 1.0)


def test_a_run_ending_between_evaluations_evaluates_at_its_end(small_corpus, tmp_path):
    recorder = Recorder()
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=7, eval_every=5,
                            log_every=5)
    evaluated = recorder.of(events.Evaluated)
    assert [(e.step, e.final) for e in evaluated] == [(5, False), (7, True)]
    assert summary.final_val_loss == evaluated[-1].val_loss


def test_save_minutes_saves_between_evaluations(small_corpus, tmp_path):
    recorder = Recorder()
    charrnn.train(small_corpus, tmp_path / "run", TINY, callbacks=[recorder], steps=6, eval_every=3, log_every=3,
                  save_minutes=1e-9, keep=10)
    # After every call but those that evaluate (3) and the last (6), which save with their evaluation.
    assert [event.step for event in recorder.of(events.Saved)] == [1, 2, 4, 5]


def ten_seconds_a_check(monkeypatch) -> None:
    """The loop's clock, as process 0 tells it to every process, reads 0 s at its first check and 10 s more at each."""
    checks = []

    def agree(values):
        checks.append(1)
        return np.array([10.0 * (len(checks) - 1), values[1]])

    monkeypatch.setattr(distributed, "agree", agree)


def test_no_call_starts_once_the_budget_is_spent(small_corpus, tmp_path, monkeypatch):
    """A clock that reads 10 s more at each check: with a 30 s budget, calls start at 0, 10 and 20 s only."""
    ten_seconds_a_check(monkeypatch)
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, steps=1000, max_minutes=0.5, eval_every=1000,
                            log_every=1)
    assert summary.steps == 3


def test_with_a_budget_the_schedule_follows_the_clock(small_corpus, tmp_path, monkeypatch):
    """A clock that reads 10 s more at each check, a 60 s budget and 1000 steps: step k starts 10k s in, so its lr
    is the cosine's at 10k / 60 of the way, not at k / 1000."""
    ten_seconds_a_check(monkeypatch)
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, steps=1000, max_minutes=1.0, eval_every=1000,
                            log_every=1, schedule="cosine", warmup_steps=0)
    assert summary.steps == 6
    train = config_lib.resolve(TINY, [], {}).train
    lrs = [record["lr"] for record in rundir.read_metrics(tmp_path / "run") if record["event"] == "train"]
    assert lrs == pytest.approx([steps.learning_rate(dataclasses.replace(train, schedule="cosine", warmup_steps=0),
                                                     step, 10.0 * step / 60.0) for step in range(6)], rel=1e-6)
    assert lrs[-1] < 0.1 * train.lr  # 50 s of 60: near the cosine's end


def train_ten_steps(cli, corpus) -> None:
    """A run "run" of TINY's model for 10 steps, by the command line, evaluated at 5 and 10."""
    done = cli("train", corpus, "--config", TINY, "--set", "train.eval_every=5", "--set", "train.log_every=5",
               "--steps", "10", "--out", "run")
    assert done.code == 0, done.err


def test_a_run_resumed_at_its_own_last_step_ends_there(cli, small_corpus, tmp_path):
    train_ten_steps(cli, small_corpus)
    again = cli("train", "--resume", "run", "--steps", "10", "--json")
    assert again.code == 0, again.err
    assert json.loads(again.out.splitlines()[-1])["steps"] == 10


def test_a_run_stopped_before_its_first_checkpoint_resumes_with_its_saved_config(small_corpus, tmp_path):
    """With no checkpoint to read, a resume starts over from the run's config.json, under what it is given."""
    run_dir = tmp_path / "run"
    with pytest.raises(charrnn.DivergedError):
        charrnn.train(small_corpus, run_dir, TINY, steps=30, lr=1e38, clip_norm=0.0, log_every=1, eval_every=100)
    assert not checkpoint.step_files(run_dir / "checkpoints")
    summary = charrnn.train(resume=run_dir, steps=4, lr=1e-2, clip_norm=1.0)
    assert summary.status == "finished" and summary.steps == 4
    config = charrnn.load(run_dir).config
    assert config.model == config_lib.resolve(TINY, [], {}).model
    train = config.train
    assert (train.batch_size, train.seq_len, train.eval_every, train.lr) == (8, 16, 100, 1e-2)  # saved, then given


def test_a_resume_that_would_end_before_where_the_run_is_is_refused(cli, small_corpus, tmp_path):
    """train.steps and train.max_epochs are the run's totals: a resume to fewer refuses, and leaves the run alone."""
    train_ten_steps(cli, small_corpus)
    metrics = (tmp_path / "run" / rundir.METRICS_FILE).read_text()
    steps_per_epoch = training.load_task(small_corpus, config_lib.resolve(TINY, [], {})).steps_per_epoch
    capped = math.ceil(0.1 * steps_per_epoch)
    assert capped < 10
    for keys, last in (({"steps": 5}, 5), ({"steps": 20, "max_epochs": 0.1}, capped)):
        with pytest.raises(charrnn.UsageError, match=f"is at step 10; .* end it at step {last},"):
            charrnn.train(resume=tmp_path / "run", **keys)
    assert (tmp_path / "run" / rundir.METRICS_FILE).read_text() == metrics


def test_the_budget_spans_resumes(cli, small_corpus, tmp_path):
    train_ten_steps(cli, small_corpus)
    spent = checkpoint.read_latest(tmp_path / "run" / "checkpoints")[2]["elapsed_s"]
    assert spent > 0
    resumed = cli("train", "--resume", "run", "--steps", "1000", "--minutes", str(spent / 2 / 60), "--json")
    assert resumed.code == 0, resumed.err
    assert json.loads(resumed.out.splitlines()[-1])["steps"] == 10  # the budget was spent before the resume


def test_a_checkpoint_counts_the_evaluation_it_follows(small_corpus, tmp_path, monkeypatch):
    """On a clock that moves only in the evaluations, 100 s each: the checkpoint saved after one holds its time, so a
    resume counts it against the budget."""
    from charrnn import loop

    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    evaluate = steps.evaluate

    def timed_evaluation(*args, **kwargs):
        now[0] += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(steps, "evaluate", timed_evaluation)
    run_dir = tmp_path / "run"
    charrnn.train(small_corpus, run_dir, TINY, steps=6, eval_every=3, log_every=3, keep=10)
    spent = [checkpoint.read(checkpoint.step_path(run_dir / "checkpoints", step))[1]["elapsed_s"] for step in (3, 6)]
    assert spent == [100.0, 200.0]


def test_training_chars_per_s_leaves_out_compiling_and_the_evaluations(small_corpus, tmp_path, monkeypatch):
    """On a clock that moves only where the run does: 50 s in a call that compiles its shapes as it is dispatched
    (the first call of 2 steps, and the last, of 1), 1 s in each other call, 100 s in each evaluation. Steady
    training is the 5 steps after the first call in the 2 s that did not compile."""
    from charrnn import loop

    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    compile_train_call, evaluate = steps.compile_train_call, steps.evaluate

    def timed_calls(*args, **kwargs):
        call, compiled = compile_train_call(*args, **kwargs), set()

        def timed(state, carry, batches, lrs):
            now[0] += 1.0 if lrs.shape in compiled else 50.0
            compiled.add(lrs.shape)
            return call(state, carry, batches, lrs)
        return timed

    def timed_evaluation(*args, **kwargs):
        now[0] += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(steps, "compile_train_call", timed_calls)
    monkeypatch.setattr(steps, "evaluate", timed_evaluation)
    summary = charrnn.train(small_corpus, tmp_path / "run", TINY, steps=7, eval_every=3, log_every=3,
                            steps_per_call=2)
    tiny = config_lib.resolve(TINY, [], {}).train
    assert summary.train_chars_per_s == pytest.approx(5 * tiny.batch_size * tiny.seq_len / 2)
