"""Character-level RNN, GRU and LSTM language models in JAX.

    >>> import charrnn
    >>> summary = charrnn.train("corpus.txt", "runs/small", steps=500, max_minutes=0)
    >>> model = charrnn.load("runs/small")
    >>> print(model.sample("ROMEO:", length=200, seed=1))
"""

__version__ = "0.1.0"

from charrnn.config import Config, ModelConfig, SampleConfig, TrainConfig
from charrnn.errors import (BusyError, CharrnnError, CheckpointError, CorpusError, DivergedError, Interrupted,
                            PeerError, StorageError, UsageError)
from charrnn.events import Summary
from charrnn.runtime import configure
from charrnn.trained import Activations, Model, Score, load
from charrnn.training import train

__all__ = [
    "Activations", "BusyError", "CharrnnError", "CheckpointError", "Config", "CorpusError", "DivergedError",
    "Interrupted", "Model", "ModelConfig", "PeerError", "SampleConfig", "Score", "StorageError", "Summary",
    "TrainConfig", "UsageError", "configure", "load", "train",
]
