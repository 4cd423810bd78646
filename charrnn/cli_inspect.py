"""Commands that look inside models and their text: `viz`, `novelty`, `inspect`."""

from __future__ import annotations

import io
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.style import Style
from rich.table import Table
from rich.text import Text

from charrnn.cli import OUTPUT, Platform, PlatformOption, ThreadsOption, _encode_checked, _setup, _text_option, app, \
    err_console
from charrnn.atomic import write_atomic
from charrnn.errors import CorpusError, UsageError
from charrnn.rundir import strict_json
from charrnn.units import bits

VIEW = "View"


class Feature(str, Enum):
    quotes = "quotes"
    brackets = "brackets"
    line_position = "line_position"
    line_start = "line_start"


class State(str, Enum):
    h = "h"
    c = "c"


def _parse_units(units: str, hidden_size: int) -> list[int]:
    try:
        chosen = [int(part) for part in units.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--units takes comma-separated unit numbers, e.g. 0,17,301; got {units!r}") from None
    outside = [unit for unit in chosen if not 0 <= unit < hidden_size]
    if not chosen or outside:
        raise UsageError(f"--units must name units 0..{hidden_size - 1}; got {units!r}")
    return list(dict.fromkeys(chosen))


def terminal_blocks(text: str, units: dict[int, np.ndarray]) -> list[Text]:
    """One rich Text per unit: the text with each character's background coloured by the unit's value."""
    from charrnn import render

    blocks = []
    for values in units.values():
        styles: dict[str, Style] = {}
        block = Text()
        for char, colour in zip(text, render.colours(values)):
            style = styles.setdefault(colour, Style(color="black", bgcolor=colour))
            block.append(render.NEWLINE_MARK if char == "\n" else render.shown(char), style)
            if char == "\n":
                block.append("\n")
        blocks.append(block)
    return blocks


@app.command()
def viz(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Run directory or checkpoint file (default: the newest run under ./runs).")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text to run the model over.")] = None,
    text_file: Annotated[Optional[Path], typer.Option("--text-file", help="Read the text from a UTF-8 file.")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", min=1, help="Layer to look at, 1 = nearest the input (default: the top one).", rich_help_panel=VIEW)] = None,
    state: Annotated[State, typer.Option("--state", help="h, or an LSTM's memory cell c.", rich_help_panel=VIEW)] = State.h,
    units: Annotated[Optional[str], typer.Option("--units", help="Units to show, 0-based, comma-separated: 0,17,301.", rich_help_panel=VIEW)] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Without --units: how many units to show.", rich_help_panel=VIEW)] = 5,
    feature: Annotated[Optional[Feature], typer.Option("--feature", help="Without --units: the units most correlated with this feature of the text (default: the most variable units).", rich_help_panel=VIEW)] = None,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop characters outside the model's vocabulary instead of failing.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", dir_okay=False, help="Write a self-contained HTML page here instead of colouring the terminal.", rich_help_panel=OUTPUT)] = None,
    dump: Annotated[Optional[Path], typer.Option("--dump", dir_okay=False, help="Also save every unit's activations, the text and the top-5 predictions (.npz).", rich_help_panel=OUTPUT)] = None,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Colour each character of a text by hidden units' activations after reading it."""
    text = _text_option(text, text_file, "text")
    if not text:
        raise UsageError("give the text to look at with --text or --text-file")
    _setup(platform, threads)
    from charrnn import activations, loading, render

    trained = loading.load(checkpoint)
    model_config = trained.config.model
    layer = model_config.num_layers if layer is None else layer
    if layer > model_config.num_layers:
        raise UsageError(f"--layer {layer}: the model has {model_config.num_layers} layer(s)")
    if state is State.c and model_config.cell != "lstm":
        raise UsageError(f"--state c needs an LSTM; this model is a {model_config.cell}")
    ids, text = _encode_checked(trained.vocab, text, "the text", skip_unknown)
    if not text:
        raise UsageError("the text has no character of the model's vocabulary left")
    recorded = activations.record(trained.params, model_config, ids, layer - 1)
    values = recorded[state.value]  # [N, H]
    if units:
        chosen = _parse_units(units, model_config.hidden_size)
    else:
        ranked = activations.top_units(values, text, top, feature.value if feature else None)
        measure = f"correlation with {feature.value}" if feature else "variance"
        err_console.print("  ".join(f"unit {unit}: {measure} {score:+.3f}" for unit, score in ranked), style="dim")
        chosen = [unit for unit, _ in ranked]
    if dump is not None:  # through a buffer: written to a path, NumPy would add ".npz" to any other name
        buffer = io.BytesIO()
        np.savez_compressed(buffer, text=np.array(text), ids=ids, layer=layer, **recorded)
        write_atomic(dump, buffer.getvalue())
    shown = {unit: values[:, unit] for unit in chosen}
    if output is not None:
        predictions = [[(trained.vocab.chars[int(i)], float(p)) for i, p in zip(top_ids, top_probs)]
                       for top_ids, top_probs in zip(recorded["top_ids"], recorded["top_probs"])]
        title = f"{trained.path.name}: layer {layer} {state.value}"
        write_atomic(output, render.html(text, shown, predictions, title).encode("utf-8"))
        err_console.print(f"wrote {output}")
        return
    console = Console(highlight=False)
    for unit, block in zip(shown, terminal_blocks(text, shown)):
        console.rule(f"layer {layer} {state.value}, unit {unit}")
        console.print(block)


@app.command()
def novelty(
    train_file: Annotated[Path, typer.Argument(help="The training text (UTF-8).")],
    sample_file: Annotated[Path, typer.Argument(help="The generated text to check; - reads stdin.")],
    ngrams: Annotated[str, typer.Option("--ngrams", help="n-gram lengths to report, comma-separated.")] = "10,20,50",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)] = False,
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


@app.command("inspect")
def inspect_checkpoint(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Run directory or checkpoint file (default: the newest run under ./runs).", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Show what a checkpoint holds: architecture, vocabulary, progress, parameter shapes."""
    _setup(Platform.cpu, None)  # reading a checkpoint needs no accelerator
    from charrnn import loading
    from charrnn.inspect_checkpoint import describe

    summary = describe(loading.load(checkpoint))
    if json_output:
        print(strict_json(summary))
        return

    def loss(nats: float | None) -> str:
        return "-" if nats is None else f"{nats:.4f} nats/char ({bits(nats):.4f} bits/char)"

    overview = Table(title=summary["path"], show_header=False)
    for key, value in [
        ("file", f"{summary['file_bytes'] / 1e6:,.2f} MB, format {summary['format_version']}"),
        ("step", f"{summary['step']:,}"), ("val loss", loss(summary["val_loss"])),
        ("best val loss", loss(summary["best_val_loss"])),
        ("parameters", f"{summary['parameter_count']:,}"),
        ("vocabulary", f"{summary['vocab_size']} characters: {summary['vocab']!r}"),
        *((f"{section}.{key}", str(value)) for section, values in summary["config"].items() for key, value in values.items()),
    ]:
        overview.add_row(key, value)
    shapes = Table("parameter", "shape", "count")
    for name, shape in summary["parameter_shapes"].items():
        shapes.add_row(name, " x ".join(map(str, shape)), f"{math.prod(shape):,}")
    console = Console(highlight=False)
    console.print(overview)
    console.print(shapes)
