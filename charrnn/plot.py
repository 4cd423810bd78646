"""Learning curves of several runs on one figure: bits/char against characters seen."""

from __future__ import annotations

import io
from pathlib import Path

from charrnn import rundir, runs
from charrnn.atomic import write_atomic
from charrnn.errors import UsageError


def plot_runs(run_dirs: list[Path], output: Path, labels: list[str] | None = None, log_scale: bool = False) -> None:
    """Draw training (left) and validation (right) curves of every run and write the figure to `output`.

    With `log_scale`, bits/char are on a logarithmic axis: a run whose loss blew up no longer flattens the others.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    rows = runs.collect(run_dirs)
    labels = labels or runs.labels(rows)
    if len(labels) != len(run_dirs):
        raise UsageError(f"{len(labels)} labels for {len(run_dirs)} runs")
    figure = Figure(figsize=(12, 5), layout="constrained")
    canvas = FigureCanvasAgg(figure)  # Agg draws without a display; no pyplot, no global backend
    image_format = output.suffix.removeprefix(".").lower() or "png"
    if image_format not in canvas.get_supported_filetypes():
        raise UsageError(f"cannot write a {output.suffix} image; use one of "
                         f"{', '.join('.' + name for name in canvas.get_supported_filetypes())}")
    train_axes, val_axes = figure.subplots(1, 2, sharex=True, sharey=True)
    legend_lines = []  # a line a run
    for run_dir, row, label in zip(run_dirs, rows, labels):
        if row["status"] != rundir.FINISHED:
            label = f"{label} ({row['status']})"
        curve = runs.curves(run_dir)
        train_x, train_y = curve["train"]["chars_seen"], curve["train"]["bpc"]
        (line,) = train_axes.plot(train_x, train_y, marker="o" if len(train_x) == 1 else None, markersize=3,
                                  label=label)  # a lone point needs a marker to show
        legend_lines += val_axes.plot(curve["val"]["chars_seen"], curve["val"]["val_bpc"], marker="o", markersize=3,
                                      color=line.get_color(), label=label)
        if curve["val_part"]["chars_seen"]:  # evaluations of the split's first part: dashed, apart from the whole's
            val_axes.plot(curve["val_part"]["chars_seen"], curve["val_part"]["val_bpc"], marker="o", markersize=3,
                          linestyle="--", fillstyle="none", color=line.get_color())
    for axes, title in ((train_axes, "training"), (val_axes, "validation")):
        axes.set_title(title)
        axes.set_xlabel("characters seen")
        axes.grid(alpha=0.3)
    train_axes.set_ylabel("bits per character")
    if log_scale:  # the axes share y: setting one sets both
        from matplotlib.ticker import LogFormatter

        train_axes.set_yscale("log")
        # Bits/char of most runs lie within one decade: label the ticks inside it, not only the powers of 10.
        train_axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    # Below both panels, so that many runs with long labels never hide a curve.
    figure.legend(handles=legend_lines, loc="outside lower center", ncols=min(len(labels), 2), fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=image_format, dpi=120)
    write_atomic(output, buffer.getvalue())
