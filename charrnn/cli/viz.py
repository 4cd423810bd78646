"""`charrnn viz`: colour a text by hidden units' activations, in the terminal or as an HTML page."""

from __future__ import annotations

import io
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.style import Style
from rich.text import Text

from charrnn.atomic import write_atomic
from charrnn.cli.common import OUTPUT, CheckpointOption, PlatformOption, ThreadsOption, app, err_console, setup, \
    text_option
from charrnn.errors import UsageError

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
    checkpoint: CheckpointOption = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text to run the model over.")] = None,
    text_file: Annotated[Optional[Path], typer.Option("--text-file", help="Read the text from a UTF-8 file.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="Encoder–decoder runs: the input whose attention to show (with --output).")] = None,
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
    """Colour each character of a text by hidden units' activations after reading it.

    For an encoder–decoder run: a heat map of where the decoder looked in --source
    while writing each character of its output, as an HTML page (--output).
    """
    text = text_option(text, text_file, "text")
    if source is not None:
        if output is None:
            raise UsageError("--source draws an HTML heat map: give it a file with --output FILE")
    elif not text:
        raise UsageError("give the text to look at with --text or --text-file")
    setup(platform, threads)
    from charrnn import render
    from charrnn.trained import Seq2SeqModel, load

    model = load(checkpoint)
    if isinstance(model, Seq2SeqModel) or source is not None:
        _attention_page(model, source, output)
        return
    model_config = model.config.model
    if state is State.c and model_config.cell != "lstm":
        raise UsageError(f"--state c needs an LSTM; this model is a {model_config.cell}")
    acts = model.activations(text, layer, skip_unknown)
    values = acts.states[state.value]  # [N, H]
    if units:
        chosen = _parse_units(units, model_config.hidden_size)
    else:
        ranked = acts.top_units(top, feature.value if feature else None, state.value)
        measure = f"correlation with {feature.value}" if feature else "variance"
        err_console.print("  ".join(f"unit {unit}: {measure} {score:+.3f}" for unit, score in ranked), style="dim")
        chosen = [unit for unit, _ in ranked]
    if dump is not None:  # through a buffer: written to a path, NumPy would add ".npz" to any other name
        buffer = io.BytesIO()
        np.savez_compressed(buffer, text=np.array(acts.text), ids=acts.ids, layer=acts.layer, **acts.states,
                            top_ids=acts.top_ids, top_probs=acts.top_probs)
        write_atomic(dump, buffer.getvalue())
    shown = {unit: values[:, unit] for unit in chosen}
    if output is not None:
        predictions = [[(model.vocab.chars[int(i)], float(p)) for i, p in zip(top_ids, top_probs)]
                       for top_ids, top_probs in zip(acts.top_ids, acts.top_probs)]
        title = f"{model.path.name}: layer {acts.layer} {state.value}"
        write_atomic(output, render.html(acts.text, shown, predictions, title).encode("utf-8"))
        err_console.print(f"wrote {output}")
        return
    console = Console(highlight=False)
    for unit, block in zip(shown, terminal_blocks(acts.text, shown)):
        console.rule(f"layer {acts.layer} {state.value}, unit {unit}")
        console.print(block)


def _attention_page(model, source: str | None, output: Path | None) -> None:
    from charrnn import render
    from charrnn.trained import Seq2SeqModel

    if not isinstance(model, Seq2SeqModel):
        raise UsageError("--source is for encoder–decoder runs; this is a language model (use --text)")
    if source is None or output is None:
        raise UsageError("an encoder–decoder's view is its attention: give --source TEXT and --output FILE")
    attention = model.attention(source)
    title = f"{model.path.name}: {attention.source} \u2192 {attention.output}"
    write_atomic(output, render.attention_html(attention.source, attention.symbols, attention.weights, title).encode())
    err_console.print(f"wrote {output}")
