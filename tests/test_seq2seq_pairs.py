"""Pairs files, vocabularies, batches and error rates of the encoder–decoder (NumPy only)."""

import subprocess
import sys

import numpy as np
import pytest
from clihelp import subprocess_env

from charrnn.data import Vocab
from charrnn.errors import CorpusError
from charrnn.seq2seq import pairs as pairs_lib
from charrnn.seq2seq.scoring import edit_distance, error_rates


def write(tmp_path, text: str, name: str = "pairs.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_reads_pairs_ignoring_blank_lines_and_line_endings(tmp_path):
    read = pairs_lib.read_pairs(write(tmp_path, "cat\tK AE1 T\r\n\nab\tba\n"), max_length=20)
    assert read.pairs == pairs_lib.Pairs(["cat", "ab"], ["K AE1 T", "ba"])
    assert read.skipped == 0
    at_most = pairs_lib.read_pairs(write(tmp_path, "x" * 10 + "\t" + "y" * 10 + "\n"), max_length=10)
    assert at_most.pairs.sources == ["x" * 10]  # as long as train.max_length is not over it


@pytest.mark.parametrize("line, problem", [
    ("no tab here", "no tab"),
    ("\ttarget", "empty source"),
    ("source\t", "empty target"),
    ("x" * 11 + "\tshort", "the source has 11 characters, over train.max_length 10"),
    ("short\t" + "y" * 12, "the target has 12 characters"),
])
def test_a_bad_line_is_an_error_naming_its_number(tmp_path, line, problem):
    path = write(tmp_path, f"good\tline\n\n{line}\nalso\tgood\n")
    with pytest.raises(CorpusError, match=rf"pairs.tsv:3: {problem}"):
        pairs_lib.read_pairs(path, max_length=10)
    read = pairs_lib.read_pairs(path, max_length=10, skip_bad=True)
    assert read.pairs.sources == ["good", "also"] and read.skipped == 1


def test_a_file_without_pairs_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no source<TAB>target pairs"):
        pairs_lib.read_pairs(write(tmp_path, "\n\n"), max_length=10)


def test_validation_split_is_by_source_and_deterministic():
    sources = [f"word{i % 301}" for i in range(903)]  # each source three times, far apart, with different targets
    pairs = pairs_lib.Pairs(sources, [f"t{i}" for i in range(903)])
    train, val = pairs_lib.split(pairs, 0.1)
    assert not set(train.sources) & set(val.sources)
    assert len(train.sources) + len(val.sources) == 903
    assert 10 <= len(set(val.sources)) <= 60
    assert pairs_lib.split(pairs, 0.1) == (train, val)
    order = np.random.default_rng(0).permutation(903)  # the same pairs in another order: the same words held out
    shuffled = pairs_lib.Pairs([sources[i] for i in order], [pairs.targets[i] for i in order])
    assert set(pairs_lib.split(shuffled, 0.1)[1].sources) == set(val.sources)
    # and in another process, whose string hashes differ
    held_out = (f"from charrnn.seq2seq import pairs; p = pairs.Pairs({sources!r}, {pairs.targets!r}); "
                "print(sorted(set(pairs.split(p, 0.1)[1].sources)))")
    for hash_seed in ("1", "2"):
        printed = subprocess.run([sys.executable, "-c", held_out], capture_output=True, text=True, check=True,
                                 env=subprocess_env(PYTHONHASHSEED=hash_seed)).stdout
        assert printed.strip() == str(sorted(set(val.sources)))


def test_batches_pad_and_mask_and_put_the_end_symbol_last():
    batch = pairs_lib.make_batch([np.array([3, 4]), np.array([5])], [np.array([1, 2, 3]), np.array([4])])
    assert batch.source.shape == (4, 2) and batch.target_in.shape == (4, 2)  # lengths 2 and 3 + 1 padded to 4
    np.testing.assert_array_equal(batch.source[:3].T, [[3, 4, 0], [5, 0, 0]])
    np.testing.assert_array_equal(batch.target_in.T, [[0, 1, 2, 3], [0, 4, 0, 0]])
    np.testing.assert_array_equal(batch.target_out.T, [[1, 2, 3, 0], [4, 0, 0, 0]])
    np.testing.assert_array_equal(batch.target_mask.T, [[1, 1, 1, 1], [1, 1, 0, 0]])
    longer = pairs_lib.make_batch([np.arange(1, 12), np.array([1])], [np.arange(1, 7), np.array([2])])
    stacked = pairs_lib.stack([batch, longer])  # padded to one shape for one compiled call
    assert stacked.source.shape == (2, 12, 2) and stacked.target_mask.shape == (2, 8, 2)
    assert not stacked.target_mask[0, 4:].any()
    assert not stacked.source[0, 4:].any()  # PAD
    assert not stacked.target_in[0, 4:].any() and not stacked.target_out[0, 4:].any()  # BOUNDARY


def test_each_epoch_takes_every_pair_once_in_a_seeded_order():
    rng = np.random.default_rng(0)
    sources = [np.ones(length, np.int32) for length in rng.integers(1, 30, 1003)]
    targets = [np.ones(length, np.int32) for length in rng.integers(1, 30, 1003)]
    keys = pairs_lib.length_key(sources, targets)
    schedule = pairs_lib.schedule(1003, 10)
    first = pairs_lib.epoch_order(keys, schedule, seed=7, epoch=0)
    assert first.shape == (100, 10) and len(set(first.ravel())) == 1000
    np.testing.assert_array_equal(first, pairs_lib.epoch_order(keys, schedule, seed=7, epoch=0))
    assert not np.array_equal(first, pairs_lib.epoch_order(keys, schedule, seed=7, epoch=1))
    # Batches are alike in length on both sides: far less spread within a batch than across the epoch.
    for lengths in (np.array([len(ids) for ids in sources]), np.array([len(ids) for ids in targets])):
        spread = np.mean([np.ptp(lengths[batch]) for batch in first])
        assert spread < np.ptp(lengths) / 3


def test_alike_batches_stay_together_and_their_groups_come_in_a_seeded_order():
    rng = np.random.default_rng(1)
    sources = [np.ones(length, np.int32) for length in rng.integers(1, 30, 400)]
    targets = [np.ones(length, np.int32) for length in rng.integers(1, 30, 400)]
    keys = pairs_lib.length_key(sources, targets)
    schedule = pairs_lib.schedule(400, 4)  # 100 batches in one sort window: 25 groups of alike batches
    alike = pairs_lib.ALIKE_BATCHES
    for epoch in (0, 1):
        # The documented order before the groups are drawn: shuffled, then sorted by length.
        order = np.random.default_rng([7, epoch]).permutation(400)
        by_length = order[np.argsort(keys[order], kind="stable")].reshape(-1, alike, 4)
        drawn = pairs_lib.epoch_order(keys, schedule, seed=7, epoch=epoch).reshape(-1, alike, 4)
        groups = [next(g for g in range(len(by_length)) if np.array_equal(group, by_length[g])) for group in drawn]
        assert sorted(groups) == list(range(len(by_length)))
        # Long batches are not all at the epoch's end.
        assert groups != sorted(groups)


def test_length_key_sorts_by_padded_target_then_source():
    sources = [np.ones(length, np.int32) for length in (9, 2, 5, 1)]
    targets = [np.ones(length, np.int32) for length in (3, 6, 12, 7)]  # padded with the end symbol: 4, 8, 16, 8
    assert list(np.argsort(pairs_lib.length_key(sources, targets))) == [0, 3, 1, 2]
    # A target of 4 symbols is 5 with its end symbol, padded to 8: after one of 3, padded to 4.
    sources, targets = [np.ones(1, np.int32), np.ones(9, np.int32)], [np.ones(4, np.int32), np.ones(3, np.int32)]
    assert list(np.argsort(pairs_lib.length_key(sources, targets))) == [1, 0]


def test_a_larger_pad_multiple_pads_to_its_multiples_and_sorts_by_them():
    batch = pairs_lib.make_batch([np.array([3, 4]), np.array([5])], [np.array([1, 2, 3]), np.array([4])], multiple=8)
    assert batch.source.shape == (8, 2) and batch.target_in.shape == (8, 2)
    assert batch.target_mask.sum() == 4 + 2 and not batch.target_mask[4:].any()  # the padding stays masked
    sources = [np.ones(length, np.int32) for length in (9, 2, 5, 1)]
    targets = [np.ones(length, np.int32) for length in (3, 6, 12, 7)]  # with the end symbol padded to 8: 8, 8, 16, 8
    assert list(np.argsort(pairs_lib.length_key(sources, targets, multiple=8))) == [3, 1, 0, 2]


def test_sources_with_unknown_characters_are_named():
    with pytest.raises(CorpusError, match="'z'"):
        pairs_lib.encode_side(Vocab("abc"), ["abz"], "--source")
    np.testing.assert_array_equal(pairs_lib.encode_side(Vocab("abc"), ["cab"], "x")[0], [3, 1, 2])
    np.testing.assert_array_equal(pairs_lib.written([3, 1, 0, 2]), [2, 0])  # up to the end symbol, as indices
    np.testing.assert_array_equal(pairs_lib.written([3, 1]), [2, 0])
    np.testing.assert_array_equal(pairs_lib.written([3, 0, 1, 0, 2]), [2])  # the first end symbol ends it


def test_token_targets_are_one_symbol_per_token():
    pairs = pairs_lib.Pairs(["cat", "hello"], ["K AE1 T", "HH AH0  L OW1"])
    sources, targets = pairs_lib.vocabularies(pairs, "tokens")
    assert sources.chars == "acehlot" and targets.tokens == ["AE1", "AH0", "HH", "K", "L", "OW1", "T"]
    encoded = pairs_lib.encode_side(targets, pairs.targets, "x")
    np.testing.assert_array_equal(encoded[0], [4, 1, 7])  # ids 1..V: 0 is the end symbol
    assert targets.decode(pairs_lib.written([*encoded[1], 0, 5])) == "HH AH0 L OW1"  # tokens rejoined by one space
    with pytest.raises(CorpusError, match="tokens the model never saw: 'AE2' 'Q'"):
        pairs_lib.encode_side(targets, ["K AE2 T", "Q AE2"], "the targets")
    assert pairs_lib.target_vocab("tokens", pairs_lib.stored_symbols(targets)).tokens == targets.tokens
    assert pairs_lib.target_vocab("chars", pairs_lib.stored_symbols(sources)).chars == sources.chars
    assert pairs_lib.vocabularies(pairs, "chars")[1].chars == " 01AEHKLOTW"


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    (["HH", "AH0"], ["HH", "AH1"], 1),
])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_error_rates_use_the_closest_reference():
    rates = error_rates(["HH AH0 L OW1", "T AH0 M EY1 T OW0"],
                        [["HH AH0 L OW1", "HH EH0 L OW1"], ["T AH0 M AA1 T OW0", "T AH0 M EY1 T OW2"]])
    assert rates.sources == 2 and rates.exact_match == 0.5
    assert rates.token_error_rate == pytest.approx(1 / 10)  # one phoneme of the closest 6, none of 4
    assert rates.char_error_rate == pytest.approx(1 / (12 + 17))
    assert error_rates(["ab"], [["ab"]]).token_error_rate is None
    # Rates are over the reference's length, not the output's; a word is right if it is any of its references.
    assert error_rates(["HH AH0"], [["HH AH0 L OW1"]]).token_error_rate == 0.5
    assert error_rates(["ab"], [["abcd"]]).char_error_rate == 0.5
    assert error_rates(["HH EH0 L OW1"], [["HH AH0 L OW1", "HH EH0 L OW1"]]).exact_match == 1.0
    assert error_rates(["a b", "cd"], [["a b"], ["cd"]]).token_error_rate == 0.0  # some targets are tokens


def test_token_rates_depend_on_the_references_spaces_alone_and_every_output_is_a_source():
    """An output without spaces is one token against tokenised references; spaces in outputs alone make no
    token rate. Equal outputs of two sources are two sources, and outputs and references must pair up."""
    assert error_rates(["HHAH0"], [["HH AH0"]]).token_error_rate == 1.0  # one token for two: a substitution, a deletion
    assert error_rates(["a b"], [["ab"]]).token_error_rate is None
    rates = error_rates(["ab", "ab"], [["ab"], ["ba"]])
    assert rates.sources == 2 and rates.exact_match == 0.5
    with pytest.raises(ValueError):
        error_rates(["ab", "cd"], [["ab"]])


def test_token_error_rate_takes_the_closest_reference_in_tokens_wherever_it_is_listed():
    """The closest reference in tokens may be listed after others, and may not be the closest in characters."""
    rates = error_rates(["AA B C"], [["AA X Y Z", "AA B C D"]])
    assert rates.token_error_rate == pytest.approx(1 / 4)
    rates = error_rates(["AB C"], [["ABC", "AB CDE"]])  # "ABC" is 1 character away, "AB CDE" 1 token
    assert rates.char_error_rate == pytest.approx(1 / 3)
    assert rates.token_error_rate == pytest.approx(1 / 2)
