"""Novelty of a sample against its training text: known answers, a brute-force reference, speed."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn.novelty import novelty

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


def random_text(alphabet: str, length: int, seed: int) -> str:
    return "".join(np.random.default_rng(seed).choice(list(alphabet), size=length))


TRAIN = random_text("abcdefgh \n", 20_000, seed=0)


def test_a_copied_sample_is_entirely_found():
    sample = TRAIN[1000:1300]
    result = novelty(TRAIN, sample)
    assert result["ngram_fractions"] == {10: 1.0, 20: 1.0, 50: 1.0}
    assert result["longest_copy_length"] == 300 and result["longest_copy"] == sample


def test_a_sample_of_unseen_characters_shares_nothing():
    result = novelty(TRAIN, random_text("0123456789", 200, seed=1))
    assert result["ngram_fractions"] == {10: 0.0, 20: 0.0, 50: 0.0}
    assert result["longest_copy_length"] == 0 and result["longest_copy"] == ""


def test_a_planted_copy_is_found_exactly():
    # The sample's own characters never occur in the training text, so the copy cannot extend.
    planted = TRAIN[5000:5030]
    sample = random_text("WXYZ", 200, seed=2) + planted + random_text("WXYZ", 200, seed=3)
    result = novelty(TRAIN, sample)
    assert result["longest_copy_length"] == 30 and result["longest_copy"] == planted
    assert result["ngram_fractions"] == {10: 21 / 421, 20: 11 / 411, 50: 0.0}


def test_short_sample_and_short_training_text():
    assert novelty(TRAIN, "abc")["ngram_fractions"] == {10: None, 20: None, 50: None}
    result = novelty("cab", "xxcabxx", ns=(2, 3, 4))  # all of the training text is in the sample
    assert result["longest_copy"] == "cab"
    assert result["ngram_fractions"] == {2: 2 / 6, 3: 1 / 5, 4: 0.0}
    assert novelty("abc", "")["longest_copy_length"] == 0
    # A sample exactly n characters long holds one n-gram; a shorter one none.
    assert novelty("abcdefghij" * 3, "cdefghijab", ns=(10, 11))["ngram_fractions"] == {10: 1.0, 11: None}


def brute_force(train: str, sample: str, ns) -> tuple[int, dict]:
    longest = max((j - i for i in range(len(sample)) for j in range(i + 1, len(sample) + 1)
                   if sample[i:j] in train), default=0)
    fractions = {}
    for n in ns:
        windows = [sample[i : i + n] for i in range(len(sample) - n + 1)]
        fractions[n] = sum(window in train for window in windows) / len(windows) if windows else None
    return longest, fractions


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_small_texts(seed):
    train, sample = random_text("ab", 300, seed), random_text("ab", 60, seed + 100)
    result = novelty(train, sample, ns=(3, 6, 9, 12))
    longest, fractions = brute_force(train, sample, (3, 6, 9, 12))
    assert result["longest_copy_length"] == longest and result["longest_copy"] in train
    assert result["ngram_fractions"] == pytest.approx(fractions)


def test_a_megabyte_of_training_text_takes_seconds():
    train = CORPUS.read_text(encoding="utf-8")
    sample = train[300_000:301_000] + random_text("abcdefghij \n", 2000, seed=4) + train[700_000:700_040]
    start = time.perf_counter()
    result = novelty(train, sample)
    assert time.perf_counter() - start < 10.0
    assert result["longest_copy_length"] >= 1000 and result["longest_copy"].startswith(train[300_000:301_000])


def test_the_command_reports_what_novelty_measures(cli, tmp_path):
    sample = TRAIN[1000:1040] + "WXYZ" + TRAIN[9000:9015]
    (tmp_path / "train.txt").write_text(TRAIN, encoding="utf-8")
    (tmp_path / "sample.txt").write_text(sample, encoding="utf-8")
    expected = novelty(TRAIN, sample, ns=(3, 30))
    result = cli("novelty", "train.txt", "sample.txt", "--ngrams", "3,30", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out) == {"train_file": "train.txt", "sample_file": "sample.txt", **expected,
                                      "ngram_fractions": {str(n): share for n, share in expected["ngram_fractions"].items()}}
    plain = cli("novelty", "train.txt", "sample.txt", "--ngrams", "3,30")
    assert plain.out.splitlines()[0] == f"longest copy: 40 characters: {TRAIN[1000:1040]!r}"
