"""One training run: check the input, set up or resume the run directory, train, checkpoint, stop cleanly."""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from charrnn import checkpoint, config as config_lib, data, model, rundir, train
from charrnn.config import Config
from charrnn.errors import EXIT_SIGINT, EXIT_SIGTERM, CharrnnError, CheckpointError, CorpusError, DivergedError, UsageError

LN2 = float(np.log(2.0))
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


def bits(nats: float | None) -> float | None:
    return None if nats is None else nats / LN2


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


def _metadata(config: Config, corpus: Corpus, run: RunState, step: int) -> dict[str, Any]:
    return {
        "config": config_lib.to_dict(config),
        "vocab": corpus.vocab.chars,
        "corpus_sha": corpus.checksum,
        "step": step,
        "elapsed_s": run.elapsed_s,
        "val_loss": run.last_val_loss,
        "best_val_loss": run.best_val_loss,
        "chars_seen": step * config.train.batch_size * config.train.seq_len,
        "saved_at": time.time(),
    }


def save(run_dir: Path, config: Config, corpus: Corpus, run: RunState, best: bool) -> Path:
    """Write the step checkpoint (and best copy), then rotate older ones away."""
    step = int(run.state.step)
    arrays = {
        **checkpoint.flatten(run.state.params, "params"),
        **checkpoint.flatten(run.state.opt_state, "opt_state"),
        **checkpoint.flatten(run.carry, "carry"),
    }
    payload = checkpoint.encode(arrays, _metadata(config, corpus, run, step))
    directory = rundir.checkpoints_dir(run_dir)
    path = checkpoint.step_path(directory, step)
    checkpoint.write_atomic(path, payload)
    if best:
        checkpoint.write_atomic(directory / rundir.BEST_FILE, payload)
    checkpoint.rotate(directory, config.train.keep)
    run.last_checkpoint = path
    return path


def restore(arrays: dict[str, np.ndarray], metadata: dict[str, Any], config: Config, corpus: Corpus,
            optimizer) -> RunState:
    template = jax.eval_shape(lambda: train.init_state(jax.random.key(0), config.model, optimizer, len(corpus.vocab)))
    params = checkpoint.unflatten(template.params, "params", arrays)
    opt_state = checkpoint.unflatten(template.opt_state, "opt_state", arrays)
    carry_template = jax.eval_shape(lambda: model.initial_carry(template.params, config.model, config.train.batch_size))
    carry = checkpoint.unflatten(carry_template, "carry", arrays)
    state = train.TrainState(params, opt_state, np.asarray(metadata["step"], np.int32))
    state, carry = jax.device_put((state, carry))
    return RunState(state, carry, float(metadata["elapsed_s"]), metadata.get("best_val_loss"), metadata.get("val_loss"))


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
        corpus = load_corpus(corpus_path, config.train.val_fraction, resuming=metadata)
        resumed = (path, arrays, metadata, skipped)
    else:
        config = config_lib.resolve(config_file, assignments, options)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"{run_dir} already exists; continue a run with --resume, or choose another --out")
        corpus = load_corpus(corpus_path, config.train.val_fraction)
        resumed = None
    data.stream_layout(len(corpus.train_ids), config.train.batch_size, config.train.seq_len)
    return config, corpus, resumed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_training(corpus_path: Path, run_dir: Path, config_file: Path | None = None,
                 assignments: list[str] = (), options: dict | None = None, resume: bool = False,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """Train into `run_dir` (new, or resumed from its newest checkpoint); return the run's summary."""
    reporter = reporter or Reporter()
    config, corpus, resumed = prepare_run(corpus_path, run_dir, config_file, list(assignments), options or {}, resume)
    rundir.prepare(run_dir)
    with rundir.RunLock(run_dir), StopFlag() as stop:
        reporter.message(f"training on {corpus_path} ({len(corpus.train_ids):,} + {len(corpus.val_ids):,} characters, "
                         f"{len(corpus.vocab)} symbols) into {run_dir}")
        for line in config_lib.describe(config):
            reporter.message(line)
        rundir.write_json(run_dir / rundir.CONFIG_FILE, config_lib.to_dict(config))
        optimizer = train.make_optimizer(config.train)
        if resumed:
            path, arrays, metadata, skipped = resumed
            for problem in skipped:
                reporter.message(f"skipped a damaged checkpoint: {problem}")
            run = restore(arrays, metadata, config, corpus, optimizer)
            run.last_checkpoint = path
            reporter.message(f"resuming {run_dir} at step {int(run.state.step)}")
        else:
            state = train.init_state(jax.random.fold_in(jax.random.key(config.train.seed), 0), config.model,
                                     optimizer, len(corpus.vocab))
            run = RunState(state, model.initial_carry(state.params, config.model, config.train.batch_size))
        identity = {"corpus": str(corpus_path.resolve()), "pid": os.getpid()}
        rundir.write_status(run_dir, rundir.RUNNING, {**identity, "step": int(run.state.step)})
        try:
            summary = _loop(config, corpus, run, run_dir, optimizer, stop, reporter)
        except DivergedError:
            rundir.write_status(run_dir, rundir.DIVERGED, {**identity, "step": int(run.state.step)})
            raise
        except Interrupted:
            rundir.write_status(run_dir, rundir.INTERRUPTED, {**identity, "step": int(run.state.step)})
            raise
        rundir.write_status(run_dir, rundir.FINISHED, {**identity, **summary})
        return summary


def _loop(config: Config, corpus: Corpus, run: RunState, run_dir: Path, optimizer, stop: StopFlag,
          reporter: Reporter) -> dict[str, Any]:
    model_config, train_config = config.model, config.train
    layout = data.stream_layout(len(corpus.train_ids), train_config.batch_size, train_config.seq_len)
    train_call = train.make_train_call(model_config, train_config, optimizer)
    eval_call = train.make_eval_call(model_config)
    metrics_log = rundir.MetricsLog(run_dir)
    chars_per_step = train_config.batch_size * train_config.seq_len
    budget_s = train_config.max_minutes * 60.0
    total = train_config.steps
    step = int(run.state.step)
    reporter.start(total, step, budget_s)

    clock_start = time.monotonic() - run.elapsed_s
    last_save_time = time.monotonic()
    pending: list[tuple[int, train.StepMetrics]] = []  # dispatched calls whose metrics are unread
    window_losses: list[float] = []
    window_start = (step, time.monotonic())
    steady: tuple[int, float] | None = None  # (step, time) after the first call: excludes compilation
    paused_s = 0.0  # time spent evaluating and saving since `steady`, not training

    def progress_at(at_step: int, elapsed: float) -> float:
        by_steps = at_step / total
        return max(by_steps, elapsed / budget_s) if budget_s else by_steps

    def validate_and_save(final: bool) -> None:
        nonlocal paused_s
        began = time.monotonic()
        val_loss = train.evaluate(run.state.params, model_config, corpus.val_ids, train_config.eval_batch_size,
                                  eval_call=eval_call)
        run.elapsed_s = time.monotonic() - clock_start
        run.last_val_loss = val_loss
        improved = run.best_val_loss is None or val_loss < run.best_val_loss
        if improved:
            run.best_val_loss = val_loss
        path = save(run_dir, config, corpus, run, best=improved)
        metrics_log.write({"event": "eval", "step": int(run.state.step), "val_loss": val_loss,
                           "val_bpc": bits(val_loss), "chars_seen": int(run.state.step) * chars_per_step,
                           "elapsed_s": run.elapsed_s, "final": final})
        reporter.message(f"step {int(run.state.step)}: val {val_loss:.4f} nats/char "
                         f"({bits(val_loss):.3f} bits/char), saved {path.name}")
        paused_s += time.monotonic() - began

    def drain(keep_last: int) -> None:
        """Read metrics of finished calls (all but the newest `keep_last`); stop on divergence."""
        while len(pending) > keep_last:
            first_step, metrics = pending.pop(0)
            finite = np.asarray(metrics.finite)
            losses = np.asarray(metrics.loss)
            if not finite.all():
                bad_step = first_step + int(np.argmin(finite)) + 1
                last = run.last_checkpoint or "none (no checkpoint was saved yet)"
                metrics_log.write({"event": "diverged", "step": bad_step})
                raise DivergedError(f"loss became non-finite at step {bad_step}; last good checkpoint: {last}")
            window_losses.extend(losses.tolist())

    last_eval_block = step // train_config.eval_every
    last_log_block = step // train_config.log_every
    while step < total and stop.signal_number is None:
        elapsed = time.monotonic() - clock_start
        if budget_s and elapsed >= budget_s:
            break
        count = min(train_config.steps_per_call, total - step)
        batches = data.stack_batches([
            data.training_batch(corpus.train_ids, layout, step + i, train_config.seed, train_config.random_offset)
            for i in range(count)
        ])
        lrs = np.array([train.learning_rate(train_config, step + i, progress_at(step + i, elapsed))
                        for i in range(count)], np.float32)
        run.state, run.carry, metrics = train_call(run.state, run.carry, batches, lrs)
        pending.append((step, metrics))
        step += count
        drain(keep_last=1)  # keeps one call in flight while checking the one before
        if steady is None:
            drain(keep_last=0)
            steady = (step, time.monotonic())
            window_start = steady

        if step // train_config.log_every > last_log_block or step == total:
            drain(keep_last=0)
            last_log_block = step // train_config.log_every
            now = time.monotonic()
            chars_per_s = (step - window_start[0]) * chars_per_step / max(now - window_start[1], 1e-9)
            train_loss = float(np.mean(window_losses)) if window_losses else float("nan")
            info = {"event": "train", "step": step, "loss": train_loss, "bpc": bits(train_loss),
                    "lr": float(lrs[-1]), "chars_per_s": chars_per_s, "chars_seen": step * chars_per_step,
                    "elapsed_s": now - clock_start, "val_loss": run.last_val_loss}
            metrics_log.write(info)
            reporter.progress(step, info)
            window_losses.clear()
            window_start = (step, now)

        if step // train_config.eval_every > last_eval_block and step < total:
            drain(keep_last=0)
            last_eval_block = step // train_config.eval_every
            validate_and_save(final=False)
            last_save_time = time.monotonic()
            window_start = (step, last_save_time)  # evaluation time is not training throughput
        elif train_config.save_minutes and time.monotonic() - last_save_time >= train_config.save_minutes * 60:
            drain(keep_last=0)
            run.elapsed_s = time.monotonic() - clock_start
            save(run_dir, config, corpus, run, best=False)
            last_save_time = time.monotonic()

    drain(keep_last=0)
    if stop.signal_number is not None:
        run.elapsed_s = time.monotonic() - clock_start
        path = save(run_dir, config, corpus, run, best=False)
        name = signal.Signals(stop.signal_number).name
        raise Interrupted(f"stopped by {name} at step {step}; saved {path}; continue with: "
                          f"charrnn train --resume {run_dir}", stop.signal_number)
    validate_and_save(final=True)
    wall_s = time.monotonic() - clock_start
    steady_chars = (step - steady[0]) * chars_per_step if steady else 0
    steady_s = time.monotonic() - steady[1] - paused_s if steady else 0.0
    return {
        "run_dir": str(run_dir),
        "status": rundir.FINISHED,
        "steps": step,
        "best_val_loss": run.best_val_loss,
        "best_val_bpc": bits(run.best_val_loss),
        "final_val_loss": run.last_val_loss,
        "final_val_bpc": bits(run.last_val_loss),
        "train_chars_per_s": steady_chars / steady_s if steady_s > 0 else None,
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
        "checkpoint": str(run.last_checkpoint),
    }
