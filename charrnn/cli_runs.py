"""Commands for sweeps and measurement: `runs`, `plot`, `bench`."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from charrnn.cli import OUTPUT, RUN, PlatformOption, ThreadsOption, _setup, app, default_corpus, err_console
from charrnn.errors import UsageError
from charrnn.rundir import strict_json

RunPaths = Annotated[list[Path], typer.Argument(exists=True, help="Run directories, or directories holding them (one level down).", show_default=False)]
# How `charrnn runs` shows its result columns; config keys and the rest show as they are.
_RUN_HEADERS = {"best_val_loss": "best val nats/char", "best_val_bpc": "best val bits/char", "chars_per_s": "chars/s",
                "wall_s": "time (s)"}
_RUN_FORMATS = {"best_val_loss": "{:.4f}", "best_val_bpc": "{:.4f}", "chars_per_s": "{:,.0f}", "wall_s": "{:,.0f}"}
_STATUS_STYLES = {"diverged": "red", "interrupted": "yellow", "running": "cyan", "unknown": "dim"}
MAX_WINDOW_S = 3600.0  # bench's timed windows: an hour each is already more than any measurement needs
MAX_CORPUS_MB = 100_000.0  # 100 GB: what a disk can hold for the memory measurement, and more than RAM


@app.command("runs")
def compare_runs(
    paths: RunPaths,
    sort: Annotated[str, typer.Option("--sort", help="Column to sort by: best_val_bpc, best_val_loss, chars_per_s, steps, wall_s, status, run, or a config key such as model.hidden_size.", rich_help_panel=OUTPUT)] = "best_val_bpc",
    descending: Annotated[bool, typer.Option("--desc", help="Largest first (runs without a value stay last).", rich_help_panel=OUTPUT)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list: every run's results and full config.", rich_help_panel=OUTPUT)] = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print the table's columns as CSV, every digit kept.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Compare runs in one table: the config keys that differ, best validation loss, speed, time, status."""
    if json_output and csv_output:
        raise UsageError("give either --json or --csv, not both")
    from charrnn import runs

    rows = runs.sort_rows(runs.collect(runs.find_runs(paths)), sort, descending)
    columns = runs.table_columns(rows)
    if json_output:
        print(strict_json(rows, indent=2))
    elif csv_output:
        sys.stdout.write(runs.to_csv(rows, columns))
    else:
        _print_runs_table(rows, columns)


def _print_runs_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Draw the rows as a rich table on stdout (the command's result); piped, at full width."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        numeric = column in _RUN_FORMATS or column == "steps"
        table.add_column(_RUN_HEADERS.get(column, column), justify="right" if numeric else "left")
    for row in rows:
        cells = ["-" if row.get(column) is None else _RUN_FORMATS.get(column, "{}").format(row[column]) for column in columns]
        table.add_row(*cells, style=_STATUS_STYLES.get(row["status"]))
    Console(highlight=False, width=None if sys.stdout.isatty() else 10_000).print(table)


@app.command("plot")
def plot_curves(
    paths: RunPaths,
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="Image to write; its suffix picks the format (.png, .svg, .pdf).", rich_help_panel=OUTPUT)] = Path("curves.png"),
) -> None:
    """Plot training and validation bits/char against characters seen, every run on one figure."""
    from charrnn import runs
    from charrnn.plot import plot_runs

    run_dirs = runs.find_runs(paths)
    plot_runs(run_dirs, output)
    err_console.print(f"wrote {output}: {len(run_dirs)} runs")


@app.command("bench")
def benchmark(
    config_file: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="TOML config of the model to measure.", rich_help_panel=RUN)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).", rich_help_panel=RUN)] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed windows; the median is reported.")] = 5,
    seconds: Annotated[float, typer.Option("--seconds", min=0.1, help="Length of each timed training window.")] = 2.0,
    corpus_mb: Annotated[float, typer.Option("--corpus-mb", min=0, help="Also measure peak memory of training on a corpus this large (0 = skip).")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Measure training and sampling throughput (chars/s), compile time and memory of a model."""
    from charrnn import config as config_lib

    config = config_lib.resolve(config_file, assignments or [], {})
    if not math.isfinite(seconds) or seconds > MAX_WINDOW_S:
        raise UsageError(f"--seconds must be at most {MAX_WINDOW_S:g}, got {seconds}")
    from charrnn import bench as benchmarks

    if corpus_mb and not (2 * benchmarks.BASELINE_CORPUS_MB <= corpus_mb <= MAX_CORPUS_MB):
        raise UsageError(f"--corpus-mb must be at least twice the {benchmarks.BASELINE_CORPUS_MB:g} MB baseline and "
                         f"at most {MAX_CORPUS_MB:g}, got {corpus_mb}")
    # Training is measured as `charrnn train` runs it, but without the compilation cache: a
    # compile time read back from it would be the time to load a cached program.
    _setup(platform, threads, cpu_device_per_core=True, compilation_cache=False)

    err_console.print(f"measuring {config.model.cell} {config.model.num_layers}x{config.model.hidden_size}, "
                      f"batch {config.train.batch_size}, seq {config.train.seq_len} ...")
    result = benchmarks.benchmark(config, repeats, seconds)
    if corpus_mb:
        result.update(benchmarks.measure_corpus_memory(corpus_mb, default_corpus().read_text(encoding="utf-8")))
    if json_output:
        print(strict_json(result))
        return
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else value
        print(f"{key:{width}} {shown}")


