"""Comparing runs: find run directories, one row of results and config per run, sort, CSV, curves."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from charrnn import config as config_lib, rundir
from charrnn.errors import UsageError
from charrnn.units import bits

# The result columns of a row; every other key of a row is a flattened config key ("model.cell").
RESULT_COLUMNS = ("run", "status", "steps", "best_val_loss", "best_val_bpc", "final_val_bpc", "chars_per_s", "wall_s")
# Config keys that say where a run's records go, not how it trains: never a column or a label.
RECORDING_KEYS = ("train.tensorboard",)
# What the table shows after the run and the config keys that differ between runs.
SHOWN_RESULTS = ("best_val_loss", "best_val_bpc", "chars_per_s", "steps", "wall_s", "status")


def find_runs(paths: list[Path] | None = None) -> list[Path]:
    """Return the run directories among `paths` (none named: runs/) and their children, sorted, each once."""
    if not paths:
        if not rundir.DEFAULT_RUNS.is_dir():
            raise UsageError(f"no runs under {rundir.DEFAULT_RUNS}/ (train one, or name run directories)")
        paths = [rundir.DEFAULT_RUNS]
    found: dict[Path, Path] = {}
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        candidates = [path] if rundir.is_run_dir(path) else sorted(path.iterdir()) if path.is_dir() else []
        for candidate in candidates:
            if rundir.is_run_dir(candidate):
                found.setdefault(candidate.resolve(), candidate)
    if not found:
        named = ", ".join(str(path) for path in paths)
        raise UsageError(f"no run directories in {named} (a run directory holds {rundir.CONFIG_FILE} "
                         f"and {rundir.CHECKPOINTS}/)")
    return sorted(found.values())


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _flat_config(run_dir: Path) -> dict[str, Any]:
    """config.json as {"model.cell": "lstm", ...}, keys it predates at the defaults it ran with; empty if unreadable."""
    try:
        saved = rundir.read_json(run_dir / rundir.CONFIG_FILE)
    except (OSError, ValueError):
        return {}
    sections = config_lib.to_dict(config_lib.saved_defaults())
    for section, values in saved.items():
        if isinstance(values, dict):
            sections.setdefault(section, {}).update(values)
    return config_lib.dotted(sections)


def _results_from_summary(status: dict[str, Any]) -> dict[str, Any]:
    """The result columns of a finished run, from the summary in its status.json."""
    return {"steps": status.get("steps"), "best_val_loss": status.get("best_val_loss"),
            "best_val_bpc": status.get("best_val_bpc"), "final_val_bpc": status.get("final_val_bpc"),
            "chars_per_s": status.get("train_chars_per_s"), "wall_s": status.get("wall_s")}


def _results_from_metrics(records: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, Any]:
    """The result columns of a run without a summary (running, interrupted, diverged), from its metrics."""
    evals = [record for record in records if _scores_whole_split(record) and _is_finite_number(record.get("val_loss"))]
    trains = [record for record in records if record.get("event") == "train" and _is_finite_number(record.get("chars_per_s"))]
    steps = max([record["step"] for record in records if "step" in record] + [status.get("step", 0)])
    if status["status"] == rundir.DIVERGED:
        # The step whose loss was non-finite; status.json names the step of the call in flight after it.
        steps = next((record["step"] for record in reversed(records) if record.get("event") == "diverged"), steps)
    best = min((record["val_loss"] for record in evals), default=None)
    return {
        "steps": steps,
        "best_val_loss": best,
        "best_val_bpc": bits(best),
        "final_val_bpc": evals[-1]["val_bpc"] if evals else None,
        # Each log window's rate leaves out compilation and evaluation; the median ignores a slow window.
        "chars_per_s": statistics.median(record["chars_per_s"] for record in trains) if trains else None,
        "wall_s": max((record["elapsed_s"] for record in records if _is_finite_number(record.get("elapsed_s"))), default=None),
    }


def collect(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Return one row per run: the RESULT_COLUMNS, then the run's config flattened to "section.key"."""
    rows = []
    for run_dir in run_dirs:
        status = rundir.read_status(run_dir)
        results = _results_from_summary(status) if status["status"] == rundir.FINISHED else {}
        if None in results.values() or not results:
            # Unfinished, or a summary with gaps (a run resumed at its last step measured no speed).
            derived = _results_from_metrics(rundir.read_metrics(run_dir), status)
            results = {key: derived[key] if results.get(key) is None else results[key] for key in derived}
        rows.append({"run": str(run_dir), "status": status["status"], **results, **_flat_config(run_dir)})
    return rows


def config_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every config key of any row, in config order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((key, None) for key in row if key not in RESULT_COLUMNS)
    return list(keys)


def differing_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Return the config keys whose values are not the same in every run (none for one run).

    Where a run's records go (`train.tensorboard`) is no difference in what was trained.
    """
    return [key for key in config_keys(rows) if key not in RECORDING_KEYS
            and any(row.get(key) != rows[0].get(key) for row in rows[1:])]


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns to show: the run, the config keys that differ, then the results."""
    return ["run", *differing_keys(rows), *SHOWN_RESULTS]


def labels(rows: list[dict[str, Any]]) -> list[str]:
    """Name each run by its differing config values ("model.cell=gru model.hidden_size=128"), else by its directory."""
    keys = differing_keys(rows)
    return [" ".join(f"{key}={row.get(key)}" for key in keys) or Path(row["run"]).name for row in rows]


def sort_rows(rows: list[dict[str, Any]], column: str, descending: bool = False) -> list[dict[str, Any]]:
    """Return `rows` sorted by `column`; runs without a value come last either way."""
    valid = list(RESULT_COLUMNS) + config_keys(rows)
    if column not in valid:
        raise UsageError(f"cannot sort by {column!r}; columns: {', '.join(valid)}")
    present = [row for row in rows if row.get(column) is not None]
    missing = [row for row in rows if row.get(column) is None]
    return sorted(present, key=lambda row: row[column], reverse=descending) + missing


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Return `columns` of `rows` as CSV with a header; floats keep every digit, None is empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: "" if row.get(column) is None else row[column] for column in columns} for row in rows)
    return buffer.getvalue()


def _append_in_order(xs: list[float], ys: list[float], x: float, y: float) -> None:
    """Append a point; a resumed run logs again from its checkpoint, so later points replace overlapped ones."""
    while xs and xs[-1] >= x:
        xs.pop()
        ys.pop()
    xs.append(x)
    ys.append(y)


def _scores_whole_split(record: dict[str, Any]) -> bool:
    """Whether a metrics record is an evaluation of all of the validation split (records before
    `train.eval_fraction` have no "fraction": they all were)."""
    return record.get("event") == "eval" and record.get("fraction", 1.0) == 1.0


def curves(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Return bits/char against characters seen: {"train": {chars_seen, bpc}, "val": {chars_seen, val_bpc}},
    and "val_part" as "val" for the evaluations of the validation split's first part (`train.eval_fraction`)."""
    result = {"train": {"chars_seen": [], "bpc": []}, "val": {"chars_seen": [], "val_bpc": []},
              "val_part": {"chars_seen": [], "val_bpc": []}}
    for record in rundir.read_metrics(run_dir):
        event, x = record.get("event"), record.get("chars_seen")
        if event == "train" and x is not None and record.get("bpc") is not None:
            _append_in_order(result["train"]["chars_seen"], result["train"]["bpc"], x, record["bpc"])
        elif event == "eval" and x is not None and record.get("val_bpc") is not None:
            curve = result["val" if _scores_whole_split(record) else "val_part"]
            _append_in_order(curve["chars_seen"], curve["val_bpc"], x, record["val_bpc"])
    return result
