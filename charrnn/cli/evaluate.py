"""`charrnn eval`: how well a trained model predicts a text, in nats and bits per character."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.common import ENSEMBLE_HELP, JsonOption, PlatformOption, ThreadsOption, app, setup
from charrnn.errors import UsageError
from charrnn.rundir import strict_json


@app.command("eval")
def evaluate(
    file: Annotated[Path, typer.Argument(help="UTF-8 text to score.")],
    checkpoint: Annotated[Optional[list[Path]], typer.Option("--checkpoint", "-c", help=ENSEMBLE_HELP)] = None,
    streams: Annotated[int, typer.Option("--streams", min=1, help="Parallel streams, state carried along each (fewer = fewer cold starts, slower).")] = 16,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop characters outside the model's vocabulary instead of failing.")] = False,
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Encoder–decoder runs: write each target by beam search of this width (default: the run's sample.beam).")] = None,
    json_output: JsonOption = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Score FILE: average loss per character in nats and bits, and perplexity.

    For an encoder–decoder run, FILE holds source<TAB>target pairs: the loss per
    target symbol (character, or token with model.target = tokens), and how often
    the targets it writes match (exact match, character and token error rates; a
    source with several targets is right if it matches any).
    """
    from charrnn.data import read_text

    text = read_text(file)
    setup(platform, threads)
    from charrnn.trained import Seq2SeqModel, load

    model = load(*(checkpoint or [None]))
    if isinstance(model, Seq2SeqModel):
        if skip_unknown:
            raise UsageError("--skip-unknown is for language models; a pairs file must use the model's characters")
        _score_pairs(model, file, beam, json_output)
        return
    if beam is not None:
        raise UsageError("--beam is for encoder–decoder runs; this is a language model")
    score = model.score(text, streams, skip_unknown, what=str(file))
    result = {"file": str(file), "checkpoint": str(model.path), "checkpoints": [str(path) for path in model.paths],
              **score._asdict()}
    result = {key: result[key] for key in ("file", "checkpoint", "checkpoints", "chars", "nats_per_char",
                                           "bits_per_char", "perplexity")}
    if json_output:
        print(strict_json(result))
    else:
        print(f"{file}: {score.nats_per_char:.4f} nats/char, {score.bits_per_char:.4f} bits/char, "
              f"perplexity {score.perplexity:.3f} over {score.chars} characters")


def _score_pairs(model, file: Path, beam: int | None, json_output: bool) -> None:
    score = model.score(file, beam)
    result = {"file": str(file), "checkpoint": str(model.path), "checkpoints": [str(path) for path in model.paths],
              "beam": beam or model.config.sample.beam, **score._asdict()}
    if json_output:
        print(strict_json(result))
        return
    tokens = "" if score.token_error_rate is None else f", token error rate {score.token_error_rate:.2%}"
    print(f"{file}: {score.nats_per_char:.4f} nats/char ({score.bits_per_char:.4f} bits/char) over {score.pairs} "
          f"pairs; {score.sources} sources: exact match {score.exact_match:.2%}, character error rate "
          f"{score.char_error_rate:.2%}{tokens}")
