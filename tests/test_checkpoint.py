"""Checkpoint files: pytree naming, bit-identical round trips, damage detection, atomic writes."""

import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from charrnn import checkpoint, config as config_lib, model, rundir
from charrnn.atomic import probe_writable
from charrnn.config import Config, ModelConfig
from charrnn.errors import CheckpointError, StorageError


class Carry(NamedTuple):
    h: jax.Array
    c: jax.Array


def _tree(seed: int = 0) -> dict:
    """A nested pytree of dicts, lists and NamedTuples with awkward values and dtypes."""
    rng = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.4e38], dtype=np.float32)  # incl. subnormal
    return {
        "params": {
            "embed": rng.standard_normal((5, 3)).astype(np.float32),
            "layers": [
                {"w": jnp.asarray(rng.standard_normal((3, 4)), dtype=jnp.float32), "b": special},
                {"w": rng.standard_normal((4, 4)).astype(np.float16), "b": np.zeros(4, np.float32)},
            ],
        },
        "carry": [Carry(jnp.ones((2, 4)), jnp.full((2, 4), -2.5))],
        "step": jnp.asarray(7 + seed, dtype=jnp.int32),  # 0-d
        "count": np.array(-3, dtype=np.int32),  # 0-d
        "ids": rng.integers(0, 255, size=(6,), dtype=np.uint8),
        "flags": np.array([True, False, True]),
    }


EXPECTED_NAMES = {
    "state/params/embed",
    "state/params/layers/0/w",
    "state/params/layers/0/b",
    "state/params/layers/1/w",
    "state/params/layers/1/b",
    "state/carry/0/h",
    "state/carry/0/c",
    "state/step",
    "state/count",
    "state/ids",
    "state/flags",
}


def _assert_bit_identical(restored, original) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def _checkpoint_error(function, *args) -> str:
    with pytest.raises(CheckpointError) as caught:
        function(*args)
    assert caught.value.exit_code == 4
    return str(caught.value)


def test_flatten_names_leaves_by_path():
    arrays = checkpoint.flatten(_tree(), "state")
    assert set(arrays) == EXPECTED_NAMES
    assert arrays["state/step"].shape == () and arrays["state/step"].dtype == np.int32


@pytest.mark.parametrize("as_template", [lambda leaf: leaf, lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)],
                         ids=["arrays", "shape_dtype_structs"])
def test_unflatten_restores_bit_identical_tree(as_template):
    tree = _tree()
    template = jax.tree.map(as_template, _tree(seed=1))  # same shapes, other values
    _assert_bit_identical(checkpoint.unflatten(template, "state", checkpoint.flatten(tree, "state")), tree)


@pytest.mark.parametrize(
    "damage",
    [
        lambda arrays: arrays.pop("state/carry/0/c"),
        lambda arrays: arrays.update({"state/carry/0/c": np.ones((2, 5), np.float32)}),
        lambda arrays: arrays.update({"state/carry/0/c": np.ones((2, 4), np.float16)}),
        lambda arrays: arrays.update({"state/carry/0/c": np.ones((8,), np.float32)}),
    ],
    ids=["missing", "wrong_shape", "wrong_dtype", "reshaped"],
)
def test_unflatten_names_the_array_that_does_not_fit(damage):
    arrays = checkpoint.flatten(_tree(), "state")
    damage(arrays)
    assert "state/carry/0/c" in _checkpoint_error(checkpoint.unflatten, _tree(), "state", arrays)


def test_unflatten_with_another_prefix_is_missing_arrays():
    arrays = checkpoint.flatten(_tree(), "params")
    assert "opt_state/" in _checkpoint_error(checkpoint.unflatten, _tree(), "opt_state", arrays)


METADATA = {"config": {"model": {"cell": "lstm", "hidden_size": 32}}, "vocab": "ab\n\u00e9\U0001f600", "step": 12,
            "val_loss": 1.25, "best_val_loss": None, "notes": [1, "two"]}


def test_write_read_round_trip(tmp_path):
    tree = _tree()
    path = tmp_path / "model.safetensors"
    checkpoint.write(path, checkpoint.flatten(tree, "state"), METADATA)
    arrays, metadata = checkpoint.read(path)
    _assert_bit_identical(checkpoint.unflatten(tree, "state", arrays), tree)
    assert {key: metadata[key] for key in METADATA} == METADATA
    assert metadata["format_version"] == checkpoint.FORMAT_VERSION
    assert len(metadata["sha256"]) == 64 and int(metadata["sha256"], 16) >= 0
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left


def test_metadata_read_back_can_be_written_again(tmp_path):
    """Re-saving new arrays with the metadata of a loaded checkpoint gives a readable file."""
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    checkpoint.write(old, checkpoint.flatten(_tree(0), "state"), METADATA)
    _, metadata = checkpoint.read(old)
    checkpoint.write(new, checkpoint.flatten(_tree(1), "state"), metadata)
    arrays, _ = checkpoint.read(new)
    _assert_bit_identical(checkpoint.unflatten(_tree(), "state", arrays), _tree(1))


def _payload(seed: int = 0, **metadata) -> bytes:
    return checkpoint.encode(checkpoint.flatten(_tree(seed), "state"), metadata)


def _data_start(payload: bytes) -> int:
    (header_size,) = struct.unpack("<Q", payload[:8])
    return 8 + header_size


def _flip_bit(payload: bytes, position: int) -> bytes:
    damaged = bytearray(payload)
    damaged[position] ^= 0x10
    return bytes(damaged)


def _other_version(monkeypatch, offset: int = 1) -> bytes:
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", checkpoint.FORMAT_VERSION + offset)
    payload = _payload()
    monkeypatch.undo()
    return payload


DAMAGED = [
    # (id, bytes from a good payload, what the message says)
    ("empty", lambda payload: b"", "empty"),
    ("cut_in_size", lambda payload: payload[:5], "truncated"),
    ("cut_after_size", lambda payload: payload[:8], "truncated"),
    ("cut_in_header", lambda payload: payload[:40], "truncated"),
    ("cut_before_header_end", lambda payload: payload[: _data_start(payload) - 1], "truncated"),
    ("cut_at_header_end", lambda payload: payload[: _data_start(payload)], "truncated"),
    ("cut_in_data", lambda payload: payload[: _data_start(payload) + 3], "truncated"),
    ("cut_last_byte", lambda payload: payload[:-1], "truncated"),
    ("flip_first_data_bit", lambda payload: _flip_bit(payload, _data_start(payload)), "checksum"),
    ("flip_mid_data_bit", lambda payload: _flip_bit(payload, (_data_start(payload) + len(payload)) // 2), "checksum"),
    ("flip_last_data_bit", lambda payload: _flip_bit(payload, len(payload) - 1), "checksum"),
    ("random_1", lambda payload: np.random.default_rng(1).bytes(1), "not a charrnn checkpoint"),
    ("random_64", lambda payload: np.random.default_rng(2).bytes(64), "not a charrnn checkpoint"),
    ("random_4096", lambda payload: np.random.default_rng(3).bytes(4096), "not a charrnn checkpoint"),
    ("json_text", lambda payload: b'{"step": 1}\n', "not a charrnn checkpoint"),
    ("plain_safetensors", lambda payload: save_safetensors({"w": np.ones(3, np.float32)}), "not a charrnn checkpoint"),
    ("metadata_not_an_object", lambda payload: save_safetensors({"w": np.ones(3, np.float32)}, {"charrnn": "[1, 2]"}),
     "not a charrnn checkpoint"),
]


@pytest.mark.parametrize("make, fragment", [case[1:] for case in DAMAGED], ids=[case[0] for case in DAMAGED])
def test_damaged_files_are_detected(make, fragment, tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(make(_payload()))
    message = _checkpoint_error(checkpoint.read, path)
    assert str(path) in message and fragment in message


@pytest.mark.parametrize("offset", [1, -1], ids=["newer", "older"])
def test_other_format_version_is_refused(tmp_path, monkeypatch, offset):
    path = tmp_path / "other.safetensors"
    path.write_bytes(_other_version(monkeypatch, offset))
    message = _checkpoint_error(checkpoint.read, path)
    assert f"format version {checkpoint.FORMAT_VERSION + offset}" in message and str(path) in message


def _retype_in_header(payload: bytes, old: str, new: str) -> bytes:
    """The payload with the first `old` in its safetensors header replaced by `new` (same length: offsets hold)."""
    start = _data_start(payload)
    header = payload[8:start].decode()
    assert len(old) == len(new) and old in header
    return payload[:8] + header.replace(old, new, 1).encode() + payload[start:]


@pytest.mark.parametrize("old, new", [('"dtype":"I32"', '"dtype":"F32"'), ('"shape":[2,4]', '"shape":[4,2]')],
                         ids=["dtype", "shape"])
def test_a_damaged_header_that_reinterprets_an_array_is_detected(old, new, tmp_path):
    """The same data bytes read as another dtype or shape are another array: the checksum covers both."""
    path = tmp_path / "retyped.safetensors"
    path.write_bytes(_retype_in_header(_payload(), old, new))
    message = _checkpoint_error(checkpoint.read, path)
    assert str(path) in message and "checksum" in message


def test_metadata_changed_where_it_still_parses_is_detected(tmp_path):
    """A digit of the saved metadata changed (the validation loss here) leaves valid JSON: its own checksum says so."""
    payload = _payload(val_loss=1.25)
    start = _data_start(payload)
    header = payload[8:start]
    assert header.count(b"1.25") == 1
    path = tmp_path / "changed.safetensors"
    path.write_bytes(payload[:8] + header.replace(b"1.25", b"9.25") + payload[start:])
    message = _checkpoint_error(checkpoint.read, path)
    assert str(path) in message and "metadata checksum" in message


def test_a_checkpoint_written_before_the_metadata_checksum_loads(tmp_path):
    arrays, metadata = checkpoint.decode(_payload(val_loss=1.25), "fresh")
    del metadata["metadata_sha256"]
    path = tmp_path / "older.safetensors"
    path.write_bytes(save_safetensors(arrays, {"charrnn": json.dumps(metadata)}))
    assert checkpoint.read(path)[1]["val_loss"] == 1.25


@pytest.mark.parametrize("name", ["missing.safetensors", "."], ids=["missing", "directory"])
def test_missing_checkpoint_is_refused(name, tmp_path):
    path = tmp_path / name
    assert str(path) in _checkpoint_error(checkpoint.read, path)


def test_enospc_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = _payload(seed=0)
    checkpoint.write_atomic(path, old)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "enospc")
    with pytest.raises(StorageError) as caught:
        checkpoint.write_atomic(path, _payload(seed=1))
    assert caught.value.exit_code == 6 and str(path) in str(caught.value)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]


def test_write_into_missing_directory_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError):
        checkpoint.write_atomic(tmp_path / "absent" / "model.safetensors", _payload())


def test_the_file_is_synced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    """The order that makes a write survive power loss: data on disk, then the name, then the name on disk."""
    path, payload = tmp_path / "model.safetensors", _payload()
    steps, fsync, replace = [], os.fsync, os.replace

    def synced(descriptor):
        kind = "directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        size = os.fstat(descriptor).st_size
        steps.append(("fsync", kind, size if kind == "file" else None))
        fsync(descriptor)

    def renamed(source, target):
        steps.append(("replace", Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    descriptors = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    checkpoint.write_atomic(path, payload)
    assert steps == [("fsync", "file", len(payload)), ("replace", path), ("fsync", "directory", None)]
    assert path.read_bytes() == payload and os.listdir(tmp_path) == [path.name]
    if descriptors is not None:
        assert len(os.listdir("/proc/self/fd")) == descriptors  # every descriptor it opened is closed


def test_a_probed_directory_is_made_with_its_parents_and_left_empty(tmp_path):
    directory = tmp_path / "runs" / "new"
    probe_writable(directory)
    assert directory.is_dir() and os.listdir(directory) == []
    (directory / "file").write_bytes(b"x")
    with pytest.raises(OSError):
        probe_writable(directory / "file" / "below")  # under a file: OSError, as documented


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from charrnn import checkpoint
    checkpoint.write_atomic(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes())
    """
)


@pytest.mark.parametrize(
    "fault, returncode, survivor",
    [
        ("before_write", -signal.SIGKILL, "old"),
        ("half_written", -signal.SIGKILL, "old"),
        ("written", -signal.SIGKILL, "old"),
        ("synced", -signal.SIGKILL, "old"),
        ("replaced", -signal.SIGKILL, "new"),
        ("none", 0, "new"),
    ],
)
def test_kill_while_writing_leaves_old_or_new(fault, returncode, survivor, tmp_path):
    path = checkpoint.step_path(tmp_path, 5)
    checkpoint.write(path, checkpoint.flatten(_tree(0), "state"), {"version": "old"})
    new = tmp_path / "new.bin"
    new.write_bytes(_payload(seed=1, version="new"))
    env = {**os.environ, checkpoint.FAULT_ENV: fault, "JAX_PLATFORMS": "cpu"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), str(new)], env=env, capture_output=True, timeout=60)
    assert child.returncode == returncode, child.stderr.decode()
    arrays, metadata = checkpoint.read(path)
    assert metadata["version"] == survivor
    _assert_bit_identical(checkpoint.unflatten(_tree(), "state", arrays), _tree(0 if survivor == "old" else 1))
    assert checkpoint.step_files(tmp_path) == [path]  # a leftover temporary file is never listed


def _write_steps(directory, steps) -> list:
    paths = [checkpoint.step_path(directory, step) for step in steps]
    for step, path in zip(steps, paths):
        checkpoint.write(path, checkpoint.flatten({"w": np.full(2, step, np.int32)}, "p"), {"step": step})
    return paths


def _clutter(directory) -> list:
    """Files that live beside step checkpoints: a temp file of a killed write, the best copy, notes."""
    names = [f"{checkpoint.TEMP_PREFIX}step-000000003{checkpoint.SUFFIX}.999", "best.safetensors", "notes.txt"]
    for name in names:
        (directory / name).write_bytes(b"x")
    return names


def test_step_files_are_ordered_by_step(tmp_path):
    steps = [10, 2, 1_000_000, 100, 9, 1_000_000_000, 999_999_999]  # past nine digits too
    _write_steps(tmp_path, steps)
    _clutter(tmp_path)
    assert checkpoint.step_files(tmp_path) == [checkpoint.step_path(tmp_path, step) for step in sorted(steps)]
    assert checkpoint.step_files(tmp_path / "absent") == []


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 10])
def test_rotate_keeps_the_newest(keep, tmp_path):
    steps = [1, 20, 300, 4000]
    _write_steps(tmp_path, steps)
    temp, best, notes = _clutter(tmp_path)
    checkpoint.rotate(tmp_path, keep)
    assert checkpoint.step_files(tmp_path) == [checkpoint.step_path(tmp_path, step) for step in steps[-keep:]]
    assert not (tmp_path / temp).exists()
    assert (tmp_path / best).exists() and (tmp_path / notes).exists()


def test_the_best_copy_is_the_last_checkpoint_saved_as_best(tmp_path):
    first, second = (checkpoint.flatten(_tree(seed), "state") for seed in (0, 1))
    rundir.checkpoints_dir(tmp_path).mkdir()
    for step, arrays, best in ((5, first, True), (10, second, True), (15, first, False)):
        checkpoint.save(tmp_path, step, arrays, {"step": step}, best=best, keep=1)
    arrays, metadata = checkpoint.read(rundir.checkpoints_dir(tmp_path) / rundir.BEST_FILE)
    assert metadata["step"] == 10 and arrays.keys() == second.keys()
    for name, value in second.items():
        np.testing.assert_array_equal(arrays[name], value)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_save_keeps_the_newest_keep_step_checkpoints_and_the_best_copy(keep, tmp_path):
    directory = rundir.checkpoints_dir(tmp_path)
    directory.mkdir()
    steps = [10, 20, 30, 40, 50]
    for step in steps:
        arrays = checkpoint.flatten({"w": np.full(2, step, np.int32)}, "p")
        checkpoint.save(tmp_path, step, arrays, {"step": step}, best=step == 20, keep=keep)
    assert checkpoint.step_files(directory) == [checkpoint.step_path(directory, step) for step in steps[-keep:]]
    assert checkpoint.read(directory / rundir.BEST_FILE)[1]["step"] == 20
    assert set(os.listdir(directory)) == {rundir.BEST_FILE, *(path.name for path in checkpoint.step_files(directory))}


def test_a_save_whose_best_copy_cannot_be_written_writes_no_step_checkpoint(tmp_path):
    """A step checkpoint records the best loss so far: it must not exist without the best copy it speaks of."""
    directory = rundir.checkpoints_dir(tmp_path)
    directory.mkdir()
    arrays = checkpoint.flatten(_tree(), "state")
    first = checkpoint.save(tmp_path, 10, arrays, {"step": 10}, best=False, keep=1)
    (directory / rundir.BEST_FILE).mkdir()  # the best copy's name is taken: its rename fails
    with pytest.raises(StorageError):
        checkpoint.save(tmp_path, 20, arrays, {"step": 20}, best=True, keep=1)
    assert checkpoint.step_files(directory) == [first]
    assert checkpoint.read_latest(directory)[2]["step"] == 10


@pytest.mark.parametrize("broken", [[], [3], [3, 2], [2]])
def test_read_latest_skips_broken_newer_files(broken, tmp_path):
    paths = _write_steps(tmp_path, [1, 2, 3])
    for step in broken:
        paths[step - 1].write_bytes(paths[step - 1].read_bytes()[:-10])
    path, arrays, metadata, problems = checkpoint.read_latest(tmp_path)
    newest_good = max(step for step in (1, 2, 3) if step not in broken)
    assert path == paths[newest_good - 1] and metadata["step"] == newest_good
    np.testing.assert_array_equal(arrays["p/w"], newest_good)
    skipped = [step for step in (3, 2, 1) if step > newest_good]
    assert len(problems) == len(skipped)
    for problem, step in zip(problems, skipped):
        assert str(paths[step - 1]) in problem


@pytest.mark.parametrize("steps", [[], [1, 2]])
def test_read_latest_raises_when_nothing_loads(steps, tmp_path):
    for path in _write_steps(tmp_path, steps):
        path.write_bytes(b"")
    assert str(tmp_path) in _checkpoint_error(checkpoint.read_latest, tmp_path)


def test_checkpoint_made_on_a_gpu_loads_and_samples_on_the_cpu():
    """tests/data/gpu_tiny_lstm.safetensors was written by `charrnn train` on an NVIDIA H200."""
    from charrnn import sample, steps, training

    trained = checkpoint.load(Path(__file__).parent / "data" / "gpu_tiny_lstm.safetensors")
    assert trained.metadata["step"] == 60 and trained.config.model.cell == "lstm"
    blocks = list(sample.generate((trained.params,), (trained.config.model,), trained.vocab.encode("\n"), 40, 2, 0,
                                  0.8))
    text = trained.vocab.decode(np.concatenate(blocks)[:, 0])
    assert len(text) == 40 and set(text) <= set(trained.vocab.chars)

    # The parameters are the trained ones: the CPU scores the run's validation split (111,539 characters,
    # half a second) with the run's streams as the GPU did. Measured gap 2e-6 (GPU vs CPU float32
    # arithmetic); a zeroed output bias moves the loss by 2.2e-3, fresh parameters by 0.87.
    # Refuses any corpus but the one the metadata's corpus_sha names, and uses the stored vocabulary.
    corpus = training.load_corpus(Path(__file__).parents[1] / "data" / "tinyshakespeare.txt",
                                  trained.config.train.val_fraction, trained.vocab, trained.metadata["corpus_sha"])
    val_loss = steps.evaluate(trained.params, trained.config.model, corpus.val_ids,
                              trained.config.train.eval_batch_size)
    assert val_loss == pytest.approx(trained.metadata["val_loss"], rel=0, abs=1e-4)


def write_small_checkpoint(directory, step):
    config = Config(model=ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4))
    vocab = "\n !abc"
    params = model.init_params(jax.random.key(0), config.model, len(vocab))
    metadata = {"config": config_lib.to_dict(config), "vocab": vocab, "corpus_sha": "0" * 16, "step": step,
                "elapsed_s": 1.5, "val_loss": 1.25, "best_val_loss": 1.2, "chars_seen": 128 * step, "saved_at": 0.0}
    path = checkpoint.step_path(directory, step)
    checkpoint.write(path, checkpoint.flatten(params, "params"), metadata)
    return path, vocab


def test_describe_a_small_checkpoint(tmp_path):
    path, vocab = write_small_checkpoint(tmp_path, 10)

    summary = checkpoint.describe(checkpoint.load(path))

    assert json.loads(json.dumps(summary)) == summary  # ready for --json
    assert summary["path"] == str(path) and summary["file_bytes"] == path.stat().st_size
    assert summary["format_version"] == checkpoint.FORMAT_VERSION
    assert (summary["step"], summary["val_loss"], summary["best_val_loss"]) == (10, 1.25, 1.2)
    assert summary["config"]["model"]["cell"] == "gru" and summary["config"]["model"]["hidden_size"] == 8
    assert summary["vocab"] == vocab and summary["vocab_size"] == 6
    shapes = summary["parameter_shapes"]
    assert shapes["params/embedding"] == [6, 4]
    assert shapes["params/layers/0/w_x"] == [4, 24] and shapes["params/layers/1/w_h"] == [8, 24]
    assert shapes["params/layers/1/b_hn"] == [8] and shapes["params/output/w"] == [8, 6]
    assert summary["parameter_count"] == sum(math.prod(shape) for shape in shapes.values())


def test_a_checkpoint_rotated_away_while_it_is_read_gives_way_to_the_newer_one(tmp_path, monkeypatch):
    """A live run saves step 20 and deletes step 10 between `load` listing the directory and reading the file."""
    old, _ = write_small_checkpoint(tmp_path, 10)
    real_read = checkpoint.read_bytes

    def read_after_a_save(path):
        if path == old and path.exists():
            write_small_checkpoint(tmp_path, 20)
            old.unlink()
        return real_read(path)

    monkeypatch.setattr(checkpoint, "read_bytes", read_after_a_save)
    trained = checkpoint.load(tmp_path)
    assert trained.path == checkpoint.step_path(tmp_path, 20) and trained.metadata["step"] == 20
    assert checkpoint.describe(trained)["file_bytes"] == trained.path.stat().st_size


def test_a_folder_of_runs_loads_its_newest_run(tmp_path):
    """`-c runs/`: a folder holding run directories names the run most recently updated."""
    from charrnn import rundir

    for name, step, updated in (("old", 10, 1000), ("new", 20, 3000), ("older", 5, 2000)):
        run_dir = tmp_path / name
        rundir.create(run_dir)
        rundir.write_json(run_dir / rundir.CONFIG_FILE, {})
        write_small_checkpoint(rundir.checkpoints_dir(run_dir), step)
        rundir.write_status(run_dir, rundir.FINISHED, {})
        os.utime(run_dir / rundir.STATUS_FILE, (updated, updated))
    assert checkpoint.find(tmp_path) == checkpoint.step_path(rundir.checkpoints_dir(tmp_path / "new"), 20)
    assert checkpoint.load(tmp_path).metadata["step"] == 20
    (tmp_path / "stray").mkdir()
    assert "neither" in _checkpoint_error(checkpoint.find, tmp_path / "stray")


def test_a_run_or_folder_of_several_step_checkpoints_loads_the_newest(tmp_path):
    """With train.keep > 1 a run holds older checkpoints too; sample and eval take the newest."""
    run_dir = tmp_path / "run"
    rundir.create(run_dir)
    rundir.write_json(run_dir / rundir.CONFIG_FILE, {})
    directory = rundir.checkpoints_dir(run_dir)
    for step in (10, 30, 20):
        write_small_checkpoint(directory, step)
    newest = checkpoint.step_path(directory, 30)
    assert checkpoint.find(run_dir) == newest and checkpoint.find(directory) == newest
    assert checkpoint.load(run_dir).metadata["step"] == 30
