"""One training run: check the input, set up or resume the run directory, train, checkpoint, stop cleanly."""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from charrnn import checkpoint, config as config_lib, data, distributed, model, rundir, train
from charrnn.config import Config
from charrnn.errors import EXIT_SIGINT, EXIT_SIGTERM, CharrnnError, CheckpointError, CorpusError, DivergedError, \
    PeerError, UsageError
from charrnn.loop import Loop
from charrnn.units import bits

# Train keys that fix the data stream and the carried state's shape: a resumed run must keep them.
_RESUME_FIXED_TRAIN_KEYS = ("batch_size", "seq_len", "seed", "val_fraction", "random_offset")
# Model keys that change how the arithmetic runs, not the parameters: free to change on resume.
_RESUME_FREE_MODEL_KEYS = ("dtype", "scan_unroll")


class Interrupted(CharrnnError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = EXIT_SIGINT if signal_number == signal.SIGINT else EXIT_SIGTERM


class Reporter:
    """What a run tells its user; the CLI draws it, tests can record it. Defaults say nothing."""

    def start(self, total_steps: int, first_step: int, budget_s: float) -> None: ...

    def progress(self, step: int, info: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass
class Corpus:
    """A corpus cut for training: encoded train and validation ids plus identity."""

    vocab: data.Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    checksum: str


def load_corpus(path: Path, val_fraction: float, resuming: dict[str, Any] | None = None) -> Corpus:
    """Read, check and split a corpus; when `resuming` (checkpoint metadata), it must be the run's corpus.

    The file is read twice, a block at a time (check and measure, then encode),
    so memory holds the compact id array and one block, never the whole text.
    """
    scanned = data.scan_corpus(path)
    if resuming is not None:
        if scanned.checksum != resuming["corpus_sha"]:
            raise UsageError(f"cannot resume on another corpus: {path} has checksum {scanned.checksum}, "
                             f"the run used {resuming['corpus_sha']}")
        scanned = scanned._replace(vocab=data.Vocab(resuming["vocab"]))
    if len(scanned.vocab) < 2:
        raise CorpusError(f"{path} has a single distinct character ({scanned.vocab.chars!r}); there is nothing to learn")
    train_ids, val_ids = data.split(data.encode_file(path, scanned), val_fraction)
    if len(val_ids) < 2:
        raise CorpusError(f"{path}: the validation split (train.val_fraction) has under 2 characters; use a longer text")
    return Corpus(scanned.vocab, train_ids, val_ids, scanned.checksum)


class StopFlag:
    """Remembers the first SIGINT/SIGTERM; later ones are ignored so a save in progress completes."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        if self.signal_number is None:
            self.signal_number = number

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass
class RunState:
    """What the loop carries between calls and what a checkpoint stores beside the arrays."""

    state: train.TrainState
    carry: tuple
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_checkpoint: Path | None = None


def _check_resumable(saved: Config, wanted: Config) -> None:
    conflicts = [line for line in config_lib.differences(saved, wanted, ("model",))
                 if line.split(":")[0].removeprefix("model.") not in _RESUME_FREE_MODEL_KEYS]
    conflicts += [line for line in config_lib.differences(saved, wanted, ("train",))
                  if line.split(":")[0].removeprefix("train.") in _RESUME_FIXED_TRAIN_KEYS]
    if conflicts:
        raise UsageError("cannot resume with a changed architecture or data layout: " + "; ".join(conflicts))


def prepare_run(corpus_path: Path, run_dir: Path, config_file: Path | None, assignments: list[str],
                options: dict[str, dict[str, Any]], resume: bool):
    """Check everything a run needs before writing anything; return (config, corpus, resume data)."""
    if resume and not checkpoint.step_files(rundir.checkpoints_dir(run_dir)):
        # Stopped before its first checkpoint: start again from the run's saved config.
        try:
            saved = config_lib.from_dict(rundir.read_json(run_dir / rundir.CONFIG_FILE))
        except (OSError, ValueError):
            raise CheckpointError(f"{run_dir} is not a charrnn run directory (nothing to resume)") from None
        config = config_lib.resolve(config_file, assignments, options, base=saved)
        corpus = load_corpus(corpus_path, config.train.val_fraction)
        resumed = None
    elif resume:
        path, arrays, metadata, skipped = checkpoint.read_latest(rundir.checkpoints_dir(run_dir))
        saved = config_lib.from_dict(metadata["config"])
        config = config_lib.resolve(config_file, assignments, options, base=saved)
        _check_resumable(saved, config)
        if config.train.steps < metadata["step"]:  # train.steps is the run's total, not steps to add
            raise UsageError(f"{run_dir} is at step {metadata['step']}; train.steps is the run's total, so "
                             f"{config.train.steps} would end it before where it is")
        corpus = load_corpus(corpus_path, config.train.val_fraction, resuming=metadata)
        resumed = (path, arrays, metadata, skipped)
    else:
        config = config_lib.resolve(config_file, assignments, options)
        # Only process 0 writes the run directory; the others may find it already begun.
        if jax.process_index() == 0 and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"{run_dir} already exists; continue a run with --resume, or choose another --out")
        corpus = load_corpus(corpus_path, config.train.val_fraction)
        resumed = None
    data.stream_layout(len(corpus.train_ids), config.train.batch_size, config.train.seq_len)
    return config, corpus, resumed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _state_arrays(run: RunState) -> dict[str, np.ndarray]:
    """Everything a resume needs, as named host arrays (gathered from every process)."""
    params, opt_state, carry = distributed.to_host((run.state.params, run.state.opt_state, run.carry))
    return {**checkpoint.flatten(params, "params"), **checkpoint.flatten(opt_state, "opt_state"),
            **checkpoint.flatten(carry, "carry")}


@dataclass
class Session:
    """A run in progress: its config, data, state, placement, and the files it writes (process 0 only)."""

    config: Config
    corpus: Corpus
    run_dir: Path
    corpus_path: Path
    optimizer: Any
    placement: distributed.Placement
    reporter: Reporter
    stop: StopFlag
    run: RunState | None = None

    def __post_init__(self):
        self.is_main = self.placement.is_main
        self.metrics_log = rundir.MetricsLog(self.run_dir)

    def stop_requested(self) -> bool:
        return self.stop.signal_number is not None

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.metrics_log.write(record)

    def diverged(self, step: int, what: str) -> DivergedError:
        """Log the divergence at `step` and return the error naming `what` went non-finite and the last checkpoint."""
        last = self.run.last_checkpoint or "none (no checkpoint was saved yet)"
        self.log({"event": "diverged", "step": step})
        return DivergedError(f"{what} became non-finite at step {step}; last good checkpoint: {last}")

    def status(self, status: str, fields: dict[str, Any]) -> None:
        if self.is_main:
            identity = {"corpus": str(self.corpus_path.resolve()), "pid": os.getpid()}
            rundir.write_status(self.run_dir, status, {**identity, "step": int(self.run.state.step), **fields})

    def save(self, best: bool) -> Path:
        """Write the best copy (when `best`) and the step checkpoint, then rotate older ones away.

        The best copy goes first: a step checkpoint records the best loss so far,
        so one written before a crash that lost the best copy would make a resumed
        run believe that copy exists. The other way round, a resume starts from the
        step before, evaluates the same step again and rewrites the same best copy.
        """
        step = int(self.run.state.step)
        arrays = _state_arrays(self.run)  # a collective: every process takes part
        directory = rundir.checkpoints_dir(self.run_dir)
        path = checkpoint.step_path(directory, step)
        if self.is_main:
            payload = checkpoint.encode(arrays, self._metadata(step))
            if best:
                checkpoint.write_atomic(directory / rundir.BEST_FILE, payload)
            checkpoint.write_atomic(path, payload)
            checkpoint.rotate(directory, self.config.train.keep)
        self.run.last_checkpoint = path
        return path

    def _metadata(self, step: int) -> dict[str, Any]:
        return {
            "config": config_lib.to_dict(self.config),
            "vocab": self.corpus.vocab.chars,
            "corpus_sha": self.corpus.checksum,
            "step": step,
            "elapsed_s": self.run.elapsed_s,
            "val_loss": self.run.last_val_loss,
            "best_val_loss": self.run.best_val_loss,
            "chars_seen": step * self.config.train.batch_size * self.config.train.seq_len,
            "saved_at": time.time(),
        }

    def validate_and_save(self, eval_call, final: bool) -> None:
        run, train_config = self.run, self.config.train
        val_loss = train.evaluate(run.state.params, self.config.model, self.corpus.val_ids,
                                  train_config.eval_batch_size, eval_call=eval_call, placement=self.placement)
        if not math.isfinite(val_loss):  # finite training losses can still end in a model that scores inf
            raise self.diverged(int(run.state.step), "validation loss")
        run.last_val_loss = val_loss
        improved = run.best_val_loss is None or val_loss < run.best_val_loss
        if improved:
            run.best_val_loss = val_loss
        path = self.save(best=improved)
        step = int(run.state.step)
        self.log({"event": "eval", "step": step, "val_loss": val_loss, "val_bpc": bits(val_loss),
                  "chars_seen": step * train_config.batch_size * train_config.seq_len,
                  "elapsed_s": run.elapsed_s, "final": final})
        self.reporter.message(f"step {step}: val {val_loss:.4f} nats/char ({bits(val_loss):.3f} bits/char), "
                              f"saved {path.name}")

    def interrupted(self, step: int) -> None:
        number = self.stop.signal_number or signal.SIGTERM
        raise Interrupted(f"stopped by {signal.Signals(number).name} at step {step}; saved "
                          f"{self.run.last_checkpoint}; continue with: charrnn train --resume {self.run_dir}", number)

    def summary(self, step: int, wall_s: float, chars_per_s: float | None) -> dict[str, Any]:
        run = self.run
        return {
            "run_dir": str(self.run_dir),
            "status": rundir.FINISHED,
            "steps": step,
            "best_val_loss": run.best_val_loss,
            "best_val_bpc": bits(run.best_val_loss),
            "final_val_loss": run.last_val_loss,
            "final_val_bpc": bits(run.last_val_loss),
            "train_chars_per_s": chars_per_s,
            "wall_s": wall_s,
            "peak_rss_mb": peak_rss_mb(),
            "devices": self.placement.num_devices,
            "checkpoint": str(run.last_checkpoint),
        }

    def start(self, resumed) -> None:
        """Fresh parameters, or the resumed checkpoint's state, placed on the mesh."""
        config, placement = self.config, self.placement
        if resumed:
            path, arrays, metadata, skipped = resumed
            for problem in skipped:
                self.reporter.message(f"skipped a damaged checkpoint: {problem}")
            template = jax.eval_shape(lambda: train.init_state(jax.random.key(0), config.model, self.optimizer,
                                                               len(self.corpus.vocab)))
            carry_template = jax.eval_shape(lambda: model.initial_carry(template.params, config.model,
                                                                        config.train.batch_size))
            params = checkpoint.unflatten(template.params, "params", arrays)
            opt_state = checkpoint.unflatten(template.opt_state, "opt_state", arrays)
            carry = checkpoint.unflatten(carry_template, "carry", arrays)
            state = train.TrainState(params, opt_state, np.asarray(metadata["step"], np.int32))
            elapsed, best, last = float(metadata["elapsed_s"]), metadata.get("best_val_loss"), metadata.get("val_loss")
            self.reporter.message(f"resuming {self.run_dir} at step {metadata['step']}")
        else:
            key = jax.random.fold_in(jax.random.key(config.train.seed), 0)
            # Every process computes the same initial values from the seed.
            state = jax.device_get(train.init_state(key, config.model, self.optimizer, len(self.corpus.vocab)))
            carry = jax.device_get(model.initial_carry(state.params, config.model, config.train.batch_size))
            elapsed, best, last, path = 0.0, None, None, None
        self.run = RunState(distributed.put(state, placement.replicated),
                            distributed.put_streams(carry, placement, config.train.batch_size),
                            elapsed, best, last, path)


def run_training(corpus_path: Path, run_dir: Path, config_file: Path | None = None,
                 assignments: list[str] = (), options: dict | None = None, resume: bool = False,
                 reporter: Reporter | None = None, devices: int | None = None) -> dict[str, Any]:
    """Train into `run_dir` (new, or resumed from its newest checkpoint); return the run's summary."""
    try:
        return _run_training(corpus_path, run_dir, config_file, assignments, options, resume, reporter, devices)
    except jax.errors.JaxRuntimeError as error:
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


def _run_training(corpus_path: Path, run_dir: Path, config_file: Path | None, assignments, options: dict | None,
                  resume: bool, reporter: Reporter | None, devices: int | None) -> dict[str, Any]:
    config, corpus, resumed = prepare_run(corpus_path, run_dir, config_file, list(assignments), options or {}, resume)
    placement = distributed.make_placement(devices, config.train.batch_size,
                                           model.recurrent_step_macs(config.model, config.train.batch_size))
    reporter = (reporter or Reporter()) if placement.is_main else Reporter()
    if placement.is_main:
        rundir.prepare(run_dir)
    lock = rundir.RunLock(run_dir) if placement.is_main else contextlib.nullcontext()
    with lock, StopFlag() as stop:
        session = Session(config, corpus, run_dir, corpus_path, train.make_optimizer(config.train), placement,
                          reporter, stop)
        reporter.message(f"training on {corpus_path} ({len(corpus.train_ids):,} + {len(corpus.val_ids):,} characters, "
                         f"{len(corpus.vocab)} symbols) into {run_dir}, {placement.num_devices} device(s)")
        for line in config_lib.describe(config):
            reporter.message(line)
        if placement.is_main:
            rundir.write_json(run_dir / rundir.CONFIG_FILE, config_lib.to_dict(config))
        session.start(resumed)
        session.status(rundir.RUNNING, {})
        try:
            summary = Loop(session).run()
        except DivergedError:
            session.status(rundir.DIVERGED, {})
            raise
        except Interrupted:
            session.status(rundir.INTERRUPTED, {})
            raise
        session.status(rundir.FINISHED, summary)
        return summary
