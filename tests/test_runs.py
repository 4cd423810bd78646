"""Comparing runs: discovery, table rows of finished / interrupted / diverged runs, sorting, CSV, curves, plots."""

import csv
import io
import json
import importlib.util
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import REPO, TINY, run_in_process, run_subprocess, start_subprocess, subprocess_env
from conftest import SAMPLE_TEXT

from charrnn import config, rundir, runs
from charrnn.errors import UsageError

# One thread each: the four runs train at once.
COMMON = ["--config", TINY, "--steps", "20", "--set", "train.eval_every=10", "--set", "train.log_every=5", "--quiet",
          "--threads", "1"]
# Run directory name -> extra options; "gru, 32" has a comma and a space for CSV quoting.
SWEEP = {
    "lstm-32": [],
    "gru, 32": ["--cell", "gru"],
    "lstm-16": ["--hidden", "16"],
    "diverged": ["--lr", "1e38", "--set", "train.clip_norm=0"],
}
CHARS_PER_STEP = 8 * 16  # tiny.toml's batch_size * seq_len


def _interrupt(run_dir, last_step: int) -> None:
    """Make a finished run look killed after `last_step`: status "running" with no lock, metrics cut there."""
    records = [record for record in rundir.read_metrics(run_dir) if record["step"] <= last_step]
    (run_dir / rundir.METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
    rundir.write_status(run_dir, rundir.RUNNING, {"pid": 0, "step": 10})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four runs trained by the real CLI, in parallel; lstm-16 then made to look interrupted at step 15."""
    root = tmp_path_factory.mktemp("sweep")
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    processes = {name: start_subprocess("train", corpus, *COMMON, *extra, "--out", f"runs/{name}", cwd=root)
                 for name, extra in SWEEP.items()}
    summaries = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == (5 if name == "diverged" else 0), err
        summaries[name] = json.loads(out.splitlines()[-1]) if process.returncode == 0 else None
    _interrupt(root / "runs" / "lstm-16", last_step=15)
    return root, summaries


@pytest.fixture(scope="module")
def rows(sweep):
    root, _ = sweep
    return {Path(row["run"]).name: row for row in runs.collect(runs.find_runs([root / "runs"]))}


def test_find_runs_takes_runs_and_their_parents_once_each(sweep):
    root, _ = sweep
    every = [root / "runs" / name for name in sorted(SWEEP)]
    assert runs.find_runs([root / "runs"]) == every
    assert runs.find_runs([root / "runs" / "lstm-32", root / "runs", root / "runs" / "lstm-32"]) == every
    assert runs.find_runs([root / "runs" / "lstm-32"]) == [root / "runs" / "lstm-32"]
    for bad in (root, root / "nowhere"):  # run directories are looked for one level down only
        with pytest.raises(UsageError) as caught:
            runs.find_runs([bad])
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_runs_named_by_no_path_are_those_under_runs(sweep, capsys, tmp_path, monkeypatch):
    root, _ = sweep
    monkeypatch.chdir(root)
    assert runs.find_runs() == runs.find_runs([Path("runs")]) == [Path("runs") / name for name in sorted(SWEEP)]
    listed = run_in_process(capsys, "runs", "--json")
    assert listed.code == 0 and [row["run"] for row in json.loads(listed.out)] == [
        row["run"] for row in json.loads(run_in_process(capsys, "runs", "runs", "--json").out)]
    monkeypatch.chdir(tmp_path)  # no runs/ here
    for command in ("runs", "plot"):
        result = run_in_process(capsys, command)
        assert result.code == 2
        assert result.err.strip() == "charrnn: error: no runs under runs/ (train one, or name run directories)"
        assert not any(tmp_path.iterdir())  # plot wrote no image


def test_finished_rows_hold_the_summary_and_the_config(sweep, rows):
    _, summaries = sweep
    for name in ("lstm-32", "gru, 32"):
        row, summary = rows[name], summaries[name]
        assert row["status"] == "finished" and row["steps"] == 20
        for column in ("best_val_loss", "best_val_bpc", "final_val_bpc", "wall_s"):
            assert row[column] == summary[column], column
        assert row["chars_per_s"] == summary["train_chars_per_s"] > 0
        assert row["train.steps"] == 20 and row["model.hidden_size"] == 32
    assert rows["gru, 32"]["model.cell"] == "gru" and rows["lstm-32"]["model.cell"] == "lstm"


def test_interrupted_row_comes_from_metrics(sweep, rows):
    root, _ = sweep
    row = rows["lstm-16"]
    records = rundir.read_metrics(root / "runs" / "lstm-16")
    (evaluation,) = [record for record in records if record["event"] == "eval"]
    speeds = sorted(record["chars_per_s"] for record in records if record["event"] == "train")
    assert row["status"] == "interrupted" and row["model.hidden_size"] == 16
    assert row["steps"] == 15  # the last logged step, past the step status.json was written at
    assert row["best_val_loss"] == evaluation["val_loss"]
    assert row["best_val_bpc"] == pytest.approx(evaluation["val_bpc"]) == row["final_val_bpc"]
    assert row["chars_per_s"] == speeds[1]  # the median of three windows
    assert row["wall_s"] == records[-1]["elapsed_s"]


def test_a_row_from_metrics_takes_its_losses_from_evaluations_of_the_whole_split(tmp_path):
    """Evaluations of the split's first part (`train.eval_fraction`) are not comparable with the whole's: a run
    without a summary takes its best and final losses from the whole's only."""
    rundir.create(tmp_path)
    rundir.write_status(tmp_path, rundir.RUNNING, {"pid": 0, "step": 30})  # running with no lock: interrupted
    log = log_train(tmp_path, ((1000, 3.0), (2000, 2.5), (3000, 2.2)))
    for step, loss, fraction in ((10, 1.9, 1.0), (20, 1.2, 0.25), (30, 1.7, 1.0), (40, 1.1, 0.25)):
        log.write({"event": "eval", "step": step, "val_loss": loss, "val_bpc": loss / math.log(2),
                   "chars_seen": step * 100, "fraction": fraction})
    (row,) = runs.collect([tmp_path])
    assert row["best_val_loss"] == 1.7 and row["final_val_bpc"] == pytest.approx(1.7 / math.log(2))
    curve = runs.curves(tmp_path)
    assert curve["val"]["chars_seen"] == [1000, 3000] and curve["val_part"]["chars_seen"] == [2000, 4000]


def test_a_row_from_metrics_takes_the_lowest_loss_and_the_last_evaluation(tmp_path):
    """An interrupted run that got worse after its best evaluation: best is the lowest loss, final the last one's bpc;
    records from before `train.eval_fraction` have no "fraction" and scored the whole split; status.json's step,
    past the last record's, is how far it got."""
    rundir.create(tmp_path)
    rundir.write_status(tmp_path, rundir.RUNNING, {"pid": 0, "step": 35})  # running with no lock: interrupted
    log = log_train(tmp_path, ((1000, 3.0),))
    for step, loss in ((10, 1.9), (20, 1.5), (30, 1.7)):
        log.write({"event": "eval", "step": step, "val_loss": loss, "val_bpc": loss / math.log(2),
                   "chars_seen": step * 100})
    (row,) = runs.collect([tmp_path])
    assert row["steps"] == 35
    assert row["best_val_loss"] == 1.5 and row["best_val_bpc"] == pytest.approx(1.5 / math.log(2))
    assert row["final_val_bpc"] == pytest.approx(1.7 / math.log(2))


def test_a_gap_in_the_summary_keeps_the_summarys_other_values(tmp_path):
    """Only the summary's missing values come from the metrics; the values it has stay, though the metrics differ."""
    rundir.create(tmp_path)
    rundir.write_status(tmp_path, rundir.FINISHED, {"steps": 30, "best_val_loss": 1.5, "best_val_bpc": 2.0,
                                                    "final_val_bpc": 2.1, "train_chars_per_s": None, "wall_s": 99.0})
    log = rundir.MetricsLog(tmp_path)
    for step, speed in ((10, 100.0), (20, 300.0), (30, 200.0)):
        log.write({"event": "train", "step": step, "chars_per_s": speed, "elapsed_s": float(step)})
    log.write({"event": "eval", "step": 30, "val_loss": 1.8, "val_bpc": 2.6, "elapsed_s": 31.0})
    (row,) = runs.collect([tmp_path])
    assert row["chars_per_s"] == 200.0
    assert (row["steps"], row["best_val_loss"], row["best_val_bpc"], row["final_val_bpc"], row["wall_s"]) == (
        30, 1.5, 2.0, 2.1, 99.0)


def test_a_gap_in_the_summary_is_filled_from_metrics(sweep, tmp_path):
    root, summaries = sweep
    run_dir = tmp_path / "resumed"
    shutil.copytree(root / "runs" / "lstm-32", run_dir)
    # Resumed at its last step: the new session trained nothing, so its summary has no speed.
    rundir.write_status(run_dir, rundir.FINISHED, {**summaries["lstm-32"], "train_chars_per_s": None})
    speeds = [record["chars_per_s"] for record in rundir.read_metrics(run_dir) if record["event"] == "train"]
    (row,) = runs.collect([run_dir])
    assert row["chars_per_s"] == statistics.median(speeds)
    assert row["best_val_bpc"] == summaries["lstm-32"]["best_val_bpc"]


def test_a_run_of_one_compiled_call_reports_no_speed_rather_than_zero(small_corpus, tmp_path):
    """The steady speed is timed from the end of the first call (it compiles), so one call leaves nothing to time."""
    done = run_subprocess("train", small_corpus, "--config", TINY, "--steps", "2", "--set", "train.steps_per_call=4",
                          "--quiet", "--out", "once", cwd=tmp_path)
    assert done.code == 0, done.err
    assert json.loads(done.out)["train_chars_per_s"] is None
    assert runs.collect([tmp_path / "once"])[0]["chars_per_s"] != 0


def test_diverged_row_names_the_step_and_has_no_results(sweep, rows):
    root, _ = sweep
    row = rows["diverged"]
    (diverged_at,) = [record["step"] for record in rundir.read_metrics(root / "runs" / "diverged")
                      if record["event"] == "diverged"]
    assert row["status"] == "diverged" and row["steps"] == diverged_at
    assert row["best_val_loss"] is row["best_val_bpc"] is row["chars_per_s"] is None
    assert row["train.lr"] == 1e38 and row["train.clip_norm"] == 0


def test_differing_keys_and_table_columns(rows):
    every = list(rows.values())
    differing = ["model.cell", "model.hidden_size", "train.lr", "train.clip_norm"]
    assert runs.differing_keys(every) == differing
    assert runs.differing_keys([rows["lstm-32"], rows["gru, 32"]]) == ["model.cell"]
    assert runs.differing_keys([rows["lstm-32"]]) == []
    assert runs.table_columns(every) == ["run", *differing, "best_val_loss", "best_val_bpc", "chars_per_s", "steps",
                                         "wall_s", "status"]
    assert runs.labels([rows["lstm-32"], rows["lstm-16"]]) == ["model.hidden_size=32", "model.hidden_size=16"]
    assert runs.labels([rows["lstm-32"]]) == ["lstm-32"]
    watched = {**rows["lstm-16"], "train.tensorboard": "tensorboard"}  # the same model, also written for TensorBoard
    assert runs.differing_keys([rows["lstm-16"], watched]) == []


def test_sort_puts_missing_values_last_both_ways(rows):
    every = list(rows.values())
    for descending in (False, True):
        ordered = [row["best_val_bpc"] for row in runs.sort_rows(every, "best_val_bpc", descending)]
        assert ordered[-1] is None and ordered[:-1] == sorted(ordered[:-1], reverse=descending)
    by_size = runs.sort_rows(every, "model.hidden_size", descending=True)
    assert [row["model.hidden_size"] for row in by_size] == [32, 32, 32, 16]
    assert [row["run"] for row in by_size[:3]] == [row["run"] for row in every if row["model.hidden_size"] == 32]
    assert [row["status"] for row in runs.sort_rows(every, "status")] == ["diverged", "finished", "finished",
                                                                          "interrupted"]
    with pytest.raises(UsageError) as caught:
        runs.sort_rows(every, "bpc")
    assert "'bpc'" in str(caught.value) and "best_val_bpc" in str(caught.value) and caught.value.exit_code == 2


def test_csv_parses_back_to_the_same_values(rows):
    every = list(rows.values())
    columns = runs.table_columns(every)
    header, *lines = list(csv.reader(io.StringIO(runs.to_csv(every, columns))))
    assert header == columns and len(lines) == len(every)
    for row, line in zip(every, lines):
        for column, text in zip(columns, line, strict=True):
            value = row[column]
            if value is None:
                assert text == "", column
            elif isinstance(value, float):
                assert float(text) == value, column  # every digit kept
            else:
                assert text == str(value), column


def test_curves_are_bits_per_char_against_characters_seen(sweep):
    root, _ = sweep
    curve = runs.curves(root / "runs" / "lstm-32")
    records = rundir.read_metrics(root / "runs" / "lstm-32")
    assert curve["train"]["chars_seen"] == [step * CHARS_PER_STEP for step in (5, 10, 15, 20)]
    assert curve["train"]["bpc"] == [record["bpc"] for record in records if record["event"] == "train"]
    assert curve["val"]["chars_seen"] == [10 * CHARS_PER_STEP, 20 * CHARS_PER_STEP]
    assert curve["val"]["val_bpc"] == [record["val_bpc"] for record in records if record["event"] == "eval"]
    assert runs.curves(root / "runs" / "diverged") == {"train": {"chars_seen": [], "bpc": []},
                                                       "val": {"chars_seen": [], "val_bpc": []},
                                                       "val_part": {"chars_seen": [], "val_bpc": []}}


def log_train(run_dir, points) -> rundir.MetricsLog:
    """`run_dir`'s metrics log with a train record for each (chars_seen, bpc) point, a step per 100 characters."""
    log = rundir.MetricsLog(run_dir)
    for chars_seen, bpc in points:
        log.write({"event": "train", "step": chars_seen // 100, "bpc": bpc, "chars_seen": chars_seen})
    return log


def test_curves_of_a_resumed_run_keep_the_newer_points(tmp_path):
    # Killed after 3000 characters, resumed from the checkpoint at 2000: 2500 and 3000 are logged again.
    log_train(tmp_path, ((1000, 4.0), (2000, 3.0), (3000, 2.5), (2500, 2.9), (3000, 2.6), (3500, 2.4)))
    curve = runs.curves(tmp_path)["train"]
    assert curve == {"chars_seen": [1000, 2000, 2500, 3000, 3500], "bpc": [4.0, 3.0, 2.9, 2.6, 2.4]}
    (tmp_path / "again").mkdir()
    # Killed just after logging 2000, which the resume logs again.
    log_train(tmp_path / "again", ((1000, 4.0), (2000, 3.0), (2000, 2.95), (3000, 2.5)))
    assert runs.curves(tmp_path / "again")["train"] == {"chars_seen": [1000, 2000, 3000], "bpc": [4.0, 2.95, 2.5]}


def test_plot_writes_a_png(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from charrnn.plot import plot_runs

    root, _ = sweep
    output = tmp_path / "curves.png"
    plot_runs(runs.find_runs([root / "runs"]), output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(output).shape
    assert height > 0 and width > 0
    with pytest.raises(UsageError):
        plot_runs([root / "runs" / "lstm-32"], output, labels=["one", "two"])
    with pytest.raises(UsageError) as caught:
        plot_runs([root / "runs" / "lstm-32"], tmp_path / "curves.xyz")
    assert ".png" in str(caught.value)


def test_plot_labels_each_run_and_draws_bits_on_the_axis_asked_for(tmp_path):
    """Legend entries are the labels given, with the status of a run that did not finish (a run's evaluations of
    validation's first part add none); log_scale labels the ticks inside the decade; an image format is its
    suffix in any case, and PNG without one."""
    matplotlib = pytest.importorskip("matplotlib")
    from charrnn.plot import plot_runs

    run_dirs = [tmp_path / "done", tmp_path / "killed"]
    for run_dir, status in zip(run_dirs, (rundir.FINISHED, rundir.RUNNING)):
        rundir.create(run_dir)
        rundir.write_status(run_dir, status, {"pid": 0, "step": 20})  # running with no lock: interrupted
        log = log_train(run_dir, ((1000, 0.5), (2000, 20.0)))
        log.write({"event": "eval", "step": 10, "val_bpc": 3.5, "chars_seen": 1000, "fraction": 0.25})
        log.write({"event": "eval", "step": 20, "val_bpc": 3.0, "chars_seen": 2000})

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        plot_runs(run_dirs, tmp_path / "curves.SVG", labels=["first", "second"], log_scale=True)
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", (tmp_path / "curves.SVG").read_text(encoding="utf-8"))
    assert texts[-2:] == ["first", "second (interrupted)"]
    assert {"2", "3", "4"} <= set(texts) and "2.5" not in texts  # a linear axis would have 0.0, 2.5, ... 20.0
    plot_runs(run_dirs, tmp_path / "curves")
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(sweep, tmp_path, monkeypatch):
    from charrnn.plot import plot_runs

    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` fail
    root, _ = sweep
    with pytest.raises(UsageError) as caught:
        plot_runs([root / "runs" / "lstm-32"], tmp_path / "curves.png")
    assert "pip install -e '.[plot]'" in str(caught.value)
    assert not (tmp_path / "curves.png").exists()


def test_unreadable_metrics_and_config_give_empty_values(tmp_path):
    rundir.create(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text("{torn")
    (tmp_path / rundir.METRICS_FILE).write_text('{"event": "train", "step": 5, "chars_per_s": NaN}\n{"event": ')
    (row,) = runs.collect([tmp_path])
    assert row["status"] == "unknown" and row["steps"] == 5
    assert all(row[column] is None for column in ("best_val_loss", "chars_per_s", "wall_s"))
    assert runs.config_keys([row]) == []


def test_config_keys_a_run_predates_take_their_defaults(tmp_path):
    rundir.create(tmp_path)
    rundir.write_json(tmp_path / rundir.CONFIG_FILE, {"model": {"cell": "gru"}, "train": {"lr": 0.5}})
    (row,) = runs.collect([tmp_path])
    assert row["model.cell"] == "gru" and row["train.lr"] == 0.5
    assert row["model.hidden_size"] == config.ModelConfig().hidden_size and "sample.top_p" in row
    # What it ran with, not today's defaults.
    assert (row["model.norm"], row["model.dtype"], row["train.dropout_from_epoch"]) == ("none", "float32", 0.0)


def test_sweep_script_trains_every_combination_then_tables_and_plots(small_corpus, tmp_path):
    """examples/sweep.sh made tiny: 2 cells x 1 size, a table on stdout, a figure; run again, it keeps them."""
    plot = "curves.png" if importlib.util.find_spec("matplotlib") else ""
    env = subprocess_env(CONFIG=str(TINY), CORPUS=str(small_corpus), STEPS="10", OUT="runs/sweep", CELLS="rnn gru",
                         SIZES="8", PLOT=plot, CHARRNN=f"{sys.executable} -m charrnn")
    script = ["bash", str(REPO / "examples" / "sweep.sh")]
    first = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "runs" / "sweep"
    assert runs.find_runs([sweep_dir]) == [sweep_dir / name for name in ("gru-8", "rnn-8")]
    header, *table = first.stdout.splitlines()  # stdout holds the table alone
    assert header.split()[:2] == ["run", "model.cell"] and "model.hidden_size" not in header and len(table) == 2
    assert all(line.split()[-1] == "finished" for line in table)
    if plot:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(script, cwd=tmp_path, env={**env, "PLOT": ""}, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished before, kept") == 2 and again.stdout == first.stdout


def test_the_commands_take_their_order_and_scale(tmp_path, capsys, monkeypatch):
    """`runs --sort KEY --desc` orders by KEY, largest first; `plot --log` asks for the logarithmic axis."""
    for name, hidden_size in (("a", 16), ("b", 64), ("c", 32)):
        rundir.create(tmp_path / "runs" / name)
        rundir.write_json(tmp_path / "runs" / name / rundir.CONFIG_FILE, {"model": {"hidden_size": hidden_size}})
    monkeypatch.chdir(tmp_path)
    for options, order in ((["--desc"], [64, 32, 16]), ([], [16, 32, 64])):
        listed = run_in_process(capsys, "runs", "--sort", "model.hidden_size", *options, "--json")
        assert [row["model.hidden_size"] for row in json.loads(listed.out)] == order
    import charrnn.plot

    drawn = []
    monkeypatch.setattr(charrnn.plot, "plot_runs", lambda run_dirs, output, log_scale: drawn.append(log_scale))
    for options in (["--log"], []):
        assert run_in_process(capsys, "plot", *options).code == 0
    assert drawn == [True, False]
