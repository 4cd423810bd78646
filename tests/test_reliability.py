"""Never lose a run: exact resume, graceful signals, divergence, one writer, kills at any moment."""

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from clihelp import TINY, assert_identical_arrays, checkpoint_arrays, final_arrays, logged_train_steps, run_subprocess, snapshot, start_subprocess

from charrnn import checkpoint, config as config_lib, rundir, training
from charrnn.errors import UsageError

# 16 streams x 16 chars: the small corpus gives 24 chunks per epoch, so runs cross epochs.
LAYOUT = ["--config", TINY, "--batch-size", "16", "--seq-len", "16", "--set", "train.log_every=5"]
# Where a checkpoint write can be killed (charrnn.atomic's fault points), in the order it reaches them.
WRITE_PHASES = ["before_write", "half_written", "written", "synced", "replaced"]


# Every kind of dropout and weight averaging: their masks follow the step, the average is saved and restored.
REGULARISED = ["--set", "model.locked_dropout=true", "--set", "model.embedding_dropout=0.1", "--set",
               "model.weight_drop=0.2", "--set", "train.ema=0.9"]


@pytest.mark.parametrize("options", [[], REGULARISED], ids=["plain", "regularised"])
def test_resume_continues_bit_identically(cli, small_corpus, tmp_path, options):
    constant = [*LAYOUT, "--set", "train.schedule=constant", "--set", "train.eval_every=15",
                "--set", "model.dropout=0.1", "--set", "train.steps_per_call=2", *options]
    assert cli("train", small_corpus, *constant, "--steps", "40", "--out", "whole").code == 0
    assert cli("train", small_corpus, *constant, "--steps", "20", "--out", "split").code == 0
    resumed = cli("train", "--resume", "split", "--steps", "40")
    assert resumed.code == 0, resumed.err
    assert json.loads(resumed.out.splitlines()[-1])["steps"] == 40
    # The resumed session trains steps 21-40 only: a resume that started over
    # from the seed would reach the same arrays, having logged steps 5-20 twice.
    steps = logged_train_steps(tmp_path / "split")
    assert steps == logged_train_steps(tmp_path / "whole") and steps == sorted(set(steps)) and steps[-1] == 40
    assert_identical_arrays(final_arrays(tmp_path / "whole"), final_arrays(tmp_path / "split"))


def test_resume_starts_from_the_checkpoint_it_finds(cli, small_corpus, tmp_path):
    """A resume continues from the checkpoint's own arrays: altered ones give a different end."""
    constant = [*LAYOUT, "--set", "train.schedule=constant", "--set", "train.eval_every=1000"]
    assert cli("train", small_corpus, *constant, "--steps", "20", "--out", "reference").code == 0
    shutil.copytree(tmp_path / "reference", tmp_path / "altered")
    assert cli("train", "--resume", "reference", "--steps", "30").code == 0

    [saved] = checkpoint.step_files(tmp_path / "altered" / "checkpoints")
    arrays, metadata = checkpoint.read(saved)
    name = next(name for name in arrays if name.startswith("params/") and name.endswith("w_h"))
    arrays[name] = arrays[name] + np.float32(0.01)
    checkpoint.write(saved, arrays, metadata)
    assert cli("train", "--resume", "altered", "--steps", "30").code == 0

    reference, altered = final_arrays(tmp_path / "reference"), final_arrays(tmp_path / "altered")
    assert reference.keys() == altered.keys()
    assert not np.array_equal(reference[name], altered[name])


def wait_for_line(path, pattern, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_resume_matches_uninterrupted(cli, small_corpus, tmp_path, signal_number, exit_code):
    args = [*LAYOUT, "--steps", "400", "--set", "train.eval_every=1000"]
    process = start_subprocess("train", small_corpus, *args, "--out", "stopped", cwd=tmp_path)
    wait_for_line(tmp_path / "stopped" / rundir.METRICS_FILE, '"event": "train"')
    process.send_signal(signal_number)
    process.send_signal(signal_number)  # a second signal must not break the save
    out, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    assert "--resume" in err and "Traceback" not in err
    assert rundir.read_status(tmp_path / "stopped")["status"] == rundir.INTERRUPTED
    stopped_at = int(checkpoint.read(checkpoint.step_files(tmp_path / "stopped" / "checkpoints")[-1])[1]["step"])
    assert 0 < stopped_at < 400

    assert cli("train", "--resume", "stopped").code == 0
    assert cli("train", small_corpus, *args, "--out", "whole").code == 0
    # None trained twice, and the interrupted window's losses logged (at the step the signal stopped it).
    stopped_steps, whole_steps = logged_train_steps(tmp_path / "stopped"), logged_train_steps(tmp_path / "whole")
    assert stopped_steps == sorted(set(stopped_steps)) and set(stopped_steps) - set(whole_steps) <= {stopped_at}
    assert set(whole_steps) <= set(stopped_steps) and stopped_at in stopped_steps
    assert_identical_arrays(final_arrays(tmp_path / "whole"), final_arrays(tmp_path / "stopped"))


def test_resume_refuses_changed_architecture_or_corpus(cli, small_corpus, tmp_path):
    assert cli("train", small_corpus, *LAYOUT, "--steps", "10", "--out", "run").code == 0
    before = snapshot(tmp_path / "run")
    fewer = cli("train", "--resume", "run", "--steps", "5")  # --steps is the total: the run is past it
    assert fewer.code == 2 and "at step 10" in fewer.err
    # So is --epochs: 24 steps an epoch, so a quarter of one ends at step 6.
    fewer_epochs = cli("train", "--resume", "run", "--epochs", "0.25")
    assert fewer_epochs.code == 2 and "at step 10" in fewer_epochs.err and "at step 6," in fewer_epochs.err
    wider = cli("train", "--resume", "run", "--hidden", "64")
    assert wider.code == 2 and "model.hidden_size" in wider.err
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text() + "more text", encoding="utf-8")
    moved = cli("train", other, "--resume", "run")
    assert moved.code == 2 and "corpus" in moved.err
    streams = cli("train", "--resume", "run", "--batch-size", "8")
    assert streams.code == 2 and "train.batch_size" in streams.err
    assert snapshot(tmp_path / "run") == before


def test_how_the_arithmetic_runs_may_change_on_resume():
    saved = config_lib.Config()
    for key, value in (("dtype", "bfloat16"), ("scan_unroll", 8), ("kernel", "pallas")):
        training._check_resumable(saved, dataclasses.replace(saved, model=dataclasses.replace(saved.model, **{key: value})))
    with pytest.raises(UsageError, match="model.hidden_size"):
        training._check_resumable(saved, dataclasses.replace(saved, model=dataclasses.replace(saved.model, hidden_size=64)))


def test_one_writer_per_run_directory(cli, small_corpus, tmp_path):
    assert cli("train", small_corpus, *LAYOUT, "--steps", "10", "--out", "run").code == 0
    again = cli("train", small_corpus, *LAYOUT, "--out", "run")
    assert again.code == 2 and "--resume" in again.err
    before = snapshot(tmp_path / "run")
    with rundir.RunLock(tmp_path / "run"):
        busy = cli("train", "--resume", "run", "--steps", "20", "--tensorboard")
    assert busy.code == 7 and "in use" in busy.err
    assert snapshot(tmp_path / "run") == before  # not even a TensorBoard file beside the live run's


def test_divergence_stops_with_its_own_code_and_keeps_good_checkpoints(cli, small_corpus, tmp_path):
    assert cli("train", small_corpus, *LAYOUT, "--steps", "10", "--out", "run").code == 0
    good = final_arrays(tmp_path / "run")
    diverged = cli("train", "--resume", "run", "--steps", "30", "--lr", "1e38", "--set", "train.clip_norm=0")
    assert diverged.code == 5, diverged.err
    assert "non-finite" in diverged.err and "step-000000010" in diverged.err
    assert rundir.read_status(tmp_path / "run")["status"] == rundir.DIVERGED
    for path in (tmp_path / "run" / "checkpoints").glob("*.safetensors"):
        assert all(np.isfinite(array).all() for array in checkpoint_arrays(path).values() if array.dtype.kind == "f")
    assert_identical_arrays(good, final_arrays(tmp_path / "run"))


def test_a_validation_loss_that_is_not_finite_is_a_divergence(cli, small_corpus, tmp_path, monkeypatch):
    """Finite training losses can still give a model that scores inf: the run stops as diverged, in strict JSON."""
    assert cli("train", small_corpus, *LAYOUT, "--steps", "10", "--out", "run").code == 0
    from charrnn import steps

    monkeypatch.setattr(steps, "evaluate", lambda *args, **kwargs: float("inf"))
    diverged = cli("train", "--resume", "run", "--steps", "30", "--set", "train.eval_every=5")
    assert diverged.code == 5, diverged.err
    stopped_at = int(re.search(r"validation loss became non-finite at step (\d+)", diverged.err).group(1))
    assert 10 < stopped_at < 30 and "step-000000010" in diverged.err
    assert rundir.read_status(tmp_path / "run")["status"] == rundir.DIVERGED
    records = [json.loads(line, parse_constant=pytest.fail)  # NaN / Infinity are not JSON
               for line in (tmp_path / "run" / rundir.METRICS_FILE).read_text().splitlines()]
    assert (records[-1]["event"], records[-1]["step"]) == ("diverged", stopped_at)
    assert not [record for record in records if record.get("event") == "eval" and record["step"] > 10]


def reported_saves(stderr: str) -> list[int]:
    return [int(step) for step in re.findall(r"saved step-(\d+)", stderr)]


@pytest.mark.parametrize("phase", WRITE_PHASES)
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(small_corpus, tmp_path, phase):
    result = run_subprocess("train", small_corpus, *LAYOUT, "--steps", "40", "--set", "train.eval_every=5",
                            "--set", "train.keep=2", "--out", "run", cwd=tmp_path,
                            **{checkpoint.FAULT_ENV: f"{phase}@3"})
    assert result.code == -signal.SIGKILL
    saved = reported_saves(result.err)
    path, _, metadata, _ = checkpoint.read_latest(tmp_path / "run" / "checkpoints")
    assert metadata["step"] >= max(saved)
    resumed = run_subprocess("train", "--resume", "run", "--quiet", cwd=tmp_path)
    assert resumed.code == 0, resumed.err
    assert json.loads(resumed.out)["steps"] == 40


@pytest.mark.parametrize("write", [3, 4])
def test_a_kill_between_the_best_copy_and_the_step_checkpoint_leaves_the_best_copy_true(small_corpus, tmp_path,
                                                                                         write):
    """After a kill at any write of an improving save, and a resume, best.safetensors holds the best loss."""
    args = [*LAYOUT, "--steps", "10", "--set", "train.eval_every=5", "--set", "train.schedule=constant"]
    killed = run_subprocess("train", small_corpus, *args, "--out", "run", cwd=tmp_path,
                            **{checkpoint.FAULT_ENV: f"before_write@{write}"})
    assert killed.code == -signal.SIGKILL
    resumed = run_subprocess("train", "--resume", "run", "--quiet", cwd=tmp_path)
    assert resumed.code == 0, resumed.err

    _, _, final, _ = checkpoint.read_latest(tmp_path / "run" / "checkpoints")
    _, best = checkpoint.read(tmp_path / "run" / "checkpoints" / rundir.BEST_FILE)
    evals = {record["step"]: record["val_loss"] for record in rundir.read_metrics(tmp_path / "run")
             if record.get("event") == "eval"}
    assert final["best_val_loss"] == min(evals.values()) == best["val_loss"]
    assert evals[best["step"]] == best["val_loss"]


def kill_after_reported_saves(process, saves: float, delay_s: float) -> str:
    """SIGKILL `process` `delay_s` after its stderr reports `saves` saves (0: after its first line); return stderr.

    Progress, not time, says when: on a slow machine as on a fast one, the kill comes after what was asked.
    A thread reads stderr as it comes, so that the child never blocks on a full pipe.
    """
    lines, reached = [], threading.Event()

    def read() -> None:
        reported = 0
        for line in process.stderr:
            lines.append(line)
            reported += len(reported_saves(line))
            if reported >= saves:
                reached.set()
        reached.set()  # it ended by itself (or killed itself at a fault point)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(timeout=300), "the run reported nothing"  # a guard against a hang only
        time.sleep(delay_s)
    finally:
        process.kill()
        reader.join()
        process.communicate(timeout=60)
    return "".join(lines)


def test_random_sigkills_never_lose_a_reported_checkpoint(small_corpus, tmp_path):
    """Sessions killed after a random number of saves, or inside a random write, never lose a reported save."""
    kills = int(os.environ.get("CHARRNN_SOAK_KILLS", "12"))
    rng = random.Random(0)
    args = [*LAYOUT, "--steps", "100000", "--set", "train.eval_every=3", "--set", "train.keep=2"]
    newest_reported = 0
    for kill in range(kills):
        command = ["train", "--resume", "run"] if kill else ["train", small_corpus, *args, "--out", "run"]
        if kill and rng.random() < 0.5:  # the session kills itself at a phase of its n-th checkpoint write
            fault = {checkpoint.FAULT_ENV: f"{rng.choice(WRITE_PHASES)}@{rng.randint(1, 6)}"}
            saves, delay_s = math.inf, 0.0
        else:  # after 0-3 saves (0: while it starts or resumes), at a random moment of the save cycle; the
            # first session saves once at least, so that every later one has a checkpoint to resume
            fault, saves, delay_s = {}, rng.randint(0 if kill else 1, 3), rng.uniform(0.0, 0.3)
        process = start_subprocess(*command, cwd=tmp_path, **fault)
        err = kill_after_reported_saves(process, saves, delay_s)
        assert process.returncode == -signal.SIGKILL, err
        newest_reported = max([newest_reported, *reported_saves(err)])
        _, _, metadata, skipped = checkpoint.read_latest(tmp_path / "run" / "checkpoints")
        assert metadata["step"] >= newest_reported
        assert skipped == []
        checkpoint.read(tmp_path / "run" / "checkpoints" / rundir.BEST_FILE)  # whole, old or new
    assert newest_reported > 0


def test_disk_full_during_save_keeps_the_previous_checkpoint(cli, small_corpus, tmp_path, monkeypatch):
    assert cli("train", small_corpus, *LAYOUT, "--steps", "10", "--out", "run").code == 0
    before = snapshot(tmp_path / "run" / "checkpoints")
    monkeypatch.setenv(checkpoint.FAULT_ENV, "enospc")
    full = cli("train", "--resume", "run", "--steps", "20")
    assert full.code == 6 and "No space left" in full.err
    assert snapshot(tmp_path / "run" / "checkpoints") == before
