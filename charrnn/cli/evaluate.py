"""`charrnn eval`: how well a trained model predicts a text, in nats and bits per character."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.common import CheckpointOption, JsonOption, PlatformOption, ThreadsOption, app, setup
from charrnn.rundir import strict_json


@app.command("eval")
def evaluate(
    file: Annotated[Path, typer.Argument(help="UTF-8 text to score.")],
    checkpoint: CheckpointOption = None,
    streams: Annotated[int, typer.Option("--streams", min=1, help="Parallel streams, state carried along each (fewer = fewer cold starts, slower).")] = 16,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop characters outside the model's vocabulary instead of failing.")] = False,
    json_output: JsonOption = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Score FILE: average loss per character in nats and bits, and perplexity."""
    from charrnn.data import read_text

    text = read_text(file)
    setup(platform, threads)
    from charrnn.trained import load

    model = load(checkpoint)
    score = model.score(text, streams, skip_unknown, what=str(file))
    result = {"file": str(file), "checkpoint": str(model.path), **score._asdict()}
    result = {key: result[key] for key in ("file", "checkpoint", "chars", "nats_per_char", "bits_per_char",
                                           "perplexity")}
    if json_output:
        print(strict_json(result))
    else:
        print(f"{file}: {score.nats_per_char:.4f} nats/char, {score.bits_per_char:.4f} bits/char, "
              f"perplexity {score.perplexity:.3f} over {score.chars} characters")
