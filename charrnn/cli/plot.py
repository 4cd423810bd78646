"""`charrnn plot`: learning curves of runs on one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.common import OUTPUT, RunPaths, app, err_console


@app.command("plot")
def plot_curves(
    paths: RunPaths = None,
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="Image to write; its suffix picks the format (.png, .svg, .pdf).", rich_help_panel=OUTPUT)] = Path("curves.png"),
    log_scale: Annotated[bool, typer.Option("--log", help="Bits/char on a logarithmic axis, so that one run whose loss blew up does not flatten the others.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Plot training and validation bits/char against characters seen, every run on one figure."""
    from charrnn import runs
    from charrnn.plot import plot_runs

    run_dirs = runs.find_runs(paths)
    plot_runs(run_dirs, output, log_scale=log_scale)
    err_console.print(f"wrote {output}: {len(run_dirs)} runs")
