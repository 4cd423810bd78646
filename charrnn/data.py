"""Corpus reading and checking, the vocabulary, and stateful batch streams (NumPy only)."""

from __future__ import annotations

import codecs
import hashlib
import math
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from charrnn.errors import CorpusError

_ENCODE_BLOCK = 1 << 20  # characters encoded at a time
_READ_BLOCK = 1 << 22  # bytes read at a time: memory stays near the size of the id array
DEFAULT_CORPUS_NAME = Path("data") / "tinyshakespeare.txt"
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)


def default_corpus() -> Path:
    """data/tinyshakespeare.txt here, else the copy beside the installed package."""
    if DEFAULT_CORPUS_NAME.exists():
        return DEFAULT_CORPUS_NAME
    return Path(__file__).resolve().parent.parent / DEFAULT_CORPUS_NAME


def _decode_blocks(blocks: Iterable[bytes], name: str) -> Iterator[str]:
    """Decode byte blocks as strict UTF-8, raising CorpusError with the byte offset of a problem.

    Never decodes with replacement: a corpus is either read exactly or refused.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes of the file before the current block
    for block in _head_whole(blocks):
        if consumed == 0:
            if block.startswith(_UTF16_BOMS):
                raise CorpusError(f"{name} looks like UTF-16/UTF-32 (byte-order mark at offset 0); convert it to UTF-8")
            if block.startswith(codecs.BOM_UTF8):
                block, consumed = block[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        nul = block.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"{name} contains a NUL byte at offset {consumed + nul}; it looks binary, not UTF-8 text")
        pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            yield decoder.decode(block)
        except UnicodeDecodeError as error:
            offset = consumed - pending + error.start
            raise CorpusError(f"{name} is not valid UTF-8: byte 0x{error.object[error.start]:02x} at offset {offset}") from None
        consumed += len(block)
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(f"{name} is not valid UTF-8: it ends inside a character at offset {consumed - pending}") from None


def _head_whole(blocks: Iterable[bytes], head_size: int = 4) -> Iterator[bytes]:
    """The same bytes, with the first block at least `head_size` long so a byte-order mark is seen whole."""
    blocks = iter(blocks)
    head = b""
    for block in blocks:
        head += block
        if len(head) >= head_size:
            break
    if head:
        yield head
    yield from blocks


def decode_text(raw: bytes, name: str) -> str:
    """Decode strict UTF-8, or raise CorpusError naming the byte offset of the problem."""
    return "".join(_decode_blocks([raw], name))


def _file_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of a file, a block at a time, with one-line errors for a path that cannot be read."""
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory, not a text file")
    try:
        with open(path, "rb") as file:
            while block := file.read(_READ_BLOCK):
                yield block
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror}") from None


def read_text(path: Path) -> str:
    """Read a whole UTF-8 text file (for evaluation and priming text)."""
    text = "".join(_decode_blocks(_file_blocks(path), str(path)))
    if not text:
        raise CorpusError(f"{path} is empty")
    return text


class CorpusFile(NamedTuple):
    """What one pass over a corpus file learns: its vocabulary, length and fingerprint."""

    vocab: Vocab
    num_chars: int
    checksum: str  # refuses resuming a run on other text


def scan_corpus(path: Path) -> CorpusFile:
    """Check and measure a corpus a block at a time, never holding the whole text.

    A training corpus is read twice (here, then by `encode_file`), so it must be a
    regular file: a pipe would be empty the second time, a FIFO would wait forever.
    """
    if path.exists() and not path.is_dir() and not path.is_file():
        raise CorpusError(f"{path} is not a regular file (a pipe?); save the text to a file and train on that")
    digest, chars, num_chars = hashlib.sha256(), set(), 0
    for text in _decode_blocks(_hashed(_file_blocks(path), digest), str(path)):
        chars.update(text)
        num_chars += len(text)
    if num_chars == 0:
        raise CorpusError(f"{path} is empty")
    return CorpusFile(Vocab("".join(sorted(chars))), num_chars, digest.hexdigest()[:16])


def _hashed(blocks: Iterable[bytes], digest) -> Iterator[bytes]:
    for block in blocks:
        digest.update(block)
        yield block


def encode_file(path: Path, corpus: CorpusFile) -> np.ndarray:
    """The corpus as a compact id array (uint8 for up to 256 symbols), encoded a block at a time.

    This is the file's second pass after `scan_corpus`, so it must read the same
    bytes: a pipe gives nothing the second time, and a file being written gives
    more. Either is an error rather than ids made of whatever memory held.
    """
    changed = CorpusError(f"{path} changed between two reads (a pipe, or a file being written); "
                          "train from a regular file that stays as it is")
    ids = np.empty(corpus.num_chars, dtype=corpus.vocab.dtype)
    digest, start = hashlib.sha256(), 0
    for text in _decode_blocks(_hashed(_file_blocks(path), digest), str(path)):
        if start + len(text) > corpus.num_chars:
            raise changed
        try:
            ids[start : start + len(text)] = corpus.vocab.encode(text)
        except CorpusError:  # a character the first pass did not see
            raise changed from None
        start += len(text)
    if start != corpus.num_chars or digest.hexdigest()[:16] != corpus.checksum:
        raise changed
    return ids


class Vocab:
    """The sorted set of code points of a corpus, mapping characters to ids."""

    units = "characters"  # what an id stands for, in messages

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {char: i for i, char in enumerate(chars)}
        self.dtype = np.uint8 if len(chars) <= 256 else np.uint16 if len(chars) <= 65536 else np.uint32

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Return the distinct characters of `text` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(char for char in text if char not in self.index))

    def encode(self, text: str) -> np.ndarray:
        """Return `text` as a compact integer array (uint8 / uint16 by vocabulary size)."""
        code_points = np.array([ord(char) for char in self.chars], dtype=np.uint32)  # sorted
        ids = np.empty(len(text), dtype=self.dtype)
        # Blocks keep the temporary 4-byte code points small for large corpora.
        for start in range(0, len(text), _ENCODE_BLOCK):
            block = np.frombuffer(text[start : start + _ENCODE_BLOCK].encode("utf-32-le"), dtype=np.uint32)
            positions = np.minimum(np.searchsorted(code_points, block), len(code_points) - 1)
            if not np.array_equal(code_points[positions], block):
                raise CorpusError(f"characters outside the vocabulary: {show_chars(self.unknown(text))}")
            ids[start : start + len(block)] = positions
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def show_chars(chars: list[str], limit: int = 20) -> str:
    """Characters as an error names them: quoted, the first `limit`, and how many more."""
    shown = " ".join(repr(char) for char in chars[:limit])
    return shown + (f" (+{len(chars) - limit} more)" if len(chars) > limit else "")


def split(ids: np.ndarray, val_fraction: float,
          calibration_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (train, validation, calibration), each contiguous: validation is the last `val_fraction` of `ids`,
    calibration the first `calibration_fraction` of them (`train.calibration_fraction`), train the rest."""
    val_start = len(ids) - int(len(ids) * val_fraction)
    train_start = int(len(ids) * calibration_fraction)
    return ids[train_start:val_start], ids[val_start:], ids[:train_start]


def leading_part(items: Sequence, fraction: float) -> Sequence:
    """The first `fraction` of `items` (ids, or pairs' sides), at least two of them: what an evaluation during
    a run scores (`train.eval_fraction`)."""
    if fraction >= 1.0:
        return items
    return items[: max(2, math.ceil(len(items) * fraction))]


class Batch(NamedTuple):
    inputs: np.ndarray  # [T, B] character ids
    targets: np.ndarray  # [T, B] the next character of each input
    reset: np.ndarray  # [] bool: start of an epoch, carried state goes back to the initial one


class StreamLayout(NamedTuple):
    """How training text is cut into `batch_size` contiguous streams of `chunks` chunks."""

    batch_size: int
    seq_len: int
    chunks_per_epoch: int


def stream_layout(num_chars: int, batch_size: int, seq_len: int) -> StreamLayout:
    """Fix the chunks per epoch so that every epoch offset in [0, seq_len) fits the text."""
    chunks = (num_chars - seq_len) // (batch_size * seq_len)
    if chunks < 1:
        need = batch_size * seq_len + seq_len
        raise CorpusError(
            f"training text has {num_chars} characters; batch_size {batch_size} x seq_len {seq_len} "
            f"needs at least {need} (lower train.batch_size or train.seq_len)"
        )
    return StreamLayout(batch_size, seq_len, chunks)


def epoch_offset(seed: int, epoch: int, layout: StreamLayout, random_offset: bool) -> int:
    """Return where the streams of `epoch` start, a pure function of (seed, epoch)."""
    if not random_offset:
        return 0
    return int(np.random.default_rng([seed, epoch]).integers(0, layout.seq_len))


def training_batch(ids: np.ndarray, layout: StreamLayout, step: int, seed: int, random_offset: bool,
                   streams: slice = slice(None)) -> Batch:
    """Return the minibatch of optimizer step `step`: chunk k of every stream (or of `streams` only).

    Stream b of an epoch covers ids[offset + b*L : offset + (b+1)*L + 1] with
    L = chunks_per_epoch * seq_len, so chunk k+1 of a stream continues chunk k.
    The data position is a function of the step alone, which makes resuming exact.
    """
    epoch, chunk = divmod(step, layout.chunks_per_epoch)
    offset = epoch_offset(seed, epoch, layout, random_offset)
    stream_len = layout.chunks_per_epoch * layout.seq_len
    starts = offset + np.arange(layout.batch_size)[streams] * stream_len + chunk * layout.seq_len  # [B]
    positions = starts[None, :] + np.arange(layout.seq_len)[:, None]  # [T, B]
    return Batch(ids[positions], ids[positions + 1], np.array(chunk == 0))


def stack_batches(batches: list[Batch]) -> Batch:
    """Stack K batches along a new leading axis, for K steps in one compiled call."""
    return Batch(*(np.stack(parts) for parts in zip(*batches)))


class EvalChunk(NamedTuple):
    inputs: np.ndarray  # [T, B]
    targets: np.ndarray  # [T, B]
    mask: np.ndarray  # [T, B] bool: True where a target is real, False for padding


def evaluation_chunks(ids: np.ndarray, num_streams: int, seq_len: int) -> list[EvalChunk]:
    """Cut text into streams that together predict every character after the first exactly once.

    Streams are contiguous, the state is meant to be carried from chunk to chunk;
    the last stream and the last chunk are padded and the padding masked out.
    """
    num_targets = len(ids) - 1
    if num_targets < 1:
        raise CorpusError(f"text to evaluate has {len(ids)} character(s); need at least 2")
    num_streams = max(1, min(num_streams, num_targets))
    stream_len = -(-num_targets // num_streams)  # ceil
    padded_len = -(-stream_len // seq_len) * seq_len
    inputs = np.zeros((num_streams, padded_len), dtype=ids.dtype)
    targets = np.zeros_like(inputs)
    mask = np.zeros((num_streams, padded_len), dtype=bool)
    for stream in range(num_streams):
        start = stream * stream_len
        stop = min(start + stream_len, num_targets)
        if stop <= start:
            continue
        inputs[stream, : stop - start] = ids[start:stop]
        targets[stream, : stop - start] = ids[start + 1 : stop + 1]
        mask[stream, : stop - start] = True
    return [
        EvalChunk(inputs[:, k : k + seq_len].T, targets[:, k : k + seq_len].T, mask[:, k : k + seq_len].T)
        for k in range(0, padded_len, seq_len)
    ]


class Corpus(NamedTuple):
    """A corpus cut for training: encoded train and validation ids, and what identifies it."""

    vocab: Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    checksum: str
    calibration_ids: np.ndarray | None = None  # held out to fit temperatures (`train.calibration_fraction`)
