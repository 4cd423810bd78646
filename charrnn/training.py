"""`charrnn.train`: check the inputs, set up or resume the run directory, run the loop, stop cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import jax

from charrnn import checkpoint, config as config_lib, data, events, rundir, sizing, steps
from charrnn.atomic import probe_writable
from charrnn.config import Config
from charrnn.errors import CharrnnError, CheckpointError, CorpusError, DivergedError, Interrupted, PeerError, \
    StorageError, UsageError
from charrnn.loop import Loop, LoopState
from charrnn.seq2seq.pairs import target_vocab
from charrnn.seq2seq.task import PairsTask, load_pairs
from charrnn.task import Task, TextTask
from charrnn.tensorboard import TensorBoardWriter, tensorboardx

# Train keys that fix the data stream, the carried state's shape or what a checkpoint holds: a resumed run keeps them.
_RESUME_FIXED_TRAIN_KEYS = ("batch_size", "seq_len", "seed", "val_fraction", "calibration_fraction", "random_offset",
                            "ema", "members")
# Model keys that change how the arithmetic runs, not the parameters: free to change on resume.
_RESUME_FREE_MODEL_KEYS = ("dtype", "scan_unroll", "kernel")


def train(corpus: str | Path | None = None, out: str | Path | None = None,
          config: Config | str | Path | None = None, *, resume: str | Path | None = None, sets: Sequence[str] = (),
          callbacks: Sequence[events.Listener] = (), devices: int | None = None, **overrides: Any) -> events.Summary:
    """Train a model on `corpus` into the run directory `out`, or continue the run `resume`; return its summary.

    `config` is a `Config` or a TOML file; `sets` are "section.key=value" strings
    and `overrides` config keys by name (`hidden_size=256`), applied in that
    order. Each of `callbacks` receives every event of the run (`charrnn.events`).
    Raises the `charrnn.errors` exceptions the command line maps to exit codes.

        >>> summary = charrnn.train("corpus.txt", "runs/small", "configs/tiny.toml", steps=200, max_minutes=0)
        >>> summary.best_val_bpc
    """
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise UsageError("give either --resume RUN or --out DIR, not both")
    options = config_lib.options_from_names(overrides)
    made_run_dir = resume is None and out is None
    made_runs_root = made_run_dir and not rundir.DEFAULT_RUNS.exists()
    run_dir = Path(resume or out) if not made_run_dir else rundir.new_run_dir(rundir.DEFAULT_RUNS)
    if corpus is None:
        corpus = _resume_corpus(run_dir) if resume is not None else data.default_corpus()
    try:
        return _train(Path(corpus), run_dir, config, list(sets), options, resume is not None, list(callbacks),
                      devices)
    except CharrnnError:
        if made_run_dir:  # refused before anything was written: leave no empty run (or runs folder) behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
                if made_runs_root:
                    run_dir.parent.rmdir()
        raise
    except (jax.errors.JaxRuntimeError, ValueError) as error:  # gloo's failures come as either, by where they surface
        if jax.process_count() == 1 or not _LOST_PEER.search(str(error)):
            raise  # this process's own failure (out of memory, ...): an internal error, traceback with --debug
        # A collective failed: another process died, left, or stopped on an error of its own. The
        # state is the failed call's output, so nothing reads it; status.json keeps "running", which
        # reads as "interrupted" once this process lets go of the run's lock.
        first_line = str(error).strip().splitlines()[0]
        last = checkpoint.step_files(rundir.checkpoints_dir(run_dir))
        raise PeerError(f"another process of the run failed or left ({first_line}); last checkpoint: "
                        f"{last[-1] if last else 'none'}; see the other processes' errors, then resume "
                        f"every process with --resume {run_dir}") from error


# How the runtime words a collective or the coordination service losing a process.
_LOST_PEER = re.compile(r"gloo|unavailable|deadline_exceeded|connection (reset|refused|closed)|coordination|"
                        r"socket closed|heartbeat", re.IGNORECASE)


def load_corpus(path: Path, val_fraction: float, vocab: data.Vocab | None = None,
                checksum: str | None = None, calibration_fraction: float = 0.0) -> data.Corpus:
    """Read, check and split a corpus (`data.split`); a resumed run passes its `vocab` and the `checksum` its corpus
    had.

    The file is read twice, a block at a time (check and measure, then encode),
    so memory holds the compact id array and one block, never the whole text.
    """
    scanned = data.scan_corpus(path)
    if checksum is not None and scanned.checksum != checksum:
        raise UsageError(f"cannot resume on another corpus: {path} has checksum {scanned.checksum}, "
                         f"the run used {checksum}")
    if vocab is not None:
        scanned = scanned._replace(vocab=vocab)
    if len(scanned.vocab) < 2:
        raise CorpusError(f"{path} has a single distinct character ({scanned.vocab.chars!r}); there is nothing to learn")
    ids = data.encode_file(path, scanned)
    train_ids, val_ids, calibration_ids = data.split(ids, val_fraction, calibration_fraction)
    if len(calibration_ids) < 2:  # a text too short to spare two characters trains on all of them
        train_ids, val_ids, calibration_ids = data.split(ids, val_fraction)
    if len(val_ids) < 2:
        raise CorpusError(f"{path}: the validation split (train.val_fraction) has under 2 characters; use a longer text")
    return data.Corpus(scanned.vocab, train_ids, val_ids, scanned.checksum,
                       calibration_ids if len(calibration_ids) else None)


def _resume_corpus(run_dir: Path) -> Path:
    try:
        return Path(rundir.read_json(run_dir / rundir.STATUS_FILE)["corpus"])
    except (OSError, ValueError, KeyError):
        return data.default_corpus()


class StopFlag:
    """Remembers the first SIGINT/SIGTERM; later ones are ignored so a save in progress completes.

    Signal handlers can be set only from the main thread; elsewhere (a notebook's
    worker thread) a signal keeps its usual effect.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        if self.signal_number is None:
            self.signal_number = number

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _check_resumable(saved: Config, wanted: Config) -> None:
    conflicts = [line for line in config_lib.differences(saved, wanted, ("model",))
                 if line.split(":")[0].removeprefix("model.") not in _RESUME_FREE_MODEL_KEYS]
    conflicts += [line for line in config_lib.differences(saved, wanted, ("train",))
                  if line.split(":")[0].removeprefix("train.") in _RESUME_FIXED_TRAIN_KEYS]
    if conflicts:
        raise UsageError("cannot resume with a changed architecture, data layout or weight averaging: "
                         + "; ".join(conflicts))


def _check_inputs(corpus_path: Path, run_dir: Path, source, assignments: list[str],
                  options: dict[str, dict[str, Any]], resume: bool):
    """Check everything a run needs before writing anything; return (config, task, resumed checkpoint)."""
    if resume and not checkpoint.step_files(rundir.checkpoints_dir(run_dir)):
        # Stopped before its first checkpoint: start again from the run's saved config.
        try:
            saved = config_lib.from_dict(rundir.read_json(run_dir / rundir.CONFIG_FILE))
        except (OSError, ValueError):
            raise CheckpointError(f"{run_dir} is not a charrnn run directory (nothing to resume)") from None
        config = config_lib.resolve(source, assignments, options, base=saved)
        return config, load_task(corpus_path, config), None
    if resume:
        latest = checkpoint.read_latest(rundir.checkpoints_dir(run_dir))
        metadata = latest[2]
        saved = config_lib.from_dict(metadata["config"])
        config = sizing.as_resumed(saved, config_lib.resolve(source, assignments, options, base=saved))
        _check_resumable(saved, config)
        task = load_task(corpus_path, config, metadata)
        last = steps.last_step(config.train, task.steps_per_epoch)
        if last < metadata["step"]:  # train.steps and train.max_epochs are the run's totals, not more to add
            raise UsageError(f"{run_dir} is at step {metadata['step']}; train.steps and train.max_epochs are the "
                             f"run's totals, so these would end it at step {last}, before where it is")
        return config, task, latest
    config = config_lib.resolve(source, assignments, options)
    # Only process 0 writes the run directory; the others may find it already begun.
    if jax.process_index() == 0 and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"{run_dir} already exists; continue a run with --resume, or choose another --out")
    return config, load_task(corpus_path, config), None


def load_task(path: Path, config: Config, metadata: dict[str, Any] | None = None) -> Task:
    """What the run learns from `path`, by `model.kind`; a resumed run passes its checkpoint's `metadata`
    (vocabularies and checksum), and the data must be the same."""
    checksum = metadata["corpus_sha"] if metadata else None
    if config.model.kind == "seq2seq":
        vocabs = ((data.Vocab(metadata["source_vocab"]), target_vocab(config.model.target, metadata["vocab"]))
                  if metadata else None)
        return PairsTask(config, load_pairs(path, config, vocabs, checksum))
    vocab = data.Vocab(metadata["vocab"]) if metadata else None
    return TextTask(config, load_corpus(path, config.train.val_fraction, vocab, checksum,
                                        config.train.calibration_fraction))


def _probe(directory: Path) -> None:
    try:
        probe_writable(directory)
    except OSError as error:
        raise StorageError(f"cannot write to {directory}: {error.strerror}") from None


def _file_writers(run_dir: Path, corpus_path: Path, config: Config, first_step: int) -> list[events.Listener]:
    """The listeners that keep the run directory's record: metrics.jsonl, status.json, TensorBoard."""
    metrics_log = rundir.MetricsLog(run_dir)
    identity = {"corpus": str(corpus_path.resolve()), "pid": os.getpid()}

    def record(event: events.Event) -> None:
        if hasattr(event, "record"):
            metrics_log.write(event.record())

    def status(event: events.Event) -> None:
        if isinstance(event, events.Started):
            rundir.write_status(run_dir, rundir.RUNNING, {**identity, "step": event.first_step})
        elif isinstance(event, events.Stopped):
            summary = event.summary.to_dict() if event.summary else {}
            rundir.write_status(run_dir, event.status, {**identity, "step": event.step, **summary})

    writers = [record, status]
    if config.train.tensorboard:
        # A resumed run hides what the stopped one logged after its checkpoint.
        writers.append(TensorBoardWriter(run_dir / config.train.tensorboard, first_step + 1 if first_step else None))
    return writers


def _train(corpus_path: Path, run_dir: Path, source, assignments: list[str], options: dict, resume: bool,
           callbacks: list[events.Listener], devices: int | None) -> events.Summary:
    config, task, resumed = _check_inputs(corpus_path, run_dir, source, assignments, options, resume)
    choice = sizing.Choice(config, 0.0, "")
    if not resumed:
        choice = sizing.choose(config, task.steps_per_epoch, lambda larger: sizing.seconds_per_step(larger, devices),
                               lambda larger: steps.placement(larger, devices))
        if choice.config != config:  # the task follows the config the run trains (larger models are language models)
            task = TextTask(choice.config, task.corpus)
        config = choice.config
    if config.train.tensorboard:  # the optional extra is there, and a folder of its own writable, before any writing
        tensorboardx()
        if Path(config.train.tensorboard).is_absolute():
            _probe(Path(config.train.tensorboard))
    placement = steps.placement(config, devices)
    optimizer = steps.make_optimizer(config.train)
    if resumed:
        path, arrays, metadata, skipped = resumed
        state, carry = checkpoint.restore_training(arrays, task, optimizer, config.train.batch_size, metadata["step"],
                                                   averaged=config.train.ema > 0, num_members=config.train.members)
        progress = LoopState(state, carry, float(metadata["elapsed_s"]), best_val_loss=metadata.get("best_val_loss"),
                             last_val_loss=metadata.get("val_loss"),
                             last_val_fraction=metadata.get("val_fraction", 1.0), last_checkpoint=path)
    else:
        skipped, (state, carry) = [], steps.fresh_state(config, optimizer, task.init_params, task.initial_carry)
        progress = LoopState(state, carry, elapsed_s=choice.elapsed_s)  # choosing the model was the run's first work
    progress.state, progress.carry = steps.place(progress.state, progress.carry, placement, config.train.batch_size)
    first_step = int(state.step)
    listeners: list[events.Listener] = []  # filled below, once the run directory may be written
    emit = events.broadcast(listeners)
    stop = StopFlag()
    loop = Loop(config, task, run_dir, placement, optimizer, progress, lambda: stop.signal_number, emit)
    if placement.is_main:
        rundir.create(run_dir)
    lock = rundir.RunLock(run_dir) if placement.is_main else contextlib.nullcontext()
    with lock, stop:
        if placement.is_main:  # the other processes of a multi-process run keep quiet and write nothing
            listeners += [*_file_writers(run_dir, corpus_path, config, first_step), *callbacks]
        emit(events.Message(f"training on {corpus_path} ({task.describe()}) into {run_dir}, "
                            f"{placement.num_devices} device(s)"))
        if choice.note:
            emit(events.Message(choice.note))
        for line in config_lib.summary_lines(config):
            emit(events.Message(line))
        if placement.is_main:
            rundir.write_json(run_dir / rundir.CONFIG_FILE, config_lib.to_dict(config))
        for problem in skipped:
            emit(events.Message(f"skipped a damaged checkpoint: {problem}"))
        if resumed:
            emit(events.Message(f"resuming {run_dir} at step {first_step}"))
        if loop.last_step < config.train.steps:
            emit(events.Message(f"train.max_epochs = {config.train.max_epochs:g} ends the run at step {loop.last_step} "
                                f"({task.steps_per_epoch} steps an epoch) unless the budget ends it first"))
        emit(events.Started(run_dir, first_step, loop.last_step, config.train.max_minutes * 60.0))
        try:
            summary = loop.run()
        except DivergedError:
            emit(events.Stopped(rundir.DIVERGED, int(progress.state.step)))
            raise
        except Interrupted:
            emit(events.Stopped(rundir.INTERRUPTED, int(progress.state.step)))
            raise
        emit(events.Stopped(rundir.FINISHED, summary.steps, summary))
        return summary
