"""How close written targets are to the references: exact match, character and token error rates."""

from __future__ import annotations

from typing import NamedTuple, Sequence


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, item in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other)))
        previous = current
    return previous[-1]


class ErrorRates(NamedTuple):
    sources: int  # distinct sources scored
    exact_match: float  # fraction of sources whose output equals one of their references
    char_error_rate: float  # edit distance over characters / reference characters
    token_error_rate: float | None  # the same over space-separated tokens (phonemes, words); None without spaces


def error_rates(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> ErrorRates:
    """Score each output against the closest of its source's references (a word may have several pronunciations).

    Each rate is the summed edit distance to the closest reference, over the
    summed length of those references. Token rates are given where any reference
    holds a space.
    """
    matched = char_errors = char_total = token_errors = token_total = 0
    tokenised = any(" " in reference for group in references for reference in group)
    for output, group in zip(outputs, references, strict=True):
        matched += output in group
        distance, closest = min((edit_distance(output, reference), reference) for reference in group)
        char_errors, char_total = char_errors + distance, char_total + len(closest)
        if tokenised:
            distance, closest = min((edit_distance(output.split(), reference.split()), reference.split())
                                    for reference in group)
            token_errors, token_total = token_errors + distance, token_total + len(closest)
    count = len(outputs)
    return ErrorRates(count, matched / count, char_errors / char_total,
                      token_errors / token_total if tokenised else None)
