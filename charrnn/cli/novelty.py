"""`charrnn novelty`: how much of a sample is copied from the training text."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.common import JsonOption, app
from charrnn.errors import CorpusError, UsageError
from charrnn.rundir import strict_json


@app.command()
def novelty(
    train_file: Annotated[Path, typer.Argument(help="The training text (UTF-8).")],
    sample_file: Annotated[Path, typer.Argument(help="The generated text to check; - reads stdin.")],
    ngrams: Annotated[str, typer.Option("--ngrams", help="n-gram lengths to report, comma-separated.")] = "10,20,50",
    json_output: JsonOption = False,
) -> None:
    """How much of SAMPLE is copied from TRAIN: the longest shared substring and the share of shared n-grams."""
    from charrnn.data import decode_text, read_text
    from charrnn.novelty import novelty as measure

    try:
        ns = tuple(int(part) for part in ngrams.split(","))
    except ValueError:
        raise UsageError(f"--ngrams takes comma-separated lengths, e.g. 10,20,50; got {ngrams!r}") from None
    if not ns or min(ns) < 1:
        raise UsageError(f"--ngrams lengths must be at least 1; got {ngrams!r}")
    train_text = read_text(train_file)
    sample_text = decode_text(sys.stdin.buffer.read(), "stdin") if str(sample_file) == "-" else read_text(sample_file)
    if not sample_text:  # as read_text says of an empty file
        raise CorpusError("stdin is empty")
    result = {"train_file": str(train_file), "sample_file": str(sample_file), **measure(train_text, sample_text, ns)}
    if json_output:
        print(strict_json(result))
        return
    print(f"longest copy: {result['longest_copy_length']} characters: {result['longest_copy']!r}")
    shares = [f"{n}: {'-' if share is None else f'{share:.1%}'}" for n, share in result["ngram_fractions"].items()]
    print(f"n-grams also in {train_file}: " + "  ".join(shares))
