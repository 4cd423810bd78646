"""Pairs files (one `source<TAB>target` per line), their vocabularies, and padded, bucketed batches (NumPy only).

Source and target keep vocabularies of their own: the decoder's softmax then
ranges only over symbols that targets use (g2p: letters in, phonemes out),
and a source character never seen in training is named as such. A target's
symbols are its characters, or with `model.target = "tokens"` its
space-separated tokens (one phoneme per decoder step). Id 0 is reserved on both
sides: padding in a source, the start and end symbol in a target.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn.data import Vocab, read_text, show_chars
from charrnn.errors import CorpusError

PAD = 0  # source id of padding
BOUNDARY = 0  # target id of start (as the decoder's input) and end (as its output)
PAD_MULTIPLE = 4  # padded lengths are multiples of this (a run's `train.pad_multiple`): few shapes, little padding
SORT_WINDOW = 256  # batches drawn together and sorted by length, so each batch's pairs are alike in length
ALIKE_BATCHES = 4  # consecutive batches of similar length: a compiled call of up to 4 steps pads them to one shape


class PairBatch(NamedTuple):
    """Pairs padded into one time-major batch (host or device arrays)."""

    source: np.ndarray  # [S, B] source ids, PAD after each source's end
    target_in: np.ndarray  # [T, B] BOUNDARY then the target's ids: what the decoder reads (teacher forcing)
    target_out: np.ndarray  # [T, B] the target's ids then BOUNDARY: what it must write
    target_mask: np.ndarray  # [T, B] bool: True where target_out is real, False for padding


class Pairs(NamedTuple):
    sources: list[str]
    targets: list[str]


class PairsFile(NamedTuple):
    """A pairs file read and checked: its pairs, how many bad lines were skipped, its checksum."""

    pairs: Pairs
    skipped: int
    checksum: str


def read_pairs(path: Path, max_length: int, skip_bad: bool = False) -> PairsFile:
    """Read `source<TAB>target` lines; a bad line is an error naming its number, or skipped with `skip_bad`.

    Bad: no tab, an empty side, a side longer than `max_length` characters. Blank
    lines are ignored; a line ending (\\n or \\r\\n) is not part of the target.
    """
    text = read_text(path)
    sources, targets, skipped = [], [], 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        source, tab, target = line.partition("\t")
        problem = (None if tab and source and target and len(source) <= max_length and len(target) <= max_length
                   else _problem(source, tab, target, max_length))
        if problem is None:
            sources.append(source)
            targets.append(target)
        elif skip_bad:
            skipped += 1
        else:
            raise CorpusError(f"{path}:{number}: {problem} (fix the line, or skip bad lines with "
                              f"--set train.skip_bad_pairs=true)")
    if not sources:
        raise CorpusError(f"{path} has no source<TAB>target pairs")
    return PairsFile(Pairs(sources, targets), skipped, hashlib.sha256(text.encode()).hexdigest())


def _problem(source: str, tab: str, target: str, max_length: int) -> str:
    if not tab:
        return "no tab between source and target"
    if not source or not target:
        return f"empty {'source' if not source else 'target'}"
    side, length = ("source", len(source)) if len(source) > max_length else ("target", len(target))
    return f"the {side} has {length} characters, over train.max_length {max_length}"


class TokenVocab:
    """The sorted set of whitespace-separated tokens of target texts, mapping tokens to ids (`Vocab`'s interface).

    A text's tokens are `text.split()`; decoding joins them with single spaces.
    """

    units = "tokens"  # what an id stands for, in messages

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def from_texts(cls, texts: list[str]) -> TokenVocab:
        return cls(sorted({token for text in texts for token in text.split()}))

    def __len__(self) -> int:
        return len(self.tokens)

    def unknown(self, text: str) -> list[str]:
        """The distinct tokens of `text` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(token for token in text.split() if token not in self.index))

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[token] for token in text.split()], np.int32)

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in np.asarray(ids).reshape(-1))


def target_vocab(target: str, symbols: str | list[str]) -> Vocab | TokenVocab:
    """The target vocabulary of symbols stored with a run: characters (a string) or tokens (a list)."""
    return TokenVocab(symbols) if target == "tokens" else Vocab(symbols)


def stored_symbols(vocab: Vocab | TokenVocab) -> str | list[str]:
    """What a checkpoint stores of a vocabulary: `target_vocab`'s inverse."""
    return vocab.tokens if isinstance(vocab, TokenVocab) else vocab.chars


def vocabularies(pairs: Pairs, target: str) -> tuple[Vocab, Vocab | TokenVocab]:
    """(source vocabulary, target vocabulary): the characters sources use, the symbols targets use."""
    targets = TokenVocab.from_texts(pairs.targets) if target == "tokens" else Vocab.from_text("".join(pairs.targets))
    return Vocab.from_text("".join(pairs.sources)), targets


def encode_side(vocab: Vocab | TokenVocab, texts: list[str], what: str) -> list[np.ndarray]:
    """Each text as ids 1..V (0 is reserved); a symbol outside `vocab` is an error naming it."""
    unknown = list(dict.fromkeys(symbol for text in texts for symbol in vocab.unknown(text)))
    if unknown:
        raise CorpusError(f"{what} has {vocab.units} the model never saw: "
                          f"{show_chars(unknown)}")
    return [vocab.encode(text).astype(np.int32) + 1 for text in texts]


def written(ids) -> np.ndarray:
    """Target ids as vocabulary indices (id - 1), up to the first end symbol."""
    ids = np.asarray(ids).reshape(-1)
    ends = np.flatnonzero(ids == BOUNDARY)
    return ids[: ends[0] if len(ends) else len(ids)] - 1


def written_order(ids: np.ndarray, reverse: bool) -> np.ndarray:
    """A target's ids in the order a decoder writes them, last symbol first where `reverse` (model.reverse_target);
    its own inverse, so it also turns what such a decoder wrote back to reading order."""
    return ids[::-1] if reverse else ids


def split(pairs: Pairs, val_fraction: float) -> tuple[Pairs, Pairs]:
    """(train, validation) by a hash of each source: a source's every target lands on the same side."""
    val = [int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction for source in pairs.sources]
    pick = lambda side: Pairs(*([s for s, v in zip(texts, val) if v == side] for texts in pairs))  # noqa: E731
    return pick(False), pick(True)


def padded_length(length: int | np.ndarray, multiple: int = PAD_MULTIPLE) -> int | np.ndarray:
    return -(-length // multiple) * multiple


def length_key(sources: list[np.ndarray], targets: list[np.ndarray], multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Each pair's place in a sort by padded target length, then source length.

    Pairs sorted by it fill batches that pad little on both sides: a batch of
    one padded target length spans as few source lengths as it can.
    """
    source_lengths = np.array([len(ids) for ids in sources])
    target_lengths = padded_length(np.array([len(ids) + 1 for ids in targets]), multiple)  # the end symbol included
    return target_lengths * (source_lengths.max(initial=0) + 1) + source_lengths


def padded_sources(sources: list[np.ndarray], source_len: int | None = None,
                   multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Encoded sources padded into one time-major array [S, B] (S rounded up to `multiple` unless given)."""
    source = np.full((source_len or padded_length(max(len(ids) for ids in sources), multiple), len(sources)), PAD,
                     np.int32)
    for column, ids in enumerate(sources):
        source[: len(ids), column] = ids
    return source


def make_batch(sources: list[np.ndarray], targets: list[np.ndarray], source_len: int | None = None,
               target_len: int | None = None, multiple: int = PAD_MULTIPLE) -> PairBatch:
    """Pad encoded pairs into one time-major batch (lengths rounded up to `multiple` unless given)."""
    source = padded_sources(sources, source_len, multiple)
    target_len = target_len or padded_length(max(len(ids) for ids in targets) + 1, multiple)
    batch_size = len(sources)
    target_in = np.full((target_len, batch_size), BOUNDARY, np.int32)
    target_out = np.full((target_len, batch_size), BOUNDARY, np.int32)
    mask = np.zeros((target_len, batch_size), bool)
    for column, target_ids in enumerate(targets):
        target_in[1 : len(target_ids) + 1, column] = target_ids
        target_out[: len(target_ids), column] = target_ids
        mask[: len(target_ids) + 1, column] = True  # the end symbol is predicted too
    return PairBatch(source, target_in, target_out, mask)


def stack(batches: list[PairBatch]) -> PairBatch:
    """K batches padded to one shape and stacked [K, ...], for K steps in one compiled call."""
    source_len = max(batch.source.shape[0] for batch in batches)
    target_len = max(batch.target_in.shape[0] for batch in batches)

    def pad(array: np.ndarray, length: int, value) -> np.ndarray:
        return np.pad(array, ((0, length - array.shape[0]), (0, 0)), constant_values=value)

    return PairBatch(*(np.stack(parts) for parts in zip(*(
        PairBatch(pad(batch.source, source_len, PAD), pad(batch.target_in, target_len, BOUNDARY),
                  pad(batch.target_out, target_len, BOUNDARY), pad(batch.target_mask, target_len, False))
        for batch in batches))))


class Schedule(NamedTuple):
    """Which pairs each training step takes: a pure function of (seed, step), so resuming is exact."""

    num_pairs: int
    batch_size: int
    batches_per_epoch: int


def schedule(num_pairs: int, batch_size: int) -> Schedule:
    if num_pairs < batch_size:
        raise CorpusError(f"the training split has {num_pairs} pairs, fewer than train.batch_size {batch_size}")
    return Schedule(num_pairs, batch_size, num_pairs // batch_size)


def epoch_order(sort_keys: np.ndarray, schedule: Schedule, seed: int, epoch: int) -> np.ndarray:
    """The pair indices of `epoch`'s batches [batches, B]: shuffled, then sorted by `sort_keys` within windows."""
    order = np.random.default_rng([seed, epoch]).permutation(schedule.num_pairs)
    order = order[: schedule.batches_per_epoch * schedule.batch_size]
    window = SORT_WINDOW * schedule.batch_size
    for begin in range(0, len(order), window):
        part = order[begin : begin + window]
        order[begin : begin + window] = part[np.argsort(sort_keys[part], kind="stable")]
    batches = order.reshape(schedule.batches_per_epoch, schedule.batch_size)
    groups = -(-len(batches) // ALIKE_BATCHES)
    group_order = np.random.default_rng([seed, epoch, 1]).permutation(groups)
    shuffled = np.concatenate([np.arange(group * ALIKE_BATCHES, min((group + 1) * ALIKE_BATCHES, len(batches)))
                               for group in group_order])
    return batches[shuffled]
