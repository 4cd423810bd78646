"""Corpus decoding, the vocabulary, the train/val split and the batch streams."""

import codecs
import os

import numpy as np
import pytest

from charrnn import data
from charrnn.errors import CorpusError

TEXTS = [
    "hello",
    "h\u00e9llo w\u00f6rld",  # 2-byte characters
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",  # 3-byte characters
    "emoji \U0001f600 and clef \U0001d11e",  # non-BMP: 4 bytes, surrogate pairs in UTF-16
    "a\r\nb\tc\u00a0d\u2028e",  # control and separator characters
    "real replacement character \ufffd stays",
]


def _corpus_error(function, *args) -> str:
    """Call `function`, expect CorpusError with exit code 3, return its message."""
    with pytest.raises(CorpusError) as caught:
        function(*args)
    assert caught.value.exit_code == 3
    return str(caught.value)


@pytest.mark.parametrize("text", TEXTS)
def test_valid_utf8_round_trips(text, tmp_path):
    raw = text.encode("utf-8")
    assert data.decode_text(raw, "corpus") == text
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    assert data.read_text(path) == text


@pytest.mark.parametrize("text", TEXTS)
def test_utf8_bom_is_stripped(text):
    assert data.decode_text(codecs.BOM_UTF8 + text.encode("utf-8"), "corpus") == text


@pytest.mark.parametrize(
    "raw, fragments",
    [
        (b"abc\xffdef", ["offset 3", "0xff", "UTF-8"]),
        (b"\x80abc", ["offset 0", "0x80"]),
        (b"ab" + "\u65e5".encode("utf-8")[:2], ["offset 2"]),  # truncated 3-byte sequence at the end
        (b"a\xc0\xafb", ["offset 1"]),  # overlong encoding of "/"
        (b"x\xed\xa0\x80y", ["offset 1"]),  # an encoded surrogate
        ("\u00e9t\u00e9".encode("latin-1"), ["offset 0", "0xe9"]),
        (b"ab\x00cd", ["NUL", "offset 2"]),
        (b"text\nmore\x00", ["NUL", "offset 9"]),
        ("hi".encode("utf-16-le"), ["NUL", "offset 1"]),  # UTF-16 without a BOM
        (codecs.BOM_UTF16_LE + "hi".encode("utf-16-le"), ["UTF-16"]),
        (codecs.BOM_UTF16_BE + "hi".encode("utf-16-be"), ["UTF-16"]),
        (codecs.BOM_UTF32_LE + "hi".encode("utf-32-le"), ["UTF-32"]),
        (codecs.BOM_UTF32_BE + "hi".encode("utf-32-be"), ["UTF-32"]),
        (codecs.BOM_UTF8 + b"ab\xffc", ["offset 5", "0xff"]),  # offsets count the stripped BOM: they are the file's
        (codecs.BOM_UTF8 + b"a\x00", ["NUL", "offset 4"]),
        (codecs.BOM_UTF8 + b"ab" + "\u65e5".encode("utf-8")[:2], ["offset 5"]),
    ],
)
def test_bad_bytes_raise_naming_the_problem(raw, fragments, tmp_path):
    """Never decoded with replacement: every one of these raises, and says where."""
    message = _corpus_error(data.decode_text, raw, "corpus.txt")
    assert "corpus.txt" in message
    for fragment in fragments:
        assert fragment in message
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    assert str(path) in _corpus_error(data.read_text, path)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda tmp_path: tmp_path / "missing.txt", "no such file"),
        (lambda tmp_path: tmp_path, "directory"),
        (lambda tmp_path: _written(tmp_path / "empty.txt", b""), "empty"),
    ],
    ids=["missing", "directory", "empty"],
)
def test_unreadable_paths_raise(make, fragment, tmp_path):
    path = make(tmp_path)
    message = _corpus_error(data.read_text, path)
    assert str(path) in message and fragment in message


def _written(path, raw):
    path.write_bytes(raw)
    return path


def test_file_of_only_a_bom_is_empty(tmp_path):
    path = _written(tmp_path / "bom.txt", codecs.BOM_UTF8)
    assert "empty" in _corpus_error(data.read_text, path)


def test_vocab_is_sorted_by_code_point():
    text = "banana \U0001f600 \u00c4pfel Zebra \n"
    vocab = data.Vocab.from_text(text)
    assert set(vocab.chars) == set(text)
    code_points = [ord(char) for char in vocab.chars]
    assert code_points == sorted(code_points) and len(set(code_points)) == len(code_points)
    assert len(vocab) == len(set(text))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_the_index_and_round_trips(text):
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    expected = np.array([vocab.chars.index(char) for char in text])
    np.testing.assert_array_equal(ids, expected)
    assert vocab.decode(ids) == text


def _distinct_text(count: int) -> str:
    """A text of `count` distinct code points (BMP and beyond), shuffled and repeated."""
    chars = [chr(0x20 + i) for i in range(count // 2)] + [chr(0x1F300 + i) for i in range(count - count // 2)]
    order = np.random.default_rng(count).permutation(len(chars))
    return "".join(chars[i] for i in order) * 3


@pytest.mark.parametrize(
    "count, dtype", [(1, np.uint8), (200, np.uint8), (256, np.uint8), (257, np.uint16), (300, np.uint16)]
)
def test_ids_use_the_smallest_dtype(count, dtype):
    text = _distinct_text(count)
    vocab = data.Vocab.from_text(text)
    assert len(vocab) == count
    ids = vocab.encode(text)
    assert ids.dtype == dtype
    assert int(ids.max()) == count - 1
    assert vocab.decode(ids) == text


def test_unknown_lists_new_characters_in_order_of_appearance():
    vocab = data.Vocab.from_text("abc")
    assert vocab.unknown("xaybz\U0001f600xcy") == ["x", "y", "z", "\U0001f600"]
    assert vocab.unknown("cab") == []


@pytest.mark.parametrize("text", ["abcq", "q", "\U0001f600abc", "ab\u00e9c" * 5, "~"])
def test_encode_of_unknown_characters_names_them(text):
    vocab = data.Vocab.from_text("abc")
    message = _corpus_error(vocab.encode, text)
    for char in vocab.unknown(text):
        assert repr(char) in message
    for char in "abc":
        assert repr(char) not in message


def test_encode_across_block_boundaries(monkeypatch):
    text = _distinct_text(40)[:53]  # 53 = 7 * 7 + 4: several full blocks and a partial one
    vocab = data.Vocab.from_text(text)
    expected = np.array([vocab.chars.index(char) for char in text])
    monkeypatch.setattr(data, "_ENCODE_BLOCK", 7)
    np.testing.assert_array_equal(vocab.encode(text), expected)
    # An unknown character in a later block is still found.
    assert "'?'" in _corpus_error(vocab.encode, text[:20] + "?" + text[20:])


@pytest.mark.parametrize("length, fraction", [(100, 0.1), (101, 0.25), (10, 0.5), (7, 0.9), (1000, 0.01), (3, 0.1)])
def test_split_holds_out_the_contiguous_end(length, fraction):
    ids = np.arange(length)
    train, val, _ = data.split(ids, fraction)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert abs(len(val) - length * fraction) < 1
    np.testing.assert_array_equal(val, ids[length - len(val) :])


LAYOUTS = [
    # (num_chars, batch_size, seq_len): the minimum that fits, and room to spare
    (12, 2, 4),
    (13, 2, 4),
    (100, 3, 5),
    (257, 4, 8),
    (64, 1, 16),
    (50, 7, 1),
]


def _epoch(ids, layout, epoch, seed, random_offset):
    steps = range(epoch * layout.chunks_per_epoch, (epoch + 1) * layout.chunks_per_epoch)
    return [data.training_batch(ids, layout, step, seed, random_offset) for step in steps]


@pytest.mark.parametrize("num_chars, batch_size, seq_len", LAYOUTS)
@pytest.mark.parametrize("random_offset", [False, True])
def test_streams_are_contiguous_and_disjoint(num_chars, batch_size, seq_len, random_offset):
    ids = np.arange(num_chars)  # ids are their own positions
    layout = data.stream_layout(num_chars, batch_size, seq_len)
    for epoch in range(3):
        batches = _epoch(ids, layout, epoch, seed=1, random_offset=random_offset)
        inputs = np.concatenate([batch.inputs for batch in batches])  # [chunks * T, B]
        for batch in batches:
            assert batch.inputs.shape == batch.targets.shape == (seq_len, batch_size)
            np.testing.assert_array_equal(batch.targets, ids[batch.inputs + 1])
        # Each stream runs on without gaps across chunks ...
        np.testing.assert_array_equal(np.diff(inputs, axis=0), 1)
        # ... and the streams tile one contiguous range, so no position is seen twice.
        flat = inputs.T.reshape(-1)
        np.testing.assert_array_equal(flat, flat[0] + np.arange(len(flat)))
        assert 0 <= flat[0] < seq_len


@pytest.mark.parametrize("num_chars, batch_size, seq_len", LAYOUTS)
def test_every_epoch_offset_fits_the_text(num_chars, batch_size, seq_len, monkeypatch):
    ids = np.arange(num_chars)
    layout = data.stream_layout(num_chars, batch_size, seq_len)
    monkeypatch.setattr(data, "epoch_offset", lambda seed, epoch, layout, random_offset: seq_len - 1)
    last = data.training_batch(ids, layout, layout.chunks_per_epoch - 1, seed=0, random_offset=True)
    assert last.targets.max() <= num_chars - 1


@pytest.mark.parametrize("chunks_per_epoch", [1, 3])
def test_reset_exactly_at_the_start_of_each_epoch(chunks_per_epoch):
    batch_size, seq_len = 2, 3
    num_chars = batch_size * seq_len * chunks_per_epoch + seq_len
    layout = data.stream_layout(num_chars, batch_size, seq_len)
    assert layout.chunks_per_epoch == chunks_per_epoch
    ids = np.arange(num_chars)
    for step in range(4 * chunks_per_epoch):
        batch = data.training_batch(ids, layout, step, seed=0, random_offset=True)
        assert bool(batch.reset) == (step % chunks_per_epoch == 0)


def _offsets(seed, random_offset, layout, epochs=30):
    ids = np.arange(layout.batch_size * layout.chunks_per_epoch * layout.seq_len + layout.seq_len)
    steps = [epoch * layout.chunks_per_epoch for epoch in range(epochs)]
    return [int(data.training_batch(ids, layout, step, seed, random_offset).inputs[0, 0]) for step in steps]


def test_random_offsets_are_deterministic_and_in_range():
    layout = data.StreamLayout(batch_size=2, seq_len=10, chunks_per_epoch=2)
    offsets = _offsets(seed=3, random_offset=True, layout=layout)
    assert offsets == _offsets(seed=3, random_offset=True, layout=layout)
    assert all(0 <= offset < layout.seq_len for offset in offsets)
    assert len(set(offsets)) > 1  # the offset changes from epoch to epoch
    assert offsets != _offsets(seed=4, random_offset=True, layout=layout)
    assert _offsets(seed=3, random_offset=False, layout=layout) == [0] * 30
    for epoch, offset in enumerate(offsets):
        assert data.epoch_offset(3, epoch, layout, True) == offset


def test_consecutive_seeds_do_not_share_offsets_an_epoch_apart():
    # Members train from seeds s, s + 1, ...: an offset drawn from seed + epoch would give member 1 the offsets
    # member 0 had one epoch earlier.
    layout = data.StreamLayout(batch_size=2, seq_len=100, chunks_per_epoch=2)
    first, second = (_offsets(seed, random_offset=True, layout=layout) for seed in (3, 4))
    assert second[:-1] != first[1:] and first[:-1] != second[1:]


@pytest.mark.parametrize("batch_size, seq_len", [(2, 4), (1, 10), (8, 16)])
def test_stream_layout_rejects_short_text(batch_size, seq_len):
    message = _corpus_error(data.stream_layout, batch_size * seq_len + seq_len - 1, batch_size, seq_len)
    assert "batch_size" in message and str(batch_size * seq_len + seq_len) in message
    assert data.stream_layout(batch_size * seq_len + seq_len, batch_size, seq_len).chunks_per_epoch == 1


@pytest.mark.parametrize(
    "length, num_streams, seq_len",
    [(2, 1, 1), (2, 4, 3), (6, 4, 2), (10, 3, 4), (10, 4, 2), (101, 4, 7), (50, 8, 5), (17, 16, 3), (33, 1, 32),
     (64, 4, 16)],
)
def test_evaluation_predicts_every_character_once(length, num_streams, seq_len):
    ids = np.arange(length)
    chunks = data.evaluation_chunks(ids, num_streams, seq_len)
    inputs = np.concatenate([chunk.inputs for chunk in chunks])  # [T_total, B]
    targets = np.concatenate([chunk.targets for chunk in chunks])
    mask = np.concatenate([chunk.mask for chunk in chunks])
    assert all(chunk.inputs.shape == chunk.mask.shape == (seq_len, inputs.shape[1]) for chunk in chunks)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    real = mask == 1
    np.testing.assert_array_equal(np.sort(inputs[real]), np.arange(length - 1))
    np.testing.assert_array_equal(targets[real], inputs[real] + 1)
    for stream in range(inputs.shape[1]):
        count = int(real[:, stream].sum())
        assert real[:count, stream].all()  # padding only at the end of a stream
        np.testing.assert_array_equal(np.diff(inputs[:count, stream]), 1)


@pytest.mark.parametrize("length", [0, 1])
def test_evaluation_needs_two_characters(length):
    assert "2" in _corpus_error(data.evaluation_chunks, np.arange(length), 4, 8)


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_corpus_read_in_small_blocks_equals_whole_read(tmp_path, monkeypatch, block):
    """Characters split across read blocks decode, and offsets count from the start of the file."""
    monkeypatch.setattr(data, "_READ_BLOCK", block)
    text = "naïve café — 𝄞 ok\n" * 3
    path = tmp_path / "blocks.txt"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    scanned = data.scan_corpus(path)
    assert scanned.num_chars == len(text) and scanned.vocab.chars == "".join(sorted(set(text)))
    assert scanned.vocab.decode(data.encode_file(path, scanned)) == text
    assert data.read_text(path) == text
    bad = text.encode("utf-8") + b"abc\xffdef"
    path.write_bytes(bad)
    assert f"offset {len(bad) - 4}" in _corpus_error(data.scan_corpus, path)
    path.write_bytes(text.encode("utf-8") + "é".encode("utf-8")[:1])
    assert "ends inside a character" in _corpus_error(data.scan_corpus, path)


@pytest.mark.parametrize("change", ["shorter", "longer", "same length", "new character"])
def test_a_corpus_that_changes_between_its_two_reads_is_refused(tmp_path, change):
    path = tmp_path / "corpus.txt"
    path.write_text("abcabcabc\n" * 50, encoding="utf-8")
    scanned = data.scan_corpus(path)
    text = {"shorter": "abcabc\n", "longer": "abcabcabc\n" * 60, "same length": "cbacbacba\n" * 50,
            "new character": "abcabcabz\n" * 50}[change]
    path.write_text(text, encoding="utf-8")
    assert "changed between two reads" in _corpus_error(lambda p: data.encode_file(p, scanned), path)


def test_a_training_corpus_must_be_a_regular_file(tmp_path):
    """A pipe holds its text for one read only; the second would see nothing (or a FIFO would block)."""
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in _corpus_error(data.scan_corpus, fifo)


def test_scan_checksum_tells_texts_apart(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("the same text", encoding="utf-8")
    second.write_text("the same text.", encoding="utf-8")
    assert data.scan_corpus(first).checksum == data.scan_corpus(first).checksum
    assert data.scan_corpus(first).checksum != data.scan_corpus(second).checksum


@pytest.mark.parametrize("length, fraction, count", [(10, 0.25, 3), (12, 0.25, 3), (11, 0.5, 6), (50, 0.01, 2),
                                                     (300, 0.01, 3), (7, 1.0, 7), (7, 1.5, 7)])
def test_leading_part_is_the_first_fraction_rounded_up_and_at_least_two(length, fraction, count):
    """An evaluation during a run scores ceil(fraction * n) leading items (2.5 -> 3), never fewer than two."""
    ids = np.arange(length)
    np.testing.assert_array_equal(data.leading_part(ids, fraction), ids[:count])
    assert data.leading_part(list(range(length)), fraction) == list(range(count))  # pairs' sides are lists


@pytest.mark.parametrize("seq_len", [2, 5])
def test_random_offsets_reach_every_start_in_range(seq_len):
    """Over many epochs every offset in [0, seq_len) comes up, seq_len - 1 included, each about equally often."""
    layout = data.StreamLayout(batch_size=2, seq_len=seq_len, chunks_per_epoch=2)
    offsets = _offsets(seed=5, random_offset=True, layout=layout, epochs=400)
    counts = np.bincount(offsets, minlength=seq_len)
    assert len(counts) == seq_len and (counts > 0.5 * 400 / seq_len).all()
