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


def load(path: Path | None) -> TrainedModel:
    """Load and verify a checkpoint; the model is rebuilt from what it stores."""
    file = find_checkpoint(path)
    arrays, metadata = checkpoint.read(file)
    try:
        config = config_lib.from_dict(metadata["config"])
        vocab = Vocab(metadata["vocab"])
    except (KeyError, TypeError, UsageError) as error:
        raise CheckpointError(f"{file} has unreadable metadata: {error}") from None
    template = jax.eval_shape(lambda: model.init_params(jax.random.key(0), config.model, len(vocab)))
    params = jax.device_put(checkpoint.unflatten(template, "params", arrays))
    return TrainedModel(config, vocab, params, metadata, file)
