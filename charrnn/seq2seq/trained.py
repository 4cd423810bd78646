"""A trained encoder–decoder in a variable: `charrnn.load(path)` on a seq2seq run, then convert, score, look inside."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import numpy as np

from charrnn import checkpoint
from charrnn.config import check_seed
from charrnn.data import Vocab
from charrnn.errors import CorpusError, UsageError
from charrnn.sample import capped_temperature
from charrnn.seq2seq import generate, pairs as pairs_lib, rescoring
from charrnn.seq2seq.scoring import error_rates
from charrnn.seq2seq.task import encode_pairs, mean_loss
from charrnn.units import bits

BATCH = 512  # sources converted per compiled call


class PairScore(NamedTuple):
    """How well a model maps sources to targets."""

    nats_per_char: float  # teacher-forced loss per target symbol (character, or token), end symbols included
    bits_per_char: float
    exact_match: float  # fraction of sources whose output is one of their targets
    char_error_rate: float  # edit distance / reference characters, against the closest target
    token_error_rate: float | None  # the same over space-separated tokens; None where targets have no spaces
    pairs: int
    sources: int  # distinct sources (a source may have several targets)


class Attention(NamedTuple):
    """Where the decoder looked while writing `output` for `source`."""

    source: str
    output: str
    symbols: list[str]  # the output's characters, or tokens (model.target = tokens)
    weights: np.ndarray  # [len(symbols) + 1, len(source)]: a row per output symbol and the end symbol


class Seq2SeqModel(checkpoint.FromCheckpoint):
    """A trained encoder–decoder rebuilt from a checkpoint alone (see `charrnn.load`).

    Several models (an ensemble) write together: each symbol is chosen from the
    mean of their distributions, and the loss is that of the mean distribution.
    Models writing in opposite directions (model.reverse_target) choose whole
    targets instead, by rescoring (`charrnn.seq2seq.rescoring`).
    """

    @property
    def source_vocab(self) -> Vocab:
        return self._loaded.source_vocab

    def __repr__(self) -> str:
        model = self.config.model
        encoder = "bidirectional " if model.bidirectional else ""
        return (f"<charrnn.Seq2SeqModel {model.cell} {encoder}{model.encoder_layers}x{model.hidden_size} -> "
                f"{model.num_layers}x{model.hidden_size}, attention {model.attention}, from {self.path}"
                f"{self._members_suffix()}>")

    @property
    def _shared_direction(self) -> bool | None:
        """The models' model.reverse_target where they all agree; None where they write targets in opposite
        directions, and so choose by rescoring."""
        groups = rescoring.directions(self._configs)
        return self._configs[groups[0][0]].reverse_target if len(groups) == 1 else None

    def _sources(self, sources: Sequence[str], what: str) -> list[np.ndarray]:
        """Sources as ids; an empty one or a character the model never saw is a usage error."""
        for index, source in enumerate(sources):
            if not source:
                raise UsageError(f"{what}: source {index + 1} is empty")
        try:
            return pairs_lib.encode_side(self.source_vocab, list(sources), what)
        except CorpusError as error:
            raise UsageError(str(error)) from None

    def convert(self, sources: Sequence[str], temperature: float | None = None, beam: int | None = None,
                top_k: int | None = None, top_p: float | None = None, length: int | None = None,
                seed: int = 0, what: str = "the sources") -> list[str]:
        """The target written for each source, in order.

        `beam` > 1 searches for the most likely target; otherwise characters are
        chosen one at a time at `temperature` (0 = the most likely), as `sample`
        chooses them. `length` caps a target (default: the run's train.max_length).
        Unset settings take the run's `sample` config. Models writing in opposite
        directions choose only the most likely target: temperature 0, or a beam.

            >>> model = charrnn.load("runs/g2p")
            >>> model.convert(["hello", "world"], beam=5)
            ['HH AH0 L OW1', 'W ER1 L D']
        """
        return [output for output, _, _ in self._write(sources, temperature, beam, top_k, top_p, length, seed, what)]

    def _write(self, sources, temperature, beam, top_k, top_p, length, seed, what):
        """(output, its vocabulary indices, attention weights [indices + end, S] or None) per source."""
        temperature, top_k, top_p, length = self._sampling(temperature, top_k, top_p, length,
                                                           self.config.train.max_length)
        beam = self.config.sample.beam if beam is None else beam
        length += 1  # room for the end symbol
        check_seed(seed, "--seed")
        if beam < 1:
            raise UsageError(f"beam must be at least 1, got {beam}")
        shared = self._shared_direction
        both_ways = shared is None
        if both_ways and beam == 1 and temperature > 0:
            raise UsageError("runs writing targets in opposite directions (model.reverse_target) choose together only "
                             "the most likely target: temperature 0 or a beam")
        reverse = bool(shared)  # rescoring.choose gives targets forwards
        encoded = self._sources(sources, what)
        vocab_size = len(self.vocab) + 1
        # Sources of similar length batched together: each batch stops once its longest target has ended.
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        results: list = [None] * len(encoded)
        for begin in range(0, len(order), BATCH):
            rows = order[begin : begin + BATCH]
            part = [encoded[row] for row in rows]
            source = pairs_lib.padded_sources(part)
            weights = None
            if both_ways:
                chosen = rescoring.choose(self._params, self._configs, source, length - 1, beam)
            elif beam > 1:
                tokens, _ = generate.beam_search(self._params, self._configs, source, length, beam)
                chosen = [pairs_lib.written(ids[: length - 1]) for ids in np.asarray(tokens)[:, 0]]
            else:
                key = jax.random.fold_in(jax.random.key(seed), begin)
                nucleus = np.float32(top_p) if top_p < 1.0 else None
                ids, weights = generate.sample(self._params, self._configs, source, key,
                                               capped_temperature(temperature), nucleus, length,
                                               top_k if top_k < vocab_size else 0)
                chosen, weights = [pairs_lib.written(one[: length - 1]) for one in np.asarray(ids)], np.asarray(weights)
            for column, row in enumerate(rows):
                indices = chosen[column]
                seen = None if weights is None else weights[: len(indices) + 1, column, : len(part[column])]
                if reverse:  # written last symbol first: read forwards, each symbol's weights with it, the end's last
                    indices = pairs_lib.written_order(indices, reverse)
                    seen = None if seen is None else np.concatenate([seen[-2::-1], seen[-1:]])
                results[row] = (self.vocab.decode(indices), indices, seen)
        return results

    def attention(self, source: str, temperature: float = 0.0, seed: int = 0) -> Attention:
        """The output for `source` and the attention weights of each of its symbols over the source.

            >>> model.attention("hello").weights.shape
            (13, 5)
        """
        if self.config.model.attention == "none":
            raise UsageError("the model has no attention (model.attention = none)")
        if len(self._members) > 1:
            raise UsageError("attention is drawn for one model, not for several writing together")
        [(output, indices, weights)] = self._write([source], temperature, 1, None, None, None, seed, "--source")
        return Attention(source, output, [self.vocab.decode([i]) for i in indices], weights)

    def score(self, pairs: pairs_lib.Pairs | str | Path, beam: int | None = None) -> PairScore:
        """Teacher-forced loss over `pairs` (or a pairs file), and error rates of the targets written for their sources.

        A source with several targets (a word's pronunciations) counts as right if
        its output equals any of them; error rates use the closest. Outputs are
        chosen greedily, or by beam search with `beam` > 1.

            >>> model.score("test.tsv", beam=5).exact_match
        """
        what = "the pairs"
        if not isinstance(pairs, pairs_lib.Pairs):
            what, pairs = str(pairs), pairs_lib.read_pairs(Path(pairs), self.config.train.max_length).pairs
        shared = self._shared_direction
        loss = rescoring.mean_nats if shared is None else mean_loss  # no shared step: the mean over whole targets
        nats = loss(self._params, self._configs, *encode_pairs(self.source_vocab, self.vocab, pairs, what, bool(shared)))
        references: dict[str, list[str]] = {}
        for source, target in zip(*pairs):
            references.setdefault(source, []).append(target)
        outputs = self.convert(list(references), temperature=0.0, beam=beam, what=what)
        rates = error_rates(outputs, list(references.values()))
        return PairScore(nats, bits(nats), rates.exact_match, rates.char_error_rate, rates.token_error_rate,
                         len(pairs.sources), rates.sources)
