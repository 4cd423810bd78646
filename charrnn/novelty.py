"""How much of a sample is copied from the training text: the longest shared substring and n-gram overlap.

Substrings of one length are compared by key: two polynomial hashes modulo
31-bit primes packed into one int64, computed for every window of a text at
once with NumPy rather than in a Python loop. The longest match is found by
binary search on its length and checked character by character, so a hash
collision cannot change it; the n-gram shares trust the keys (a false match
needs both hashes to collide, about 2**-62 per pair).
"""

from __future__ import annotations

import numpy as np

_PRIMES = (2_147_483_647, 2_147_483_629)
_BASES = (1_000_003, 911_382_323)
_TABLE_SIZE = 1 << 22  # slots of the prefilter of training windows


def _powers(base: int, count: int, prime: int) -> np.ndarray:
    """base**k mod prime for k in [0, count), by doubling the filled prefix."""
    powers = np.ones(count, np.int64)
    filled, step = 1, base % prime  # step = base**filled
    while filled < count:
        todo = min(filled, count - filled)
        powers[filled : filled + todo] = powers[:todo] * step % prime  # products < 2**62
        filled, step = filled + todo, step * step % prime
    return powers


class _WindowKeys:
    """Prefix sums from which the key of any window of a text is O(1) (vectorised over all windows)."""

    def __init__(self, text: str):
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64) + 1  # [N], no zero code
        self.size = len(codes)
        self.prefixes, self.inverse_powers = [], []
        for prime, base in zip(_PRIMES, _BASES):
            terms = codes * _powers(base, self.size, prime) % prime  # c_j * base**j
            self.prefixes.append(np.concatenate([[0], np.cumsum(terms) % prime]))  # [N + 1], sums < 2**63
            self.inverse_powers.append(_powers(pow(base, prime - 2, prime), self.size, prime))

    def keys(self, length: int) -> np.ndarray:
        """The key of every window of `length` characters: [N - length + 1] int64."""
        count = self.size - length + 1
        if length < 1 or count < 1:
            return np.zeros(0, np.int64)
        key = np.zeros(count, np.int64)
        for prefix, inverse, prime in zip(self.prefixes, self.inverse_powers, _PRIMES):
            # sum_j c_j base**j over the window, shifted to start at base**0
            window = (prefix[length:] - prefix[:count] + prime) * inverse[:count] % prime  # < 2p * p < 2**63
            key = key * prime + window  # < 2**62
        return key


class _Comparison:
    """Which windows of the sample also occur in the training text, by length (computed once per length)."""

    def __init__(self, train_text: str, sample_text: str):
        self.train_text, self.sample_text = train_text, sample_text
        self.train, self.sample = _WindowKeys(train_text), _WindowKeys(sample_text)
        self.masks: dict[int, np.ndarray] = {}

    def found(self, length: int) -> np.ndarray:
        """[M - length + 1] bool: whether each sample window's key is the key of a training window."""
        if length not in self.masks:
            self.masks[length] = self._found(length)
        return self.masks[length]

    def _found(self, length: int) -> np.ndarray:
        sample_keys = self.sample.keys(length)
        if len(sample_keys) == 0:
            return np.zeros(0, bool)
        distinct = np.unique(sample_keys)  # sorted and small: look each training window up in it
        train_keys = self.train.keys(length)
        # A table of low key bits drops nearly every training window before the binary search.
        table = np.zeros(_TABLE_SIZE, bool)
        table[distinct % _TABLE_SIZE] = True
        candidates = train_keys[table[train_keys % _TABLE_SIZE]]
        slots = np.minimum(np.searchsorted(distinct, candidates), len(distinct) - 1)
        return np.isin(sample_keys, candidates[distinct[slots] == candidates])

    def copied_start(self, length: int) -> int | None:
        """Where a sample substring of `length` characters that the training text holds starts, or None."""
        for start in np.flatnonzero(self.found(length)):
            if self.sample_text[start : start + length] in self.train_text:  # rules out a hash collision
                return int(start)
        return None


def _longest_copy(comparison: _Comparison, ns) -> tuple[int, int]:
    """(start, length) of the longest sample substring found in the training text: binary search on length."""
    sample_text, train_text = comparison.sample_text, comparison.train_text
    if sample_text in train_text:
        return 0, len(sample_text)
    longest, start, shortest_absent = 0, 0, min(len(sample_text), len(train_text) + 1)
    for length in sorted(ns):  # first narrow the range with the lengths already compared
        if length >= shortest_absent:
            break
        found_at = comparison.copied_start(length)
        if found_at is None:
            shortest_absent = length
            break
        longest, start = length, found_at
    while shortest_absent - longest > 1:  # a copy of `longest` characters exists, of `shortest_absent` none
        length = (longest + shortest_absent) // 2
        found_at = comparison.copied_start(length)
        if found_at is None:
            shortest_absent = length
        else:
            longest, start = length, found_at
    return start, longest


def novelty(train_text: str, sample_text: str, ns=(10, 20, 50)) -> dict:
    """The longest substring of the sample found in the training text, and the share of its n-grams found there.

    `ngram_fractions[n]` counts every position of the sample (overlapping
    n-grams, repeats included); None when the sample is shorter than n.
    """
    comparison = _Comparison(train_text, sample_text)
    fractions = {n: float(np.mean(comparison.found(n))) if len(sample_text) >= n else None for n in ns}
    start, longest = _longest_copy(comparison, ns)
    return {
        "sample_chars": len(sample_text),
        "train_chars": len(train_text),
        "longest_copy_length": longest,
        "longest_copy": sample_text[start : start + longest],
        "ngram_fractions": fractions,
    }
