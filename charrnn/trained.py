"""A trained model in a variable: `charrnn.load(path)`, then sample, stream, score and look inside it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from charrnn import activations as activations_lib, checkpoint, sample as sampling, steps
from charrnn.config import check_seed
from charrnn.data import show_chars
from charrnn.errors import UsageError
from charrnn.seq2seq.trained import Seq2SeqModel
from charrnn.units import bits


class Score(NamedTuple):
    """How well a model predicts a text: mean loss per predicted character."""

    nats_per_char: float
    bits_per_char: float
    perplexity: float
    chars: int  # characters predicted: every character after the first


@dataclass(frozen=True)
class Activations:
    """One layer's state after each character of `text`, and the model's guesses for the next character."""

    text: str  # the text read (without characters dropped as unknown)
    ids: np.ndarray  # [N] its character ids
    layer: int  # 1 = nearest the input
    states: dict[str, np.ndarray]  # "h" [N, H], and "c" [N, H] for an LSTM
    top_ids: np.ndarray  # [N, 5] most likely next characters, most likely first
    top_probs: np.ndarray  # [N, 5]

    def top_units(self, count: int, feature: str | None = None, state: str = "h") -> list[tuple[int, float]]:
        """The `count` units most correlated with a text feature (see `activations.FEATURES`), or most variable."""
        return activations_lib.top_units(self.states[state], self.text, count, feature)


def random_seed() -> int:
    """A seed for a sample asked for without one (31 bits, so any tool takes it)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


class Model(checkpoint.FromCheckpoint):
    """A trained language model rebuilt from a checkpoint alone (see `load`).

    Given several checkpoints of runs on the same characters, they predict
    together (an ensemble): `score` is the loss of the mean of their
    distributions, and sampling draws each character from it, each model
    carrying its own state. Activations take one model.
    """

    def __repr__(self) -> str:
        model = self.config.model
        return (f"<charrnn.Model {model.cell} {model.num_layers}x{model.hidden_size} from {self.path}"
                f"{self._members_suffix()}>")

    def encode(self, text: str, what: str = "the text", skip_unknown: bool = False) -> tuple[np.ndarray, str]:
        """(ids, text kept) of `text`; characters the model never saw are an error, or dropped with `skip_unknown`."""
        unknown = self.vocab.unknown(text)
        if unknown:
            if not skip_unknown:
                raise UsageError(f"{what} has characters outside the model's vocabulary: {show_chars(unknown)} "
                                 f"(--skip-unknown drops them)")
            text = "".join(char for char in text if char in self.vocab.index)
        return self.vocab.encode(text), text

    def stream(self, prime: str = "", length: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, stop: str | None = None,
               seed: int | None = None, skip_unknown: bool = False) -> Iterator[str]:
        """Return one sample's text in pieces as it is generated: the prime first, then the new characters.

        The arguments are those of `sample` (checked now, not at the first piece);
        the pieces joined are its text.

            >>> for piece in model.stream("ROMEO:", length=200, seed=1):
            ...     print(piece, end="", flush=True)
        """
        blocks = self.generate(prime, length, temperature, top_k, top_p, stop, seed, 1, skip_unknown)
        return (pieces[0] for pieces in blocks if pieces[0])

    def sample(self, prime: str = "", length: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, stop: str | None = None,
               seed: int | None = None, num_samples: int = 1, skip_unknown: bool = False) -> str | list[str]:
        """Generate text that continues `prime`: a string, or a list of `num_samples` strings.

        Each text is the prime followed by up to `length` characters, ending just
        after `stop` where it appears. `temperature` 0 always takes the most likely
        character; `top_k` (0 = off) and `top_p` (1 = off) keep only the likeliest
        characters. Unset settings take the run's `sample` config. The same `seed`
        gives the same text here and from `charrnn sample --seed`.

            >>> model = charrnn.load("runs/lstm")
            >>> print(model.sample("ROMEO:", length=200, temperature=0.8, seed=1))
        """
        blocks = self.generate(prime, length, temperature, top_k, top_p, stop, seed, num_samples, skip_unknown)
        texts = ["".join(pieces) for pieces in zip(*blocks)]
        return texts[0] if num_samples == 1 else texts

    def generate(self, prime: str = "", length: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, stop: str | None = None,
                 seed: int | None = None, num_samples: int = 1, skip_unknown: bool = False) -> Iterator[list[str]]:
        """Check the settings of `sample`, then return an iterator of every sample's next piece, block by block.

        The first item is the prime of every sample (as kept: `skip_unknown` drops
        characters), then each block's new text, "" for a sample that has stopped.

            >>> texts = ["".join(pieces) for pieces in zip(*model.generate("KING:", length=100, num_samples=2))]
        """
        temperature, top_k, top_p, length = self._sampling(temperature, top_k, top_p, length, self.config.sample.length)
        if num_samples < 1:
            raise UsageError(f"num_samples must be at least 1, got {num_samples}")
        if prime:
            _, prime = self.encode(prime, "--prime", skip_unknown)
            if not prime:
                raise UsageError("--prime has no character of the model's vocabulary left")
        seed = random_seed() if seed is None else seed
        check_seed(seed, "--seed")
        return sampling.generate_text(self._params, self._configs, self.vocab, prime, length, num_samples, seed,
                                      temperature, top_k, top_p, stop)

    def score(self, text: str, streams: int = 16, skip_unknown: bool = False, what: str = "the text") -> Score:
        """Mean loss over every character of `text` after the first, state carried along `streams` streams.

        `what` names the text in errors (a file name, say). Several models score
        under the mean of their distributions.

            >>> model.score(open("held_out.txt").read()).bits_per_char
        """
        ids, _ = self.encode(text, what, skip_unknown)
        if streams < 1:
            raise UsageError(f"streams must be at least 1, got {streams}")
        nats = steps.evaluate_models(self._params, self._configs, ids, streams)
        return Score(nats, bits(nats), math.exp(nats), int(len(ids) - 1))

    def activations(self, text: str, layer: int | None = None, skip_unknown: bool = False) -> Activations:
        """Layer `layer`'s state (default: the top layer; 1 = nearest the input) after each character of `text`.

            >>> acts = model.activations("ROMEO: hello")
            >>> acts.states["h"].shape, acts.top_units(3, feature="line_position")

        Of a run of several members (`train.members`), they are the first member's.
        """
        if len(self._runs) > 1:
            raise UsageError("activations take one language model, not several runs predicting together")
        num_layers = self.config.model.num_layers
        layer = num_layers if layer is None else layer
        if not 1 <= layer <= num_layers:
            raise UsageError(f"--layer {layer}: the model has {num_layers} layer(s)")
        ids, text = self.encode(text, "the text", skip_unknown)
        if not text:
            raise UsageError("the text has no character of the model's vocabulary left")
        recorded = activations_lib.record(self.params, self.config.model, ids, layer - 1)
        top_ids, top_probs = recorded.pop("top_ids"), recorded.pop("top_probs")
        return Activations(text, ids, layer, recorded, top_ids, top_probs)


def load(path: str | Path | None = None, *more: str | Path) -> Model | Seq2SeqModel:
    """Load a model from a checkpoint file, a run directory or a folder of runs (its newest run).

    Without a path, the newest run under ./runs. The architecture comes from the
    checkpoint itself: a language model gives a `Model`, an encoder–decoder a
    `Seq2SeqModel`. Several paths of runs with the same symbols give one model
    in which they predict together (an ensemble): they score, sample and
    write from the mean of their distributions (encoder–decoders writing in
    opposite directions: see `charrnn.seq2seq.rescoring`). A damaged file raises
    `CheckpointError`.

        >>> model = charrnn.load("runs/lstm")
        >>> together = charrnn.load("runs/g2p-a", "runs/g2p-b")
    """
    loaded = [checkpoint.load(None if path is None else Path(path)), *(checkpoint.load(Path(p)) for p in more)]
    encoder_decoder = [one.config.model.kind == "seq2seq" for one in loaded]
    if any(encoder_decoder) != all(encoder_decoder):
        other = loaded[encoder_decoder.index(not encoder_decoder[0])]
        raise UsageError(f"{other.path} and {loaded[0].path}: language models and encoder–decoder runs do not "
                         "predict together")
    return Seq2SeqModel(*loaded) if encoder_decoder[0] else Model(*loaded)
