"""A listener that writes a run's training and validation figures as TensorBoard scalars, against the step.

Written with tensorboardX: the lightest maintained writer, needing neither TensorFlow nor PyTorch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from charrnn.errors import StorageError, UsageError
from charrnn.events import Evaluated, Event, Logged, Stopped
from charrnn.units import bits


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, or a UsageError naming the extra that brings it."""
    try:  # an optional extra: `charrnn` itself imports and runs without it
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UsageError("TensorBoard logging needs the tensorboard extra: "
                         "pip install -e '.[tensorboard]'") from None
    return SummaryWriter


class TensorBoardWriter:
    """Write each log window and evaluation into event files in `directory`; a listener of `charrnn.events`."""

    def __init__(self, directory: Path | str, purge_step: int | None = None) -> None:
        """Open an event file in `directory`.

        A resumed run writes into the same directory again. Pass `purge_step` = the resumed checkpoint's
        step + 1: TensorBoard then hides the earlier files' points at that step or later, which the
        crashed or interrupted run wrote after its checkpoint, instead of drawing both runs over each other.
        """
        # tensorboardX names its file by the second it opens and opens it with "wb": a second writer here within
        # that second (a quick resume, runs sharing a folder) would empty the first's file. A nanosecond suffix
        # keeps every file, in the order they were opened.
        try:
            self.writer = summary_writer_class()(logdir=str(directory), purge_step=purge_step,
                                                 filename_suffix=f".{time.time_ns()}")
        except OSError as error:
            raise StorageError(f"cannot write TensorBoard files to {directory}: {error.strerror}") from None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Logged):
            self._scalar("train/loss", event.loss, event.step)
            self._scalar("train/bits_per_char", bits(event.loss), event.step)
            self._scalar("train/learning_rate", event.lr, event.step)
            self._scalar("train/grad_norm", event.grad_norm, event.step)
            if event.chars_per_s is not None:  # a window with no step in it has no speed
                self._scalar("train/chars_per_s", event.chars_per_s, event.step)
        elif isinstance(event, Evaluated):
            section = "val" if event.fraction == 1.0 else "val_part"  # a part's loss is not the whole's: a curve of its own
            self._scalar(f"{section}/loss", event.val_loss, event.step)
            self._scalar(f"{section}/bits_per_char", bits(event.val_loss), event.step)
            self.writer.flush()  # a crash loses at most the windows since (tensorboardX also flushes on a timer)
        elif isinstance(event, Stopped):
            self.writer.close()

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """Add one point to the curve `tag`, unless it is not finite."""
        # Skipped, not written: tensorboardX warns on stderr for each one, into the progress bar, and the
        # Diverged event already says where a run diverged.
        if math.isfinite(value):
            self.writer.add_scalar(tag, float(value), global_step=step)
