"""Character-level RNN, GRU and LSTM language models in JAX, and encoder–decoders built from them.

    >>> import charrnn
    >>> summary = charrnn.train("corpus.txt", "runs/small", steps=500, max_minutes=0)
    >>> model = charrnn.load("runs/small")
    >>> print(model.sample("ROMEO:", length=200, seed=1))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from charrnn import runtime
from charrnn.config import Config, ModelConfig, SampleConfig, TrainConfig
from charrnn.errors import (BusyError, CharrnnError, CheckpointError, CorpusError, DivergedError, Interrupted,
                            PeerError, StorageError, UsageError)
from charrnn.events import Summary
from charrnn.runtime import configure

# charrnn's XLA options go into XLA_FLAGS on import, before a library caller's first computation starts JAX's
# backends, so that `charrnn.train` without `configure` compiles as the command line does (without them XLA copies
# every saved product in each backward step: benchmarks/README.md, "XLA's options in library calls").
runtime.set_xla_flags()

# Imported on first use: they bring JAX, which `charrnn --help` and the commands that only read files never need.
_LAZY = {"Activations": "charrnn.trained", "Model": "charrnn.trained", "Score": "charrnn.trained",
         "load": "charrnn.trained", "train": "charrnn.training", "Seq2SeqModel": "charrnn.seq2seq.trained",
         "PairScore": "charrnn.seq2seq.trained"}

if TYPE_CHECKING:
    from charrnn.seq2seq.trained import PairScore, Seq2SeqModel
    from charrnn.trained import Activations, Model, Score, load
    from charrnn.training import train


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Activations", "BusyError", "CharrnnError", "CheckpointError", "Config", "CorpusError", "DivergedError",
    "Interrupted", "Model", "ModelConfig", "PairScore", "PeerError", "SampleConfig", "Score", "Seq2SeqModel",
    "StorageError", "Summary",
    "TrainConfig", "UsageError", "configure", "load", "train",
]
