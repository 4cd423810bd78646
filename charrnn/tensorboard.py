"""A listener that writes a run's training and validation figures as TensorBoard scalars, against the step.

Written with tensorboardX: the lightest maintained writer, needing neither TensorFlow nor PyTorch.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from types import SimpleNamespace

from charrnn.errors import StorageError, UsageError
from charrnn.events import Evaluated, Event, Logged, Stopped
from charrnn.units import bits


def tensorboardx() -> SimpleNamespace:
    """The parts of tensorboardX that write event files, or a UsageError naming the extra that brings them."""
    try:  # an optional extra: `charrnn` itself imports and runs without it
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar
    except ImportError:
        raise UsageError("TensorBoard logging needs the tensorboard extra: "
                         "pip install -e '.[tensorboard]'") from None
    return SimpleNamespace(EventsWriter=EventsWriter, Event=Event, SessionLog=SessionLog, scalar=scalar)


class TensorBoardWriter:
    """Write each log window and evaluation into an event file in `directory`; a listener of `charrnn.events`.

    Written in the caller's thread and flushed to disk at each evaluation, so a crash loses at most the windows
    since (tensorboardX's SummaryWriter hands its points to a thread, and its flush() leaves the queued ones behind).
    """

    def __init__(self, directory: Path | str, purge_step: int | None = None) -> None:
        """Open an event file in `directory`.

        A resumed run writes into the same directory again. Pass `purge_step` = the resumed checkpoint's
        step + 1: TensorBoard then hides the earlier files' points at that step or later, which the
        crashed or interrupted run wrote after its checkpoint, instead of drawing both runs over each other.
        """
        self.directory = Path(directory)
        self.tbx = tensorboardx()
        # tensorboardX names its file by the second it opens and opens it with "wb": a second writer here within
        # that second (a quick resume, runs sharing a folder) would empty the first's file. A nanosecond suffix
        # keeps every file, in the order they were opened.
        with self._storage():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.file = self.tbx.EventsWriter(str(self.directory / "events"), f".{time.time_ns()}")
        if purge_step is not None:
            restart = self.tbx.SessionLog(status=self.tbx.SessionLog.START)
            self._write(self.tbx.Event(step=purge_step, session_log=restart))

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
            with self._storage():
                self.file.flush()
        elif isinstance(event, Stopped):
            with self._storage():
                self.file.close()  # flushed first

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """Add one point to the curve `tag`, unless it is not finite."""
        # Skipped, not written: the Diverged event already says where a run diverged.
        if math.isfinite(value):
            self._write(self.tbx.Event(summary=self.tbx.scalar(tag, float(value)), step=step))

    def _write(self, event) -> None:
        event.wall_time = time.time()
        with self._storage():
            self.file.write_event(event)

    @contextlib.contextmanager
    def _storage(self):
        """An OSError here is the run directory's StorageError: a disk that fills stops the run with one line."""
        try:
            yield
        except OSError as error:
            raise StorageError(f"cannot write TensorBoard files to {self.directory}: {error.strerror}") from None
