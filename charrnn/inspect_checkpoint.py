"""What a checkpoint holds: architecture, vocabulary, progress and the shape of every parameter."""

from __future__ import annotations

from typing import Any

from charrnn import checkpoint, config as config_lib, model
from charrnn.loading import TrainedModel


def describe(trained: TrainedModel) -> dict[str, Any]:
    """A JSON-ready summary of a loaded checkpoint."""
    metadata = trained.metadata
    return {
        "path": str(trained.path),
        "file_bytes": trained.file_bytes,
        "format_version": metadata.get("format_version"),
        "step": metadata.get("step"),
        "val_loss": metadata.get("val_loss"),
        "best_val_loss": metadata.get("best_val_loss"),
        "config": config_lib.to_dict(trained.config),
        "vocab": trained.vocab.chars,
        "vocab_size": len(trained.vocab),
        "parameter_count": model.parameter_count(trained.params),
        "parameter_shapes": {name: list(array.shape) for name, array in checkpoint.flatten(trained.params, "params").items()},
    }
