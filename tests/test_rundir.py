"""The run directory: the one-writer lock, status, the metrics log, discovery, preparation."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from charrnn import rundir
from charrnn.errors import BusyError, CheckpointError, StorageError


def _busy(run_dir) -> None:
    with pytest.raises(BusyError) as caught:
        with rundir.RunLock(run_dir):
            pass
    assert caught.value.exit_code == 7 and str(run_dir) in str(caught.value)


def test_lock_is_exclusive_while_held(tmp_path):
    assert not rundir.is_locked(tmp_path)
    with rundir.RunLock(tmp_path):
        assert rundir.is_locked(tmp_path)
        _busy(tmp_path)
        assert rundir.is_locked(tmp_path)  # a refused second writer does not release the first
    assert not rundir.is_locked(tmp_path)
    with rundir.RunLock(tmp_path):  # released on exit: it can be taken again
        assert (tmp_path / rundir.LOCK_FILE).read_text() == str(os.getpid())


def test_a_lock_that_fails_closes_its_file(tmp_path, monkeypatch):
    """flock failing other than busy (here EIO) is a StorageError, and the file opened for it is closed again."""
    def failing(descriptor, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(rundir.fcntl, "flock", failing)
    open_files = len(os.listdir("/proc/self/fd"))
    with pytest.raises(StorageError, match="cannot lock run directory"):
        with rundir.RunLock(tmp_path):
            pass
    assert len(os.listdir("/proc/self/fd")) == open_files


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyError):
        with rundir.RunLock(tmp_path):
            raise KeyError("boom")
    assert not rundir.is_locked(tmp_path)


def test_the_lock_file_names_its_holder_not_an_earlier_one(tmp_path):
    (tmp_path / rundir.LOCK_FILE).write_text("4194304999")  # left by a holder with a longer pid
    with rundir.RunLock(tmp_path):
        assert (tmp_path / rundir.LOCK_FILE).read_text() == str(os.getpid())


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from charrnn.rundir import RunLock
    with RunLock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_lock_of_a_killed_process_is_released(tmp_path):
    rundir.write_status(tmp_path, rundir.RUNNING, {"step": 3})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert rundir.is_locked(tmp_path)
        _busy(tmp_path)
        assert rundir.read_status(tmp_path)["status"] == rundir.RUNNING
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not rundir.is_locked(tmp_path)
    assert rundir.read_status(tmp_path) == {"step": 3, "status": rundir.INTERRUPTED,
                                            "updated": rundir.read_json(tmp_path / rundir.STATUS_FILE)["updated"]}
    with rundir.RunLock(tmp_path):
        pass


@pytest.mark.parametrize(
    "status, locked, shown",
    [
        (rundir.RUNNING, False, rundir.INTERRUPTED),
        (rundir.RUNNING, True, rundir.RUNNING),
        (rundir.FINISHED, False, rundir.FINISHED),
        (rundir.DIVERGED, False, rundir.DIVERGED),
        (rundir.INTERRUPTED, True, rundir.INTERRUPTED),
    ],
)
def test_read_status(status, locked, shown, tmp_path):
    rundir.write_status(tmp_path, status, {"step": 42})
    if locked:
        with rundir.RunLock(tmp_path):
            got = rundir.read_status(tmp_path)
    else:
        got = rundir.read_status(tmp_path)
    assert got["status"] == shown and got["step"] == 42


@pytest.mark.parametrize("content", [None, b"", b'{"status": "runn'], ids=["missing", "empty", "torn"])
def test_unreadable_status_is_unknown(content, tmp_path):
    if content is not None:
        (tmp_path / rundir.STATUS_FILE).write_bytes(content)
    assert rundir.read_status(tmp_path) == {"status": "unknown"}


RECORDS = [{"event": "train", "step": 10, "loss": 2.5}, {"event": "eval", "step": 20, "val_loss": 1.75}, {"step": 30}]


TORN = ['{"event": "train", "st', "{", '{"step": 40}'[:-1]]


def _log_records(run_dir, torn: str) -> None:
    """Append RECORDS, a fresh writer each time, then a last line cut short by a crash."""
    for record in RECORDS:
        rundir.MetricsLog(run_dir).write(record)
    with open(run_dir / rundir.METRICS_FILE, "a", encoding="utf-8") as file:
        file.write(torn)


@pytest.mark.parametrize("torn", ["", *TORN])
def test_metrics_log_appends_and_skips_a_torn_line(torn, tmp_path):
    _log_records(tmp_path, torn)
    assert rundir.read_metrics(tmp_path) == RECORDS


@pytest.mark.parametrize("torn", TORN)
def test_metrics_written_after_a_torn_line_are_kept(torn, tmp_path):
    """A resumed run appends to the log of a crashed one; its first record must survive."""
    _log_records(tmp_path, torn)
    rundir.MetricsLog(tmp_path).write({"step": 50})
    assert rundir.read_metrics(tmp_path) == [*RECORDS, {"step": 50}]


def test_read_metrics_of_a_new_run_is_empty(tmp_path):
    assert rundir.read_metrics(tmp_path) == []


def test_metrics_log_to_a_vanished_directory_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError):
        rundir.MetricsLog(tmp_path / "absent").write({"step": 1})


def _make_run(root, name, status_mtime=None, checkpoint=True, config=True):
    run_dir = root / name
    rundir.create(run_dir)
    if config:
        (run_dir / rundir.CONFIG_FILE).write_text(json.dumps({}), encoding="utf-8")
    if checkpoint:
        (rundir.checkpoints_dir(run_dir) / "step-000000010.safetensors").write_bytes(b"x")
    if status_mtime is not None:
        rundir.write_status(run_dir, rundir.FINISHED, {})
        os.utime(run_dir / rundir.STATUS_FILE, (status_mtime, status_mtime))
    return run_dir


@pytest.mark.parametrize("newest", ["a", "b", "c"])
def test_newest_run_picks_the_most_recent(newest, tmp_path):
    base = 1_700_000_000
    runs = {name: _make_run(tmp_path, name, base + (1000 if name == newest else index))
            for index, name in enumerate("abc")}
    # Newer directories that are not usable runs are passed over.
    _make_run(tmp_path, "no-checkpoint", base + 5000, checkpoint=False)
    _make_run(tmp_path, "no-config", base + 5000, config=False)
    (tmp_path / "stray-file").write_text("x")
    assert rundir.newest_run(tmp_path) == runs[newest]


def test_newest_run_passes_over_a_run_killed_before_its_first_step_checkpoint(tmp_path):
    """A first save writes the best copy, then the step checkpoint: a kill between leaves no step file to load."""
    older = _make_run(tmp_path, "older", 1_700_000_000)
    killed = _make_run(tmp_path, "killed", 1_700_005_000, checkpoint=False)
    for name in (rundir.BEST_FILE, ".tmp-step-000000010.safetensors.4242"):
        (rundir.checkpoints_dir(killed) / name).write_bytes(b"x")
    assert rundir.newest_run(tmp_path) == older


@pytest.mark.parametrize("setup", [lambda root: None, lambda root: _make_run(root, "empty", 1, checkpoint=False)],
                         ids=["no_runs", "no_checkpoints"])
def test_newest_run_raises_without_runs(setup, tmp_path):
    setup(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        rundir.newest_run(tmp_path)
    assert caught.value.exit_code == 4 and str(tmp_path) in str(caught.value)


def test_prepare_creates_a_clean_run_directory(tmp_path):
    run_dir = tmp_path / "runs" / "first"
    rundir.create(run_dir)
    assert rundir.checkpoints_dir(run_dir).is_dir()
    assert os.listdir(run_dir) == [rundir.CHECKPOINTS]  # the write probe is gone


@pytest.mark.parametrize("below", ["run", "runs/run"])
def test_prepare_refuses_an_unwritable_location(below, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError) as caught:
        rundir.create(blocker / below)
    assert caught.value.exit_code == 6 and str(blocker / below) in str(caught.value)


def test_new_run_dir_claims_a_name_no_other_run_gets(tmp_path):
    """Made, not only named: three runs started in one second (a sweep's `&`) get three directories."""
    made = [rundir.new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert len(set(made)) == 3
    assert all(run_dir.is_dir() and not any(run_dir.iterdir()) and run_dir.parent == tmp_path / "runs"
               for run_dir in made)


def test_a_runs_folder_that_cannot_be_made_is_a_storage_error(tmp_path):
    (tmp_path / "runs").symlink_to(tmp_path / "nowhere" / "runs")  # a dangling link where runs/ would be
    with pytest.raises(StorageError) as caught:
        rundir.new_run_dir(tmp_path / "runs")
    assert caught.value.exit_code == 6


def test_runs_started_together_without_out_each_train(small_corpus, tmp_path):
    from clihelp import TINY, start_subprocess

    processes = [start_subprocess("train", small_corpus, "--config", TINY, "--steps", "2", "--threads", "1",
                                  "--quiet", cwd=tmp_path) for _ in range(3)]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err for _, err in results]
    assert len({json.loads(out)["run_dir"] for out, _ in results}) == 3


def test_json_files_and_lines_hold_null_where_a_number_is_not_finite(tmp_path):
    """NaN and Infinity are not JSON: jq and JavaScript reject a line that holds them."""
    value = {"loss": float("nan"), "speeds": [float("inf"), 1.5], "nested": {"low": float("-inf")}, "steps": 3}
    expected = {"loss": None, "speeds": [None, 1.5], "nested": {"low": None}, "steps": 3}
    assert json.loads(rundir.strict_json(value), parse_constant=pytest.fail) == expected
    rundir.write_json(tmp_path / "status.json", value)
    assert json.loads((tmp_path / "status.json").read_text(), parse_constant=pytest.fail) == expected
    rundir.MetricsLog(tmp_path).write(value)
    assert json.loads((tmp_path / rundir.METRICS_FILE).read_text(), parse_constant=pytest.fail) == expected


def test_a_json_file_that_cannot_be_written_keeps_its_old_content(tmp_path, monkeypatch):
    """config.json and status.json are replaced whole or not at all: a failed write leaves the old file."""
    path = tmp_path / rundir.CONFIG_FILE
    rundir.write_json(path, {"model": {"hidden_size": 32}})
    old = path.read_bytes()

    def failing_fsync(descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError) as caught:
        rundir.write_json(path, {"model": {"hidden_size": 64}})
    assert caught.value.exit_code == 6 and str(path) in str(caught.value)
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]
