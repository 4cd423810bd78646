"""`charrnn train`: options to a config, `charrnn.train`, a progress bar, the JSON summary on stdout."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from charrnn import events, rundir
from charrnn.cli.common import MODEL, OUTPUT, RUN, SCALE, TRAINING, PlatformOption, ThreadsOption, \
    app, err_console, flags, scored_part, setup
from charrnn.rundir import strict_json
from charrnn.stdout import EndsWhenReaderLeaves, ReaderGone
from charrnn.units import bits


class CellName(str, Enum):
    rnn = "rnn"
    gru = "gru"
    lstm = "lstm"


class ProgressBar:
    """Draws a rich progress bar on a terminal, plain periodic lines otherwise; a listener of the run's events."""

    def __init__(self):
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Started) and err_console.is_terminal:
            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} chars/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
            )
            self.task = self.bar.add_task("train", total=event.total_steps, completed=event.first_step, loss="-",
                                          val="-", speed="-")
            self.bar.start()
        elif isinstance(event, events.Logged):
            val = "-" if event.val_loss is None else f"{event.val_loss:.3f}"
            speed = "-" if event.chars_per_s is None else f"{event.chars_per_s:,.0f}"
            if self.bar is not None:
                self.bar.update(self.task, completed=event.step, loss=f"{event.loss:.3f}", val=val, speed=speed)
            else:
                err_console.print(f"step {event.step}  loss {event.loss:.4f}  val {val}  lr {event.lr:.2e}  "
                                  f"{speed} chars/s  {event.elapsed_s:.0f}s")
        elif isinstance(event, events.Evaluated):
            self.print(f"step {event.step}: val {event.val_loss:.4f} nats/char ({bits(event.val_loss):.3f} "
                       f"bits/char){scored_part(event.fraction)}, saved {event.checkpoint.name}")
        elif isinstance(event, events.Message):
            self.print(event.text)
        elif isinstance(event, events.Stopped):
            self.stop()

    def print(self, text: str) -> None:
        (self.bar.console if self.bar else err_console).print(text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def json_lines(out) -> events.Listener:
    """A listener printing each event that metrics.jsonl records as one JSON line on `out`.

    A reader that leaves (`| head -1`) stops the lines, not the run: training
    goes on to its end and its checkpoints, as without --json.
    """
    reader_gone = False

    def write(event: events.Event) -> None:
        nonlocal reader_gone
        if hasattr(event, "record") and not reader_gone:
            try:
                print(strict_json(event.record()), file=out, flush=True)
            except ReaderGone:
                reader_gone = True

    return write


@app.command()
def train(
    corpus: Annotated[Optional[Path], typer.Argument(help="UTF-8 text to learn from, or for model.kind = seq2seq a file of source<TAB>target lines (default: data/tinyshakespeare.txt; with --resume, the run's corpus).", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="TOML config (see configs/); without it, the defaults: configs/shakespeare.toml's recipe without its epoch cap.", rich_help_panel=RUN)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set model.cell=gru (repeatable).", rich_help_panel=RUN)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: a new one under ./runs/).", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory exactly where it stopped.", rich_help_panel=RUN)] = None,
    cell: Annotated[Optional[CellName], typer.Option("--cell", help="model.cell", rich_help_panel=MODEL)] = None,
    num_layers: Annotated[Optional[int], typer.Option("--layers", help="model.num_layers", rich_help_panel=MODEL)] = None,
    hidden_size: Annotated[Optional[int], typer.Option("--hidden", help="model.hidden_size", rich_help_panel=MODEL)] = None,
    embedding_size: Annotated[Optional[int], typer.Option("--embedding", help="model.embedding_size", rich_help_panel=MODEL)] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="model.dropout", rich_help_panel=MODEL)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="train.steps: the run's total optimizer steps.", rich_help_panel=TRAINING)] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="train.max_minutes: wall-clock budget (0 = none).", rich_help_panel=TRAINING)] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="train.max_epochs: passes over the training data that end the run (0 = no cap).", rich_help_panel=TRAINING)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="train.batch_size", rich_help_panel=TRAINING)] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="train.seq_len", rich_help_panel=TRAINING)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="train.lr", rich_help_panel=TRAINING)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="train.seed", rich_help_panel=TRAINING)] = None,
    members: Annotated[Optional[int], typer.Option("--members", help="train.members: models trained side by side from seeds --seed, --seed + 1, ...; they predict, write and are scored together.", rich_help_panel=TRAINING)] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="train.tensorboard: write TensorBoard event files into the run's tensorboard/ folder (needs the optional tensorboard extra).", rich_help_panel=OUTPUT)] = False,
    tensorboard_dir: Annotated[Optional[Path], typer.Option("--tensorboard-dir", file_okay=False, help="Write the TensorBoard event files into this folder instead (implies --tensorboard).", rich_help_panel=OUTPUT)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and the final JSON line.", rich_help_panel=OUTPUT)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Also print every event on stdout as it happens, one JSON object a line (as metrics.jsonl), before the summary.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
    devices: Annotated[Optional[int], typer.Option("--devices", min=1, help="Devices to split the streams over; train.batch_size must divide. Default: all GPUs, or on a CPU each core when a language model is small enough to gain (an encoder–decoder: one).", rich_help_panel=SCALE)] = None,
    coordinator: Annotated[Optional[str], typer.Option("--coordinator", help="HOST:PORT of process 0, to train with several processes or hosts.", rich_help_panel=SCALE)] = None,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", min=1, help="Processes in a multi-process run.", rich_help_panel=SCALE)] = None,
    process_id: Annotated[Optional[int], typer.Option("--process-id", min=0, help="This process's index, 0 to --num-processes - 1.", rich_help_panel=SCALE)] = None,
    distributed_auto: Annotated[bool, typer.Option("--distributed", help="Join a multi-process run described by the environment (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...).", rich_help_panel=SCALE)] = False,
) -> None:
    """Train a model on CORPUS, saving checkpoints; print a JSON summary line at the end (--json: every event too)."""
    options = {"cell": cell.value if cell else None, "num_layers": num_layers, "hidden_size": hidden_size,
               "embedding_size": embedding_size, "dropout": dropout, "steps": steps, "max_minutes": minutes,
               "max_epochs": epochs, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
               "members": members,
               "tensorboard": _tensorboard_dir(tensorboard, tensorboard_dir)}
    # One process per host splits its streams over the CPU's cores itself; several take a device each.
    multi_process = bool(coordinator or distributed_auto)
    setup(platform, threads, cpu_device_per_core=not multi_process, multi_process=multi_process)
    from charrnn import distributed
    from charrnn.training import train as train_model

    distributed.check_scale_out(coordinator, num_processes, process_id, distributed_auto,
                                (resume or out) is not None)
    results_out = sys.stdout
    if multi_process:
        flags["multi_process"] = True
        # The collectives' native code prints on file descriptor 1; keep stdout for the results alone,
        # and send the rest to stderr (or nowhere, with --quiet).
        results_out = EndsWhenReaderLeaves(os.fdopen(os.dup(sys.stdout.fileno()), "w"))
        native_out = os.open(os.devnull, os.O_WRONLY) if quiet else sys.stderr.fileno()
        os.dup2(native_out, sys.stdout.fileno())
        if not quiet:
            err_console.print(f"joining the multi-process run (up to {distributed.JOIN_TIMEOUT_S} s for every "
                              f"process to start)", style="dim")
    distributed.initialize(coordinator, num_processes, process_id, distributed_auto)

    progress = ProgressBar()
    callbacks = [] if quiet else [progress]
    if json_output:
        callbacks.append(json_lines(results_out))
    try:
        summary = train_model(corpus, out, config_file, resume=resume, sets=assignments or [], callbacks=callbacks,
                              devices=devices, **{key: value for key, value in options.items() if value is not None})
    finally:
        progress.stop()
    if not quiet:
        err_console.print(f"done: best val {summary.best_val_loss:.4f} nats/char "
                          f"({summary.best_val_bpc:.3f} bits/char) in {summary.wall_s:.0f}s")
    print(strict_json(summary.to_dict()), file=results_out, flush=True)


def _tensorboard_dir(in_run_dir: bool, directory: Path | None) -> str | None:
    """train.tensorboard for the options: DIR from here, the run's own folder, or unset (the config decides)."""
    if directory is not None:
        return str(directory.resolve())
    return rundir.TENSORBOARD_DIR if in_run_dir else None
