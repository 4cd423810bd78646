"""The step loop of a run: dispatch compiled calls, read metrics one call behind, evaluate, save, emit events."""

from __future__ import annotations

import functools
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from charrnn import calibration, checkpoint, config as config_lib, distributed, dropout, events, rundir, runtime, steps
from charrnn.config import Config
from charrnn.errors import DivergedError, Interrupted
from charrnn.events import Listener
from charrnn.task import Task
from charrnn.units import bits


@dataclass
class Clock:
    """Wall time of the run (across resumes) and of its steady training (no compile, no evaluation)."""

    start: float
    steady_from: tuple[int, float] | None = None  # (step, time) after the first call
    paused_s: float = 0.0  # evaluation, saving and compiling since steady_from
    window: tuple[int, float] = (0, 0.0)  # (step, time) where the current log window began

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def steady_chars_per_s(self, step: int, chars_per_step: int) -> float | None:
        """Training chars/s after the first call, or None where no step ran after it (a run of one call)."""
        if self.steady_from is None or step <= self.steady_from[0]:
            return None
        seconds = time.monotonic() - self.steady_from[1] - self.paused_s
        return (step - self.steady_from[0]) * chars_per_step / seconds if seconds > 0 else None


@dataclass
class LoopState:
    """What the loop carries between calls and what a checkpoint stores beside the arrays."""

    state: steps.TrainState
    carry: tuple
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_val_fraction: float = 1.0  # the share of the validation split that `last_val_loss` scored
    last_checkpoint: Path | None = None


@dataclass
class Loop:
    """One run's loop over optimizer steps; what happens is told to `emit`, and only process 0 writes files."""

    config: Config
    task: Task
    run_dir: Path
    placement: distributed.Placement
    optimizer: object
    progress: LoopState
    stop_signal: Callable[[], int | None]  # the signal that asked the run to stop, or None
    emit: Listener
    pending: list = field(default_factory=list)  # (first step, StepMetrics) of calls not yet read
    window: list = field(default_factory=list)  # (loss, grad_norm) of each step of the log window
    called: set = field(default_factory=set)  # (dropout or not, argument shapes) of the train calls made so far

    def __post_init__(self):
        train_config = self.config.train
        self.local_streams = self.placement.local_streams(train_config.batch_size)
        self.train_call = steps.compile_train_call(self.task.batch_loss, train_config, self.optimizer, self.placement)
        # Late dropout: calls that start before this step train without any dropout (the same steps, masks unused).
        self.dropout_from_step = dropout.first_step(self.config, self.task.steps_per_epoch)
        self.train_call_without_dropout = steps.compile_train_call(
            functools.partial(self.task.batch_loss, dropout=False), train_config, self.optimizer, self.placement)
        self.chars_per_step = self.task.chars_per_step
        self.budget_s = train_config.max_minutes * 60.0
        self.last_step = steps.last_step(train_config, self.task.steps_per_epoch)
        self.clock = Clock(time.monotonic() - self.progress.elapsed_s)

    def schedule_position(self, step: int, elapsed: float) -> float:
        """How far through the run: by steps (or epochs), or by the wall-clock budget if that is further."""
        by_steps = step / self.last_step
        return max(by_steps, elapsed / self.budget_s) if self.budget_s else by_steps

    def batches(self, step: int, count: int):
        """Minibatches of steps [step, step + count) for this process's streams, placed on the mesh."""
        return distributed.put_batches(self.task.batches(step, count, self.local_streams), self.placement)

    def diverged(self, step: int, what: str) -> DivergedError:
        """Report the divergence at `step`; the error names what went non-finite and the last checkpoint."""
        self.emit(events.Diverged(step))
        last = self.progress.last_checkpoint or "none (no checkpoint was saved yet)"
        return DivergedError(f"{what} became non-finite at step {step}; last good checkpoint: {last}")

    def drain(self, keep_last: int) -> None:
        """Read the metrics of finished calls, all but the newest `keep_last`; stop on divergence."""
        while len(self.pending) > keep_last:
            first_step, metrics = self.pending.pop(0)
            finite = np.asarray(metrics.finite)
            if not finite.all():
                raise self.diverged(first_step + int(np.argmin(finite)) + 1, "loss")
            self.window.extend(zip(np.asarray(metrics.loss).tolist(), np.asarray(metrics.grad_norm).tolist()))

    def log(self, step: int, lr: float) -> None:
        self.drain(keep_last=0)
        now = time.monotonic()
        window_step, window_time = self.clock.window
        loss, grad_norm = np.mean(self.window, axis=0).tolist() if self.window else (math.nan, math.nan)
        self.emit(events.Logged(
            step=step, loss=loss, lr=lr, grad_norm=grad_norm,
            chars_per_s=(step - window_step) * self.chars_per_step / max(now - window_time, 1e-9)
            if step > window_step else None,
            chars_seen=step * self.chars_per_step, elapsed_s=now - self.clock.start,
            val_loss=self.progress.last_val_loss))
        self.window.clear()
        self.clock.window = (step, now)

    def save(self, best: bool, host: tuple | None = None, temperatures: list[float] | None = None) -> Path:
        """Write the checkpoints of the current step (process 0); every process takes part in gathering them, or
        passes the (state, carry) `host` already gathered.

        With `train.calibration_fraction`, the checkpoint records the models' `temperatures`, fitted here where
        not given (`charrnn.calibration`).
        """
        progress, step = self.progress, int(self.progress.state.step)
        progress.elapsed_s = self.clock.elapsed()  # after any evaluation: a resume counts it against the budget
        if host is None:
            host = distributed.to_host((progress.state, progress.carry))
        path = checkpoint.step_path(rundir.checkpoints_dir(self.run_dir), step)
        if self.placement.is_main:
            if temperatures is None:
                temperatures = self.task.temperatures(host[0].model_params)
            metadata = {
                "config": config_lib.to_dict(self.config), **self.task.metadata(), "step": step,
                **({"temperatures": temperatures} if temperatures else {}),
                "elapsed_s": progress.elapsed_s,
                "val_loss": progress.last_val_loss, "val_fraction": progress.last_val_fraction,
                "best_val_loss": progress.best_val_loss,
                "chars_seen": step * self.chars_per_step, "saved_at": time.time(),
            }
            path = checkpoint.save(self.run_dir, step, checkpoint.training_arrays(*host), metadata, best,
                                   self.config.train.keep)
        progress.last_checkpoint = path
        return path

    def validate_and_save(self, final: bool) -> None:
        """Score the validation data and save: all of it at the end, its first `train.eval_fraction` before.

        Only a score of all of it can make a new best: a part's loss is not the whole's.
        """
        progress, step = self.progress, int(self.progress.state.step)
        fraction = 1.0 if final else self.config.train.eval_fraction
        host = distributed.to_host((progress.state, progress.carry))  # for the temperatures' fit and the save
        temperatures = self.task.temperatures(host[0].model_params)
        val_loss = self.task.validation_loss(calibration.apply(progress.state.model_params, temperatures),
                                             self.placement, fraction)
        if not math.isfinite(val_loss):  # finite training losses can still end in a model that scores inf
            raise self.diverged(step, "validation loss")
        progress.last_val_loss, progress.last_val_fraction = val_loss, fraction
        improved = fraction == 1.0 and (progress.best_val_loss is None or val_loss < progress.best_val_loss)
        if improved:
            progress.best_val_loss = val_loss
        path = self.save(best=improved, host=host, temperatures=temperatures)
        self.emit(events.Evaluated(step, val_loss, step * self.chars_per_step, progress.elapsed_s, final, path,
                                   improved, fraction))

    def pause_to_save(self, evaluate: bool, final: bool = False) -> None:
        """Save (after a validation pass when `evaluate`); the time is not counted as training."""
        self.drain(keep_last=0)
        began = time.monotonic()
        if evaluate:
            self.validate_and_save(final)
        else:
            self.emit(events.Saved(int(self.progress.state.step), self.save(best=False)))
        self.clock.paused_s += time.monotonic() - began
        self.clock.window = (int(self.progress.state.step), time.monotonic())

    def summary(self, step: int) -> events.Summary:
        progress = self.progress
        return events.Summary(
            run_dir=str(self.run_dir), status=rundir.FINISHED, steps=step,
            best_val_loss=progress.best_val_loss, best_val_bpc=bits(progress.best_val_loss),
            final_val_loss=progress.last_val_loss, final_val_bpc=bits(progress.last_val_loss),
            train_chars_per_s=self.clock.steady_chars_per_s(step, self.chars_per_step), wall_s=self.clock.elapsed(),
            peak_rss_mb=runtime.peak_rss_mb(), devices=self.placement.num_devices, checkpoint=str(progress.last_checkpoint))

    def run(self) -> events.Summary:
        """Train until the step count (or epochs), the budget or a signal ends the run; return the summary."""
        train_config = self.config.train
        step = int(self.progress.state.step)
        self.clock.window = (step, time.monotonic())
        last_eval_block, last_log_block = step // train_config.eval_every, step // train_config.log_every
        last_save_time = time.monotonic()
        stopping, last_lr = False, None
        while step < self.last_step:
            # Every process must take the same decisions, from process 0's clock and signals.
            elapsed, stopping = distributed.agree(np.array([self.clock.elapsed(), self.stop_signal() is not None]))
            if stopping or (self.budget_s and elapsed >= self.budget_s):
                break
            count = min(train_config.steps_per_call, self.last_step - step)
            lrs = np.array([steps.learning_rate(train_config, step + i, self.schedule_position(step + i, elapsed))
                            for i in range(count)], np.float32)
            progress = self.progress
            dropping = step >= self.dropout_from_step
            train_call = self.train_call if dropping else self.train_call_without_dropout
            batches = self.batches(step, count)
            shapes = (dropping, count, tuple(leaf.shape for leaf in jax.tree.leaves(batches)))
            # A steady call that compiles (an encoder–decoder's new lengths, a last shorter call) is left out of the
            # steady time, with nothing in flight so that no training goes untimed while it compiles.
            compiles = shapes not in self.called and self.clock.steady_from is not None
            self.called.add(shapes)
            if compiles:
                self.drain(keep_last=0)
            dispatched = time.monotonic()
            progress.state, progress.carry, metrics = train_call(
                progress.state, progress.carry, batches, distributed.put(lrs, self.placement.replicated))
            if compiles:
                self.clock.paused_s += time.monotonic() - dispatched
            self.pending.append((step, metrics))
            step += count
            last_lr = float(lrs[-1])
            self.drain(keep_last=1)  # one call stays in flight while the one before is checked
            if self.clock.steady_from is None:
                self.drain(keep_last=0)
                self.clock.steady_from = self.clock.window = (step, time.monotonic())
            if step // train_config.log_every > last_log_block or step == self.last_step:
                last_log_block = step // train_config.log_every
                self.log(step, last_lr)
            if step == self.last_step:  # evaluated and saved once, after the loop
                break
            if step // train_config.eval_every > last_eval_block:
                last_eval_block = step // train_config.eval_every
                self.pause_to_save(evaluate=True)
                last_save_time = time.monotonic()
            elif train_config.save_minutes and time.monotonic() - last_save_time >= train_config.save_minutes * 60:
                self.pause_to_save(evaluate=False)
                last_save_time = time.monotonic()

        self.drain(keep_last=0)
        if self.window:  # a signal or the budget ended the run inside a log window: its losses are logged too
            self.log(step, last_lr)
        if stopping:
            self.pause_to_save(evaluate=False)
            number = self.stop_signal() or signal.SIGTERM
            raise Interrupted(f"stopped by {signal.Signals(number).name} at step {step}; saved "
                              f"{self.progress.last_checkpoint}; continue with: charrnn train --resume {self.run_dir}",
                              number)
        self.pause_to_save(evaluate=True, final=True)
        return self.summary(step)
