"""The step loop of a run: dispatch compiled calls, read metrics one call behind, log, evaluate, save."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charrnn import data, distributed, train
from charrnn.units import bits


@dataclass
class Clock:
    """Wall time of the run (across resumes) and of its steady training (no compile, no evaluation)."""

    start: float
    steady_from: tuple[int, float] | None = None  # (step, time) after the first call
    paused_s: float = 0.0  # evaluation and saving since steady_from
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
class Loop:
    """One run's loop over optimizer steps; `session` (runner.Session) owns files and state."""

    session: Any
    pending: list = field(default_factory=list)  # (first step, StepMetrics) of calls not yet read
    window_losses: list = field(default_factory=list)

    def __post_init__(self):
        session = self.session
        self.config, self.train_config = session.config, session.config.train
        self.layout = data.stream_layout(len(session.corpus.train_ids), self.train_config.batch_size,
                                         self.train_config.seq_len)
        self.local_streams = session.placement.local_streams(self.train_config.batch_size)
        self.train_call = train.make_train_call(self.config.model, self.train_config, session.optimizer,
                                                session.placement)
        self.eval_call = train.make_eval_call(self.config.model)
        self.chars_per_step = self.train_config.batch_size * self.train_config.seq_len
        self.budget_s = self.train_config.max_minutes * 60.0
        self.clock = Clock(time.monotonic() - session.run.elapsed_s)

    def progress(self, step: int, elapsed: float) -> float:
        """How far through the run: by steps, or by the wall-clock budget if that is further."""
        by_steps = step / self.train_config.steps
        return max(by_steps, elapsed / self.budget_s) if self.budget_s else by_steps

    def batches(self, step: int, count: int) -> data.Batch:
        """Minibatches of steps [step, step + count) for this process's streams, placed on the mesh."""
        config, placement = self.train_config, self.session.placement
        stacked = data.stack_batches([
            data.training_batch(self.session.corpus.train_ids, self.layout, step + i, config.seed,
                                config.random_offset, self.local_streams)
            for i in range(count)
        ])
        return distributed.put_batches(stacked, placement)

    def drain(self, keep_last: int) -> None:
        """Read the metrics of finished calls, all but the newest `keep_last`; stop on divergence."""
        while len(self.pending) > keep_last:
            first_step, metrics = self.pending.pop(0)
            finite = np.asarray(metrics.finite)
            if not finite.all():
                raise self.session.diverged(first_step + int(np.argmin(finite)) + 1, "loss")
            self.window_losses.extend(np.asarray(metrics.loss).tolist())

    def log(self, step: int, lr: float) -> None:
        self.drain(keep_last=0)
        now = time.monotonic()
        window_step, window_time = self.clock.window
        loss = float(np.mean(self.window_losses)) if self.window_losses else float("nan")
        info = {"event": "train", "step": step, "loss": loss, "bpc": bits(loss), "lr": lr,
                # None for a window with no step in it (a log just after the first, compiling call).
                "chars_per_s": (step - window_step) * self.chars_per_step / max(now - window_time, 1e-9)
                if step > window_step else None,
                "chars_seen": step * self.chars_per_step, "elapsed_s": now - self.clock.start,
                "val_loss": self.session.run.last_val_loss}
        self.session.log(info)
        self.session.reporter.progress(step, info)
        self.window_losses.clear()
        self.clock.window = (step, now)

    def checkpoint(self, evaluate: bool, final: bool = False) -> None:
        """Save (after a validation pass when `evaluate`); the time is not counted as training."""
        self.drain(keep_last=0)
        began = time.monotonic()
        self.session.run.elapsed_s = self.clock.elapsed()
        if evaluate:
            self.session.validate_and_save(self.eval_call, final)
        else:
            self.session.save(best=False)
        self.clock.paused_s += time.monotonic() - began
        self.clock.window = (int(self.session.run.state.step), time.monotonic())

    def run(self) -> dict[str, Any]:
        """Train until the step count, the budget or a signal ends the run; return the summary."""
        session, config = self.session, self.train_config
        step = int(session.run.state.step)
        session.reporter.start(config.steps, step, self.budget_s)
        self.clock.window = (step, time.monotonic())
        last_eval_block, last_log_block = step // config.eval_every, step // config.log_every
        last_save_time = time.monotonic()
        stopping, last_lr = False, None
        while step < config.steps:
            # Every process must take the same decisions, from process 0's clock and signals.
            elapsed, stopping = distributed.agree(np.array([self.clock.elapsed(), session.stop_requested()]))
            if stopping or (self.budget_s and elapsed >= self.budget_s):
                break
            count = min(config.steps_per_call, config.steps - step)
            lrs = np.array([train.learning_rate(config, step + i, self.progress(step + i, elapsed))
                            for i in range(count)], np.float32)
            batches = self.batches(step, count)
            run = session.run
            run.state, run.carry, metrics = self.train_call(
                run.state, run.carry, batches, distributed.put(lrs, session.placement.replicated))
            self.pending.append((step, metrics))
            step += count
            last_lr = float(lrs[-1])
            self.drain(keep_last=1)  # one call stays in flight while the one before is checked
            if self.clock.steady_from is None:
                self.drain(keep_last=0)
                self.clock.steady_from = self.clock.window = (step, time.monotonic())
            if step // config.log_every > last_log_block or step == config.steps:
                last_log_block = step // config.log_every
                self.log(step, last_lr)
            if step // config.eval_every > last_eval_block and step < config.steps:
                last_eval_block = step // config.eval_every
                self.checkpoint(evaluate=True)
                last_save_time = time.monotonic()
            elif config.save_minutes and time.monotonic() - last_save_time >= config.save_minutes * 60:
                self.checkpoint(evaluate=False)
                last_save_time = time.monotonic()

        self.drain(keep_last=0)
        if self.window_losses:  # a signal or the budget ended the run inside a log window: its losses are logged too
            self.log(step, last_lr)
        if stopping:
            self.checkpoint(evaluate=False)
            session.interrupted(step)
        self.checkpoint(evaluate=True, final=True)
        return session.summary(step, self.clock.elapsed(), self.clock.steady_chars_per_s(step, self.chars_per_step))
