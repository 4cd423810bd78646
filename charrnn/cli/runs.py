"""`charrnn runs`: one table of runs: the config keys that differ, results, status."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from charrnn.cli.common import OUTPUT, RunPaths, app
from charrnn.errors import UsageError
from charrnn.rundir import strict_json

# How `charrnn runs` shows its result columns; config keys and the rest show as they are.
_RUN_HEADERS = {"best_val_loss": "best val nats/char", "best_val_bpc": "best val bits/char", "chars_per_s": "chars/s",
                "wall_s": "time (s)"}
_RUN_FORMATS = {"best_val_loss": "{:.4f}", "best_val_bpc": "{:.4f}", "chars_per_s": "{:,.0f}", "wall_s": "{:,.0f}"}
_STATUS_STYLES = {"diverged": "red", "interrupted": "yellow", "running": "cyan", "unknown": "dim"}


@app.command("runs")
def compare_runs(
    paths: RunPaths = None,
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
