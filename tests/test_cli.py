"""End to end through the command line: train -> sample -> eval for every cell, in a temp directory."""

import json
import math

import pytest
from clihelp import TINY

from charrnn import checkpoint, rundir

STEPS = ["--steps", "20", "--set", "train.eval_every=10", "--set", "train.log_every=5"]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_train_sample_eval(cli, small_corpus, tmp_path, cell):
    result = cli("train", small_corpus, "--config", TINY, "--cell", cell, "--out", "runs/one", *STEPS)
    assert result.code == 0, result.err
    summary = json.loads(result.out.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["status"] == "finished"
    run_dir = tmp_path / "runs" / "one"
    saved = json.loads((run_dir / rundir.CONFIG_FILE).read_text())
    assert saved["model"]["cell"] == cell
    assert [path.name for path in checkpoint.step_files(run_dir / "checkpoints")] == ["step-000000020.safetensors"]
    assert (run_dir / "checkpoints" / rundir.BEST_FILE).exists()
    events = [json.loads(line)["event"] for line in (run_dir / rundir.METRICS_FILE).read_text().splitlines()]
    assert events.count("eval") == 2 and "train" in events

    # sample and eval find the newest run under ./runs by themselves
    sampled = cli("sample", "--length", "60", "--seed", "7", "--prime", "All:")
    assert sampled.code == 0, sampled.err
    assert sampled.out.startswith("All:") and len(sampled.out) == len("All:") + 60 + 1
    # Scoring the run's validation text (the corpus's last val_fraction, contiguous) with training's number
    # of streams repeats the final evaluation: same chunks, same compiled step on the same CPU device, same
    # float32 sums in the same order, and JSON keeps a float exactly. So the two agree bit for bit (measured:
    # a gap of 0.0 for every cell), and any change in what the loader hands back shows.
    text = small_corpus.read_text(encoding="utf-8")
    val_file = tmp_path / "val.txt"
    val_file.write_text(text[len(text) - int(len(text) * saved["train"]["val_fraction"]):], encoding="utf-8")
    scored = cli("eval", val_file, "--streams", saved["train"]["eval_batch_size"], "--json")
    assert scored.code == 0, scored.err
    figures = json.loads(scored.out)
    assert figures["chars"] == len(val_file.read_text(encoding="utf-8")) - 1
    assert figures["bits_per_char"] == pytest.approx(figures["nats_per_char"] / 0.6931471805599453)
    assert figures["nats_per_char"] == summary["final_val_loss"]


@pytest.fixture
def trained_run(cli, small_corpus, tmp_path):
    assert cli("train", small_corpus, "--config", TINY, "--out", "runs/one", *STEPS).code == 0
    return tmp_path / "runs" / "one"


def test_sampling_is_reproducible(cli, trained_run):
    first = cli("sample", "-c", trained_run, "--seed", "3", "--length", "300")
    second = cli("sample", "-c", trained_run, "--seed", "3", "--length", "300")
    other = cli("sample", "-c", trained_run, "--seed", "4", "--length", "300")
    assert first.code == second.code == 0
    assert first.out == second.out and first.out != other.out
    greedy = [cli("sample", "-c", trained_run, "--temp", "0", "--seed", str(seed), "--length", "50").out for seed in (1, 2)]
    assert greedy[0] == greedy[1]


def test_batched_json_samples_and_stop(cli, trained_run):
    result = cli("sample", "-c", trained_run, "--num-samples", "3", "--length", "40", "--seed", "1", "--json")
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert all(len(line["text"]) == 40 for line in lines)
    assert len({line["text"] for line in lines}) == 3  # independent streams
    stopped = cli("sample", "-c", trained_run, "--length", "2000", "--seed", "1", "--stop", "\n")
    assert stopped.code == 0 and stopped.out.endswith("\n\n") and stopped.out.count("\n") == 2


def test_tiny_temperature_does_not_overflow(cli, trained_run):
    result = cli("sample", "-c", trained_run, "--temp", "1e-30", "--seed", "1", "--length", "50")
    greedy = cli("sample", "-c", trained_run, "--temp", "0", "--seed", "1", "--length", "50")
    assert result.code == 0 and result.out == greedy.out


def test_help_and_version(cli):
    for command in ("train", "sample", "eval"):
        result = cli(command, "--help")
        assert result.code == 0 and "Usage" in result.out
    bare = cli()  # no command: the list of commands, not silence
    assert bare.code == 0 and "Usage" in bare.out and "sample" in bare.out
    assert "Model" in cli("train", "-h").out and "Training" in cli("train", "-h").out
    assert cli("--version").out.startswith("charrnn ")


# Each first-class option of `train`, a value unlike tiny.toml's and the defaults', and the key it sets.
FIRST_CLASS = {"--cell": ("gru", "model.cell"), "--layers": ("1", "model.num_layers"),
               "--hidden": ("12", "model.hidden_size"), "--embedding": ("6", "model.embedding_size"),
               "--dropout": ("0.125", "model.dropout"), "--steps": ("2", "train.steps"),
               "--minutes": ("7.5", "train.max_minutes"), "--epochs": ("9.5", "train.max_epochs"),
               "--batch-size": ("4", "train.batch_size"), "--seq-len": ("12", "train.seq_len"),
               "--lr": ("0.004", "train.lr"), "--seed": ("5", "train.seed")}


def test_first_class_options_set_the_keys_they_name(cli, small_corpus, monkeypatch):
    """Each option reaches the config the run would train with (caught as the corpus is about to be read)."""
    from charrnn import config as config_lib
    from charrnn import training
    from charrnn.errors import UsageError

    resolved = []

    def stop_at_the_corpus(path, config, metadata=None):
        resolved.append(config_lib.to_dict(config))
        raise UsageError("stopped before reading the corpus")

    monkeypatch.setattr(training, "load_task", stop_at_the_corpus)
    options = [word for option, (value, _) in FIRST_CLASS.items() for word in (option, value)]
    result = cli("train", small_corpus, "--config", TINY, *options, "--out", "run")
    assert result.code == 2 and "stopped before reading the corpus" in result.err
    (saved,) = resolved
    for option, (value, key) in FIRST_CLASS.items():
        section, name = key.split(".")
        assert str(saved[section][name]) == value, option


def cosine_lr(train: dict, step: int, progress: float) -> float:
    """The lr of optimizer step `step` (0-based) at `progress` through the run, as the run's config sets it."""
    warmup = min(1.0, (step + 1) / train["warmup_steps"])
    final = train["final_lr_fraction"]
    return train["lr"] * warmup * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def test_time_budget_ends_training_with_the_schedule_at_its_end(cli, small_corpus, tmp_path):
    """The budget, not the step count, ends the run, and the lr follows the clock to the budget's end.

    Only what holds at any machine speed is checked, never how long past the budget the run took.
    The loop reads the clock at the top of each step, after the previous step's log record: a step
    starts only while the budget lasts, and its lr is the schedule's at a time between its own
    record's elapsed_s and the one before it.
    """
    common = ["--config", TINY, "--set", "train.schedule=cosine", "--set", "train.log_every=1",
              "--set", "train.eval_every=1000000"]
    # The same run compiled once beforehand: the timed run's first step loads it from the compilation cache,
    # so it ends sooner than the warm-up's did, and a budget at least that long leaves time for more steps.
    assert cli("train", small_corpus, *common, "--steps", "1", "--out", "warm").code == 0
    [first_step] = [record for record in rundir.read_metrics(tmp_path / "warm") if record["event"] == "train"]
    result = cli("train", small_corpus, *common, "--steps", "1000000",
                 "--minutes", str(max(4.0, first_step["elapsed_s"]) / 60), "--out", "timed")
    assert result.code == 0, result.err
    train = json.loads((tmp_path / "timed" / rundir.CONFIG_FILE).read_text())["train"]
    budget_s = train["max_minutes"] * 60.0  # to the last bit as the run has it
    summary = json.loads(result.out.splitlines()[-1])
    assert summary["status"] == "finished" and 2 <= summary["steps"] < 1000000
    assert summary["wall_s"] >= budget_s  # the final evaluation and save come after the budget, however long
    records = [record for record in rundir.read_metrics(tmp_path / "timed") if record["event"] == "train"]
    assert [record["step"] for record in records] == list(range(1, summary["steps"] + 1))
    assert all(record["elapsed_s"] < budget_s for record in records[:-1])  # no step began after the budget

    elapsed = [0.0, *(record["elapsed_s"] for record in records)]
    for step, record in enumerate(records):
        # Cosine over the budget, not over the steps (by which every step here is at the very start).
        earliest, latest = (max(step / train["steps"], seconds / budget_s) for seconds in elapsed[step:step + 2])
        assert cosine_lr(train, step, latest) - 1e-8 <= record["lr"] <= cosine_lr(train, step, earliest) + 1e-8, step


def test_output_without_a_terminal_has_no_control_codes(small_corpus, tmp_path):
    from clihelp import run_subprocess

    result = run_subprocess("train", small_corpus, "--config", TINY, *STEPS, "--out", "plain", cwd=tmp_path)
    assert result.code == 0, result.err
    assert "\x1b" not in result.err and "\x1b" not in result.out
    assert "step 5" in result.err and "val" in result.err  # periodic plain lines instead of a bar
    quiet = run_subprocess("train", small_corpus, "--config", TINY, *STEPS, "--out", "quiet", "--quiet", cwd=tmp_path)
    assert quiet.err == "" and json.loads(quiet.out)["status"] == "finished"


def test_paths_with_brackets_are_printed_as_they_are(cli, small_corpus, tmp_path):
    """Progress and messages print paths literally: "[/r]" is part of a name, not a closing style tag."""
    (tmp_path / "o[").mkdir()
    result = cli("train", small_corpus, "--config", TINY, "--steps", "4", "--out", "o[/r]")
    assert result.code == 0, result.err
    assert "into o[/r]" in result.err
    assert (tmp_path / "o[" / "r]" / "checkpoints").is_dir()
