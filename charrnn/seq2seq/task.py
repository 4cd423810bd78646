"""The encoder–decoder's task: learn each source line's target from a pairs file (see `charrnn.task`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from charrnn import data
from charrnn.config import Config
from charrnn.data import Vocab
from charrnn.errors import CorpusError, UsageError
from charrnn.seq2seq import model as seq2seq_model, pairs as pairs_lib
from charrnn.seq2seq.pairs import PairBatch, TokenVocab

EVAL_BATCH_SIZE = 256  # pairs per validation batch: nothing is carried between pairs, so batches can be wide
SAMPLING_STREAM = 2**31 - 2  # fold_in(step key, this): scheduled sampling's coins, apart from the dropout masks


class PairsCorpus(NamedTuple):
    """A pairs file cut for training: vocabularies, encoded train and validation pairs, and what identifies it."""

    source_vocab: Vocab
    target_vocab: Vocab | TokenVocab
    train: tuple[list[np.ndarray], list[np.ndarray]]  # (sources, targets) as ids 1..V
    val: tuple[list[np.ndarray], list[np.ndarray]]
    checksum: str
    skipped: int  # bad lines left out (train.skip_bad_pairs)


def encode_pairs(source_vocab: Vocab, target_vocab: Vocab | TokenVocab, pairs: pairs_lib.Pairs,
                 what: str, reverse: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(sources, targets) as ids, each target last symbol first where `reverse` (model.reverse_target); `what`
    names the pairs in an error about characters outside a vocabulary."""
    targets = pairs_lib.encode_side(target_vocab, pairs.targets, f"{what}'s targets")
    return (pairs_lib.encode_side(source_vocab, pairs.sources, f"{what}'s sources"),
            [pairs_lib.written_order(ids, reverse) for ids in targets])


def batches_of(sources: list[np.ndarray], targets: list[np.ndarray], size: int,
               multiple: int = pairs_lib.PAD_MULTIPLE) -> list[tuple[np.ndarray, PairBatch]]:
    """Consecutive batches of up to `size` pairs, sorted by length so that little of each is padding, each with the
    indices of its pairs; lengths padded to multiples of `multiple`."""
    order = np.argsort(pairs_lib.length_key(sources, targets, multiple), kind="stable")
    return [(part, pairs_lib.make_batch([sources[i] for i in part], [targets[i] for i in part], multiple=multiple))
            for part in np.array_split(order, max(1, -(-len(order) // size)))]


_summed_loss = jax.jit(seq2seq_model.ensemble_summed_loss, static_argnames=("configs",))


def mean_loss(params: tuple[dict, ...], configs: tuple, sources: list[np.ndarray], targets: list[np.ndarray],
              multiple: int = pairs_lib.PAD_MULTIPLE) -> float:
    """Mean nats per target symbol (end symbols included) over all pairs, teacher-forced, under the models'
    mean distribution (one model: its own); batches padded to multiples of `multiple`."""
    total, count = 0.0, 0.0
    for _, batch in batches_of(sources, targets, EVAL_BATCH_SIZE, multiple):
        batch_total, batch_count = _summed_loss(params, configs, batch)
        total, count = total + batch_total, count + batch_count
    return float(total / count)


class PairsTask:
    """Map sources to targets: the encoder reads a source, the decoder writes its target, teacher-forced."""

    def __init__(self, config: Config, corpus: PairsCorpus):
        self.config, self.corpus = config, corpus
        sources, targets = corpus.train
        self.sort_keys = pairs_lib.length_key(sources, targets, config.train.pad_multiple)
        self.schedule = pairs_lib.schedule(len(targets), config.train.batch_size)
        self.steps_per_epoch = self.schedule.batches_per_epoch
        self.chars_per_step = int(round(config.train.batch_size * (np.mean([len(ids) for ids in targets]) + 1)))
        self._epoch: tuple[int, np.ndarray] | None = None

    def init_params(self, key: jax.Array) -> dict:
        return seq2seq_model.init_params(key, self.config.model, len(self.corpus.source_vocab) + 1,
                                         len(self.corpus.target_vocab) + 1)

    def initial_carry(self, params: dict, batch_size: int) -> tuple:
        return ()  # each pair starts afresh: nothing is carried from step to step

    def batch_loss(self, params: dict, carry: tuple, batch: PairBatch, dropout_key: jax.Array, dropout: bool = True):
        model, train = self.config.model, self.config.train
        if train.scheduled_sampling:  # a key of its own: the dropout masks stay those of a run without it
            batch = seq2seq_model.with_own_choices(params, model, batch, train.scheduled_sampling,
                                                   jax.random.fold_in(dropout_key, SAMPLING_STREAM))
        return seq2seq_model.loss(params, model, batch, dropout_key if dropout else None, train.label_smoothing), carry

    def _batch_pairs(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.schedule.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, pairs_lib.epoch_order(self.sort_keys, self.schedule, self.config.train.seed, epoch))
        return self._epoch[1][index]

    def batches(self, step: int, count: int, streams: slice) -> PairBatch:
        sources, targets = self.corpus.train
        chosen = [self._batch_pairs(step + i)[streams] for i in range(count)]
        return pairs_lib.stack([pairs_lib.make_batch([sources[j] for j in part], [targets[j] for j in part],
                                                     multiple=self.config.train.pad_multiple) for part in chosen])

    def validation_loss(self, params: dict, placement, fraction: float = 1.0) -> float:
        sources, targets = self.corpus.val
        return mean_loss((params,), (self.config.model,), data.leading_part(sources, fraction),
                         data.leading_part(targets, fraction), self.config.train.pad_multiple)

    def temperatures(self, params: dict) -> None:  # train.calibration_fraction is for language models
        return None

    def metadata(self) -> dict[str, Any]:
        return {"vocab": pairs_lib.stored_symbols(self.corpus.target_vocab),
                "source_vocab": self.corpus.source_vocab.chars, "corpus_sha": self.corpus.checksum}

    def describe(self) -> str:
        corpus = self.corpus
        skipped = f", {corpus.skipped:,} bad lines skipped" if corpus.skipped else ""
        return (f"{len(corpus.train[0]):,} + {len(corpus.val[0]):,} pairs, {len(corpus.source_vocab)} source and "
                f"{len(corpus.target_vocab)} target symbols{skipped}")


def load_pairs(path: Path, config: Config, vocabs: tuple[Vocab, Vocab | TokenVocab] | None = None,
               checksum: str | None = None) -> PairsCorpus:
    """Read, check, split and encode a pairs file; a resumed run passes its (source, target) `vocabs` and `checksum`."""
    read = pairs_lib.read_pairs(path, config.train.max_length, config.train.skip_bad_pairs)
    if checksum is not None and read.checksum != checksum:
        raise UsageError(f"cannot resume on another pairs file: {path} has checksum {read.checksum}, "
                         f"the run used {checksum}")
    train, val = pairs_lib.split(read.pairs, config.train.val_fraction)
    if not val.sources:
        raise CorpusError(f"{path}: no pair falls in the validation split (train.val_fraction); use more pairs")
    source_vocab, target_vocab = vocabs or pairs_lib.vocabularies(read.pairs, config.model.target)
    reverse = config.model.reverse_target
    return PairsCorpus(source_vocab, target_vocab, encode_pairs(source_vocab, target_vocab, train, str(path), reverse),
                       encode_pairs(source_vocab, target_vocab, val, str(path), reverse), read.checksum, read.skipped)
