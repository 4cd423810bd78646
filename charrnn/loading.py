"""Rebuild a trained model from a checkpoint alone: config, vocabulary and parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax

from charrnn import checkpoint, config as config_lib, model, rundir
from charrnn.data import Vocab
from charrnn.errors import CheckpointError, UsageError

DEFAULT_RUNS = Path("runs")


class TrainedModel(NamedTuple):
    config: config_lib.Config
    vocab: Vocab
    params: dict
    metadata: dict[str, Any]
    path: Path
    file_bytes: int  # the size of the file when it was read


def find_checkpoint(path: Path | None) -> Path:
    """A checkpoint file from a file, a run directory, or (None) the newest run under ./runs."""
    if path is None:
        path = rundir.newest_run(DEFAULT_RUNS)
    if path.is_dir():
        if rundir.is_run_dir(path):
            files = checkpoint.step_files(rundir.checkpoints_dir(path))
            if not files:
                raise CheckpointError(f"run {path} has no checkpoint yet")
            return files[-1]
        files = checkpoint.step_files(path)
        if not files:
            raise CheckpointError(f"{path} is neither a run directory nor holds checkpoints")
        return files[-1]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


def _read_newest(path: Path | None, attempts: int = 5) -> tuple[Path, int, dict, dict]:
    """(file, its size in bytes, arrays, metadata) of the checkpoint `find_checkpoint` names.

    A run still training deletes its older step checkpoints as it saves new ones,
    so the file just listed can be gone by the time it is read: then the run is
    listed again, for its newer checkpoint.
    """
    for attempt in range(attempts):
        file = find_checkpoint(path)
        try:
            payload = checkpoint.read_bytes(file)  # one read: the size and the arrays are of one version
        except CheckpointError:
            if file == path or file.exists() or attempt == attempts - 1:
                raise
            continue
        return (file, len(payload), *checkpoint.decode(payload, str(file)))
    raise AssertionError("unreachable")


def load(path: Path | None) -> TrainedModel:
    """Load and verify a checkpoint; the model is rebuilt from what it stores."""
    file, file_bytes, arrays, metadata = _read_newest(path)
    try:
        config = config_lib.from_dict(metadata["config"])
        vocab = Vocab(metadata["vocab"])
    except (KeyError, TypeError, UsageError) as error:
        raise CheckpointError(f"{file} has unreadable metadata: {error}") from None
    template = jax.eval_shape(lambda: model.init_params(jax.random.key(0), config.model, len(vocab)))
    params = jax.device_put(checkpoint.unflatten(template, "params", arrays))
    return TrainedModel(config, vocab, params, metadata, file, file_bytes)
