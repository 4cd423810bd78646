"""`charrnn sample`: text from a trained model on stdout, streamed as it is generated."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.common import CHECKPOINT_HELP, OUTPUT, SAMPLING, PlatformOption, ThreadsOption, app, err_console, \
    setup, text_option


@app.command()
def sample(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help=CHECKPOINT_HELP, rich_help_panel=SAMPLING)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temp", "--temperature", help="Sampling temperature; 0 = always the most likely character (default: the run's sample.temperature, 0.8 unless set).", rich_help_panel=SAMPLING)] = None,
    length: Annotated[Optional[int], typer.Option("--length", "-n", help="Characters to generate per sample (default: the run's sample.length, 1000 unless set).", rich_help_panel=SAMPLING)] = None,
    prime: Annotated[Optional[str], typer.Option("--prime", help="Text to start from (printed first).", rich_help_panel=SAMPLING)] = None,
    prime_file: Annotated[Optional[Path], typer.Option("--prime-file", help="Read the priming text from a file.", rich_help_panel=SAMPLING)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed gives the same text (default: random, shown on stderr).", rich_help_panel=SAMPLING)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample only among the k most likely characters (0 = off; default: the run's sample.top_k).", rich_help_panel=SAMPLING)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Sample only from the smallest set holding this probability (1 = off; default: the run's sample.top_p).", rich_help_panel=SAMPLING)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Independent samples, generated as one batch.", rich_help_panel=SAMPLING)] = 1,
    stop: Annotated[Optional[str], typer.Option("--stop", help="End a sample once it contains this text (e.g. a blank line).", rich_help_panel=SAMPLING)] = None,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop prime characters outside the model's vocabulary instead of failing.", rich_help_panel=SAMPLING)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per sample on stdout instead of plain text.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Generate text from a trained model, streamed to stdout as it is written."""
    prime_text = text_option(prime, prime_file, "prime") or ""
    setup(platform, threads, cpu_device_per_core=True)  # many samples of a small model split over the cores
    from charrnn.trained import load, random_seed

    model = load(checkpoint)
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
