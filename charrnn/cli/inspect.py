"""`charrnn inspect`: what a checkpoint holds, as tables or JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from charrnn.cli.common import CHECKPOINT_HELP, JsonOption, Platform, app, scored_part, setup
from charrnn.config import dotted
from charrnn.rundir import strict_json
from charrnn.units import bits


@app.command("inspect")
def inspect_checkpoint(
    checkpoint: Annotated[Optional[Path], typer.Argument(help=CHECKPOINT_HELP, show_default=False)] = None,
    json_output: JsonOption = False,
) -> None:
    """Show what a checkpoint holds: architecture, vocabulary, progress, parameter shapes."""
    setup(Platform.cpu, None)  # reading a checkpoint needs no accelerator
    from charrnn.trained import load

    summary = load(checkpoint).describe()
    if json_output:
        print(strict_json(summary))
        return

    def loss(nats: float | None) -> str:
        return "-" if nats is None else f"{nats:.4f} nats/char ({bits(nats):.4f} bits/char)"

    overview = Table(title=summary["path"], show_header=False)
    for key, value in [
        ("file", f"{summary['file_bytes'] / 1e6:,.2f} MB, format {summary['format_version']}"),
        ("step", f"{summary['step']:,}"), ("val loss", loss(summary["val_loss"]) + scored_part(summary["val_fraction"])),
        ("best val loss", loss(summary["best_val_loss"])),
        *((("temperatures", ", ".join(f"{value:.4f}" for value in summary["temperatures"])),)
          if "temperatures" in summary else ()),
        ("parameters", f"{summary['parameter_count']:,}"),
        ("vocabulary", f"{summary['vocab_size']} {'tokens' if isinstance(summary['vocab'], list) else 'characters'}: "
                       f"{summary['vocab']!r}"),
        *((("source vocabulary", f"{len(summary['source_vocab'])} characters: {summary['source_vocab']!r}"),)
          if "source_vocab" in summary else ()),
        *((name, str(value)) for name, value in dotted(summary["config"]).items()),
    ]:
        overview.add_row(key, value)
    shapes = Table("parameter", "shape", "count")
    for name, shape in summary["parameter_shapes"].items():
        shapes.add_row(name, " x ".join(map(str, shape)), f"{math.prod(shape):,}")
    console = Console(highlight=False)
    console.print(overview)
    console.print(shapes)
