"""What a training run reports as it goes: one event type per thing that happened, and its summary.

The loop emits events and holds no reference to whoever listens; the progress
bar, metrics.jsonl, status.json and TensorBoard each consume the same stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from charrnn.units import bits


@dataclass(frozen=True)
class Summary:
    """The result of `charrnn.train`: the same keys as `charrnn train`'s JSON line."""

    run_dir: str
    status: str  # "finished"
    steps: int
    best_val_loss: float | None  # nats/char
    best_val_bpc: float | None
    final_val_loss: float | None
    final_val_bpc: float | None
    train_chars_per_s: float | None  # steady training only: no compilation, no evaluation
    wall_s: float
    peak_rss_mb: float
    devices: int
    checkpoint: str  # the newest step checkpoint

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Started:
    run_dir: Path
    first_step: int  # 0, or the resumed checkpoint's step
    total_steps: int
    budget_s: float  # wall-clock budget, 0 = none


@dataclass(frozen=True)
class Message:
    """A line for a person: what is being trained, the resolved config, a damaged checkpoint skipped."""

    text: str


@dataclass(frozen=True)
class Logged:
    """The training figures of one log window."""

    step: int
    loss: float  # mean nats/char of the window's steps
    lr: float
    grad_norm: float  # mean global gradient norm before clipping
    chars_per_s: float | None  # None for a window with no step in it
    chars_seen: int
    elapsed_s: float
    val_loss: float | None  # the latest evaluation's

    def record(self) -> dict[str, Any]:
        return {"event": "train", "step": self.step, "loss": self.loss, "bpc": bits(self.loss), "lr": self.lr,
                "grad_norm": self.grad_norm, "chars_per_s": self.chars_per_s, "chars_seen": self.chars_seen,
                "elapsed_s": self.elapsed_s, "val_loss": self.val_loss}


@dataclass(frozen=True)
class Evaluated:
    step: int
    val_loss: float  # nats/char over the validation split, or over its first `fraction`
    chars_seen: int
    elapsed_s: float
    final: bool
    checkpoint: Path  # the step checkpoint saved with this evaluation
    best: bool  # a new best: best.safetensors holds these parameters
    fraction: float = 1.0  # the share of the validation split scored: train.eval_fraction before the final one

    def record(self) -> dict[str, Any]:
        return {"event": "eval", "step": self.step, "val_loss": self.val_loss, "val_bpc": bits(self.val_loss),
                "chars_seen": self.chars_seen, "elapsed_s": self.elapsed_s, "final": self.final,
                "fraction": self.fraction}


@dataclass(frozen=True)
class Saved:
    """A checkpoint written without an evaluation (time-based saves, a signal)."""

    step: int
    checkpoint: Path


@dataclass(frozen=True)
class Diverged:
    step: int  # the first step whose loss (or validation loss) was not finite

    def record(self) -> dict[str, Any]:
        return {"event": "diverged", "step": self.step}


@dataclass(frozen=True)
class Stopped:
    """The run ended: "finished" (with its summary), "interrupted" or "diverged"."""

    status: str
    step: int
    summary: Summary | None = None


Event = Started | Message | Logged | Evaluated | Saved | Diverged | Stopped
Listener = Callable[[Event], None]


def broadcast(listeners: list[Listener]) -> Listener:
    """One listener that passes each event to every one of `listeners`, in order."""
    def emit(event: Event) -> None:
        for listener in listeners:
            listener(event)

    return emit
