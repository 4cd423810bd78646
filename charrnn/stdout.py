"""Standard output as a command's results need it: UTF-8 whatever the locale, and a quiet end when the reader leaves.

When `charrnn sample | head` closes the pipe, the next write raises BrokenPipeError
(a silent exit 1 under Typer, an internal error otherwise). Here the stream is pointed
at /dev/null, so the interpreter's last flush has somewhere to go, and `ReaderGone`
unwinds to `cli.main`, which exits 0: the reader had all it wanted.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator


class ReaderGone(Exception):
    """stdout's reader closed the pipe: the command has no one left to write for."""


class EndsWhenReaderLeaves:
    """A text stream that raises ReaderGone, not BrokenPipeError, once the reader has gone."""

    def __init__(self, stream):
        self._stream = stream

    @contextlib.contextmanager
    def _closed_pipe_ends_the_command(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            with contextlib.suppress(io.UnsupportedOperation, OSError):  # not every stream has a descriptor
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            raise ReaderGone from None

    def write(self, text: str) -> int:
        with self._closed_pipe_ends_the_command():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._closed_pipe_ends_the_command():
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def command_stdout() -> Iterator[None]:
    """Within the block, sys.stdout writes UTF-8 (LANG=C with a redirect would fail on "é") and ends with ReaderGone."""
    original = sys.stdout
    if hasattr(original, "reconfigure"):
        original.reconfigure(encoding="utf-8", errors="strict")
    sys.stdout = EndsWhenReaderLeaves(original)
    try:
        yield
    finally:
        sys.stdout = original
