"""Character-level RNN, GRU and LSTM language models in JAX."""

__version__ = "0.1.0"
