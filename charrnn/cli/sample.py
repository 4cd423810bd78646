"""`charrnn sample`: text from a trained model on stdout, streamed as it is generated."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.common import ENSEMBLE_HELP, OUTPUT, SAMPLING, PlatformOption, ThreadsOption, app, err_console, \
    setup, text_option
from charrnn.data import read_text
from charrnn.errors import UsageError

CONVERTING = "Encoder–decoder runs"


@app.command()
def sample(
    checkpoint: Annotated[Optional[list[Path]], typer.Option("--checkpoint", "-c", help=ENSEMBLE_HELP, rich_help_panel=SAMPLING)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temp", "--temperature", help="Sampling temperature; 0 = always the most likely character (default: the run's sample.temperature, 0.8 unless set).", rich_help_panel=SAMPLING)] = None,
    length: Annotated[Optional[int], typer.Option("--length", "-n", help="Characters to generate per sample (default: the run's sample.length, 1000 unless set).", rich_help_panel=SAMPLING)] = None,
    prime: Annotated[Optional[str], typer.Option("--prime", help="Text to start from (printed first).", rich_help_panel=SAMPLING)] = None,
    prime_file: Annotated[Optional[Path], typer.Option("--prime-file", help="Read the priming text from a file.", rich_help_panel=SAMPLING)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed gives the same text (default: random, shown on stderr).", rich_help_panel=SAMPLING)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample only among the k most likely characters (0 = off; default: the run's sample.top_k).", rich_help_panel=SAMPLING)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Sample only from the smallest set holding this probability (1 = off; default: the run's sample.top_p).", rich_help_panel=SAMPLING)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Independent samples, generated as one batch.", rich_help_panel=SAMPLING)] = 1,
    stop: Annotated[Optional[str], typer.Option("--stop", help="End a sample once the text it writes completes this (e.g. a blank line), which may begin in the prime.", rich_help_panel=SAMPLING)] = None,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop prime characters outside the model's vocabulary instead of failing.", rich_help_panel=SAMPLING)] = False,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="An encoder–decoder's input: write its target (repeat for several).", rich_help_panel=CONVERTING)] = None,
    source_file: Annotated[Optional[Path], typer.Option("--source-file", help="An encoder–decoder's inputs, one per line: one output line each, in order.", rich_help_panel=CONVERTING)] = None,
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Beam width: the most likely target among N kept hypotheses (default: the run's sample.beam; 1 = character by character).", rich_help_panel=CONVERTING)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per sample on stdout instead of plain text.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Generate text from a trained model, streamed to stdout as it is written; or an encoder–decoder's targets."""
    prime_text = text_option(prime, prime_file, "prime") or ""
    sources = _sources(source, source_file)
    setup(platform, threads, cpu_device_per_core=sources is None)  # many samples of a small model split over the cores
    from charrnn.trained import Seq2SeqModel, load, random_seed

    model = load(*(checkpoint or [None]))
    if isinstance(model, Seq2SeqModel):
        if prime_text:
            raise UsageError("an encoder–decoder takes --source or --source-file, not --prime")
        if not sources:
            raise UsageError("an encoder–decoder needs its input: --source TEXT or --source-file FILE")
        _convert(model, sources, temperature, beam, top_k, top_p, length, seed, json_output)
        return
    if sources is not None or beam is not None:
        raise UsageError("--source, --source-file and --beam are for encoder–decoder runs; this is a language model")
    shown_seed = seed is None
    seed = random_seed() if seed is None else seed
    blocks = model.generate(prime_text, length, temperature, top_k, top_p, stop, seed, num_samples, skip_unknown)
    if shown_seed:  # once the settings are known to be good
        err_console.print(f"seed {seed}", style="dim")
    if num_samples == 1 and not json_output:
        for pieces in blocks:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    primes = next(blocks)  # the prime as kept (--skip-unknown drops characters), then the generated pieces
    texts = ["".join(pieces) for pieces in zip(primes, *blocks)]
    if json_output:
        for index, text in enumerate(texts):
            print(json.dumps({"index": index, "seed": seed, "prime": primes[index], "text": text}, ensure_ascii=False))
    else:
        print("\n\n".join(texts))


def _sources(source: list[str] | None, source_file: Path | None) -> list[str] | None:
    """The sources given, in order; a file's lines each one (a final line ending adds none)."""
    if source and source_file is not None:
        raise UsageError("give --source or --source-file, not both")
    if source_file is not None:
        return read_text(source_file).removesuffix("\n").replace("\r\n", "\n").split("\n")
    return source or None


def _convert(model, sources: list[str], temperature, beam, top_k, top_p, length, seed, json_output) -> None:
    seed = 0 if seed is None else seed  # outputs are most often greedy: the same every time unless asked
    outputs = model.convert(sources, temperature, beam, top_k, top_p, length, seed, what="--source")
    for source_text, output in zip(sources, outputs):
        print(json.dumps({"source": source_text, "output": output}, ensure_ascii=False) if json_output else output)
